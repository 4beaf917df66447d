"""LoRA dropout fused into the products with A, as two Triton kernels (CUDA).

With dropout p, keep-probability q = 1 - p and mask m, fast/lora_function.py computes

    forward    a   = (x ⊙ m / q) Aᵀ                  [N, r]
    backward   dA  = g_aᵀ (x ⊙ m / q)                [r, in]
               dx += (g_a A) ⊙ m / q                 [N, in], into the base GEMM's dx

Through torch's dropout each line is a pass over an [N, in] tensor of its own, plus a mask
to store (bits) and a dropped-out copy of x to rebuild for backward: 0.24 s of a 1.7 s step
at 16k tokens on a 7B model. Here the mask is never stored. It is a hash of (seed, row,
column), recomputed wherever it is needed, so

    forward    one kernel reads x once and writes a
    backward   one kernel reads x and dx once, writes dx in place and dA

and backward keeps only x and an integer seed.

The mask, in uint32 arithmetic, fmix32 being MurmurHash3's finalizer (a bijection whose every
input bit flips each output bit with probability ~1/2). One hash serves two neighbouring
columns, 16 bits each: the hash's integer multiplies, not memory, bounded these kernels.

    row_h = fmix32(row ^ fmix32(seed))
    h     = fmix32(row_h ^ (column // 2) · 0x9E3779B1)
    keep  = (low 16 bits of h for even columns, high 16 for odd) ≥ t,   t = round(p · 2¹⁶)

so the drop rate is t / 2¹⁶ (p to within 8e-6) and kept values are scaled by 2¹⁶ / (2¹⁶ − t),
the exact inverse of the keep rate: x_d is unbiased.

One seed per call, drawn from torch's CPU generator, which a checkpoint's recompute replays:
the recompute regenerates the same mask. Adapters that share an input and run as one
(fast/siblings.py) take seeds seed, seed + 1, ...: fmix32 scatters neighbouring seeds. The
keep-rate is q and the bits are independent in practice, neighbouring seeds' masks included
(tests/test_lora_kernels.py measures both), but they are not torch's random numbers, so for
one seed the masks differ from PEFT's, which torch's dropout (the reference, and the fast path
with kernels off) reproduces exactly.

Products run in x's dtype with fp32 accumulation, A cast to that dtype first, as the kernels-off
path casts it (bf16 training: bf16 tensor-core products, x_d and g_a exact in bf16; fp32: tf32).
Why not tf32 throughout: fp32 operands double the registers and shared memory every tile of x
passes through on its way to the tensor cores, for no precision the kernels-off path has.
tests/test_lora_kernels.py runs both kernels (Triton's CPU interpreter where there is no GPU)
against the formulas above in plain PyTorch, with the masks rebuilt from the hash.
"""

import torch

from fast.triton_support import tl, triton


def keep_threshold(p):
    """keep ⇔ 16 hash bits ≥ this: a fraction ≈ p of the 2¹⁶ values drop."""
    return min(round(p * 2**16), 2**16 - 1)


def keep_scale(p):
    """1 / the exact keep rate that `keep_threshold(p)` gives."""
    return 2**16 / (2**16 - keep_threshold(p))


# Tiles of x, BN rows x BK columns. Each backward program walks ROWS rows of one column block,
# keeping its members' slices of A and dA in registers, and writes one partial dA per member
# that the host sums (no atomics: the sum is deterministic). The fastest of sweeps on an H200
# at 16k tokens with bf16 products (bench/kernel_tiles.py, run T1 in bench/RESULTS.md): one
# forward tile for every member count; backward tiles by member count, the single-member one
# chosen over both of its widths (o's 4096, down's 14336).
FORWARD_TILE = dict(BN=32, BK=128, num_warps=4)
BACKWARD_TILE = {1: dict(BN=16, BK=128, ROWS=1024, num_warps=4),
                 2: dict(BN=16, BK=128, ROWS=1024, num_warps=4),
                 3: dict(BN=16, BK=256, ROWS=1024, num_warps=4)}


def fp32_products(x):
    """Whether the kernels convert their operands to fp32 before the products: for fp32 x (tf32 on
    the tensor cores), and off CUDA, where Triton's CPU interpreter (the tests) multiplies bf16
    operands as if they were integers (triton 3.9). The values are the same: products of bf16
    numbers are exact in fp32, and A is rounded to x's dtype before either."""
    return x.dtype == torch.float32 or x.device.type != "cuda"


def padded_rank(r):
    return max(16, triton.next_power_of_2(r))  # tl.dot wants dimensions of 16 or more


