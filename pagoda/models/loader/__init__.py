"""Reading checkpoints into models: safetensors, GGUF, dummy weights, tokenizers."""
