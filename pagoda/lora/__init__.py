"""LoRA adapters: PEFT loading, slot weights on the linear layers, kernels."""