def dropout_a_forward(x, lora_a, seed, p, members=1):
    """a = (x ⊙ m / q) Aᵀ for x [N, in] (any float dtype), A [r, in] (cast to x's dtype); returns a
    in x's dtype.

    `members` > 1: A stacks that many adapters' A [r, in] over one input (fast/siblings.py),
    member j with the mask of seed + j; a [N, members · r] holds their products side by side.
    """
    x = x.contiguous()
    n, k = x.shape
    r = lora_a.shape[0] // members
    a = torch.empty(n, members * r, device=x.device, dtype=x.dtype)
    # members on the fastest grid axis: the programs that read one block of x run together,
    # so x comes from DRAM once and from L2 for the other members.
    grid = (members, triton.cdiv(n, FORWARD_TILE["BN"]))
    lora_a = lora_a.to(x.dtype).contiguous()  # products in x's dtype (module docstring)
    _forward_kernel[grid](x, lora_a, a, n, seed, keep_threshold(p), keep_scale(p),
                          K=k, R=r, R_PAD=padded_rank(r), MEMBERS=members, FP32_PRODUCTS=fp32_products(x),
                          **FORWARD_TILE)
    return a


def dropout_a_backward(x, g_a, lora_a, dx, seed, p, members=1):
    """dA = g_aᵀ (x ⊙ m / q) (fp32, [r, in]); dx += (g_a A) ⊙ m / q in place unless dx is None.

    `members` (1 to 3) > 1: as in `dropout_a_forward`, g_a [N, members · r] and the returned
    dA [members · r, in] side by side; dx receives every member's term, and x and dx are read
    and dx written once for all of them.
    """
    if not 1 <= members <= 3:
        raise ValueError(f"the backward kernel takes 1 to 3 adapters over one input, got {members}")
    x = x.contiguous()
    g_a, lora_a = g_a.to(x.dtype).contiguous(), lora_a.to(x.dtype).contiguous()  # products in x's dtype
    n, k = x.shape
    r = lora_a.shape[0] // members
    tile = BACKWARD_TILE[members]
    splits = triton.cdiv(n, tile["ROWS"])
    partial = torch.empty(members, splits, r, k, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(k, tile["BK"]), splits)
    _backward_kernel[grid](x, g_a, lora_a, x if dx is None else dx, partial, n, seed,
                           keep_threshold(p), keep_scale(p), K=k, R=r, R_PAD=padded_rank(r), MEMBERS=members,
                           HAS_DX=dx is not None, FP32_PRODUCTS=fp32_products(x), **tile)
    return partial.sum(1).reshape(members * r, k)


