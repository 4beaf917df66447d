"""`LoRALinear`: a frozen linear layer (dense or 4-bit) plus a trainable low-rank update.

      x ─┬─► base_layer: frozen W, nn.Linear or bnb Linear4bit ───────────────┐
         │                                                                    + ─► y
         └─► dropout ─► lora_A [r × in] ─► lora_B [out × r] ─► × scaling ─────┘

    y = W x + scaling · B A dropout(x),   scaling = alpha / r   (rsLoRA: alpha / √r)

Only A and B train. B starts at zero, so a freshly wrapped model computes exactly what the
base model computed. Names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`), so
our state-dict keys are PEFT's on-disk keys without the `base_model.model.` prefix.
"""

import math

import torch
from torch import nn

from fast.lora_function import LoRALinearFunction
from quant.linear4bit import Linear4bit, keep_standard_layout
from fast import triton_support
from rawqlora.errors import BadInput
from fast.fused import is_inference


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
        # Set by inject for layers that read the same input as a sibling (q/k/v, gate/up):
        # backward then keeps that one input, not a dropped-out copy each (lora/function.py).
        self.shared_input = False
        # Set by rawqlora.fused.enable: on CUDA, dropout inside the Triton kernels of lora/kernels.py.
        self.fused_dropout = False
        # (x, y): this layer's output y for input x, already computed together with its
        # siblings (lora/siblings.py); the next call with that very x returns it.
        self.precomputed = None

    def forward(self, x, output_needed=True):
        if self.precomputed is not None and self.precomputed[0] is x:
            y, self.precomputed = self.precomputed[1], None
            return y
        if self.merged:  # the update is already inside W
            return self.base_layer(x)
        if is_inference(self) or self.base_layer.weight.requires_grad:
            # Generation: the formula as written, so a 4-bit base runs bitsandbytes' own
            # kernels (a fused 4-bit GEMV at batch 1, where dequantizing all of W per token,
            # as the training path does, would be 5x slower). Also a base weight that trains
            # (an output head's rows for added tokens): the function below treats W as frozen.
            lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
            result = self.base_layer(x)
            return result + (lora * self.scaling).to(result.dtype)
        # The whole layer is one autograd function (lora/function.py has the formulas and
        # the reasons): the LoRA term is added inside the output GEMM, and backward keeps
        # only the (dropped-out) input, never an fp32 copy of it nor a dequantized W.
        return LoRALinearFunction.apply(x, self.lora_A.weight, self.lora_B.weight, self.base_layer, self.scaling,
                                        self.training_dropout(), self.compute_dtype(x), self.shared_input,
                                        output_needed, self.fused_dropout_on(x.device))

    def compute_dtype(self, x):
        """Autocast's dtype when it is on (bf16 training), else the base's (its weight's, or a
        4-bit layer's compute_dtype), like bnb's own Linear4bit. The fp32 A and B are cast to it
        for the products, as autocast would cast them."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.compute_dtype or x.dtype
        return self.base_layer.weight.dtype

    def training_dropout(self):
        """The dropout probability this forward applies: p in training mode, else 0."""
        return self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def fused_dropout_on(self, device):
        """Dropout runs inside lora/kernels.py's Triton kernels for inputs on `device`."""
        return self.fused_dropout and triton_support.available(device)

    def delta_weight(self):
        """scaling · B @ A, shape [out, in], fp32: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        """Add the update into a dense base weight: W ← W + scaling·B·A. Twice is a no-op."""
        if isinstance(self.base_layer, Linear4bit):
            # Adding into NF4 would re-quantize W and lose precision silently; merge.py instead
            # dequantizes the base and adds `delta_weight()` there.
            raise TypeError("cannot merge LoRA into a 4-bit base layer; dequantize it first")
        if self.merged:
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():  # as PEFT's safe_merge: never corrupt W with NaN/inf
            raise BadInput("LoRA weights are not finite (did training diverge?); refusing to merge")
        weight = self.base_layer.weight
        # fp32 sum, then one rounding to the base dtype (bf16 W + bf16 delta would round twice).
        weight.copy_(weight.float() + delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Subtract the update again: W comes back up to rounding (an ulp or so of its dtype)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
