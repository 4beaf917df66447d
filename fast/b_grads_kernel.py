"""A LoRA layer's two products with its output gradient, from one read of it (CUDA, Triton).

For dy [N, out] (the layer's output gradient), a = x_d Aᵀ [N, r] (saved in forward) and
B_s = s·B [out, r] in the compute dtype, fast/lora_function.py's backward needs

    g_a = dy B_s          [N, r]      what dA and dx's LoRA term need
    dB  = dyᵀ a           [out, r]    (times s, by the caller)

As two cuBLAS products each reads dy, the largest tensor of the pair, from memory: on a 7B
model at 16k tokens the seven adapters' dy are 1.4 GB a layer, and the two passes took 24 ms
of a ~0.95 s step (bench/RESULTS.md, session 9). Here one kernel reads each tile of dy once and
multiplies it both ways. Program (i, j) owns ROWS rows and COLS columns of dy and walks its
columns BK at a time:

    g_part[j, rows]  = Σ over its columns  dy[rows, cols] B_s[cols]       kept in registers
    dB_part[i, cols] = dy[rows, cols]ᵀ a[rows]                           stored per BK columns

and the host sums the parts over j and i (fp32, a fixed order: deterministic, no atomics).
The parts add 4r bytes per row (g) and per column (dB) of each ROWS x COLS block, written once
and read once by the sums, against the block's 2·ROWS·COLS bytes of dy: 2·(32/COLS + 32/ROWS)
of dy's traffic at r = 16, 19% at the tiles below. Measured on an H200 (bench/RESULTS.md,
session 9): a 7B layer's seven adapters at 16k tokens in 0.69 ms against the two products'
0.87 (dy once from DRAM: 0.29).

Products in dy's dtype with fp32 accumulation, as cuBLAS's (fp32 operands off CUDA: Triton's
CPU interpreter, which the tests use, multiplies bf16 as if it were an integer; see
fast/dropout_kernels.py `fp32_products`). tests/test_b_grads_kernel.py checks both outputs
against the two products in plain PyTorch.
"""

import torch

from fast.dropout_kernels import fp32_products, padded_rank
from fast.triton_support import tl, triton

# ROWS x COLS of dy per program (fewer columns where out is narrower), BK columns a step: the
# fastest of bench/kernel_tiles.py --kernels b_grads on an H200 at 16k tokens (run V4 in
# bench/RESULTS.md). Narrow outputs (k and v, out = 1024) leave most SMs without a program at
# these tiles; splitting their columns further to fill them measured slower (run V6).
COLS = 1024
TILE = dict(ROWS=512, BK=64, num_warps=8, num_stages=3)


def b_grads(dy, a, b_s):
    """(g_a = dy b_s in dy's dtype [N, r], dyᵀ a in fp32 [out, r]) for dy [N, out], a [N, r]
    (a column slice of a wider tensor will do) and b_s [out, r], all in one dtype."""
    dy = dy.contiguous()
    n, out = dy.shape
    r = a.shape[1]
    cols = min(COLS, triton.next_power_of_2(out))
    splits, groups = triton.cdiv(n, TILE["ROWS"]), triton.cdiv(out, cols)
    g_part = torch.empty(groups, n, r, device=dy.device, dtype=torch.float32)
    d_b_part = torch.empty(splits, out, r, device=dy.device, dtype=torch.float32)
    _b_grads_kernel[(splits, groups)](dy, a, b_s.contiguous(), g_part, d_b_part, n, a.stride(0), OUT=out, R=r,
                                      R_PAD=padded_rank(r), COLS=cols, FP32_PRODUCTS=fp32_products(dy), **TILE)
    return g_part.sum(0).to(dy.dtype), d_b_part.sum(0)


if triton is not None:

    @triton.jit
    def _b_grads_kernel(dy_ptr, a_ptr, b_ptr, g_part_ptr, d_b_part_ptr, n_rows, a_stride, OUT: tl.constexpr,
                        R: tl.constexpr, R_PAD: tl.constexpr, COLS: tl.constexpr, FP32_PRODUCTS: tl.constexpr,
                        ROWS: tl.constexpr, BK: tl.constexpr):
        split, group = tl.program_id(0), tl.program_id(1)
        rows = split * ROWS + tl.arange(0, ROWS)
        ranks = tl.arange(0, R_PAD)
        rank_ok = ranks < R
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * a_stride + ranks[None, :],
                    mask=(rows[:, None] < n_rows) & rank_ok[None, :], other=0.0)
        if FP32_PRODUCTS:
            a = a.to(tl.float32)
        g = tl.zeros((ROWS, R_PAD), tl.float32)
        for c0 in range(group * COLS, group * COLS + COLS, BK):
            cols = c0 + tl.arange(0, BK)
            col_ok = cols < OUT
            dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * OUT + cols[None, :],
                         mask=(rows[:, None] < n_rows) & col_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            if FP32_PRODUCTS:
                dy, b = dy.to(tl.float32), b.to(tl.float32)
            g += tl.dot(dy, b)
            d_b = tl.dot(tl.trans(dy), a)  # [BK, R_PAD]: these rows' share of dB
            tl.store(d_b_part_ptr + split.to(tl.int64) * OUT * R + cols[:, None] * R + ranks[None, :], d_b,
                     mask=col_ok[:, None] & rank_ok[None, :])
        tl.store(g_part_ptr + group.to(tl.int64) * n_rows * R + rows.to(tl.int64)[:, None] * R + ranks[None, :], g,
                 mask=(rows[:, None] < n_rows) & rank_ok[None, :])