if triton is not None:

    @triton.jit
    def _fmix32(h):
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    @triton.jit
    def keep_block(rows, col0, seed, threshold, BN: tl.constexpr, BK: tl.constexpr):
        """The mask's block of `rows` x columns col0 .. col0 + BK (col0 even; module docstring)."""
        seed_h = _fmix32(seed.to(tl.uint32))
        row_h = _fmix32(rows.to(tl.uint32) ^ seed_h)
        pairs = col0 // 2 + tl.arange(0, BK // 2)
        h = _fmix32(row_h[:, None] ^ (pairs.to(tl.uint32) * 0x9E3779B1)[None, :])
        t = threshold.to(tl.uint32)
        # join puts (low, high) side by side: reshaped, pair j lands on columns 2j and 2j + 1
        return tl.reshape(tl.join((h & 0xFFFF) >= t, (h >> 16) >= t), (BN, BK))

    @triton.jit
    def masked_a_product(acc, x, keep, a_ptr, cols, K: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                         FP32_PRODUCTS: tl.constexpr):
        """acc + (x ⊙ keep) Aᵀ over one block of columns `cols`: x [BN, BK] in A's dtype, A [R, K]."""
        ranks = tl.arange(0, R_PAD)
        x = tl.where(keep, x, tl.zeros_like(x))
        a_t = tl.load(a_ptr + ranks[None, :] * K + cols[:, None],  # Aᵀ block [BK, R_PAD], x's dtype
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        if FP32_PRODUCTS:
            x, a_t = x.to(tl.float32), a_t.to(tl.float32)
        acc += tl.dot(x, a_t)
        return acc

    @triton.jit
    def _forward_kernel(x_ptr, a_ptr, out_ptr, n_rows, seed, threshold, scale, K: tl.constexpr, R: tl.constexpr,
                        R_PAD: tl.constexpr, MEMBERS: tl.constexpr, FP32_PRODUCTS: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
        member = tl.program_id(0)
        seed += member
        a_ptr += member * R * K
        out_ptr += member * R
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        ranks = tl.arange(0, R_PAD)
        acc = tl.zeros((BN, R_PAD), tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=inside, other=0.0)
            acc = masked_a_product(acc, x, keep_block(rows, k0, seed, threshold, BN, BK), a_ptr, cols, K, R, R_PAD,
                                   FP32_PRODUCTS)
        out = (acc * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + ranks[None, :], out,
                 mask=(rows[:, None] < n_rows) & (ranks[None, :] < R))

    @triton.jit
    def member_backward(x, dx, d_a, a, ga_ptr, rows, col0, n_rows, seed, threshold, scale, member: tl.constexpr,
                        MEMBERS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, HAS_DX: tl.constexpr, FP32_PRODUCTS: tl.constexpr):
        """Member `member`'s terms on one block of rows: d_a += g_aᵀ (x ⊙ m) (the 1/q comes at
        the store) and dx += (g_a A) ⊙ m / q, both from one computation of its mask."""
        ranks = tl.arange(0, R_PAD)
        keep = keep_block(rows, col0, seed + member, threshold, BN, BK)
        g_a = tl.load(ga_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + member * R + ranks[None, :],
                      mask=(rows[:, None] < n_rows) & (ranks[None, :] < R), other=0.0)
        if FP32_PRODUCTS:
            g_a = g_a.to(tl.float32)
        d_a += tl.dot(tl.trans(g_a), tl.where(keep, x, tl.zeros_like(x)))
        if HAS_DX:
            dx += tl.where(keep, tl.dot(g_a, a), 0.0) * scale
        return d_a, dx

    @triton.jit
    def _backward_kernel(x_ptr, ga_ptr, a_ptr, dx_ptr, partial_ptr, n_rows, seed, threshold, scale,
                         K: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, MEMBERS: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, ROWS: tl.constexpr, HAS_DX: tl.constexpr,
                         FP32_PRODUCTS: tl.constexpr):
        # Up to three members (q, k, v), each with its A block and dA accumulator in registers;
        # the blocks of absent members are never used and compile away.
        col0 = tl.program_id(0) * BK
        cols = col0 + tl.arange(0, BK)
        split = tl.program_id(1)
        ranks = tl.arange(0, R_PAD)
        a_block = a_ptr + ranks[:, None] * K + cols[None, :]
        a_mask = (ranks[:, None] < R) & (cols[None, :] < K)
        a0 = tl.load(a_block, mask=a_mask, other=0.0)  # x's dtype, as are g_a's loads
        a1 = tl.load(a_block + R * K, mask=a_mask & (MEMBERS > 1), other=0.0)
        a2 = tl.load(a_block + 2 * R * K, mask=a_mask & (MEMBERS > 2), other=0.0)
        if FP32_PRODUCTS:
            a0, a1, a2 = a0.to(tl.float32), a1.to(tl.float32), a2.to(tl.float32)
        d_a0 = tl.zeros((R_PAD, BK), tl.float32)
        d_a1 = tl.zeros((R_PAD, BK), tl.float32)
        d_a2 = tl.zeros((R_PAD, BK), tl.float32)
        for r0 in range(0, ROWS, BN):
            rows = split * ROWS + r0 + tl.arange(0, BN)
            inside = (rows[:, None] < n_rows) & (cols[None, :] < K)
            offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
            if FP32_PRODUCTS:
                x = x.to(tl.float32)
            dx = tl.zeros((BN, BK), tl.float32)
            if HAS_DX:
                dx = tl.load(dx_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            d_a0, dx = member_backward(x, dx, d_a0, a0, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 0,
                                       MEMBERS, R, R_PAD, BN, BK, HAS_DX, FP32_PRODUCTS)
            if MEMBERS > 1:
                d_a1, dx = member_backward(x, dx, d_a1, a1, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 1,
                                           MEMBERS, R, R_PAD, BN, BK, HAS_DX, FP32_PRODUCTS)
            if MEMBERS > 2:
                d_a2, dx = member_backward(x, dx, d_a2, a2, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 2,
                                           MEMBERS, R, R_PAD, BN, BK, HAS_DX, FP32_PRODUCTS)
            if HAS_DX:
                tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        # partial [MEMBERS, splits, R, K]
        out = partial_ptr + split * R * K + ranks[:, None] * K + cols[None, :]
        member_stride = tl.num_programs(1) * R * K
        tl.store(out, d_a0 * scale, mask=a_mask)
        if MEMBERS > 1:
            tl.store(out + member_stride, d_a1 * scale, mask=a_mask)
        if MEMBERS > 2:
            tl.store(out + 2 * member_stride, d_a2 * scale, mask=a_mask)
