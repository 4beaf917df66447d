"""One-token attention as one Triton kernel (CUDA): rawqlora/decode_attention.py's math, fused.

    fits(query, key)                                whether the kernel takes these (on CUDA)
    out = attention(query, key, value, visible, scaling)
        query [b, heads, 1, d], key/value [b, kv_heads, columns, d] (the static cache's views),
        visible [b, 1, 1, columns] bool -> out [b, 1, heads, d] in query's dtype
    out = rotary_attention(query, key, value, cos, sin, key_cache, value_cache, column, visible, scaling)
        the same, given the step's projections before their rotary embedding (query [b, 1, heads, d],
        key/value [b, 1, kv_heads, d], cos/sin [b, 1, d]): it rotates query and key and writes key and
        value into the caches [b, kv_heads, columns, d] at `column` ([1] long) first
    (under torch.compile custom ops, rawqlora::one_token_attention and rawqlora::rotary_one_token_attention,
    that the compiler calls as they are)

Compiled, the reference's products and sums became three kernels a layer (scores, softmax, the
weighted sum of values): 9 µs of a 7B layer's decode step on an H200, 0.3 ms a token, for 1 MB of
keys and values. Here a program per (row, KV head, part of the columns) holds the query heads that
share the KV head and walks its columns in blocks with the online softmax of FlashAttention (Dao et
al. 2022): per block

    s = q kᵀ · scaling (−∞ where not visible)      m' = max(m, max s)      p = exp(s − m')
    l = l·exp(m − m') + Σ p                          acc = acc·exp(m − m') + p v

Products on the tensor cores (the query heads padded to 16 rows, the least a product takes), p
rounded to the cache's dtype for the second one as FlashAttention does, the rest in fp32. A block
where a row sees nothing leaves it as it was (m stays −∞; every row sees at least its own column,
rawqlora/static_cache.visible_columns). The columns are split into parts until about PROGRAMS
programs run (flash-decoding): at batch 1 a 7B model has only 8 (row, KV head) pairs. Each part
stores (acc, m, l); the last part of a pair to finish merges them in part order, so the output is
the same on every run, with quant/split_k.py's counters:

    out = Σ acc·exp(m − M) / Σ l·exp(m − M)        M the largest m of the parts

Measured in a batch-1 GPTQ step on an H200 (bench/RESULTS.md, session 13): 7.5 µs a layer with one
program per pair, 5.1 split (a kept decoder's 256-column cache).

`rotary_attention` also takes over what the layer did before it (transformers' apply_rotary_pos_emb,
then the cache's index_copy_): three small kernels a layer that Inductor made of it, 4 µs of each
layer's step on that H200, mostly launch and wait (session 13's profile). Every program rotates the
query heads it holds,

    rotary(x) = x·cos + rotate_half(x)·sin       rotate_half(x) = (−x[d/2:], x[:d/2])

rounded to the cache's dtype after each product and after the sum, as the eager bf16 code rounds
(its cache writes are the eager layer's bit for bit); the program whose columns hold `column` also
writes the new key and value there, before it reads its columns. In the same step (session 14): the
attention 164 -> 187 µs, the three kernels' 127 µs gone, a 2.504 -> 2.372 ms step.
"""

import os

import torch

from fast.triton_support import tl, triton
from quant import split_k

BLOCK_C = 32  # cache columns a step
# At batch 1 a 7B model has 8 (row, KV head) pairs: the columns are split until about this many
# programs run (two an SM on an H200's 132), each over whole blocks.
PROGRAMS = 264


def fits(query, key):
    """Whether the kernel takes these (`takes`); the caller checks the device (CUDA)."""
    return query.dtype == key.dtype and takes(query.dtype, query.shape[1], key.shape[1], query.shape[-1])


