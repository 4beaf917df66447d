"""Next-token cross-entropy that never materialises the full fp32 logits.

A 7B model with a 32k vocabulary at 8 x 2048 tokens has 0.5G logits: 2 GiB in fp32, plus
as much again for their gradient. Instead we

  1. keep only the positions that have a target (completion-only training skips the
     prompt and pad tokens: their logits are never computed at all), then
  2. run lm_head + cross-entropy over chunks of those positions, each chunk under
     activation checkpointing, so backward recomputes one chunk's logits at a time.

Peak extra memory is one chunk's logits instead of the whole batch's. Where memory is plentiful
(--grad-ckpt auto with room left after the decoder layers it keeps), the chunks keep their
log-probabilities instead (`keep_log_probs`, `kept_bytes`): backward then runs without
computing the logits again, one lm_head product less per target token.
The loss is returned as a *sum* over target tokens, with the count: the trainer divides
by the number of target tokens in the whole accumulation window (see train.py).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the label that gets no loss: torch cross_entropy's ignore_index default


def keep_log_probs(lm_head, keep):
    """From the next forward on, `causal_lm_loss` with this `lm_head` keeps every chunk's fp32
    log-probabilities for backward (True) or recomputes each chunk's logits there (False, the
    default). training/memory_plan.py decides."""
    lm_head.loss_keeps_log_probs = keep


def kept_bytes(targets, vocab_size):
    """What `causal_lm_loss` holds for backward when it keeps its chunks: cross_entropy's fp32
    log-probabilities, 4 bytes per target and vocabulary entry (the logits' bf16 copy and their
    fp32 cast are not saved). The recomputing version holds the targets' hidden states instead,
    32x fewer bytes on a 7B model, so this bounds what keeping adds from above
    (tests/test_loss.py counts the saved tensors)."""
    return 4 * targets * vocab_size


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
    recompute = torch.is_grad_enabled() and not getattr(lm_head, "loss_keeps_log_probs", False)
    for start in range(0, targets.numel(), chunk_size):
        h_chunk, t_chunk = h[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            total = total + checkpoint(chunk_loss, h_chunk, t_chunk, use_reentrant=False)
        else:
            total = total + chunk_loss(h_chunk, t_chunk)
    return total, targets.numel()
