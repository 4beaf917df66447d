import pytest
import torch

from training import loss
from training.loss import causal_lm_loss
from training.memory_plan import SavedBytes
from rawqlora.tiny import tiny_model


def test_chunked_loss_equals_transformers_loss_and_gradients():
    # transformers' own loss (mean over shifted targets) is the reference; ours is a sum over
    # the same targets computed in chunks of 5 positions, so loss/n must match to fp32
    # rounding (1e-6 relative: the sums are over a few dozen terms).
    model = tiny_model("llama", 97, seed=0)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    hidden = model.model(input_ids=ids).last_hidden_state
    total, n = causal_lm_loss(hidden, model.lm_head, labels, chunk_size=5)
    assert n == (labels[:, 1:] != -100).sum()
    (total / n).backward()
    torch.testing.assert_close(total / n, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_kept_log_probs_give_the_same_gradients_and_hold_kept_bytes(chunk_size):
    # Keeping the chunks' log-probabilities runs the same operations as recomputing them in
    # backward, so the loss and the hidden states' gradient are bit-equal. What it holds beyond
    # the recomputing version, counted from the saved tensors: kept_bytes (fp32 log-probabilities)
    # and a few 0-dim tensors (nll_loss's weight total, one a chunk), less the targets' hidden
    # states, which only the recomputing version's checkpoints keep.
    model = tiny_model("llama", 97, seed=0).requires_grad_(False)  # a frozen head, as in LoRA training
    torch.manual_seed(1)
    labels = torch.randint(0, 97, (3, 11))
    labels[0, :4] = -100
    hidden = torch.randn(3, 11, model.config.hidden_size, requires_grad=True)
    results = {}
    for keep in (False, True):
        loss.keep_log_probs(model.lm_head, keep)
        hidden.grad = None
        with SavedBytes(exclude=[model.lm_head.weight, hidden]) as saved:
            total, n = causal_lm_loss(hidden, model.lm_head, labels, chunk_size=chunk_size)
        total.backward()
        results[keep] = total.detach(), hidden.grad.clone(), saved.bytes
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
    extra = results[True][2] - results[False][2]
    chunks, hidden_bytes = -(-n // chunk_size), n * model.config.hidden_size * 4
    assert loss.kept_bytes(n, 97) - hidden_bytes < extra <= loss.kept_bytes(n, 97) - hidden_bytes + 8 * (chunks + 1)