def takes(dtype, heads, kv_heads, dim):
    """Whether the kernel takes query and cache of `dtype`, `heads` query heads over `kv_heads`, heads of
    size `dim`: 16-bit (in fp32 its products would run in TF32, coarser than the reference's fp32), a
    power-of-two head size of 16..256 (tl.arange), at most 64 query heads a KV head."""
    return (triton is not None and dtype in (torch.bfloat16, torch.float16) and 16 <= dim <= 256
            and dim & (dim - 1) == 0 and heads // kv_heads <= 64)


def attention(query, key, value, visible, scaling):
    if torch.compiler.is_compiling():
        return torch.ops.rawqlora.one_token_attention(query, key, value, visible, scaling)
    return _launch(query, key, value, visible, scaling)


def rotary_attention(query, key, value, cos, sin, key_cache, value_cache, column, visible, scaling):
    if torch.compiler.is_compiling():
        return torch.ops.rawqlora.rotary_one_token_attention(query, key, value, cos, sin, key_cache, value_cache,
                                                             column, visible, scaling)
    return _launch(query, key_cache, value_cache, visible, scaling, new=(key, value, cos, sin, column))


def split(pairs, columns):
    """(blocks a program walks, programs a (row, KV head) pair) for `pairs` pairs and `columns` columns."""
    blocks = triton.cdiv(columns, BLOCK_C)
    parts = min(blocks, max(1, triton.cdiv(PROGRAMS, pairs)))
    per_part = triton.cdiv(blocks, parts)
    return per_part, triton.cdiv(blocks, per_part)


def _launch(query, key, value, visible, scaling, new=None):
    """key/value: the cache's columns. new: None, or (the step's key, value, cos, sin, column) as
    rotary_attention takes them, with query then before its rotary ([b, 1, heads, d])."""
    # The kernel steps through d with stride 1; any other layout of what it only reads is copied first.
    def unit_stride(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    if new is None:
        query, key, value = map(unit_stride, (query, key, value))
        k_new = v_new = cos = sin = column = query  # not read
    else:
        if key.stride(-1) != 1 or value.stride(-1) != 1:
            raise ValueError("rotary_attention writes the caches in place: their last dimension needs stride 1")
        query = unit_stride(query).transpose(1, 2)  # [b, heads, 1, d], as the kernel indexes it
        k_new, v_new, cos, sin, column = map(unit_stride, new)
        cos, sin = (t.expand(query.shape[0], 1, -1) for t in (cos, sin))  # one row's for all: stride 0
    batch, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group = heads // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    visible = unit_stride(visible.reshape(batch, columns))
    blocks, parts = split(batch * kv_heads, columns)
    # each part's (acc, m, l): g_pad · (dim + 2) floats; a counter per pair
    ws = split_k.workspace(query.device, batch * kv_heads * parts * g_pad * (dim + 2), batch * kv_heads)
    _kernel[(batch, kv_heads, parts)](query, key, value, visible, out, ws.partials, ws.counters, scaling, columns,
                                      k_new, v_new, cos, sin, column,
                                      query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
                                      value.stride(0), value.stride(1), value.stride(2), visible.stride(0),
                                      k_new.stride(0), k_new.stride(2), v_new.stride(0), v_new.stride(2),
                                      cos.stride(0), sin.stride(0),
                                      GROUP=group, G_PAD=g_pad, D=dim, BLOCK_C=BLOCK_C, BLOCKS=blocks, SPLIT=parts,
                                      ROTARY=new is not None,
                                      INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4,
                                      # no fused multiply-adds: with them the compiler dropped the rotary's rounding
                                      # to 16 bits between a product and the sum (as Inductor, to round as eager)
                                      enable_fp_fusion=False)
    return out


# Inductor may lay the ops' inputs out as it likes (the kernel takes any strides): under its default for
# custom ops (exact strides) it wrote every layer its own copy of the step's cos, sin and mask, in one kernel
# per four layers; with this tag it computes them once (a 32-layer step compiled on the CPU, session 14).
LAYOUT = (torch.Tag.flexible_layout,)


@torch.library.custom_op("rawqlora::one_token_attention", mutates_args=(), tags=LAYOUT)
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    return _launch(query, key, value, visible, scaling)


@_attention_op.register_fake
def _(query, key, value, visible, scaling):
    batch, heads, _, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


@torch.library.custom_op("rawqlora::rotary_one_token_attention", mutates_args=("key_cache", "value_cache"),
                         tags=LAYOUT)
def _rotary_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, column: torch.Tensor,
                         visible: torch.Tensor, scaling: float) -> torch.Tensor:
    return _launch(query, key_cache, value_cache, visible, scaling, new=(key, value, cos, sin, column))


@_rotary_attention_op.register_fake
def _(query, key, value, cos, sin, key_cache, value_cache, column, visible, scaling):
    batch, _, heads, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


if triton is not None:

    @triton.jit
    def _kernel(q_ptr, k_ptr, v_ptr, vis_ptr, o_ptr, part_ptr, count_ptr, scaling, columns,
                kn_ptr, vn_ptr, cos_ptr, sin_ptr, col_ptr,
                sq_b, sq_h, sk_b, sk_h, sk_c, sv_b, sv_h, sv_c, svis_b, skn_b, skn_h, svn_b, svn_h, scos_b, ssin_b,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCKS: tl.constexpr, SPLIT: tl.constexpr, ROTARY: tl.constexpr, INTERPRETED: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        part = tl.program_id(2)  # this program's columns: [part · BLOCKS · BLOCK_C, + BLOCKS · BLOCK_C)
        g = tl.arange(0, G_PAD)  # query heads h·GROUP + g, rows past GROUP padding
        d = tl.arange(0, D)
        c = tl.arange(0, BLOCK_C)
        row = g < GROUP
        q_rows = q_ptr + b * sq_b + (h * GROUP + g)[:, None] * sq_h
        q = tl.load(q_rows + d[None, :], mask=row[:, None], other=0.0)
        if ROTARY:  # the query heads rotated; the new key and value written where this program's part reads
            q = _rotate_and_write(q, q_rows, row, kn_ptr + b * skn_b + h * skn_h, vn_ptr + b * svn_b + h * svn_h,
                                  cos_ptr + b * scos_b, sin_ptr + b * ssin_b, col_ptr, k_ptr + b * sk_b + h * sk_h,
                                  v_ptr + b * sv_b + h * sv_h, sk_c, sv_c, part * BLOCKS * BLOCK_C, BLOCKS * BLOCK_C,
                                  D, INTERPRETED)
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        for i in range(BLOCKS):
            cols = (part * BLOCKS + i) * BLOCK_C + c
            inside = cols < columns
            seen = tl.load(vis_ptr + b * svis_b + cols, mask=inside, other=0) != 0
            # k and v masked by `inside`, not `seen`: their loads then wait on nothing
            k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_c + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_c + d[None, :], mask=inside[:, None], other=0.0)
            if INTERPRETED:  # its tl.dot multiplies bf16's bits as integers; fp32 holds them and products exactly
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                qk = tl.dot(q, tl.trans(k))
            s = tl.where(seen[None, :], qk * scaling, float("-inf"))  # [G_PAD, BLOCK_C]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - _finite(m_new)[:, None])
            rescale = tl.exp(m - _finite(m_new))
            l = l * rescale + tl.sum(p, axis=1)
            if INTERPRETED:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * rescale[:, None] + pv
            m = m_new
        out_ptrs = o_ptr + (b * GROUP * tl.num_programs(1) + h * GROUP + g)[:, None] * D + d[None, :]
        if SPLIT == 1:
            tl.store(out_ptrs, (acc / _nonzero(l)[:, None]).to(o_ptr.dtype.element_ty), mask=row[:, None])
        else:
            # This part's (acc, m, l) stored; the last part of (b, h) to finish merges all SPLIT parts in
            # part order (the same result on every run; quant/split_k.py's counters, the same protocol):
            # with M the rows' largest m, out = Σ acc·exp(m − M) / Σ l·exp(m − M).
            tile = b * tl.num_programs(1) + h
            parts = part_ptr + tile * (SPLIT * G_PAD * (D + 2))
            at = parts + part * (G_PAD * (D + 2))
            tl.store(at + g[:, None] * D + d[None, :], acc, mask=row[:, None])
            tl.store(at + G_PAD * D + g, m, mask=row)
            tl.store(at + G_PAD * (D + 1) + g, l, mask=row)
            tl.debug_barrier()  # every lane's part stored before the counter moves (released below)
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT - 1:
                # one pass, the parts' loads independent of each other (unrolled): with M the largest m
                # so far, total = Σ acc·exp(m − M), weight = Σ l·exp(m − M), rescaled as M grows
                top = tl.full((G_PAD,), float("-inf"), tl.float32)
                total = tl.zeros((G_PAD, D), tl.float32)
                weight = tl.zeros((G_PAD,), tl.float32)
                for j in tl.static_range(SPLIT):  # .cg: from L2, not a stale L1
                    at = parts + j * (G_PAD * (D + 2))
                    m_i = tl.load(at + G_PAD * D + g, mask=row, other=float("-inf"), cache_modifier=".cg")
                    l_i = tl.load(at + G_PAD * (D + 1) + g, mask=row, other=0.0, cache_modifier=".cg")
                    acc_i = tl.load(at + g[:, None] * D + d[None, :], mask=row[:, None], other=0.0, cache_modifier=".cg")
                    new_top = tl.maximum(top, m_i)
                    before = tl.exp(top - _finite(new_top))  # a part that saw nothing: m = −∞, weight 0
                    w = tl.exp(m_i - _finite(new_top))
                    weight = weight * before + l_i * w
                    total = total * before[:, None] + acc_i * w[:, None]
                    top = new_top
                tl.store(out_ptrs, (total / _nonzero(weight)[:, None]).to(o_ptr.dtype.element_ty), mask=row[:, None])
                tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _rotate_and_write(q, q_rows, row, k_new, v_new, cos_row, sin_row, col_ptr, k_head, v_head, sk_c, sv_c,
                          first, width, D: tl.constexpr, INTERPRETED: tl.constexpr):
        """rotary_attention's prologue: the query heads q (loaded from q_rows, `row` the real ones) rotated,
        returned; the KV head's new key rotated and, with its new value, written at `column` in its cache
        (k_head, v_head) by the program whose columns [first, first + width) hold that column."""
        d = tl.arange(0, D)
        half = (d + D // 2) % D  # rotate_half's source of each d
        negated = d < D // 2
        cos = tl.load(cos_row + d).to(tl.float32)
        sin = tl.load(sin_row + d).to(tl.float32)
        q = _rotary(q, tl.load(q_rows + half[None, :], mask=row[:, None], other=0.0), cos[None, :], sin[None, :],
                    negated[None, :], INTERPRETED)
        k = _rotary(tl.load(k_new + d), tl.load(k_new + half), cos, sin, negated, INTERPRETED)
        column = tl.load(col_ptr + d * 0)  # [D], all `column`
        owner = (column >= first) & (column < first + width)
        tl.store(k_head + column * sk_c + d, k, mask=owner)
        tl.store(v_head + column * sv_c + d, tl.load(v_new + d), mask=owner)
        tl.debug_barrier()  # stored before any lane of this program reads the column
        return q

    @triton.jit
    def _rotary(x, x_half, cos, sin, negated, INTERPRETED: tl.constexpr):
        """x·cos + rotate_half(x)·sin, x_half = x at rotate_half's source (negated where `negated`),
        rounded to x's dtype after each product and after the sum, as the eager code in x's dtype."""
        rotated = tl.where(negated, -x_half.to(tl.float32), x_half.to(tl.float32))
        a = _round(x.to(tl.float32) * cos, x.dtype, INTERPRETED).to(tl.float32)
        b = _round(rotated * sin, x.dtype, INTERPRETED).to(tl.float32)
        return _round(a + b, x.dtype, INTERPRETED)

    @triton.jit
    def _round(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
        """fp32 x in `dtype`, to nearest (ties to even), as the GPU's conversion and torch's round; the
        interpreter's conversion to bf16 truncates, so there x is rounded to bf16's 8 bits first."""
        if INTERPRETED and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _finite(m):
        """m, with −∞ (nothing seen yet) as 0: exp(−∞ − 0) = 0 where exp(−∞ − (−∞)) would be NaN."""
        return tl.where(m == float("-inf"), 0.0, m)

    @triton.jit
    def _nonzero(l):
        """l, with 0 (a padding row, which sees nothing) as 1."""
        return tl.where(l == 0.0, 1.0, l)
