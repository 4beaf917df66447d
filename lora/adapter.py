"""Save and load LoRA adapters in PEFT's on-disk format, so PEFT and we read each other's.

An adapter directory holds two files:
  adapter_config.json        a LoraConfig: r, lora_alpha, target_modules, ...
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight  [r, in]
                             base_model.model.<module>.lora_B.weight  [out, r]
                             base_model.model.<module>.<param>        (modules_to_save, whole)

`base_model.model.` is the path PEFT's wrappers (PeftModelForCausalLM -> LoraModel) add in
front of the transformers model; PEFT strips its in-memory adapter name (`lora_A.default`)
and the `modules_to_save.default` wrapper before writing.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora.inject import inject, lora_modules, resolve_targets
from quant import staged_dir
from rawqlora.errors import BadInput

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# LoraConfig fields beyond plain LoRA (DoRA, per-layer ranks, MoE parameter targets, ...) and
# the value that means "off". load_adapter refuses an adapter that turns any of them on rather
# than load it wrong; save_adapter writes the "off" values.
PLAIN_LORA = {
    "bias": "none",
    "fan_in_fan_out": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "target_parameters": None,
    "layer_replication": None,
    "lora_bias": False,
    "trainable_token_indices": None,
}


def _target_modules(model, names):
    """target_modules for the config: the short suffixes if they select exactly `names` (PEFT's
    usual form, e.g. ["q_proj", "v_proj"]), otherwise the full module names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    try:
        if resolve_targets(model, suffixes) == names:
            return suffixes
    except BadInput:  # a suffix also names a module that is not linear
        pass
    return names


def _hyperparameters(modules):
    """The one (r, alpha, dropout, rslora) all LoRA layers share: a LoraConfig has one of each."""
    found = {
        (m.r, m.alpha, getattr(m.lora_dropout, "p", 0.0), m.rslora) for m in modules.values()
    }
    if len(found) != 1:
        raise BadInput(f"LoRA layers differ in (r, alpha, dropout, rslora): {sorted(found)}; "
                       "PEFT's format holds one setting per adapter")
    return found.pop()


def _whole_modules(model, modules_to_save):
    """Full module path -> module for each modules_to_save entry (matched as target names are)."""
    found = {}
    for entry in modules_to_save:
        hits = {n: m for n, m in model.named_modules() if n == entry or n.endswith(f".{entry}")}
        if not hits:
            raise BadInput(f"modules_to_save entry {entry!r} matches no module of this model")
        found.update(hits)
    return found


def save_adapter(model, path, base_model=None, modules_to_save=None, overwrite=False):
    """Write the model's LoRA weights (and any `modules_to_save`, whole) as a PEFT adapter.

    `base_model` goes into base_model_name_or_path (default: the model's own name_or_path).
    The directory appears complete or not at all (`quant.staged_dir`). An existing non-empty
    `path` is refused unless `overwrite=True`: the trainer saves only into directories it
    owns and says so; anyone else gets an error, not data loss.
    """
    path = Path(path)
    modules = lora_modules(model)
    if not modules:
        raise BadInput("the model has no LoRA layers to save; call lora.inject first")
    r, alpha, dropout, rslora = _hyperparameters(modules)
    names = sorted(modules)

    # Contiguous CPU copies in the adapter's own dtype (fp32): safetensors needs contiguous
    # tensors and refuses tensors that share memory (tied embeddings), so we copy.
    def copy(t):
        return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)

    tensors = {}
    for name, m in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = copy(m.lora_A.weight)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = copy(m.lora_B.weight)
        if m.base_layer.weight.requires_grad:  # trained base rows (an output head that grew):
            tensors[f"{PREFIX}{name}.base_layer.weight"] = copy(m.base_layer.weight)  # PEFT's key for them
    modules_to_save = list(modules_to_save or [])
    for name, m in _whole_modules(model, modules_to_save).items():
        if any(w == name or w.startswith(f"{name}.") or name.startswith(f"{w}.") for w in modules):
            raise BadInput(f"{name} has LoRA layers and cannot also be in modules_to_save")
        # The module's own dtype: these are the model's weights, saved as the model holds them.
        for key, t in m.state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = copy(t)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": model.name_or_path or None if base_model is None else base_model,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": _target_modules(model, names),
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        **PLAIN_LORA,
    }
    # Every key above exists in PEFT >= 0.17 (setup.cfg's minimum), which loads this without
    # a warning; PEFT fills the fields we leave out with their defaults, which is what we mean.
    # Copying all ~45 fields PEFT 0.21 writes would make older PEFTs warn about each unknown one.

    with staged_dir(path, overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})  # PEFT's metadata


