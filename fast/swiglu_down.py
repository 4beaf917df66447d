"""The SwiGLU gate and the MLP's down projection (a LoRA layer with hash dropout) as one autograd
function, with two Triton kernels around the down GEMM (CUDA).

For gate g and up u [N, I] (gate_proj's and up_proj's outputs), down's frozen W [out, I],
trainable A [r, I], B [out, r], scaling s and hash mask m with keep-probability q (the mask of
fast/dropout_kernels.py, from one seed per call):

    forward    h   = silu(g) ⊙ u = g σ(g) ⊙ u                               [N, I], in g's dtype
               a   = (h ⊙ m / q) Aᵀ                                         [N, r]
               y   = h Wᵀ + a (s B)ᵀ                                        [N, out]
    backward   g_a = dy (s B)          dB = s · dyᵀ a
               dh  = dy W + (g_a A) ⊙ m / q                                 W: one GEMM
               dA  = g_aᵀ (h ⊙ m / q)
               du  = dh ⊙ g σ(g)       dg = dh ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))

which is fast/ops.py's SwiGLU and fast/lora_function.py's LoRA layer, one after the other. Why
one function: apart, h is written by SwiGLU's kernel and read back by the dropout kernel and
by the GEMM, backward keeps h as well as g and u, and dh goes to memory between the dropout
kernel that completes it and SwiGLU's backward that reads it (with I = 14336 at 16k tokens:
0.46 GiB a pass, each pass ~0.13 ms of a layer's ~30 ms). Here

    forward    one kernel reads g and u, writes h (the GEMM's operand) and a
    backward   the GEMM writes dy W; one kernel reads g, u and it, rebuilds h, writes dg over
               it, writes du and the partial dA

and backward keeps g, u, a and the seed: h, I wide per token, is never kept, which is what
training/grad_ckpt.py's lean layers bought by rebuilding it separately. Measured on an H200
(bench/RESULTS.md, session 8, run U5): a 7B step 1% faster with nothing recomputed, 2% faster
under a 24 GiB budget, 0.44 GiB less per kept layer at 16k tokens.

h here is rounded to g's dtype from fp32 silu(g)·u, as fast/ops.py's compiled SwiGLU rounds it;
Triton's and inductor's sigmoid may differ in the last bit. dh stays fp32 from the GEMM's
output to dg and du (apart, it is rounded to g's dtype in between). tests/test_swiglu_down.py
checks outputs and gradients against the two functions apart.

Who calls it: fast/patch.py's SwiGLU MLP forward, where `run_fused` applies: CUDA kernels on
(fast/state.py), down a LoRA layer on its fast forward with dropout. Elsewhere the MLP runs the
two functions apart.
"""

import torch

import fast.dropout_kernels as kernels
import fast.state as state
from fast.dropout_kernels import keep_scale, keep_threshold
from fast.lora_function import (b_side_grads, compute_dtype, dense_weight, dropout_seed, output, scaled_b,
                                training_dropout, uses_reference)
from fast.triton_support import tl, triton

# Tiles (rows x columns of g, u): the fastest of bench/kernel_tiles.py --kernels swiglu on an
# H200 at 16k tokens (run V1 in bench/RESULTS.md: forward 372 us against a 294 us DRAM floor,
# backward 880 against 489; no tile of the sweep brought backward nearer).
FORWARD_TILE = dict(BN=32, BK=256, num_warps=4)
BACKWARD_TILE = dict(BN=16, BK=128, ROWS=1024, num_warps=4)


def run_fused(down, gate, up, output_needed=True):
    """down_proj(silu(gate) * up) through `SwiGLUDownFunction`, or None where it does not apply:
    kernels off for this device, `down` on its reference forward (fast/lora_function.py
    `uses_reference`), or no dropout (these kernels hash a mask whatever p is, and their
    speed is measured with dropout, the issue's workload; without it the plain path's cuBLAS
    products run instead). `output_needed=False`: a checkpoint's recompute, which needs only
    what backward keeps (no h, no GEMM)."""
    dropout = training_dropout(down)
    if not state.kernels_on(gate.device) or uses_reference(down) or dropout == 0:
        return None
    return SwiGLUDownFunction.apply(gate, up, down.lora_A.weight, down.lora_B.weight, down.base_layer, down.scaling,
                                    dropout, compute_dtype(down, gate), output_needed)


def swiglu_a_forward(gate, up, lora_a, seed, p, store_h=True):
    """(h, a) for gate, up [N, I] and A [r, I]: h = silu(gate) ⊙ up in gate's dtype (None unless
    `store_h`), a = (h ⊙ m / q) Aᵀ [N, r] in gate's dtype."""
    n, k = gate.shape
    r = lora_a.shape[0]
    h = torch.empty_like(gate) if store_h else None
    a = torch.empty(n, r, device=gate.device, dtype=gate.dtype)
    lora_a = lora_a.to(gate.dtype).contiguous()  # products in gate's dtype, as dropout_kernels.py's
    grid = (triton.cdiv(n, FORWARD_TILE["BN"]),)
    _forward_kernel[grid](gate, up, gate if h is None else h, lora_a, a, n, seed, keep_threshold(p), keep_scale(p),
                          K=k, R=r, R_PAD=kernels.padded_rank(r), STORE_H=store_h,
                          FP32_PRODUCTS=kernels.fp32_products(gate), **FORWARD_TILE)
    return h, a


