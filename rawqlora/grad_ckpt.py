"""Gradient (activation) checkpointing, one decoder layer at a time.

During training only each decoder layer's *input* is kept; its internals (attention
scores, MLP activations, dequantized weights) are recomputed in backward. For QLoRA this
is what makes long sequences fit: activations, not the 4-bit weights, dominate memory.

We use PyTorch's non-reentrant checkpoint: unlike the reentrant one it works when the
layer's inputs do not require grad (frozen embeddings feed layer 0), supports keyword
arguments, and lets autograd see through for the LoRA parameters inside the layer.
"""

import functools

from torch.utils.checkpoint import checkpoint


def enable(layers):
    """Wrap each layer's forward in a checkpoint while the layer is in training mode.

    The module itself is untouched (same names, same state dict): only its bound
    `forward` is replaced, so adapters and checkpoints are unaffected.
    """
    for layer in layers:
        if getattr(layer, "_plain_forward", None) is not None:
            continue  # already enabled
        layer._plain_forward = layer.forward

        @functools.wraps(layer._plain_forward)
        def forward(*args, _layer=layer, **kwargs):
            if _layer.training:
                return checkpoint(_layer._plain_forward, *args, use_reentrant=False, **kwargs)
            return _layer._plain_forward(*args, **kwargs)

        layer.forward = forward
