"""Shared pieces of rawqlora that are neither LoRA (lora/) nor quantization (quant/)."""
