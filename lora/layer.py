"""`LoRALinear`: a frozen linear layer (dense or 4-bit) plus a trainable low-rank update.

      x ─┬─► base_layer: frozen W, nn.Linear or bnb Linear4bit ───────────────┐
         │                                                                    + ─► y
         └─► dropout ─► lora_A [r × in] ─► lora_B [out × r] ─► × scaling ─────┘

    y = W x + scaling · B A dropout(x),   scaling = alpha / r   (rsLoRA: alpha / √r)

Only A and B train. B starts at zero, so a freshly wrapped model computes exactly what the
base model computed. Names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so
our state-dict keys are PEFT's on-disk keys without the `base_model.model.` prefix.

`forward` is this formula, and it is what trains through plain autograd unless train.py turns
the fast path on: `fast.enable(model)` then gives each LoRALinear instance a faster forward of
the same math (fast/lora_function.py; tests/test_fast.py holds the two equal), and this class
stays as written. `merged_weight` is the merge as a pure function, shared with merge.py.
"""

import math

import torch
from torch import nn

from quant.linear4bit import Linear4bit, keep_standard_layout
from rawqlora.errors import BadInput


def merged_weight(weight, lora_a, lora_b, scaling):
    """W + scaling · B @ A in fp32: the dense weight one LoRA layer computes, [out, in].

    Pure (nothing is modified). As torchtune's `get_merged_lora_ckpt`: summed in fp32, so the
    caller rounds once to its storage dtype (bf16 W + a bf16 delta would round twice).
    """
    return weight.float() + scaling * (lora_b.float() @ lora_a.float())


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, dtype=torch.float32):
        super().__init__()
        if r <= 0:
            raise BadInput(f"LoRA rank r must be a positive integer, got {r}; try r=8 or r=16")
        if not 0.0 <= dropout < 1.0:
            raise BadInput(f"LoRA dropout must be in [0, 1), got {dropout}; try 0.05")
        if isinstance(base, Linear4bit):
            keep_standard_layout(base)  # one 4-bit layout on every CPU (quant/linear4bit.py)
        self.base_layer = base
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): alpha/r shrinks the update as r grows
        # and higher ranks then learn no better; alpha/√r keeps its scale rank-independent.
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 by default even over a bf16 or 4-bit base: Adam moves a weight by about lr per
        # step, and bf16 (8 significant bits) spaces values near 0.05 by 2.4e-4, so a step of
        # lr=1e-4 would round to no change at all. fp32 (24 bits) keeps every step.
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        # PEFT's default init (peft/tuners/lora/layer.py, `reset_lora_parameters`; itself
        # nn.Linear's default): A ~ kaiming_uniform(a=√5), B = 0, so B·A starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False  # True while B·A·scaling is added into base_layer.weight

    def forward(self, x):
        if self.merged:  # the update is already inside W
            return self.base_layer(x)
        result = self.base_layer(x)
        # x is cast to the adapter's dtype (fp32 A and B under a bf16 or 4-bit base), as PEFT
        # does; the update comes back in the base's output dtype, so a bf16 model stays bf16.
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (lora * self.scaling).to(result.dtype)

    def delta_weight(self):
        """scaling · B @ A, shape [out, in], fp32: what merging adds to the base weight."""
        zero = torch.zeros((), device=self.lora_A.weight.device)
        return merged_weight(zero, self.lora_A.weight, self.lora_B.weight, self.scaling)

    @torch.no_grad()
    def merge(self):
        """Add the update into a dense base weight: W ← W + scaling·B·A. Twice is a no-op."""
        if isinstance(self.base_layer, Linear4bit):
            # Adding into NF4 would re-quantize W and lose precision silently; merge.py instead
            # dequantizes the base and adds `delta_weight()` there.
            raise TypeError("cannot merge LoRA into a 4-bit base layer; dequantize it first")
        if self.merged:
            return
        weight = self.base_layer.weight
        merged = merged_weight(weight, self.lora_A.weight, self.lora_B.weight, self.scaling)
        if not torch.isfinite(merged).all():  # as PEFT's safe_merge: never corrupt W with NaN/inf
            raise BadInput("LoRA weights are not finite (did training diverge?); refusing to merge")
        # fp32 sum, then one rounding to the base dtype (bf16 W + bf16 delta would round twice).
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again: W comes back up to rounding (an ulp or so of its dtype)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(merged_weight(weight, self.lora_A.weight, self.lora_B.weight, -self.scaling))
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
