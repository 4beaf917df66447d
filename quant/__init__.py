"""4-bit (QLoRA) loading and saving of Hugging Face causal LMs, without `from_pretrained`.

    load_model(path, quant="nf4", ...)  a model directory -> model with bnb Linear4bit layers
    save_quantized(model, path, ...)    -> pre-quantized checkpoint transformers can read
    dequantize(module)                  -> fp32 dense weight of a Linear or Linear4bit
"""

from .experts import LinearExperts, checkpoint_key, module_key
from .linear4bit import dequantize
from .load import load_model
from .save import save_quantized

__all__ = ["LinearExperts", "checkpoint_key", "dequantize", "load_model", "module_key", "save_quantized"]