def read_adapter(path):
    """(config, tensors) of the PEFT adapter in `path`, checked; tensor names without PEFT's PREFIX."""
    path = Path(path)
    if not path.is_dir():
        raise BadInput(f"adapter directory {path} does not exist; pass one save_adapter wrote")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise BadInput(f"{path} has no {name}; not a complete LoRA adapter (an old .bin "
                           "adapter? re-save it with PEFT's safe_serialization=True)")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
        tensors = load_file(path / WEIGHTS_NAME)
    except (json.JSONDecodeError, SafetensorError) as e:
        raise BadInput(f"cannot read adapter {path}: {e}") from None
    if config.get("peft_type") != "LORA":
        raise BadInput(f"{path} holds a {config.get('peft_type')} adapter; only LoRA adapters load")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise BadInput(f"{path}/{CONFIG_NAME} has no {key}; re-save the adapter")
    for key, off in PLAIN_LORA.items():
        if config.get(key) not in (off, None):
            raise BadInput(f"{path} uses {key}={config[key]!r}, which rawqlora does not support")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise BadInput(f"adapter {path} has NaN/inf in {bad[0]}; the run that wrote it diverged")
    if any(not k.startswith(PREFIX) for k in tensors):
        raise BadInput(f"adapter {path} has tensors not named {PREFIX}...; is it a PEFT adapter?")
    return config, {k.removeprefix(PREFIX): t for k, t in tensors.items()}


def load_adapter(model, path):
    """Inject LoRA layers as the adapter's config says, load its weights, return the wrapped names.

    `model` is the plain base model (no LoRA yet). Whole modules saved with the adapter
    (modules_to_save, or embeddings PEFT saved because the vocabulary grew) are loaded too;
    like every non-LoRA weight they stay frozen. Every tensor is checked before any is copied,
    but after a BadInput the model may hold fresh LoRA layers: load a new base to retry.
    """
    config, tensors = read_adapter(path)

    # A trainer that added tokens (e.g. ChatML's <|im_start|>) grew the vocabulary and saved the
    # embeddings whole; the base model on disk still has the old vocabulary. Grow it first so
    # the shapes agree; every row, old and new, is then overwritten by the saved matrix. This
    # must happen before injection, while lm_head is still a plain module transformers resizes.
    embed = model.get_input_embeddings()
    embed_key = next(f"{n}.weight" for n, m in model.named_modules() if m is embed)
    saved_vocab = tensors[embed_key].shape[0] if embed_key in tensors else 0
    if saved_vocab > embed.weight.shape[0]:
        # mean_resizing would spend time on a covariance for rows we overwrite anyway.
        model.resize_token_embeddings(saved_vocab, mean_resizing=False)

    try:
        names = inject(
            model,
            config["target_modules"],
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
        )
    except BadInput as e:
        raise BadInput(f"adapter {path} does not fit this model: {e}") from None

    # Not model.state_dict(): for a 4-bit model that also serializes (and may repack) quant state.
    params = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    expected = {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    if missing := sorted(expected - tensors.keys()):
        raise BadInput(f"adapter {path} has no tensor {missing[0]}, though its config targets it")
    for key, t in tensors.items():
        if key not in params:
            raise BadInput(f"adapter {path} has a tensor for {key}, which this model lacks: "
                           "was it trained on another architecture?")
        if params[key].shape != t.shape:
            raise BadInput(f"adapter {path}: {key} has shape {list(t.shape)} but this model's "
                           f"is {list(params[key].shape)}; it is for another base model")
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)  # copy_ casts to the parameter's dtype and device
    return names
