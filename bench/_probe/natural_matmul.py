"""y = x Ŵᵀ for several rows of x (batched decode, prefill), from a GPTQ checkpoint's packed tensors (CUDA, Triton).

    matmul_fits(n, k, group)                              whether the kernel takes this weight
    ws = split_k.workspace(device, *workspace_need(n, k)) once, when the layer is prepared
    y = gptq_matmul(x, qweight, scales, zeros, group, ws) x [M, K] bf16 -> [M, N] bf16

The layout is quant/gptq_gemv.py's, the checkpoint's own, read in place: qweight int32 [K/8, N] (input
k at bits 4·(k mod 8) of row k // 8), scales fp16 [K/g, N], zeros uint8 [K/g, N];
Ŵ[n, k] = s[k // g, n] · (q[k, n] − z[k // g, n]).

A program owns a [BLOCK_M, 64] tile of y and one of SPLIT parts of K, walked in steps of BLOCK_K =
128 inputs, each inside one group. A step's 16 rows of words [16, 64] become its 128 × 64 codes in
input order (nibble j of row r is input 8r + j: shift by 4j, reshape [16, 8, 64] -> [128, 64]), one
tensor-core product with the step's [BLOCK_M, 128] block of x as it lies in memory. The step sums of
x (X below) come from that block too. The host does nothing but allocate y and launch: eager calls
(a prefill, transformers' generate) pay Python for every operation, and the host's reordered copy of
x and its step sums were three more per product (session 12).

SPLIT: with many rows (a long prefill) the tiles alone make enough programs; with up to 64 (batched
decode, short prompts) the 64 column blocks of a 4096-wide layer would leave most of 132 SMs idle, so
K is split until there are about a thousand programs, and the parts are added in a fixed order
(quant/split_k.py).

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
BLOCK_N = 64
MAX_SPLIT_ROWS = 64  # above this many rows, no split: the tiles make programs enough
BF16_128 = 0x4300  # the bits of 128.0 in bf16


def matmul_fits(n, k, group):
    return group % BLOCK_K == 0 and k % group == 0 and n % BLOCK_N == 0


def config(m, n, k):
    """(BLOCK_M, SPLIT) for M rows of an [N, K] weight: SPLIT doubles while the programs stay
    within 1,024 and every part keeps at least 4 steps (limits reasoned, not swept: about 8 programs
    an SM, and enough steps for the loads' pipeline)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if m > MAX_SPLIT_ROWS:
        return block_m, 1
    split = 1
    while ((n // BLOCK_N) * split * 2 <= 1024 and k % (BLOCK_K * split * 2) == 0
           and k // (split * 2) >= 4 * BLOCK_K):
        split *= 2
    return block_m, split


def workspace_need(n, k):
    """(partials, counters) of quant/split_k.py's workspace for any call on an [N, K] weight."""
    _, split = config(MAX_SPLIT_ROWS, n, k)
    return MAX_SPLIT_ROWS * n * split, n // BLOCK_N


def gptq_matmul(x, qweight, scales, zeros, group, ws):
    """x [M, K] bf16, contiguous -> x Ŵᵀ [M, N] bf16 (module docstring); ws: a quant/split_k.py Workspace."""
    if torch.compiler.is_compiling():
        return torch.ops.rawqlora.gptq_matmul(x, qweight, scales, zeros, ws.partials, ws.counters, group)
    return _launch(x, qweight, scales, zeros, ws.partials, ws.counters, group)  # eager: no op dispatch


def _launch(x, qweight, scales, zeros, partials, counters, group):
    m, k = x.shape
    n = qweight.shape[1]
    block_m, split = config(m, n, k)
    if x.dtype != torch.bfloat16:
        raise TypeError(f"gptq_matmul takes bf16 x, not {x.dtype}")
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, block_m), n // BLOCK_N, split)
    _matmul_kernel[grid](x, qweight, scales, zeros, partials, counters, y, m, n, BF16_128,
                         K=k, GROUP=group, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT=split,
                         INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4, num_stages=3)
    return y


if triton is not None:
    from quant.split_k import store_sum

    @triton.jit
    def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, part_ptr, count_ptr, y_ptr, M, N, bf16_128,
                       K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr):
        ROWS: tl.constexpr = BLOCK_K // 8  # word rows a step
        PART: tl.constexpr = K // SPLIT  # inputs a program
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, ROWS)
        nibble = 4 * tl.arange(0, 8)
        m_ok = (m < M)[:, None]
        # num_programs(2) is SPLIT, which ptxas cannot know: as quant/gptq_gemv.py's `one`, the bits
        # stay in a register rather than being reloaded from the constant bank before every OR.
        exponent = bf16_128 + tl.num_programs(2) - SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(pid_k * PART, (pid_k + 1) * PART, BLOCK_K):
            w = tl.load(w_ptr + (k0 // 8 + r)[:, None] * N + n[None, :])  # [ROWS, BLOCK_N] int32
            codes = tl.reshape((w[:, None, :] >> nibble[None, :, None]) & 15, (BLOCK_K, BLOCK_N))  # input order
            q = (codes | exponent).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q
            a = tl.load(x_ptr + m[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_ok, other=0.0)
            if INTERPRETED:  # its tl.dot multiplies bf16's bits as integers; fp32 holds them and products exactly
                part = tl.dot(a.to(tl.float32), q.to(tl.float32))
            else:
                part = tl.dot(a, q)
            x_sum = tl.sum(a.to(tl.float32), axis=1)  # X
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + n).to(tl.float32)
            z = tl.load(z_ptr + g * N + n).to(tl.float32)
            acc += s[None, :] * (part - (128.0 + z)[None, :] * x_sum[:, None])
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        store_sum(acc, y_ptr + m[:, None] * N + n[None, :], m_ok, part_ptr, count_ptr,
                  pid_m * (N // BLOCK_N) + pid_n, pid_k, local, SPLIT, BLOCK_M * BLOCK_N)
