"""y = x Ŵᵀ for one row of x, straight from a GPTQ checkpoint's packed tensors: batch-1 decode (CUDA, Triton).

    tile = tile_for(n, k, group)                  a GemvTile, or None where the kernel does not apply
    ws = split_k.workspace(device, *tile.workspace_need(n, k))   once, when the layer is prepared
    y = gptq_gemv(x, qweight, scales, zeros, group, tile, ws)    x [1, K] bf16 -> [1, N] bf16
    (under torch.compile a custom op, rawqlora::gptq_gemv, that the compiler calls as it is)

Batch-1 decode reads every weight once per token and does two flops a byte with it, so its time is
the time to stream the weights from HBM. PyTorch's int4 kernel (tinygemm) reads them at 1.2-1.8 TB/s
on an H200 (bench/RESULTS.md, sessions 8 and 10), well short of what the memory gives.

Layout: the checkpoint's own (quant/gptq_checkpoint.py), read in place, no copy:
    qweight int32 [K/8, N]   code of input k at bits 4·(k mod 8) of row k // 8: N contiguous
    scales  fp16  [K/g, N]   zeros uint8 [K/g, N] (the checkpoint's qzeros unpacked, + 1)
    Ŵ[n, k] = s[k // g, n] · (q[k, n] − z[k // g, n])

Work split. A program owns BLOCK_N outputs (four or eight adjacent columns a lane: 16-byte loads,
a warp's loads cover 512 contiguous bytes of a row) and STEPS · BLOCK_K inputs of them; the grid is
(N / BLOCK_N) × SPLIT with SPLIT = K / (STEPS · BLOCK_K). Splitting K is what gives a GEMV of a 4096-
wide layer enough programs in flight to cover HBM's latency (with N alone, 4096 outputs make a few
dozen programs for 132 SMs). Each program issues all its loads at once and sums in registers; the
parts are added in a fixed order (quant/split_k.py), so y is the same on every run.

Arithmetic, per lane, in fp32. A code becomes a float without an int -> float conversion (those
issue at a quarter of the FMA rate): nibbles come in pairs (2p, 2p + 1), 8 bits apart in a word;
one shift puts nibble 2p + 1 at mantissa bits 19..22 and nibble 2p at 15..18, and one AND/OR each
(a LOP3) makes

    v_hi = bitcast_f32(0x3F800000 | q_hi << 19) = 1 + q_hi/16
    v_lo = bitcast_f32(0x41800000 | q_lo << 15) = 16 + q_lo/16

both exact. With dot = Σ x·v over a step's inputs, X_hi and X_lo the sums of x over the odd and the
even nibbles' inputs:

    Σ x·q = 16·(dot − X_hi − 16·X_lo)        Σ_k x_k Ŵ[n, k] = Σ_steps s·(Σ x·q − z·(X_hi + X_lo))

a shift per two weights, a LOP3 and an FMA per weight; x's sums are shared by all the lane's
columns. The 1 (or 16) taken out through the X sums cancels by at most 16·16: fp32 keeps ~2^-15 of
the output's scale, far below bf16's 2^-9 rounding of y.

x is bf16 and read as int32 words: a word holds inputs 2i (low half) and 2i + 1 (high half), exactly
the pair (2p, 2p + 1) a shift serves, and a bf16's bits are the top half of its fp32. One 32-bit load
then serves two inputs, and a shift or an AND makes each an fp32 (it was a load and a conversion each).
With the LOP3 constants in registers (below) a lane issues 1,963 instructions for its 256 bytes of
codes (the SASS for sm_90; 2,571 before), and at 4 warps issuing a cycle on each of 132 SMs that is
most of the time HBM needs for them. Measured on an H200 (bench/RESULTS.md, session 12): the largest
product (gate+up, 28672 × 4096) 9% faster; the three smaller ones, bound by latency, 3-8% slower, for
reasons the instruction count does not show; a 7B layer's four about even. Hence GemvTile.pairs:
pairs for products of many programs, one load an input for the others.
"""

from typing import NamedTuple

import torch

from fast.triton_support import tl, triton

# The bits of 1.0f and 16.0f, passed as kernel arguments: from a register, ptxas folds
# `(t & mask) | one` into one LOP3; as an immediate it emits two instructions.
ONE_BITS, SIXTEEN_BITS = 0x3F800000, 0x41800000
# Programs from which a product reads x in pairs (GemvTile.pairs). On the H200 (bench/RESULTS.md,
# session 12) pairs made gate+up (3,584 programs) 9% faster and o, q+k+v and down (512 to 1,792)
# 3-8% slower.
PAIRS_FROM = 2048


