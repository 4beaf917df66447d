"""fast/swiglu_down.py: the SwiGLU gate and down_proj's LoRA with hash dropout as one function.

Its two kernels against the module's formulas in float64 (masks rebuilt from the hash, as
tests/test_lora_kernels.py does), then a model's MLPs through it against the same MLPs with the
gate and down_proj apart (fast/ops.py's SwiGLU, fast/lora_function.py's layer: the same masks,
since both draw down_proj's seed at the same point), checkpointed or not. Without a GPU the
kernels run in Triton's CPU interpreter (conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from fast import state, swiglu_down
from training import grad_ckpt, memory_plan
from test_grad_ckpt import lora_grads, loss_of, tiny_lora_model
from test_lora_kernels import DEVICE, FP32_BOUND, keep_mask, keep_scale, rel_err


@pytest.fixture(autouse=True)
def kernels_on_this_device(monkeypatch):
    monkeypatch.setattr(state, "kernels_on", lambda device: True)


# Rows and columns off the tiles, ranks under and over 16, more rows than one backward program walks.
@pytest.mark.parametrize("n,k,r,p", [(150, 96, 4, 0.3), (1100, 64, 24, 0.05), (7, 200, 16, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_the_formulas(n, k, r, p, dtype):
    g = torch.Generator().manual_seed(n + k)
    gate, up, dh = (torch.randn(n, k, generator=g).to(DEVICE, dtype) for _ in range(3))
    lora_a = torch.randn(r, k, generator=g).to(DEVICE)
    g_a = torch.randn(n, r, generator=g).to(DEVICE, dtype)
    seed = 4321 + n
    m = keep_mask(seed, n, k, p).to(DEVICE) * keep_scale(p)
    a_used = lora_a.to(dtype).double()  # products in the inputs' dtype, A cast to it
    gd, ud, dhd = gate.double(), up.double(), dh.double()
    h_exact = F.silu(gd) * ud

    h, a = swiglu_down.swiglu_a_forward(gate, up, lora_a, seed, p)
    # bf16: h, a, dg and du each rounded once to 8 bits (4e-3 an element); fp32: FP32_BOUND
    # (the interpreter's fp32 products; a GPU's tf32)
    bound = 1e-2 if dtype == torch.bfloat16 else FP32_BOUND
    assert h.dtype == dtype and rel_err(h, h_exact) < bound
    h_used = h.double()  # a and dA are products with h as stored
    assert a.dtype == dtype and rel_err(a, (h_used * m) @ a_used.t()) < bound
    _, a_alone = swiglu_down.swiglu_a_forward(gate, up, lora_a, seed, p, store_h=False)
    assert torch.equal(a_alone, a)  # a recompute's call: the same a, no h

    dh_full = dhd + (g_a.double() @ a_used) * m
    sig = torch.sigmoid(gd)
    d_a, d_gate, d_up = swiglu_down.swiglu_a_backward(gate, up, dh.clone(), g_a, lora_a, seed, p)
    assert d_a.dtype == torch.float32 and rel_err(d_a, g_a.double().t() @ (h_used * m)) < 1e-3
    assert d_up.dtype == dtype and rel_err(d_up, dh_full * gd * sig) < bound
    assert d_gate.dtype == dtype and rel_err(d_gate, dh_full * ud * sig * (1 + gd * (1 - sig))) < bound


def mlp_grads(monkeypatch, fused, **run):
    """lora_grads (tests/test_grad_ckpt.py) with the MLPs through fast/swiglu_down.py or apart,
    and the store_h argument of each fused forward that ran."""
    calls = []
    forward = swiglu_down.swiglu_a_forward
    with monkeypatch.context() as m:
        m.setattr(swiglu_down, "swiglu_a_forward",
                  lambda *a, **k: calls.append(k.get("store_h", True)) or forward(*a, **k))
        if not fused:
            m.setattr("fast.patch.run_fused", lambda *a, **k: None)
        return lora_grads(dropout=0.1, use_fast=True, device=DEVICE, **run), calls


@pytest.mark.parametrize("checkpointing,offload", [(False, False), (True, False), (True, True)])
def test_model_gradients_equal_the_functions_apart(checkpointing, offload, monkeypatch):
    apart, none = mlp_grads(monkeypatch, fused=False, checkpointing=checkpointing, offload=offload)
    fused, calls = mlp_grads(monkeypatch, fused=True, checkpointing=checkpointing, offload=offload)
    assert not none
    # Two layers, each once forward and (checkpointed) once more in the recompute, without h then.
    assert sorted(calls) == [False] * (2 if checkpointing else 0) + [True] * 2
    assert apart.keys() == fused.keys()
    for name in apart:  # fp32: the same products (tf32 on a GPU), summed in another order
        assert rel_err(fused[name], apart[name]) < FP32_BOUND, name


def test_partial_plan_equals_full_checkpointing(monkeypatch):
    # Kept layers never keep h here, lean or not: their gradients are full checkpointing's.
    run = dict(checkpointing=True, offload=False, layers=3)
    full, _ = mlp_grads(monkeypatch, fused=True, **run)
    for lean in (False, True):
        partial, calls = mlp_grads(monkeypatch, fused=True, checkpointed={0}, lean=lean, **run)
        assert sorted(calls) == [False, True, True, True]  # three forwards, layer 0 recomputed
        for name in full:
            assert rel_err(partial[name], full[name]) < FP32_BOUND, name


def test_memory_plan_skips_the_lean_probe(monkeypatch):
    # With every MLP on the fused function no layer has a lean form: a plan that cannot keep
    # every layer probes once, not twice, and is not lean.
    model = tiny_lora_model(dropout=0.1, use_fast=True, layers=3, device=DEVICE)
    layers = model.get_decoder().layers
    grad_ckpt.enable(layers)
    model.train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run_step():
        loss_of(model, ids).backward()
        model.zero_grad(set_to_none=True)

    probes = []
    measure = memory_plan.measure
    monkeypatch.setattr(memory_plan, "measure", lambda *a, **k: probes.append(1) or measure(*a, **k))
    c = measure(layers, run_step).per_layer
    tight = memory_plan.apply(layers, run_step, budget=(c - 1) * 10 // 9)
    assert len(probes) == 1 and not tight.lean and tight.kept < 3
