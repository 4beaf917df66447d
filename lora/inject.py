"""Wrap a model's linear layers in `LoRALinear`, in place, and freeze everything else.

Targets are chosen as PEFT chooses them, so an adapter config means the same to both:
  - a list of names: a module matches if its name equals an entry or ends with "." + entry
    (["q_proj", "v_proj"], or "self_attn.q_proj" to be more specific);
  - a string: a regex that must match the whole module name (re.fullmatch);
  - "all-linear": every nn.Linear (bnb's Linear4bit is one) except the output head, which is
    wrapped only when named explicitly.

MoE routers: PEFT 0.21 on transformers 5 adds Mixtral's router (`mlp.gate`) to "all-linear"
through its `target_parameters` machinery. We do not: the router is a MixtralTopKRouter, not an
nn.Linear, so "all-linear" skips it by type. A LoRA there shifts which experts fire, and on a
[8 × hidden] router a rank-8 adapter has as many weights as the router it adapts.
The per-expert `w1`/`w2`/`w3` modules that quant/ builds from the fused expert tensors are
nn.Linear/Linear4bit and are wrapped like any other.
"""

import re

from torch import nn

from lora.layer import LoRALinear
from rawqlora.errors import BadInput


def lora_modules(model):
    """name -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _candidates(model):
    """Named modules that could be targets: everything except the insides of a LoRALinear."""
    wrapped = tuple(f"{name}." for name in lora_modules(model))
    return {name: m for name, m in model.named_modules() if name and not name.startswith(wrapped)}


def _matches(name, target):
    return name == target or name.endswith(f".{target}")


def _linear_suffixes(candidates):
    linear = (nn.Linear, LoRALinear)
    return sorted({n.rsplit(".", 1)[-1] for n, m in candidates.items() if isinstance(m, linear)})


def resolve_targets(model, targets):
    """The sorted module names `targets` selects; BadInput if any part of it matches nothing."""
    candidates = _candidates(model)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        head = model.get_output_embeddings()
        names = [n for n, m in candidates.items() if isinstance(m, nn.Linear) and m is not head]
    elif isinstance(targets, str):
        names = [n for n in candidates if re.fullmatch(targets, n)]
        if not names:
            raise BadInput(
                f"target regex {targets!r} fully matches no module name; linear layers end in: "
                f"{', '.join(_linear_suffixes(candidates))}"
            )
    else:
        targets = list(targets)
        missing = [t for t in targets if not any(_matches(n, t) for n in candidates)]
        if missing:
            raise BadInput(
                f"target module(s) {missing} match no module of this model; its linear layers are "
                f"named: {', '.join(_linear_suffixes(candidates))}"
            )
        names = [n for n in candidates if any(_matches(n, t) for t in targets)]
    for n in names:
        if not isinstance(candidates[n], (nn.Linear, LoRALinear)):
            raise BadInput(
                f"target {n} is a {type(candidates[n]).__name__}, not a linear layer; "
                "LoRA wraps nn.Linear / Linear4bit only, so name its linear sub-layers instead"
            )
    return sorted(names)


def inject(model, targets, r, alpha, dropout=0.0, rslora=False):
    """Wrap every module `targets` selects in a LoRALinear; freeze all other parameters.

    Returns the sorted names of the wrapped modules. A module that is already a LoRALinear is
    refused rather than wrapped again (LoRA inside LoRA is never what anyone meant).
    """
    if r <= 0:
        raise BadInput(f"LoRA rank r must be a positive integer, got {r}; try r=8 or r=16")
    names = resolve_targets(model, targets)
    already = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]
    if already:
        raise BadInput(f"{already[0]} already has a LoRA adapter; inject into each module once")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        # A new module starts in training mode; take the base's mode instead, so injecting
        # into a model in eval() does not silently switch LoRA dropout on.
        setattr(parent, child, LoRALinear(base, r, alpha, dropout, rslora).train(base.training))
    # Only adapters train: the base (4-bit or not), norms and embeddings stay as loaded.
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return names
