"""Next-token cross-entropy that never materialises the full fp32 logits.

A 7B model with a 32k vocabulary at 8 x 2048 tokens has 0.5G logits: 2 GiB in fp32, plus
as much again for their gradient. Instead we

  1. keep only the positions that have a target (completion-only training skips the
     prompt and pad tokens: their logits are never computed at all), then
  2. run lm_head + cross-entropy over chunks of those positions, each chunk under
     activation checkpointing, so backward recomputes one chunk's logits at a time.

Peak extra memory is one chunk's logits instead of the whole batch's.
The loss is returned as a *sum* over target tokens, with the count: the trainer divides
by the number of target tokens in the whole accumulation window (see train.py).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label that gets no loss: torch cross_entropy's ignore_index default


def causal_lm_loss(hidden, lm_head, labels, chunk_size=1024):
    """Summed cross-entropy of predicting labels[:, t+1] from hidden[:, t]; returns (sum, n_targets).

    `hidden` is the decoder's last hidden state [B, T, H], `labels` [B, T] with -100 where
    no loss is taken. Logits are upcast to fp32 inside each chunk before the softmax, as
    transformers does, because bf16 log-softmax over a large vocabulary loses precision.
    """
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = targets.index_select(0, keep)

    def chunk_loss(h_chunk, t_chunk):
        return F.cross_entropy(lm_head(h_chunk).float(), t_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h_chunk, t_chunk = h[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h_chunk, t_chunk, use_reentrant=False)
        else:
            total = total + chunk_loss(h_chunk, t_chunk)
    return total, targets.numel()
