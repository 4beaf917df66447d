"""Attention for the compiled one-token decode step: grouped-query attention read straight from the cache.

One new token per row attends to every cache column the static cache holds (rawqlora/static_cache.py),
under a boolean mask (left padding, columns not written yet). transformers' sdpa path, given a
mask, first copies each KV head's keys and values once per query head (`repeat_kv`), and the
kernel it reaches (cuDNN's, on an H200) is built for long queries: at batch 1 the attention of a
7B model took 13 µs a layer, 0.4 ms of a 4.7 ms step (bench/RESULTS.md, issue 16). Here the query
heads of a KV head are grouped instead, in fp32:

    q [b, heads, 1, d] -> [b, kv_heads, heads / kv_heads, 1, d]     no copy of the cache
    scores = Σ_d q · k          [b, kv_heads, group, columns]   x scaling, masked to -inf
    out    = Σ_c softmax(scores) · v                            [b, 1, heads, d]

written as products and sums (`grouped_attention`), which torch.compile turns into three fused
reductions (an eager call would materialise the [.., columns, d] products: the eager decode step
keeps sdpa). On CUDA the same math runs as one Triton kernel instead
(rawqlora/decode_attention_kernel.py, tested against `grouped_attention`). `routed(step)` runs a
compiled step with the model's attention dispatched here; anything but one boolean-masked query
per row goes to sdpa as before.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rawqlora import decode_attention_kernel

NAME = "rawqlora_one_token"
# Attention-function arguments some models pass that change the arithmetic (Gemma 2's logit
# soft-capping, attention sinks, position biases): with any of them the call goes to sdpa.
UNHANDLED = ("softcap", "s_aux", "sinks", "position_bias")


def one_token_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function interface: (output [b, q, heads, d], None)."""
    batch, heads, queries, dim = query.shape
    extras = any(kwargs.get(k) is not None for k in UNHANDLED)
    if queries != 1 or attention_mask is None or attention_mask.dtype != torch.bool or dropout or extras:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scaling = dim**-0.5 if scaling is None else scaling
    if query.is_cuda and decode_attention_kernel.fits(query, key):  # on CUDA: this math as one kernel
        return decode_attention_kernel.attention(query, key, value, attention_mask, scaling), None
    return grouped_attention(query, key, value, attention_mask, scaling), None


def grouped_attention(query, key, value, visible, scaling):
    """The math (module docstring): query [b, heads, 1, d], key/value [b, kv_heads, columns, d],
    visible [b, 1, 1, columns] bool -> [b, 1, heads, d] in query's dtype."""
    batch, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    q = query.float().reshape(batch, kv_heads, heads // kv_heads, 1, dim)
    scores = (q * key.float()[:, :, None]).sum(-1) * scaling  # [b, kv_heads, group, columns]
    scores = scores.masked_fill(~visible.reshape(batch, 1, 1, columns), float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs[..., None] * value.float()[:, :, None]).sum(-2)  # [b, kv_heads, group, d]
    return out.to(query.dtype).reshape(batch, 1, heads, dim)


AttentionInterface.register(NAME, one_token_attention)


def routed(decoder, step):
    """`step()` run with `decoder.model`'s attention dispatched to `one_token_attention`, then put back.
    For a step compiled with it: the compiled code was traced, and is guarded, with this setting."""

    def run():
        config = decoder.model.config
        previous = config._attn_implementation
        config._attn_implementation = NAME
        try:
            return step()
        finally:
            config._attn_implementation = previous

    return run
