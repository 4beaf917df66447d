"""Load a Hugging Face causal LM with its Linear layers in 4-bit, one tensor at a time.

    config.json ──> model on the meta device (no memory, no random init)
                      │  fused Mixtral experts -> LinearExperts (quant/experts.py)
                      │  nn.Linear -> bnb Linear4bit, except `skip`
    *.safetensors ──> one tensor at a time: a view of the memory-mapped file, copied to
                      `device` in compute_dtype, quantized there if its module is 4-bit

The mapped file is page cache the kernel can drop; what the loader allocates is the model
built so far plus the tensor in flight. So host memory peaks near the largest tensor, and
device memory near the final 4-bit model. A directory written by `save_quantized` is read
back as stored (packed 4-bit data + quantization state), without quantizing again.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from rawqlora.errors import BadInput

from .experts import module_key, unfuse_experts
from .linear4bit import Linear4bit, bnb, keep_standard_layout

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # QLoRA's choice, and bitsandbytes' and transformers' default
INDEX = "model.safetensors.index.json"


def load_model(
    path,
    quant="nf4",
    double_quant=True,
    compute_dtype=torch.bfloat16,
    device=None,
    skip=("lm_head",),
    trust_remote_code=False,
):
    """A causal LM from the directory `path`, its Linear layers in 4-bit, the rest in `compute_dtype`.

    quant: "nf4" (QLoRA's), "fp4", or None / "none" for the plain model in `compute_dtype`.
    double_quant: also quantize the per-block scales (saves ~0.37 bit per weight).
    skip: module names (or dotted parts of names) to keep dense; the output head by default.
    device: None -> CUDA when available, else CPU.
    A directory written by `save_quantized` loads as stored, with its own 4-bit settings
    (`quant` must name its type; `double_quant` and `skip` are not used).
    Returns the model in eval mode, as `from_pretrained` does; dense parameters keep
    requires_grad=True as there, 4-bit weights are frozen.
    """
    path = Path(path)
    quant = None if quant in (None, "none") else quant
    if quant not in (None, *QUANT_TYPES):
        raise BadInput(f"unknown quant {quant!r}: use 'nf4', 'fp4' or None")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = read_config(path, trust_remote_code)
    files = checkpoint_files(path)
    keys = {file: checkpoint_keys(file) for file in files}  # headers only: catches truncation early

    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        quant = prequantized_type(path, stored, quant)

    # Building on the meta device allocates nothing and skips the random init, which
    # for a 7B model would otherwise cost minutes and the model's full size in memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=compute_dtype, trust_remote_code=trust_remote_code
        )
        unfuse_experts(model)
        if stored is not None:
            # Exactly the Linears whose weight carries a quantization state are 4-bit.
            stats = {k for ks in keys.values() for k in ks if ".weight.quant_state." in k}
            names = {module_key(config.model_type, k.split(".weight.")[0]) for k in stats}
            to_4bit(model, lambda name: name in names, quant, double_quant, compute_dtype)
        elif quant is not None:
            to_4bit(model, lambda name: not skipped(name, skip), quant, double_quant, compute_dtype)

    prequantized = {}  # module name -> {"weight": packed, "absmax": ..., ...}
    for file, file_keys in keys.items():
        with open_checkpoint(file) as f:
            for key in file_keys:
                name = module_key(config.model_type, key)
                if name.endswith("rotary_emb.inv_freq"):  # legacy checkpoints store this buffer
                    continue
                tensor = read_tensor(f, file, key)
                if stored is not None and is_quant_stat(model, name):
                    owner, _, stat = name.partition(".weight")
                    stat = stat.lstrip(".") or "weight"
                    prequantized.setdefault(owner, {})[stat] = tensor.to(device, copy=True)  # own memory, not the map
                else:
                    place(model, name, tensor, device, compute_dtype, path)

    for owner, stats in prequantized.items():
        module = model.get_submodule(owner)
        packed = stats.pop("weight", None)
        if packed is None:
            continue  # statistics without data: reported as a missing weight below
        module.weight = bnb.nn.Params4bit.from_prequantized(
            packed, stats, requires_grad=False, device=device, module=module
        )

    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # loading replaced the input embedding; re-point the head at it
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise BadInput(
            f"{path} has no weights for {len(missing)} parameters (first: {missing[0]}): "
            "the checkpoint does not match its config.json"
        )
    rebuild_computed_buffers(model, device)
    return model.eval()


# ---------------------------------------------------------------- checking the directory


def checkpoint_files(path):
    """The safetensors files of the model directory `path`, after checking they are all there."""
    index = path / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise BadInput(f"{index} is not a valid safetensors index ({e}): re-download the model") from e
        for shard in shards:
            if not (path / shard).is_file():
                raise BadInput(f"{path} lacks shard {shard} listed in {INDEX}: re-download the model")
        return [path / shard for shard in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if len(files) > 1:
        raise BadInput(f"{path} has several *.safetensors files but no {INDEX}: re-download the model")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise BadInput(
            f"{path} has only PyTorch pickle weights (.bin/.pt), which rawqlora never reads because "
            "unpickling can run code: convert them to safetensors with save_pretrained"
        )
    raise BadInput(f"{path} has no *.safetensors weights: give a directory with the model's weights")


def open_checkpoint(file):
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise BadInput(f"{file} is truncated or corrupted ({e}): re-download it") from e


def checkpoint_keys(file):
    """The tensor names in `file`. Opening parses the header, which must cover the file exactly."""
    with open_checkpoint(file) as f:
        return list(f.keys())


def read_tensor(f, file, key):
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise BadInput(f"{file} is truncated or corrupted (reading {key}: {e}): re-download it") from e


def read_config(path, trust_remote_code):
    if not path.exists():
        raise BadInput(f"model path {path} does not exist: give a local Hugging Face model directory")
    if not path.is_dir():
        raise BadInput(f"model path {path} is not a directory: give the directory holding config.json")
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise BadInput(f"{path / 'config.json'} is not a valid JSON object ({e})") from e
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        if "auto_map" in (path / "config.json").read_text() and not trust_remote_code:
            raise BadInput(
                f"{path}: model_type {model_type!r} needs the model's own code (auto_map in config.json), "
                "which runs only with --trust-remote-code: pass it if you trust where the model came from"
            ) from e
        raise BadInput(
            f"{path}: model_type {model_type!r} is not an architecture transformers knows: "
            "upgrade transformers or pick a supported model"
        ) from e
    if type(config) not in AutoModelForCausalLM._model_mapping and not trust_remote_code:
        raise BadInput(
            f"{path}: model_type {model_type!r} has no causal-LM class in transformers: "
            "rawqlora fine-tunes decoder-only language models"
        )
    return config


def prequantized_type(path, stored, quant):
    """The 4-bit type of a `save_quantized` directory; its own settings win over the arguments."""
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    if stored.get("quant_method") != "bitsandbytes" or not stored.get("load_in_4bit"):
        raise BadInput(f"{path} is quantized as {stored.get('quant_method')!r}: only bitsandbytes 4-bit loads")
    kind = stored.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default
    if quant != kind:
        raise BadInput(f"{path} already holds {kind} weights: load it with quant={kind!r}")
    return kind


# ---------------------------------------------------------------- building the model


def skipped(name, skip):
    """Whether module `name` stays dense: some entry of `skip` is a whole dotted part of it."""
    return any(f".{s}." in f".{name}." for s in skip)


def to_4bit(model, wanted, quant, double_quant, compute_dtype):
    """Swap each `nn.Linear` whose name passes `wanted` for an (empty, meta) `Linear4bit`."""
    # A head tied to the input embedding shares its weight, which must stay an embedding.
    tied_head = model.get_output_embeddings() if model.config.tie_word_embeddings else None
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not wanted(name) or module is tied_head:
            continue
        new = Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant,
            quant_storage=torch.uint8,
        )
        new.weight.blocksize = BLOCKSIZE
        keep_standard_layout(new)  # the same 4-bit layout on every CPU (quant/linear4bit.py)
        new.requires_grad_(False)
        model.set_submodule(name, new)


def is_quant_stat(model, name):
    """Whether tensor `name` is a Linear4bit's packed weight or one of its statistics (`weight.absmax`...)."""
    owner, sep, _ = name.partition(".weight")
    try:
        return bool(sep) and isinstance(model.get_submodule(owner), Linear4bit)
    except AttributeError:
        return False


def place(model, name, tensor, device, compute_dtype, path):
    """Put checkpoint tensor `name` into the model, on `device`, quantizing 4-bit weights."""
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        module = None
    if module is None or (attr not in module._parameters and attr not in module._buffers):
        raise BadInput(f"{path} has a weight {name} that the model has no place for: config.json does not match")
    expected = getattr(module, attr).shape
    if isinstance(module, Linear4bit) and attr == "weight":
        expected = (module.out_features, module.in_features)
    if tensor.shape != expected:
        raise BadInput(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected)}")
    # safetensors hands out views of its memory map of the file: copy=True makes the model
    # own its memory even when device and dtype already match. Floats are cast before
    # quantizing, so the 4-bit state dequantizes straight to compute_dtype.
    dtype = compute_dtype if tensor.is_floating_point() else tensor.dtype
    tensor = tensor.to(device=device, dtype=dtype, copy=True)
    if isinstance(module, Linear4bit) and attr == "weight":
        old = module.weight
        # Params4bit.to(device) is where bitsandbytes quantizes (blockwise absmax, 4-bit codes).
        module.weight = bnb.nn.Params4bit(
            tensor,
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        ).to(device)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        requires_grad = module._parameters[attr].requires_grad
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())


def rebuild_computed_buffers(model, device):
    """Recompute the buffers that no checkpoint stores (rotary `inv_freq`), left empty on meta.

    A rotary embedding computes them from the config in its constructor, so we run that
    constructor again, on the CPU in fp32 as `from_pretrained` does, and move the result.
    """
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if not hasattr(module, "original_inv_freq"):  # transformers' own test for a rotary embedding
            raise BadInput(
                f"{type(module).__name__} ({name}) has computed buffers rawqlora cannot rebuild: "
                "this architecture is not supported"
            )
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        model.set_submodule(name, fresh.to(device))
