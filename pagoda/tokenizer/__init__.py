"""pagoda.tokenizer."""
