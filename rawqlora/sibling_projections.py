"""Sibling projections as one matrix product, for decoding.

Attention's q, k and v projections read the same input, and so do the SwiGLU MLP's gate and up.
At batch 1 each projection is a matrix-vector product, bound by reading its weight, and the
small ones read it badly: on an H200, cuBLAS reads k's and v's [1024, 4096] bf16 weights at
1.6 TB/s and q's [4096, 4096] at 3.1, each followed by a split-K reduction, 26 µs for the three,
where one [6144, 4096] product takes 16 µs (bench/RESULTS.md, session 6). `fuse(model)`
concatenates each group's weights once:

    q_proj, k_proj, v_proj   ->  one [q_out + k_out + v_out, in] layer, shared by three views
    gate_proj, up_proj       ->  one [2 · intermediate, in] layer, shared by two views

Each projection becomes a `SiblingView`: called on an input x, the first view computes the whole
group's output for x and keeps it; the others return their slice of it (for that very x; any
other input is computed afresh, so a model that calls its projections in another order or on
different inputs still gets the right values). The model's forward code is untouched.

For inference only (the fused layer has no LoRA and is not meant to train), on models whose
projections are plain `nn.Linear` (a merged model) or `quant.gptq_checkpoint.GPTQLinear` (a GPTQ
directory: the packed codes, zeros and scales concatenate along the outputs, given one act-order
permutation for the group). LoRA-wrapped or 4-bit bitsandbytes layers are left as they are.
"""

from functools import partial

import torch
from torch import nn

from quant.gptq_checkpoint import GPTQLinear, pack, unpack
from quant.gptq_gemv import gptq_gemv

GATE_UP = ("gate_proj", "up_proj")
GROUPS = (("q_proj", "k_proj", "v_proj"), GATE_UP)
# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (transformers' Llama, Mistral, Qwen2)
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")


class SiblingGroup(nn.Module):
    """One layer computing several projections of the same input; `output(x, i)` is projection i.
    interleaved: two projections of one width, output j of projection i at 2j + i (gate_up_silu)."""

    def __init__(self, fused, widths, interleaved=False):
        super().__init__()
        self.fused = fused
        self.bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.interleaved = interleaved
        self.last = None  # (x, fused(x)) for the members that have not taken their slice yet

    def output(self, x, i):
        if self.last is None or self.last[0] is not x:
            self.last = (x, self.fused(x))
        y = self.last[1]
        if i == len(self.bounds) - 2:
            # The last member clears it: nothing is held between forwards (and a compiled step
            # sees the same state, None, on every call).
            self.last = None
        if self.interleaved:
            return y[..., i::2]
        return y[..., self.bounds[i] : self.bounds[i + 1]]


class SiblingView(nn.Module):
    """Stands where one projection was; its output is the group's slice `index`."""

    def __init__(self, group, index):
        super().__init__()
        self.group, self.index = group, index  # `group` is shared: registered once per view, one set of tensors

    def forward(self, x):
        return self.group.output(x, self.index)


def fused_linear(layers):
    """One nn.Linear whose output is the layers' outputs side by side."""
    first = layers[0]
    bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in layers), bias=bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in layers]))
        if bias:
            fused.bias.copy_(torch.cat([m.bias for m in layers]))
    return fused.requires_grad_(False)


def fused_gptq(layers, interleaved=False):
    """One GPTQLinear: codes, zeros and scales of each layer side by side along the outputs (or, for
    two layers, interleaved: output j of layer i at 2j + i), prepared as the first layer was (for the
    int4 kernels, a cached dense weight, or not at all)."""
    first = layers[0]
    bias = first.bias is not None
    fused = GPTQLinear(first.in_features, sum(m.out_features for m in layers), bias, first.group_size,
                       device=first.qweight.device)

    def outputs(tensors):  # [rows, out] each -> [rows, Σ out]
        return torch.stack(tensors, dim=2).flatten(1) if interleaved else torch.cat(tensors, dim=1)

    fused.qweight = outputs([m.qweight for m in layers])  # [in / 8, out]: 8 codes of a column a word
    # [groups, out / 8], 8 zero points a word along the outputs: unpacked to interleave them
    fused.qzeros = (pack(outputs([unpack(m.qzeros.T).T for m in layers]).T).T.contiguous() if interleaved else
                    outputs([m.qzeros for m in layers]))
    fused.scales = outputs([m.scales for m in layers])
    fused.g_idx = first.g_idx
    if bias:
        fused.bias = outputs([m.bias[None] for m in layers])[0]
    if first.own is not None:  # on our kernels, which take the sum of widths they take
        fused.prepare_own()
    elif first.int4 is not None:
        fused.prepare(torch.bfloat16)
    elif first.dense is not None:
        fused.prepare(first.dense.dtype)
    return fused


def fusable(layers):
    """Whether `layers` can become one: all nn.Linear of one dtype, or all GPTQLinear of one
    group size and act-order permutation; the same input width, the same bias or none."""
    first = layers[0]
    dense, packed = all(type(m) is nn.Linear for m in layers), all(isinstance(m, GPTQLinear) for m in layers)
    if not (dense or packed) or any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None)
                                    for m in layers):
        return False
    if dense:
        return len({(m.weight.dtype, m.weight.device) for m in layers}) == 1
    return all(m.group_size == first.group_size and torch.equal(m.g_idx, first.g_idx) and m.out_features % 8 == 0
               for m in layers)


def fuse(model):
    """Fuse every q/k/v and gate/up group of `model` that `fusable` allows, in place; returns how
    many groups were fused. Call it on a model loaded for inference, before decoding; the old
    weights are freed."""
    count = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            if any(m is None for m in layers) or not fusable(layers):
                continue
            silu_epilogue = names == GATE_UP and swiglu_epilogue_fits(parent, layers)
            fused = fused_linear(layers) if type(layers[0]) is nn.Linear else fused_gptq(layers, silu_epilogue)
            group = SiblingGroup(fused, [m.out_features for m in layers], interleaved=silu_epilogue)
            for index, name in enumerate(names):
                setattr(parent, name, SiblingView(group, index))
            if silu_epilogue:
                parent.forward = partial(swiglu_mlp_forward, parent)
            count += 1
    return count


def swiglu_epilogue_fits(mlp, layers):
    """Whether a SwiGLU MLP's gate/up product can end in silu(gate) · up (quant/gptq_gemv.py, swiglu=True):
    GPTQ layers on our kernels, no bias, the MLP's forward down(silu(gate(x)) · up(x))."""
    gate, up = layers
    return (isinstance(gate, GPTQLinear) and gate.own is not None and gate.bias is None
            and gate.out_features == up.out_features and type(mlp).__name__ in SWIGLU_MLPS
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))  # torch's, transformers


def swiglu_mlp_forward(mlp, x):
    """The MLP's forward. One row (batch-1 decode): gate and up in one product that ends in silu(gate) · up,
    one kernel fewer; otherwise the model's own, on the fused layer's interleaved views."""
    if x.numel() != x.shape[-1]:
        return type(mlp).forward(mlp, x)
    fused = mlp.gate_proj.group.fused
    tile, zeros, ws = fused.own
    h = gptq_gemv(x.reshape(1, -1).to(torch.bfloat16).contiguous(), fused.qweight, fused.scales, zeros,
                  fused.group_size, tile, ws, swiglu=True)
    return mlp.down_proj(h.reshape(*x.shape[:-1], -1).to(x.dtype))
