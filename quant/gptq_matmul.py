"""y = x Ŵᵀ for several rows of x (batched decode, prefill), from a GPTQ checkpoint's packed tensors (CUDA, Triton).

    matmul_fits(n, k, group)                              whether the kernel takes this weight
    ws = split_k.workspace(device, *workspace_need(n, k)) once, when the layer is prepared
    y = gptq_matmul(x, qweight, scales, zeros, group, ws) x [M, K] bf16 -> [M, N] bf16

The layout is quant/gptq_gemv.py's, the checkpoint's own, read in place: qweight int32 [K/8, N] (input
k at bits 4·(k mod 8) of row k // 8), scales fp16 [K/g, N], zeros uint8 [K/g, N];
Ŵ[n, k] = s[k // g, n] · (q[k, n] − z[k // g, n]).

A program owns a [BLOCK_M, 64] tile of y and one of SPLIT parts of K, walked in steps of BLOCK_K =
128 inputs, each inside one group. Two ways through a step, each faster where it is used (bench/
RESULTS.md, session 12):

  - up to 32 rows (batched decode), `_by_nibble_kernel`: nibble j of the step's words holds inputs
    k0 + 8r + j (r = 0..15), a [16, 64] matrix of codes per j, multiplied on the tensor cores by the
    16 columns of x it meets. A small kernel first copies x with each 128 inputs reordered
    (r, j) -> (j, r) and sums each step's x (X below), so the products load plain [BLOCK_M, 16]
    tiles, and the shifts apply to the words in the tensor cores' operand layout.
  - more rows (prefills), `_in_order_kernel`: the step's codes reshaped to input order,
    [16, 8, 64] -> [128, 64], one product with the [BLOCK_M, 128] block of x as it lies, and X
    summed from that block. The reshaped codes go to shared memory two bytes at a time, which at 8
    and 32 rows made it 2x slower than the first way; at 64 rows it is 1.4-1.8x faster.

Either way the host only allocates and launches: eager calls (a prefill, transformers' generate)
pay Python for every operation.

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
BY_NIBBLE_ROWS = 32  # up to this many rows, _by_nibble_kernel; above, _in_order_kernel
BF16_128 = 0x4300  # the bits of 128.0 in bf16
REORDER_STEPS = 8  # steps of x a program of _reorder_kernel reorders


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
    consts = dict(K=k, GROUP=group, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT=split,
                 INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4, num_stages=3)
    if m > BY_NIBBLE_ROWS:
        _in_order_kernel[grid](x, qweight, scales, zeros, partials, counters, y, m, n, BF16_128, **consts)
        return y
    by_nibble = torch.empty_like(x)
    x_sums = torch.empty(m, k // BLOCK_K, device=x.device, dtype=torch.float32)
    _reorder_kernel[(m, triton.cdiv(k, BLOCK_K * REORDER_STEPS))](x, by_nibble, x_sums, K=k, BLOCK_K=BLOCK_K,
                                                                  STEPS=REORDER_STEPS, num_warps=4)
    _by_nibble_kernel[grid](by_nibble, x_sums, qweight, scales, zeros, partials, counters, y, m, n, BF16_128,
                            **consts)
    return y


# The custom op for torch.compile, as rawqlora::gptq_gemv (quant/gptq_gemv.py).
@torch.library.custom_op("rawqlora::gptq_matmul", mutates_args=("partials", "counters"))
def _gptq_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    partials: torch.Tensor, counters: torch.Tensor, group: int) -> torch.Tensor:
    return _launch(x, qweight, scales, zeros, partials, counters, group)


@_gptq_matmul_op.register_fake
def _(x, qweight, scales, zeros, partials, counters, group):
    return x.new_empty(x.shape[0], qweight.shape[1], dtype=torch.bfloat16)


if triton is not None:
    from quant.split_k import store_sum

    @triton.jit
    def _reorder_kernel(x_ptr, out_ptr, sums_ptr, K: tl.constexpr, BLOCK_K: tl.constexpr, STEPS: tl.constexpr):
        """out: each BLOCK_K inputs of x in the order (j, r), out[k0 + 16j + r] = x[k0 + 8r + j]; sums: each
        step's sum of x, in fp32. A program does STEPS steps of one row."""
        row = tl.program_id(0)
        step = tl.program_id(1) * STEPS + tl.arange(0, STEPS)
        i = tl.arange(0, BLOCK_K)
        ok = step < K // BLOCK_K
        at = row * K + step[:, None] * BLOCK_K
        x = tl.load(x_ptr + at + 8 * (i % 16)[None, :] + (i // 16)[None, :], mask=ok[:, None], other=0.0)
        tl.store(out_ptr + at + i[None, :], x, mask=ok[:, None])
        tl.store(sums_ptr + row * (K // BLOCK_K) + step, tl.sum(x.to(tl.float32), axis=1), mask=ok)

    @triton.jit
    def _tile(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr):
        """This program's rows m and columns n of y, and the first input of its part of K (K / SPLIT inputs)."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return m, n, tl.program_id(2) * (K // SPLIT)

    @triton.jit
    def _add_step(acc, part, x_sum, s_ptr, z_ptr, g, n, N):
        """acc + one step's Σ_k x_k Ŵ[n, k] = s·(Σ x·(128 + q) − (128 + z)·X), its group g's s and z."""
        s = tl.load(s_ptr + g * N + n).to(tl.float32)
        z = tl.load(z_ptr + g * N + n).to(tl.float32)
        return acc + s[None, :] * (part - (128.0 + z)[None, :] * x_sum[:, None])

    @triton.jit
    def _store(acc, y_ptr, m, n, m_ok, part_ptr, count_ptr, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SPLIT: tl.constexpr):
        """This program's [BLOCK_M, BLOCK_N] tile of y, or its part of it (quant/split_k.py)."""
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        store_sum(acc, y_ptr + m[:, None] * N + n[None, :], m_ok, part_ptr, count_ptr,
                  tl.program_id(0) * (N // BLOCK_N) + tl.program_id(1), tl.program_id(2), local, SPLIT,
                  BLOCK_M * BLOCK_N)

    @triton.jit
    def _by_nibble_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, part_ptr, count_ptr, y_ptr, M, N, bf16_128,
                          K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr):
        ROWS: tl.constexpr = BLOCK_K // 8  # word rows a step
        m, n, first = _tile(BLOCK_M, BLOCK_N, K, SPLIT)
        r = tl.arange(0, ROWS)
        m_ok = (m < M)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(first, first + K // SPLIT, BLOCK_K):
            w = tl.load(w_ptr + (k0 // 8 + r)[:, None] * N + n[None, :])  # [ROWS, BLOCK_N] int32
            part = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for j in tl.static_range(8):
                a = tl.load(x_ptr + m[:, None] * K + (k0 + ROWS * j + r)[None, :], mask=m_ok, other=0.0)
                q = (((w >> (4 * j)) & 15) | bf16_128).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q
                if INTERPRETED:  # its tl.dot multiplies bf16's bits as integers; fp32 holds them and products exactly
                    part = tl.dot(a.to(tl.float32), q.to(tl.float32), part)
                else:
                    part = tl.dot(a, q, part)
            x_sum = tl.load(xs_ptr + m * (K // BLOCK_K) + k0 // BLOCK_K, mask=m < M, other=0.0)
            acc = _add_step(acc, part, x_sum, s_ptr, z_ptr, k0 // GROUP, n, N)
        _store(acc, y_ptr, m, n, m_ok, part_ptr, count_ptr, N, BLOCK_M, BLOCK_N, SPLIT)

    @triton.jit
    def _in_order_kernel(x_ptr, w_ptr, s_ptr, z_ptr, part_ptr, count_ptr, y_ptr, M, N, bf16_128,
                         K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, INTERPRETED: tl.constexpr):
        ROWS: tl.constexpr = BLOCK_K // 8  # word rows a step
        m, n, first = _tile(BLOCK_M, BLOCK_N, K, SPLIT)
        r = tl.arange(0, ROWS)
        nibble = 4 * tl.arange(0, 8)
        m_ok = (m < M)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(first, first + K // SPLIT, BLOCK_K):
            w = tl.load(w_ptr + (k0 // 8 + r)[:, None] * N + n[None, :])  # [ROWS, BLOCK_N] int32
            codes = tl.reshape((w[:, None, :] >> nibble[None, :, None]) & 15, (BLOCK_K, BLOCK_N))  # input order
            q = (codes | bf16_128).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q
            a = tl.load(x_ptr + m[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_ok, other=0.0)
            if INTERPRETED:  # its tl.dot multiplies bf16's bits as integers; fp32 holds them and products exactly
                part = tl.dot(a.to(tl.float32), q.to(tl.float32))
            else:
                part = tl.dot(a, q)
            x_sum = tl.sum(a.to(tl.float32), axis=1)  # X
            acc = _add_step(acc, part, x_sum, s_ptr, z_ptr, k0 // GROUP, n, N)
        _store(acc, y_ptr, m, n, m_ok, part_ptr, count_ptr, N, BLOCK_M, BLOCK_N, SPLIT)
