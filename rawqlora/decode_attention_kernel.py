"""One-token attention as one Triton kernel (CUDA): rawqlora/decode_attention.py's math, fused.

    fits(query, key)                                whether the kernel takes these (on CUDA)
    out = attention(query, key, value, visible, scaling)
        query [b, heads, 1, d], key/value [b, kv_heads, columns, d] (the static cache's views),
        visible [b, 1, 1, columns] bool -> out [b, 1, heads, d] in query's dtype
    (under torch.compile a custom op, rawqlora::one_token_attention, that the compiler calls as it is)

Compiled, the reference's products and sums became three kernels a layer (scores, softmax, the
weighted sum of values): 9 µs of a 7B layer's decode step on an H200, 0.3 ms a token, for 1 MB of
keys and values. Here one program per (row, KV head) holds the query heads that share the KV head
and walks the columns in blocks with the online softmax of FlashAttention (Dao et al. 2022): per block

    s = q kᵀ · scaling (−∞ where not visible)      m' = max(m, max s)      p = exp(s − m')
    l = l·exp(m − m') + Σ p                          acc = acc·exp(m − m') + p v

and out = acc / l. Products on the tensor cores (the query heads padded to 16 rows, the least a
product takes), p rounded to the cache's dtype for the second one as FlashAttention does, the rest
in fp32. A block where a row sees nothing leaves it as it was (m stays −∞; every row sees at least
its own column, rawqlora/static_cache.visible_columns).

Measured (bench/RESULTS.md, session 12): with it, and emulate_precision_casts in the same run, a
batch-1 GPTQ step went from 2.70 to 2.64 ms, less than the 0.2 ms hoped for. At batch 1 it is 8
programs, each walking every column: splitting the columns across programs is the next thing to try.
"""

import os

import torch

from fast.triton_support import tl, triton

BLOCK_C = 64  # cache columns a step


def fits(query, key):
    """Whether the kernel takes these: 16-bit inputs (in fp32 its products would run in TF32, coarser
    than the reference's fp32), a power-of-two head size of 16..256 (tl.arange), at most 64 query
    heads a KV head. The caller checks the device (CUDA)."""
    dim, group = query.shape[-1], query.shape[1] // key.shape[1]
    return (triton is not None and query.dtype == key.dtype and query.dtype in (torch.bfloat16, torch.float16)
            and 16 <= dim <= 256 and dim & (dim - 1) == 0 and group <= 64)


def attention(query, key, value, visible, scaling):
    if torch.compiler.is_compiling():
        return torch.ops.rawqlora.one_token_attention(query, key, value, visible, scaling)
    return _launch(query, key, value, visible, scaling)


def _launch(query, key, value, visible, scaling):
    # The kernel steps through d with stride 1; any other layout is copied first.
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    batch, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    group = heads // kv_heads
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    visible = visible.reshape(batch, columns)
    _kernel[(batch, kv_heads)](query, key, value, visible, out, scaling, columns,
                               query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
                               value.stride(0), value.stride(1), value.stride(2), visible.stride(0),
                               GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_C=BLOCK_C,
                               INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4)
    return out


@torch.library.custom_op("rawqlora::one_token_attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    return _launch(query, key, value, visible, scaling)


@_attention_op.register_fake
def _(query, key, value, visible, scaling):
    batch, heads, _, dim = query.shape
    return query.new_empty(batch, 1, heads, dim)


if triton is not None:

    @triton.jit
    def _kernel(q_ptr, k_ptr, v_ptr, vis_ptr, o_ptr, scaling, columns,
                sq_b, sq_h, sk_b, sk_h, sk_c, sv_b, sv_h, sv_c, svis_b,
                GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
                INTERPRETED: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        g = tl.arange(0, G_PAD)  # query heads h·GROUP + g, rows past GROUP padding
        d = tl.arange(0, D)
        c = tl.arange(0, BLOCK_C)
        row = (g < GROUP)[:, None]
        q = tl.load(q_ptr + b * sq_b + (h * GROUP + g)[:, None] * sq_h + d[None, :], mask=row, other=0.0)
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        for c0 in range(0, columns, BLOCK_C):
            cols = c0 + c
            inside = cols < columns
            k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_c + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_c + d[None, :], mask=inside[:, None], other=0.0)
            seen = tl.load(vis_ptr + b * svis_b + cols, mask=inside, other=0) != 0
            if INTERPRETED:  # its tl.dot multiplies bf16's bits as integers; fp32 holds them and products exactly
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                qk = tl.dot(q, tl.trans(k))
            s = tl.where(seen[None, :], qk * scaling, float("-inf"))  # [G_PAD, BLOCK_C]
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp(−∞ − 0) = 0, not NaN
            p = tl.exp(s - shift[:, None])
            rescale = tl.exp(m - shift)
            l = l * rescale + tl.sum(p, axis=1)
            if INTERPRETED:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * rescale[:, None] + pv
            m = m_new
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # padding rows: l = 0
        tl.store(o_ptr + (b * GROUP * tl.num_programs(1) + h * GROUP + g)[:, None] * D + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row)