def swiglu_a_backward(gate, up, dh, g_a, lora_a, seed, p):
    """(dA fp32 [r, I], dgate, dup) from dh = dy W [N, I] (completed with the LoRA term here;
    dgate is written over dh's memory)."""
    n, k = gate.shape
    r = lora_a.shape[0]
    g_a, lora_a = g_a.to(gate.dtype).contiguous(), lora_a.to(gate.dtype).contiguous()
    d_up = torch.empty_like(up)
    splits = triton.cdiv(n, BACKWARD_TILE["ROWS"])
    partial = torch.empty(splits, r, k, device=gate.device, dtype=torch.float32)
    grid = (triton.cdiv(k, BACKWARD_TILE["BK"]), splits)
    _backward_kernel[grid](gate, up, dh, g_a, lora_a, d_up, partial, n, seed, keep_threshold(p), keep_scale(p),
                           K=k, R=r, R_PAD=kernels.padded_rank(r),
                           FP32_PRODUCTS=kernels.fp32_products(gate), **BACKWARD_TILE)
    return partial.sum(0), dh, d_up


class SwiGLUDownFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, base, scaling, dropout, dtype, output_needed):
        shape, gate_dtype, up_dtype = gate.shape, gate.dtype, up.dtype
        gate = gate.reshape(-1, shape[-1]).to(dtype).contiguous()
        up = up.reshape(-1, shape[-1]).to(dtype).contiguous()
        with torch.autocast(gate.device.type, enabled=False):
            a_w, b_s = lora_a.to(dtype), scaled_b(lora_b, scaling, dtype)  # kept for backward too
            ctx.seed = dropout_seed()
            h, a = swiglu_a_forward(gate, up, a_w, ctx.seed, dropout, store_h=output_needed)
            if output_needed:
                y = output(h, a, b_s, base, dtype)
            else:  # a recompute that only needs the saved tensors: zeros, no memory, no GEMM
                y = gate.new_zeros(()).expand(gate.shape[0], base.out_features)
        ctx.save_for_backward(gate, up, a, a_w, b_s)
        ctx.base, ctx.scaling, ctx.dropout, ctx.dtype, ctx.shape = base, scaling, dropout, dtype, shape
        ctx.input_dtypes, ctx.weight_dtypes = (gate_dtype, up_dtype), (lora_a.dtype, lora_b.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        gate, up, a, a_w, b_s = ctx.saved_tensors
        dtype = ctx.dtype
        (gate_dtype, up_dtype), (a_dtype, b_dtype) = ctx.input_dtypes, ctx.weight_dtypes
        dy = dy.reshape(-1, dy.shape[-1]).to(dtype)
        with torch.autocast(dy.device.type, enabled=False):
            g_a, d_b = b_side_grads(dy, a, b_s, ctx.scaling, b_dtype)
            dh = dy @ dense_weight(ctx.base, dtype)
            d_a, d_gate, d_up = swiglu_a_backward(gate, up, dh, g_a, a_w, ctx.seed, ctx.dropout)
        return (d_gate.reshape(ctx.shape).to(gate_dtype), d_up.reshape(ctx.shape).to(up_dtype),
                d_a.to(a_dtype), d_b, None, None, None, None, None)


if triton is not None:

    from fast.dropout_kernels import keep_block, masked_a_product, member_backward

    @triton.jit
    def _swiglu(g, u):
        """silu(g) ⊙ u from fp32 g and u, in fp32 (the callers round it to h's dtype)."""
        return g * tl.sigmoid(g) * u

    @triton.jit
    def _forward_kernel(g_ptr, u_ptr, h_ptr, a_ptr, out_ptr, n_rows, seed, threshold, scale, K: tl.constexpr,
                        R: tl.constexpr, R_PAD: tl.constexpr, STORE_H: tl.constexpr, FP32_PRODUCTS: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        ranks = tl.arange(0, R_PAD)
        acc = tl.zeros((BN, R_PAD), tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < K)
            offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
            g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            h = _swiglu(g, u).to(g_ptr.dtype.element_ty)
            if STORE_H:
                tl.store(h_ptr + offsets, h, mask=inside)
            acc = masked_a_product(acc, h, keep_block(rows, k0, seed, threshold, BN, BK), a_ptr, cols, K, R, R_PAD,
                                   FP32_PRODUCTS)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (ranks[None, :] < R))

    @triton.jit
    def _backward_kernel(g_ptr, u_ptr, dh_ptr, ga_ptr, a_ptr, du_ptr, partial_ptr, n_rows, seed, threshold, scale,
                         K: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, FP32_PRODUCTS: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, ROWS: tl.constexpr):
        # As dropout_kernels.py's backward with one member and x = h, rebuilt from g and u; then
        # the gate's backward on dh, written to dg (over dh) and du.
        col0 = tl.program_id(0) * BK
        cols = col0 + tl.arange(0, BK)
        split = tl.program_id(1)
        ranks = tl.arange(0, R_PAD)
        a_mask = (ranks[:, None] < R) & (cols[None, :] < K)
        a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=a_mask, other=0.0)
        if FP32_PRODUCTS:
            a = a.to(tl.float32)
        d_a = tl.zeros((R_PAD, BK), tl.float32)
        for r0 in range(0, ROWS, BN):
            rows = split * ROWS + r0 + tl.arange(0, BN)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < K)
            offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
            g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            x = _swiglu(g, u).to(g_ptr.dtype.element_ty)  # h, as forward stored it
            if FP32_PRODUCTS:
                x = x.to(tl.float32)
            dh = tl.load(dh_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            d_a, dh = member_backward(x, dh, d_a, a, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 0, 1,
                                      R, R_PAD, BN, BK, True, FP32_PRODUCTS)
            sig = tl.sigmoid(g)
            tl.store(du_ptr + offsets, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=inside)
            tl.store(dh_ptr + offsets, (dh * u * sig * (1 + g * (1 - sig))).to(dh_ptr.dtype.element_ty), mask=inside)
        tl.store(partial_ptr + split * R * K + ranks[:, None] * K + cols[None, :], d_a * scale, mask=a_mask)
