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

On CUDA, the attention layers of Llama, Mistral and Qwen2 go one step further in that step
(`layer_forward`): what their forward does between the projections and the output projection,

    q, k = apply_rotary_pos_emb(q, k, cos, sin);  cache.update(k, v)  ->  index_copy_ at the column
    attention(q, cache's keys, cache's values)

is the kernel's `rotary_attention`, one kernel where Inductor made four (tested against exactly that
sequence: the cache writes bit for bit, the output as the kernel's).
"""

from functools import partial

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rawqlora import decode_attention_kernel
from rawqlora.static_cache import StaticCache

NAME = "rawqlora_one_token"
# Where the kernel runs (the tests add "cpu" under Triton's interpreter).
KERNEL_DEVICES = ("cuda",)
# Attention layers whose forward is: q, k, v projections viewed [b, tokens, heads, d], rotary from
# position_embeddings (apply_rotary_pos_emb), cache.update(k, v, layer_idx), the attention function
# with `scaling`, o_proj (transformers' Llama, Mistral, Qwen2; Qwen2's window is in the prepared mask).
ROTARY_LAYERS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
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
    if query.device.type in KERNEL_DEVICES and decode_attention_kernel.fits(query, key):  # this math as one kernel
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


def layer_forward(layer, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """An attention layer's forward (ROTARY_LAYERS): in a routed decode step on the kernel's devices, the
    rotary, the cache write and the attention as one kernel; anything else as the layer's own forward."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the argument's new name, or its old one
    batch, tokens, _ = hidden_states.shape
    shape = (batch, tokens, -1, layer.head_dim)
    decoding = (layer.config._attn_implementation == NAME and not layer.training and isinstance(cache, StaticCache)
                and cache.length == cache.max_len and tokens == 1 and attention_mask is not None
                and attention_mask.dtype == torch.bool and hidden_states.device.type in KERNEL_DEVICES)
    if decoding:
        keys, values = cache.keys[layer.layer_idx], cache.values[layer.layer_idx]
        cos, sin = position_embeddings
        heads = layer.config.num_attention_heads
        if decode_attention_kernel.takes(keys.dtype, heads, keys.shape[1], layer.head_dim) and cos.dtype == keys.dtype:
            out = decode_attention_kernel.rotary_attention(
                *(p(hidden_states).view(shape) for p in (layer.q_proj, layer.k_proj, layer.v_proj)), cos, sin,
                keys, values, cache.columns, attention_mask, layer.scaling)
            return layer.o_proj(out.reshape(batch, tokens, -1)), None
    return type(layer).forward(layer, hidden_states, position_embeddings, attention_mask, **kwargs)


def route_layers(model):
    """Give `model`'s ROTARY_LAYERS `layer_forward` (once; outside a routed step it is their own)."""
    for module in model.modules():
        if type(module).__name__ in ROTARY_LAYERS and not isinstance(module.forward, partial):
            module.forward = partial(layer_forward, module)


def routed(decoder, step):
    """`step()` run with `decoder.model`'s attention dispatched to `one_token_attention`, and its
    ROTARY_LAYERS to `layer_forward`'s kernel, then put back. For a step compiled with it: the
    compiled code was traced, and is guarded, with this setting."""
    route_layers(decoder.model)

    def run():
        config = decoder.model.config
        previous = config._attn_implementation
        config._attn_implementation = NAME
        try:
            return step()
        finally:
            config._attn_implementation = previous

    return run
