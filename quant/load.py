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

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rawqlora.errors import BadInput

from .experts import module_key, unfuse_experts
from .linear4bit import Linear4bit, bnb, keep_standard_layout
from .model_dir import checkpoint_files, checkpoint_shapes, open_checkpoint, read_config, read_tensor

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # QLoRA's choice, and bitsandbytes' and transformers' default
SKIP = ("lm_head",)  # kept dense by default: QLoRA's recipe, and transformers' for bnb 4-bit


def load_model(
    path,
    quant="nf4",
    double_quant=True,
    compute_dtype=torch.bfloat16,
    device=None,
    skip=SKIP,
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
    keys = {file: checkpoint_shapes(file) for file in files}  # headers only: catches truncation early

    stored = getattr(config, "quantization_config", None)
    if stored is not None:
        quant = prequantized_type(path, stored, quant)

    model = empty_model(config, compute_dtype, trust_remote_code)
    if stored is not None:
        # Exactly the Linears whose weight carries a quantization state are 4-bit.
        stats = {k for ks in keys.values() for k in ks if ".weight.quant_state." in k}
        to_4bit(model, {module_key(config.model_type, k.split(".weight.")[0]) for k in stats},
                quant, double_quant, compute_dtype)
    elif quant is not None:
        to_4bit(model, quantized_modules(model, skip), quant, double_quant, compute_dtype)

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


def empty_model(config, dtype=None, trust_remote_code=False):
    """The model of `config` on the meta device, Mixtral's experts unfused (quant/experts.py).

    The module tree without memory or random init, which for a 7B model would otherwise
    cost minutes and the model's full size: the names LoRA targets resolve to, the Linears
    `load_model` quantizes, the shapes its parameters will get.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        unfuse_experts(model)
    return model


def quantized_modules(model, skip=SKIP):
    """Names of the Linears `load_model` makes 4-bit: every `nn.Linear` but `skip` (module names
    or dotted parts of names) and a head tied to the input embedding, whose weight is the embedding's."""
    tied_head = model.get_output_embeddings() if model.config.tie_word_embeddings else None
    return {
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and m is not tied_head and not any(f".{s}." in f".{name}." for s in skip)
    }


def new_linear4bit(in_features, out_features, bias, quant, double_quant, compute_dtype):
    """An empty `Linear4bit` on the meta device, with the settings `load_model` uses."""
    with torch.device("meta"):
        layer = Linear4bit(
            in_features,
            out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant,
            quant_storage=torch.uint8,
        )
    layer.weight.blocksize = BLOCKSIZE
    keep_standard_layout(layer)  # the same 4-bit layout on every CPU (quant/linear4bit.py)
    return layer.requires_grad_(False)


def to_4bit(model, names, quant, double_quant, compute_dtype):
    """Swap each `nn.Linear` of `model` named in `names` for an (empty, meta) `Linear4bit`."""
    for name, module in list(model.named_modules()):
        if name in names and type(module) is nn.Linear:
            new = new_linear4bit(module.in_features, module.out_features, module.bias is not None,
                                 quant, double_quant, compute_dtype)
            model.set_submodule(name, new)


def set_4bit_weight(module, weight):
    """Quantize `weight` [out, in] (in the compute dtype, on its device) into the `Linear4bit` `module`.

    Params4bit.to(device) is where bitsandbytes quantizes (blockwise absmax, 4-bit codes).
    """
    old = module.weight
    module.weight = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
        module=module,
    ).to(weight.device)
    return module


def quantize_weight(weight, quant, double_quant):
    """`weight` [out, in] as a `Linear4bit` exactly as `load_model` makes it: the same settings and
    steps, so `dequantize` of it is the weight a model loaded in 4-bit multiplies with."""
    layer = new_linear4bit(weight.shape[1], weight.shape[0], False, quant, double_quant, weight.dtype)
    return set_4bit_weight(layer, weight)


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
        set_4bit_weight(module, tensor)
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
