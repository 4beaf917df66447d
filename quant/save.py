"""Write a 4-bit model as the pre-quantized checkpoint transformers + bitsandbytes read.

Each `Linear4bit` is stored as its state dict gives it: `<name>.weight` (packed uint8,
two 4-bit codes a byte) and the `QuantState.as_dict(packed=True)` entries beside it,
`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`
and `weight.quant_state.bitsandbytes__nf4` (the non-tensor fields, JSON packed into a
uint8 tensor). Names are the checkpoint's own (Mixtral back to `block_sparse_moe`), and
config.json gets the `quantization_config` transformers writes for a bnb 4-bit model.
"""

import copy
from pathlib import Path

from torch import nn

from rawqlora.errors import BadInput

from .experts import checkpoint_key
from .linear4bit import Linear4bit
from .model_dir import MAX_SHARD_BYTES, ShardWriter, copy_tokenizer, staged_dir


def save_quantized(model, path, tokenizer_source=None, overwrite=False, max_shard_bytes=MAX_SHARD_BYTES):
    """Save `model` (loaded by `load_model` with quant "nf4"/"fp4") to the new directory `path`.

    The directory appears complete or not at all (`staged_dir`). Tokenizer files are copied
    from the directory `tokenizer_source` when given.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise BadInput("the model has no 4-bit layers: save a dense model with save_pretrained")
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(model, layers[0])
    write_model(model, path, config, tokenizer_source, overwrite, max_shard_bytes)


def write_model(model, path, config, tokenizer_source=None, overwrite=False, max_shard_bytes=MAX_SHARD_BYTES):
    """`model`'s weights with `config` (and the tokenizer of `tokenizer_source`) as the new model directory `path`."""
    if tokenizer_source is not None and not Path(tokenizer_source).is_dir():
        raise BadInput(f"tokenizer source {tokenizer_source} is not a directory")
    with staged_dir(path, overwrite) as tmp:
        write_weights(model, tmp, max_shard_bytes)
        config.save_pretrained(tmp)  # config.json exactly as transformers writes it
        if tokenizer_source is not None:
            copy_tokenizer(tokenizer_source, tmp)


def write_weights(model, out, max_shard_bytes=MAX_SHARD_BYTES):
    """The state dict, in checkpoint names, as `model.safetensors` or shards plus an index.

    Tensors are copied to the host one at a time by the `ShardWriter`, which holds one file's
    worth: host memory holds one shard, not the model. Returns the number of files.
    """
    model_type = model.config.model_type
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # The head is the input embedding; transformers stores it once and re-ties on load.
        head = model.get_output_embeddings()
        state.pop(next(n for n, m in model.named_modules() if m is head) + ".weight")
    writer = ShardWriter(out, max_shard_bytes)
    for name, tensor in state.items():
        writer.add(checkpoint_key(model_type, name), tensor)
    return writer.close()


def quantization_config(model, layer):
    """The `quantization_config` transformers writes for bnb 4-bit (`BitsAndBytesConfig.to_dict()`)."""
    model_type = model.config.model_type
    dense = [checkpoint_key(model_type, n) for n, m in model.named_modules() if type(m) is nn.Linear]
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": dense,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": layer.weight.quant_type,
        "bnb_4bit_use_double_quant": layer.weight.quant_state.nested,
        "bnb_4bit_compute_dtype": str(layer.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
