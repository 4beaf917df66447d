"""A KV cache at fixed addresses, for a decode step whose shapes never change (CUDA graphs).

    keys[layer], values[layer]: [batch, kv_heads, max_len, head_dim], allocated once

    prefill  columns = 0 .. P-1   update() writes the prompt's K/V there, returns columns [0, P)
    decode   columns = [c]        update() writes the new token's K/V at column c (a tensor on
                                  the device, advanced in place by the loop), returns all max_len

Column c holds, for every row of a left-padded batch, what was fed at column c: the prompts in
the first P columns, then one column per decode step. The mask from `visible_columns` hides
left padding and columns not written yet, so reading all max_len columns every step computes
what a cache of exactly the columns so far would. Nothing here
reads a value back to the host, allocates after the first update, or branches on data: the
decode step that uses it can be captured in a CUDA graph and replayed.

transformers' attention layers call only `update(key_states, value_states, layer_idx, ...)`
when they are given a prepared 4-D mask (masking_utils returns such a mask as it is), which is
all this class provides. transformers' own `StaticCache` keeps its write position per layer,
and its sliding-window layers keep it in a Python int, which a captured graph would freeze.
"""


class StaticCache:
    def __init__(self, num_layers, max_len):
        self.max_len = max_len
        self.keys = [None] * num_layers
        self.values = [None] * num_layers
        self.columns = None  # long tensor: where update() writes; set by the decode loop
        self.length = max_len  # how many columns update() returns: the prompt's at prefill, all when decoding

    @property
    def allocated(self):
        """Whether a prefill has made the buffers (after it, no update allocates)."""
        return any(k is not None for k in self.keys)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            # Allocated at the first (prefill) call, in the dtype and on the device the layer
            # computes in, which only the forward knows (autocast, a norm in fp32 ahead of a
            # bf16 projection, ...). Never during a capture: prefill always runs first, eagerly.
            batch, heads, _, k_dim = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(batch, heads, self.max_len, k_dim)
            self.values[layer_idx] = value_states.new_zeros(batch, heads, self.max_len, value_states.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.columns, key_states)
        values.index_copy_(2, self.columns, value_states)
        return keys[:, :, : self.length], values[:, :, : self.length]

    def get_seq_length(self, layer_idx=0):
        # Read only by transformers releases that derive cache positions when none are given; with
        # position ids and a 4-D mask given they use it for nothing that reaches the output.
        return 0


def visible_columns(real, query_columns, all_columns):
    """Which cache columns each query attends to: [batch, 1, queries, columns] bool (True = attend).

    real: [batch, columns] bool, the columns that hold a real token (not left padding).
    query_columns: [queries] long, the column of each query token.
    A query sees the real columns at or before its own; a padding query also sees itself, so
    no row is empty (an all-masked softmax row is NaN in some kernels, and NaN in a padding
    row's values would reach real rows as 0 · NaN through the attention product).
    """
    causal = all_columns[None, :] <= query_columns[:, None]  # [queries, columns]
    own = all_columns[None, :] == query_columns[:, None]
    return ((real[:, None, :] & causal) | own)[:, None]
