"""Write a 4-bit model as the pre-quantized checkpoint transformers + bitsandbytes read.

Each `Linear4bit` is stored as its state dict gives it: `<name>.weight` (packed uint8,
two 4-bit codes a byte) and the `QuantState.as_dict(packed=True)` entries beside it,
`weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`
and `weight.quant_state.bitsandbytes__nf4` (the non-tensor fields, JSON packed into a
uint8 tensor). Names are the checkpoint's own (Mixtral back to `block_sparse_moe`), and
config.json gets the `quantization_config` transformers writes for a bnb 4-bit model.
"""

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rawqlora.errors import BadInput

from .experts import checkpoint_key
from .linear4bit import Linear4bit
from .load import INDEX

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default: files a hub upload and most filesystems take
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "generation_config.json",  # not the tokenizer's, but generation defaults belong with it
)


def save_quantized(model, path, tokenizer_source=None, overwrite=False, max_shard_bytes=MAX_SHARD_BYTES):
    """Save `model` (loaded by `load_model` with quant "nf4"/"fp4") to the new directory `path`.

    The directory appears complete or not at all: everything is written to a temporary
    directory beside it, which is then renamed. Tokenizer files are copied from the
    directory `tokenizer_source` when given.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{path} exists and is not a directory: choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BadInput(f"{path} is not empty: choose a new directory or pass overwrite=True")
    if tokenizer_source is not None and not Path(tokenizer_source).is_dir():
        raise BadInput(f"tokenizer source {tokenizer_source} is not a directory")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise BadInput("the model has no 4-bit layers: save a dense model with save_pretrained")

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
    tmp.mkdir(parents=True)
    try:
        write_weights(model, tmp, max_shard_bytes)
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config(model, layers[0])
        config.save_pretrained(tmp)  # config.json exactly as transformers writes it
        if tokenizer_source is not None:
            copy_tokenizer(Path(tokenizer_source), tmp)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def write_weights(model, out, max_shard_bytes):
    """The state dict, in checkpoint names, as `model.safetensors` or shards plus an index.

    Shards are planned from tensor sizes first, then copied to the host and written one
    at a time, so host memory holds one shard, not the model.
    """
    model_type = model.config.model_type
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # The head is the input embedding; transformers stores it once and re-ties on load.
        head = model.get_output_embeddings()
        state.pop(next(n for n, m in model.named_modules() if m is head) + ".weight")
    shards, size, total = [[]], 0, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for names, file in zip(shards, files):
        # Plain CPU tensors with storage of their own: safetensors refuses shared storage
        # (transformers' tied weights, bitsandbytes' shared 4-bit code tables).
        tensors = {
            checkpoint_key(model_type, n): state[n].detach().as_subclass(torch.Tensor).to("cpu", copy=True)
            for n in names
        }
        save_file(tensors, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(source, out):
    files = [f for pattern in TOKENIZER_FILES for f in source.glob(pattern) if f.is_file()]
    if not any(f.name.startswith("tokenizer") for f in files):
        raise BadInput(f"tokenizer source {source} has no tokenizer files: give the base model's directory")
    for f in files:
        shutil.copy2(f, out / f.name)


def replace_dir(tmp, path):
    """Move the finished directory `tmp` to `path`, putting an old `path` aside until done."""
    if path.is_dir() and any(path.iterdir()):
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)  # an empty directory may be replaced by rename
