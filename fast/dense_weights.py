"""Dequantized copies of the frozen 4-bit weights, kept for the run when memory allows.

The fast path (fast/lora_function.py, fast/siblings.py) dequantizes a 4-bit base weight each
time it uses it: once in forward, once in backward, once more in a checkpoint's recompute,
each time into a new [out, in] tensor freed right after. On a 7B model at 16k tokens that is
445 dequantization kernels and ~20 ms of a ~1 s step (bench/profiles/rawqlora-2048x8-no-
recompute.txt), and it is what lets 4-bit training fit where bf16 weights would not. Where the
memory plan has room left after keeping activations (training/memory_plan.py), `keep` stores
each layer's weights as `dequantize` returns them, 2 bytes a weight in bf16 (0.41 GiB a
Mistral-7B layer), and `kept` hands them out instead: the very values, so the same gradients.

A kept layer's activations save a recompute (~11 ms a layer-step on that model for 1.6 GiB);
a layer's dense weights save two or three dequantizations (~0.6 ms for 0.41 GiB): the plan
spends memory on activations first and on these with what is left.
"""

from lora.layer import LoRALinear
from quant.linear4bit import Linear4bit, dequantize


def fast_4bit_bases(layer):
    """The 4-bit bases of the LoRA layers in `layer` (a decoder layer) that run the fast forward."""
    return [m.base_layer for m in layer.modules()
            if isinstance(m, LoRALinear) and isinstance(m.base_layer, Linear4bit)
            and getattr(m.forward, "rawqlora_fast", False)]


def nbytes(layer, dtype):
    """What `keep` would hold for `layer`, in bytes."""
    return sum(base.out_features * base.in_features for base in fast_4bit_bases(layer)) * dtype.itemsize


def keep(layers, dtype):
    """Dequantize the fast 4-bit bases of `layers` once, in `dtype`, and keep the results."""
    for layer in layers:
        for base in fast_4bit_bases(layer):
            base.dense_copy = dequantize(base, dtype)


def drop(layers):
    """Free the copies `keep` made for `layers`."""
    for layer in layers:
        for base in fast_4bit_bases(layer):
            base.__dict__.pop("dense_copy", None)


def kept(base, dtype):
    """`base`'s kept dense weight in `dtype`, or None."""
    copy = getattr(base, "dense_copy", None)
    return copy if copy is not None and copy.dtype == dtype else None
