"""The LoRA linear layer as one autograd function, with its backward written out.

For input rows x [N, in], frozen W [out, in] (dense, or 4-bit and dequantized on use),
trainable A [r, in], B [out, r], dropout mask m with keep-probability q = 1 - p:

    forward    x_d = x * m / q                      (x_d = x when p = 0)
               a   = x_d Aᵀ                         [N, r]
               y   = x Wᵀ + bias + s · a Bᵀ         one GEMM, then the LoRA term added by addmm
    backward   g_a = s · dy B                       [N, r]
               dB  = s · dyᵀ a                      [out, r]
               dA  = g_aᵀ x_d                       [r, in]
               dx  = dy W + (g_a A) * m / q         W dequantized again: never stored

Why by hand rather than autograd over `base(x) + B(A(dropout(x))) * s`:
  * autograd over the plain expression keeps an fp32 (or a dropped-out) copy of x per
    adapter and runs five elementwise passes over [N, out] outputs (scale, cast, add ...);
    on a 7B model at 16k tokens those passes cost about as much as the matrix products.
    Here the LoRA term is folded into the output by `addmm_` (the GEMM adds in place), and
    backward saves only x_d (x itself when p = 0), the mask and the small `a`.
  * the 4-bit weight is dequantized once in forward and once in backward, and neither
    dequantized copy is kept: saving it would cost 2 bytes per weight per layer.
  * with dropout the mask is kept as bits (1/16 of x_d's size, rawqlora/fused.py), and
    layers whose input is shared (`shared_input`: q, k and v read the same normed x, so do
    gate and up) keep x itself rather than x_d and rebuild x_d in backward (one fused
    pass): one saved tensor for the three instead of three dropped-out copies. At 16k
    tokens on a 7B model the two save 1 GiB. Other layers keep x_d: rebuilding it would
    cost the pass and save nothing.
  * `output_needed=False` (a checkpoint's recompute of the MLP's last projection, whose
    output nobody reads) runs only what backward saves: dropout and `a`, no W GEMM.

Everything runs in the compute dtype (the autocast dtype, else the base's dtype); A and B
stay fp32 master weights and are cast for the products, as autocast would do. Dropout goes
through `torch.native_dropout`, which draws the same random numbers as `nn.Dropout`, so
this layer and PEFT's produce the same masks from the same seed.
"""

import bitsandbytes as bnb
import torch

from rawqlora.fused import add_masked_, apply_mask, kernel, pack_mask


def dense_weight(base, dtype):
    """W [out, in] in `dtype`: dequantized for a 4-bit base, the weight itself for a dense one."""
    if isinstance(base, bnb.nn.Linear4bit):
        w = base.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
    return base.weight.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, dropout, dtype, shared_input=False, output_needed=True):
        shape, x_dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if output_needed:
                bias = None if base.bias is None else base.bias.to(dtype)
                y = torch.nn.functional.linear(x, dense_weight(base, dtype), bias)
            else:  # a recompute that only needs the saved tensors: zeros, no memory, no GEMM
                y = x.new_zeros(()).expand(x.shape[0], base.out_features)
            mask = None
            if dropout > 0:
                x_d, mask = torch.native_dropout(x, dropout, True)
                mask = kernel(pack_mask, x.device)(mask)
            else:
                x_d = x
            a_w, b_w = lora_a.to(dtype), lora_b.to(dtype)
            a = x_d @ a_w.t()
            if output_needed:
                y.addmm_(a, b_w.t(), alpha=scaling)
        ctx.rebuild_x_d = mask is not None and shared_input
        ctx.save_for_backward(x if ctx.rebuild_x_d else x_d, mask, a, lora_a, lora_b)
        ctx.base, ctx.scaling, ctx.dropout, ctx.dtype = base, scaling, dropout, dtype
        ctx.x_shape, ctx.x_dtype = shape, x_dtype
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_or_x_d, mask, a, lora_a, lora_b = ctx.saved_tensors
        dtype, s, keep = ctx.dtype, ctx.scaling, 1 - ctx.dropout
        dy = dy.reshape(-1, dy.shape[-1]).to(dtype)
        with torch.autocast(dy.device.type, enabled=False):
            a_w, b_w = lora_a.to(dtype), lora_b.to(dtype)
            g_a = (dy @ b_w).mul_(s)
            d_b = (dy.t() @ a).mul_(s).to(lora_b.dtype)
            x_d = kernel(apply_mask, dy.device)(x_or_x_d, mask, 1 / keep) if ctx.rebuild_x_d else x_or_x_d
            d_a = (g_a.t() @ x_d).to(lora_a.dtype)
            del x_d
            dx = None
            if ctx.needs_input_grad[0]:
                dx = dy @ dense_weight(ctx.base, dtype)
                if mask is None:  # the LoRA term goes straight into dx's GEMM
                    dx.addmm_(g_a, a_w)
                else:  # one fused pass: dx += (g_a A) * m / q
                    kernel(add_masked_, dx.device)(dx, g_a @ a_w, mask, 1 / keep)
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return dx, d_a, d_b, None, None, None, None, None, None
