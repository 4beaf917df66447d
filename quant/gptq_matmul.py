"""y = x Ŵᵀ for many rows of x (prefill, batched decode), straight from a GPTQ checkpoint's packed tensors (CUDA, Triton).

    y = gptq_matmul(x, qweight, scales, zeros, group)    x [M, K] bf16 -> [M, N] bf16 (groups of >= 128)
    matmul_fits(n, k, group)                             whether the kernel takes this weight

The layout is quant/gptq_gemv.py's, the checkpoint's own, read in place: qweight int32 [K/8, N] (input
k at bits 4·(k mod 8) of row k // 8), scales fp16 [K/g, N], zeros uint8 [K/g, N];
Ŵ[n, k] = s[k // g, n] · (q[k, n] − z[k // g, n]).

A program owns a [BLOCK_M, BLOCK_N] tile of y and walks K in steps of BLOCK_K = 128 inputs, inside one
group. Nibble j of a step's words holds inputs k0 + 8r + j (r = 0..15): a [16, BLOCK_N] matrix of codes
per j, multiplied on the tensor cores by the 16 columns of x it meets. Those columns are made
contiguous first: `x_by_nibble` reorders each 128 inputs of x (r, j) -> (j, r), one copy of x,
so the kernel loads them as plain [BLOCK_M, 16] tiles. The step sums of x (X below) are made
beside it, once, rather than reduced across lanes in every program.

A program walks all of K itself: with many rows (prefill) there are enough programs, but with a
few (batched decode) the N / 64 programs of a 4096-wide layer leave most SMs idle, so GPTQLinear
keeps tinygemm for 2 to MATMUL_MIN_ROWS − 1 rows (bench/RESULTS.md, session 11).

Codes become bf16 without an int -> float conversion: (q | 0x4300) as a bf16 is 128 + q, exact (bf16
has 8 bits of mantissa), so the products are Σ x·(128 + q) = 128·X + Σ x·q with X the step's sum of
x; per step

    Σ_k x_k Ŵ[n, k] = s·(Σ x·(128 + q) − (128 + z)·X)

The bf16 products are exact in the fp32 accumulator; taking 128·X back out cancels by up to 128/8:
fp32 keeps ~2^-19 of the output's scale, far below bf16's 2^-9 rounding of y. (tinygemm rounds each
dequantized weight to bf16, and GPTQ's fp16 scales to bf16, first.)
"""

import os

import torch

from fast.triton_support import tl, triton

BLOCK_K = 128  # one step: 16 rows of words, the K of one bf16 tensor-core product per nibble
BF16_128 = 0x4300  # the bits of 128.0 in bf16
# Rows from which this kernel beats tinygemm on every 7B shape on the H200 (at 32 it loses on three
# of four; at 64 it wins on all, 2x over a layer).
MATMUL_MIN_ROWS = 64


def matmul_fits(n, k, group):
    return group % BLOCK_K == 0 and k % group == 0 and n % 64 == 0


def x_by_nibble(x):
    """x [M, K] with each 128 inputs reordered (r, j) -> (j, r): column k0 + 16j + r holds input k0 + 8r + j."""
    m, k = x.shape
    return x.reshape(m, k // BLOCK_K, BLOCK_K // 8, 8).transpose(2, 3).reshape(m, k).contiguous()


def gptq_matmul(x, qweight, scales, zeros, group):
    """x [M, K] bf16 -> x Ŵᵀ [M, N] bf16 (module docstring)."""
    m, k = x.shape
    n = qweight.shape[1]
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64
    x = x.to(torch.bfloat16)
    x_sums = x.float().reshape(m, k // BLOCK_K, BLOCK_K).sum(-1)  # X of every step, once for all programs
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, block_m), n // block_n)
    _matmul_kernel[grid](x_by_nibble(x), x_sums, qweight, scales, zeros, y, m, n, BF16_128,
                         K=k, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
                         INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4, num_stages=3)
    return y


if triton is not None:

    @triton.jit
    def _matmul_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, bf16_128, K: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
        ROWS: tl.constexpr = BLOCK_K // 8  # word rows a step
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS)
        m_ok = (m < M)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptr + (k0 // 8 + r)[:, None] * N + n[None, :])  # [ROWS, BLOCK_N] int32
            part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for j in tl.static_range(8):
                a = tl.load(x_ptr + m[:, None] * K + (k0 + ROWS * j + r)[None, :], mask=m_ok, other=0.0)
                q = (((w >> (4 * j)) & 15) | bf16_128).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q
                if INTERPRETED:  # its tl.dot multiplies bf16's bits as integers; fp32 holds them and their products exactly
                    part = tl.dot(a.to(tl.float32), q.to(tl.float32), part)
                else:
                    part = tl.dot(a, q, part)
            x_sum = tl.load(xs_ptr + m * (K // BLOCK_K) + k0 // BLOCK_K, mask=m < M, other=0.0)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + n).to(tl.float32)
            z = tl.load(z_ptr + g * N + n).to(tl.float32)
            acc += s[None, :] * (part - (128.0 + z)[None, :] * x_sum[:, None])
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(tl.bfloat16), mask=m_ok)
