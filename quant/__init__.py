"""Hugging Face model directories in and out, and 4-bit (QLoRA) loading and saving, without `from_pretrained`.

    load_model(path, quant="nf4", ...)   a model directory -> model with bnb Linear4bit layers (load.py)
    save_quantized(model, path, ...)     -> pre-quantized checkpoint transformers can read (save.py)
    dequantize(module)                   -> fp32 dense weight of a Linear or Linear4bit (linear4bit.py)
    read_config, checkpoint_files, ...   reading a model directory; ShardWriter, staged_dir, ...
                                         writing one whole or not at all; the tokenizer (model_dir.py)
"""

from .experts import LinearExperts, checkpoint_key, module_key
from .linear4bit import dequantize
from .load import SKIP, empty_model, load_model, quantize_weight, quantized_modules
from .model_dir import (
    DTYPES,
    INDEX,
    MAX_SHARD_BYTES,
    TMP_PREFIX,
    TOKENIZER_FILES,
    ShardWriter,
    checkpoint_files,
    checkpoint_shapes,
    check_model_dir,
    copy_tokenizer,
    load_tokenizer,
    open_checkpoint,
    parse_size,
    read_config,
    read_tensor,
    remove_dir,
    staged_dir,
    swap_in,
    tokenizer_source,
    write_text_atomic,
)
from .save import save_quantized, write_model

__all__ = [
    "DTYPES", "INDEX", "MAX_SHARD_BYTES", "SKIP", "TMP_PREFIX", "TOKENIZER_FILES", "LinearExperts", "ShardWriter",
    "check_model_dir", "checkpoint_files", "checkpoint_key", "checkpoint_shapes", "copy_tokenizer", "dequantize",
    "empty_model", "load_model", "load_tokenizer", "module_key", "open_checkpoint", "parse_size",
    "quantize_weight", "quantized_modules", "read_config", "read_tensor", "remove_dir", "save_quantized",
    "staged_dir", "swap_in", "tokenizer_source", "write_model", "write_text_atomic",
]
