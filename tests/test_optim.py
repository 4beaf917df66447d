import math

import pytest
import torch

from training.optim import AdamW, LossScaler, lr_factor


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_equals_torch_adamw_over_several_steps(foreach):
    # Same parameters, same gradient sequence. Our step does the operations of torch's
    # multi-tensor AdamW in the same order, so the results are bit-identical, weight decay
    # included (and equal to torch's single-tensor path too: the same arithmetic per element).
    # The third parameter gets no gradient on odd steps: its step count, and so its bias
    # correction, lags behind the others', as in torch.
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3)),
            torch.nn.Parameter(torch.randn(4, 2))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt, ref_opt = AdamW(ours, **kw), torch.optim.AdamW(ref, foreach=foreach, **kw)
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, ref)):
            if i == 2 and step % 2:
                p.grad = q.grad = None
                continue
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    # And the moments themselves, so a state-dict round trip resumes the same trajectory.
    for p, q in zip(ours, ref):
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


def test_adamw_state_dict_round_trips_through_weights_only_load(tmp_path):
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=0.1)
    p.grad = torch.full((4,), 0.5)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW([q], lr=0.1)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    p.grad, q.grad = torch.full((4,), -0.25), torch.full((4,), -0.25)
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
    total, warmup = 110, 10
    f = [lr_factor(s, total, warmup, schedule) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert f[10] == pytest.approx(1.0)
    mid = f[60]  # halfway through the decay phase
    expected = {"constant": 1.0, "linear": 0.5, "cosine": 0.5 * (1 + math.cos(math.pi * 0.5))}[schedule]
    assert mid == pytest.approx(expected)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # never increases after warmup


def test_loss_scaler_skips_overflow_and_grows():
    s = LossScaler(enabled=True, scale=1024.0, growth_interval=2)
    assert s.update(False) is False and s.scale == 512.0 and s.skipped == 1
    assert s.update(True) and s.update(True) and s.scale == 1024.0
    off = LossScaler(enabled=False)
    assert off.scale == 1.0 and off.update(False) is False and off.skipped == 0
