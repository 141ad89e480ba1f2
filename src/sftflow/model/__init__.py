"""Model: resolve names, load tokenizer/model, quantize, attach adapters."""
