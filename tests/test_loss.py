import torch

from training.loss import causal_lm_loss
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
