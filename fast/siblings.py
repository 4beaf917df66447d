"""Sibling LoRA layers, those that read the same input (q, k and v; gate and up), as one
autograd function.

For adapters j = 1..G over one input x [N, in], each with frozen W_j, trainable A_j [r, in],
B_j [out_j, r], scaling s_j and its own dropout mask m_j (fast/lora_function.py has one layer's
formulas, which these are, side by side):

    forward    a   = [x_d1 A_1ᵀ | ... | x_dG A_Gᵀ]                         [N, G·r]
               y_j = a_j (s_j B_j)ᵀ + x W_jᵀ                                  [N, out_j]
    backward   g_a = [dy_1 (s_1 B_1) | ... | dy_G (s_G B_G)]
               dB_j = s_j dy_jᵀ a_j     dA_j = g_a,jᵀ x_dj
               dx  = Σ_j dy_j W_j + Σ_j (g_a,j A_j) ⊙ m_j / q                  one [N, in] tensor

Why: one layer at a time, autograd adds the siblings' input gradients up in passes of its own
(two over [N, in] for q/k/v, one for gate/up), each adapter's dropout reads x from memory
again, and every layer pays the Python and launch overhead of a function of its own, which
on a 7B model is about as long as a k or v projection's GPU work. Here dx is one tensor that
every GEMM and the dropout kernel add into in place, the dropout forward reads x once for all
members (fast/dropout_kernels.py, `members`), and there is one function.

Dropout: the masks come from fast/dropout_kernels.py's hash (seeds seed, seed + 1, ...), so
siblings run together only where that is the dropout path (`state.kernels_on`: CUDA) or there
is no dropout. With torch's dropout each layer draws its own mask, in the order the model calls
them, to stay equal to the reference's (and PEFT's): there they run one by one.

Who calls it: fast/patch.py, for the attentions' q/k/v (through `FastLoRAForward.precomputed`,
since transformers' attention calls the three itself) and the SwiGLU MLPs' gate/up.
"""

import torch

import fast.dropout_kernels as kernels
import fast.state as state
from fast.lora_function import (b_side_grads, compute_dtype, dense_weight, dropout_seed, output, scaled_b,
                                training_dropout, uses_reference)
from lora.layer import LoRALinear


def run_together(layers, x):
    """The outputs of `layers` (each reading `x`) from one `LoRASiblingsFunction`, or None
    where they must run one by one: not all LoRA layers, one of them on its reference forward
    (`uses_reference`: merged, inference, a base that trains), torch's dropout (reference-equal
    masks, drawn per layer), more than three with dropout, or differing in rank, dropout or
    dtype."""
    if not all(isinstance(layer, LoRALinear) for layer in layers) or any(map(uses_reference, layers)):
        return None
    first = layers[0]
    dropout, dtype = training_dropout(first), compute_dtype(first, x)
    if dropout > 0 and (len(layers) > 3 or not state.kernels_on(x.device)):
        return None  # torch's dropout draws per layer; the kernels take up to three members
    if any(layer.r != first.r or training_dropout(layer) != dropout or compute_dtype(layer, x) != dtype
           for layer in layers):
        return None
    weights = [w for layer in layers for w in (layer.lora_A.weight, layer.lora_B.weight)]
    return LoRASiblingsFunction.apply(x, [layer.base_layer for layer in layers],
                                      [layer.scaling for layer in layers], dropout, dtype, *weights)


class LoRASiblingsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bases, scalings, dropout, dtype, *weights):
        lora_as, lora_bs = weights[0::2], weights[1::2]
        shape, x_dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).to(dtype)
        r = lora_as[0].shape[0]
        with torch.autocast(x.device.type, enabled=False):
            # the A's stacked and the s·B's in the compute dtype, made once and kept for backward
            a_stacked = torch.cat(lora_as).to(dtype)
            b_ss = [scaled_b(b, s, dtype) for b, s in zip(lora_bs, scalings)]
            ctx.seed = None
            if dropout > 0:
                ctx.seed = dropout_seed()
                a = kernels.dropout_a_forward(x, a_stacked, ctx.seed, dropout, members=len(bases))
            else:
                a = x @ a_stacked.t()
            # One tensor per output, laid out as a layer of its own would make it: column views
            # of one [N, Σ out] tensor ran the step 1% slower (bench/RESULTS.md, run M).
            outputs = [output(x, a[:, j * r:(j + 1) * r], b_s, base, dtype).reshape(*shape[:-1], base.out_features)
                       for j, (base, b_s) in enumerate(zip(bases, b_ss))]
        ctx.save_for_backward(x, a, a_stacked, *b_ss)
        ctx.bases, ctx.scalings, ctx.dropout, ctx.dtype = bases, scalings, dropout, dtype
        ctx.weight_dtypes = (lora_as[0].dtype, [b.dtype for b in lora_bs])
        ctx.x_shape, ctx.x_dtype = shape, x_dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *dys):
        x, a, a_stacked, *b_ss = ctx.saved_tensors
        a_dtype, b_dtypes = ctx.weight_dtypes
        dtype, members = ctx.dtype, len(b_ss)
        r = a_stacked.shape[0] // members
        dys = [dy.reshape(-1, dy.shape[-1]).to(dtype) for dy in dys]
        with torch.autocast(x.device.type, enabled=False):
            g_as, d_bs = zip(*[b_side_grads(dy, a[:, j * r:(j + 1) * r], b_s, s, b_dtype)
                               for j, (dy, b_s, s, b_dtype) in enumerate(zip(dys, b_ss, ctx.scalings, b_dtypes))])
            g_a = torch.cat(g_as, dim=1)
            dx = None
            if ctx.needs_input_grad[0]:  # every term added into one tensor, in place
                dx = dys[0] @ dense_weight(ctx.bases[0], dtype)
                for dy, base in zip(dys[1:], ctx.bases[1:]):
                    dx.addmm_(dy, dense_weight(base, dtype))
            if ctx.seed is not None:
                d_a = kernels.dropout_a_backward(x, g_a, a_stacked, dx, ctx.seed, ctx.dropout, members=members)
            else:
                d_a = g_a.t() @ x
                if dx is not None:
                    dx.addmm_(g_a, a_stacked)
            d_as = d_a.to(a_dtype).split(r)
            if dx is not None:
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, None, None) + tuple(g for pair in zip(d_as, d_bs) for g in pair)