# With the SwiGLU epilogue ptxas gives the kernel 138 registers a lane (96 without): 7 programs an SM
# where 10 fit, and in a decode step the MLP's gate+up product got slower than the kernel it saved
# (session 13). Held to 96, it spills 24 bytes, in the epilogue only.
SWIGLU_REGISTERS = 96


class GemvTile(NamedTuple):
    block_n: int  # outputs per program: 128 · num_warps · (1 or 2)
    block_k: int  # inputs per step; divides the group size
    steps: int  # steps per program
    num_warps: int
    # x read as bf16 pairs in int32 words, the LOP3 constants in registers (fewer instructions): for
    # products of many programs, bound by issue; else each x read alone, the constants as arguments
    pairs: bool

    def split(self, k):
        return k // (self.block_k * self.steps)

    def workspace_need(self, n, k):
        """(partials, counters) of quant/split_k.py's workspace for an [N, K] weight."""
        return self.split(k) * n, n // self.block_n


def tile_for(n, k, group):
    """The tile for an [N, K] weight with groups of `group` inputs, or None where the kernel does not
    apply (then GPTQLinear keeps tinygemm). 64 words of codes a lane (16 rows of 4 columns): on the
    H200, 32 were 10-20% slower (HBM's latency uncovered) and 128 or more 2-8x slower
    (bench/RESULTS.md, session 11)."""
    block_n, block_k = 256, min(128, group)
    if n % block_n or group % block_k or k % block_k:
        return None
    programs = (n // block_n) * (k // block_k)
    return GemvTile(block_n, block_k, steps=1, num_warps=2, pairs=programs >= PAIRS_FROM)


def gptq_gemv(x, qweight, scales, zeros, group, tile, ws, out_dtype=torch.bfloat16, swiglu=False):
    """x [1, K] bf16, contiguous -> x Ŵᵀ [1, N] in out_dtype (module docstring); one kernel launch,
    nothing allocated but y. (fp32 out_dtype serves the tests: y without bf16's rounding.)

    swiglu: Ŵ is a SwiGLU MLP's gate and up projections with their outputs interleaved (gate j at
    2j, up j at 2j + 1); y is then [1, N / 2], silu(gate) · up with the bf16 roundings of the
    separate operations (the products', silu's, the multiplication's), which saves the MLP a kernel."""
    if torch.compiler.is_compiling():
        return torch.ops.rawqlora.gptq_gemv(x, qweight, scales, zeros, ws.partials, ws.counters, group, list(tile),
                                            swiglu)
    return _launch(x, qweight, scales, zeros, ws.partials, ws.counters, group, tile, swiglu, out_dtype)  # eager: no op dispatch


def _launch(x, qweight, scales, zeros, partials, counters, group, tile, swiglu=False, out_dtype=torch.bfloat16):
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if x.dtype != torch.bfloat16:
        raise TypeError(f"gptq_gemv takes bf16 x (read as pairs in int32 words), not {x.dtype}")
    if tile.pairs and x.storage_offset() % 2:  # a view starting mid-word: .view(torch.int32) needs whole words
        x = x.clone()
    y = torch.empty(1, n // 2 if swiglu else n, device=x.device, dtype=out_dtype)
    grid = (n // tile.block_n, tile.split(k))
    _gemv_kernel[grid](x.view(torch.int32) if tile.pairs else x, qweight, scales, zeros, partials, counters, y, n,
                       ONE_BITS, SIXTEEN_BITS, K=k, GROUP=group, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                       STEPS=tile.steps, SPLIT=tile.split(k), PAIRS=bool(tile.pairs), SWIGLU=swiglu,
                       num_warps=tile.num_warps, **({"maxnreg": SWIGLU_REGISTERS} if swiglu else {}))
    return y


# A custom op for torch.compile (decode's compiled step), which then calls the kernel as it is rather
# than tracing into the launch; eager calls skip its dispatch. It writes the workspace (partials;
# counters, which it leaves at 0).
@torch.library.custom_op("rawqlora::gptq_gemv", mutates_args=("partials", "counters"))
def _gptq_gemv_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  partials: torch.Tensor, counters: torch.Tensor, group: int, tile: list[int],
                  swiglu: bool) -> torch.Tensor:
    return _launch(x, qweight, scales, zeros, partials, counters, group, GemvTile(*tile), swiglu)


@_gptq_gemv_op.register_fake
def _(x, qweight, scales, zeros, partials, counters, group, tile, swiglu):
    return x.new_empty(1, qweight.shape[1] // 2 if swiglu else qweight.shape[1])


if triton is not None:
    from quant.split_k import store_sum, tile_sum

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, part_ptr, count_ptr, y_ptr, N, one_bits, sixteen_bits,
                     K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     STEPS: tl.constexpr, SPLIT: tl.constexpr, PAIRS: tl.constexpr, SWIGLU: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_K // 8)  # word rows of a step
        acc = tl.zeros((BLOCK_N,), tl.float32)
        if PAIRS:
            # program_id(2) is 0 (a 2-D grid), but ptxas cannot know it: the bits stay in a register.
            # Used as kernel arguments directly, ptxas reloads them from the constant bank (an LDC)
            # before every LOP3, 512 instructions a lane, a fifth of the kernel's (session 12).
            one = one_bits + tl.program_id(2)
            sixteen = sixteen_bits + tl.program_id(2)
        else:
            one = one_bits
            sixteen = sixteen_bits
        for step in tl.static_range(STEPS):
            k0 = (pid_k * STEPS + step) * BLOCK_K
            w = tl.load(w_ptr + (k0 // 8 + r)[:, None] * N + n[None, :])  # [BLOCK_K/8, BLOCK_N]
            dot = tl.zeros((BLOCK_K // 8, BLOCK_N), tl.float32)
            x_hi = tl.zeros((BLOCK_K // 8,), tl.float32)
            x_lo = tl.zeros((BLOCK_K // 8,), tl.float32)
            for p in tl.static_range(4):
                # nibbles 2p and 2p + 1 (inputs 8r + 2p, 8r + 2p + 1) to mantissa bits 15..18 and 19..22
                if p < 2:
                    t = w << (15 - 8 * p)
                else:
                    t = w >> (8 * p - 15)  # arithmetic: the sign copies land above the masks
                v_hi = ((t & 0x00780000) | one).to(tl.float32, bitcast=True)  # 1 + q/16
                v_lo = ((t & 0x00078000) | sixteen).to(tl.float32, bitcast=True)  # 16 + q/16
                if PAIRS:  # x_ptr: int32 words
                    pair = tl.load(x_ptr + k0 // 2 + 4 * r + p)  # bf16 inputs 8r + 2p (low half), 8r + 2p + 1
                    xl = (pair << 16).to(tl.float32, bitcast=True)
                    xh = (pair & -65536).to(tl.float32, bitcast=True)  # -65536: the mask 0xFFFF0000
                else:  # x_ptr: bf16
                    xl = tl.load(x_ptr + k0 + 8 * r + 2 * p).to(tl.float32)
                    xh = tl.load(x_ptr + k0 + 8 * r + 2 * p + 1).to(tl.float32)
                x_lo += xl
                x_hi += xh
                dot += xh[:, None] * v_hi
                dot += xl[:, None] * v_lo
            xh_sum = tl.sum(x_hi, axis=0)
            xl_sum = tl.sum(x_lo, axis=0)
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + n).to(tl.float32)
            z = tl.load(z_ptr + g * N + n).to(tl.float32)
            acc += (16.0 * s) * (tl.sum(dot, axis=0) - xh_sum - 16.0 * xl_sum) - (s * z) * (xh_sum + xl_sum)
        if SWIGLU:
            y, last = tile_sum(acc, part_ptr, count_ptr, pid_n, pid_k, tl.arange(0, BLOCK_N), SPLIT, BLOCK_N)
            if last:
                # a lane's adjacent columns are (gate j, up j) pairs; each value rounded to bf16 as the
                # separate operations round their outputs
                gate, up = tl.split(tl.reshape(y.to(tl.bfloat16).to(tl.float32), (BLOCK_N // 2, 2)))
                act = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)  # silu
                h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                tl.store(y_ptr + h, (act * up).to(y_ptr.dtype.element_ty), mask=h < N // 2)
        else:
            store_sum(acc, y_ptr + n, n < N, part_ptr, count_ptr, pid_n, pid_k, tl.arange(0, BLOCK_N), SPLIT, BLOCK_N)
