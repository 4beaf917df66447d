"""fast/siblings.py: LoRA layers that share an input, run as one function, against the formula
with their masks, against the same layers one by one (the reference forward), and inside models
after fast.enable.

Tolerances as in test_lora_kernels.py (FP32_BOUND): the same products grouped differently
(one block-diagonal GEMM for the LoRA terms, input gradients summed in place) move fp32 results
by reordering only.
"""

import pytest
import torch

import fast
import lora
import quant
from fast import siblings, state
from fast.patch import fast_lora
from lora.layer import LoRALinear
from training.loss import causal_lm_loss
from test_lora_kernels import DEVICE, FP32_BOUND, keep_mask, keep_scale, rel_err


def sibling_layers(bias, dropout, outs=(40, 24, 24), r=8):
    """Three adapters over one 48-wide input, shaped like q, k and v."""
    torch.manual_seed(0)
    layers = []
    for n_out in outs:
        base = torch.nn.Linear(48, n_out, bias=bias).to(DEVICE).requires_grad_(False)  # frozen, as inject leaves it
        layer = LoRALinear(base, r=r, alpha=16, dropout=dropout)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # B = 0 would hide A's gradient
        layers.append(layer.to(DEVICE))
    return layers


def outputs_and_grads(run, layers, x, dys):
    """`run`'s outputs and the gradients of x and of every A and B, for upstream gradients dys."""
    params = [x] + [p for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    for p in params:
        p.grad = None
    ys = run()
    torch.autograd.backward(ys, dys)
    return [y.detach() for y in ys], [p.grad.clone() for p in params]


def inputs(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, 48, generator=g).to(DEVICE).requires_grad_()
    dys = [torch.randn(3, 11, layer.base_layer.out_features, generator=g).to(DEVICE) for layer in layers]
    return x, dys


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_with_fused_dropout_equal_their_formula(bias, monkeypatch):
    # Each adapter's own mask (seed + j), in the forward products, dA and dx alike.
    monkeypatch.setattr(state, "kernels_on", lambda device: True)  # Triton's interpreter on the CPU
    layers = sibling_layers(bias, dropout=0.2)
    x, dys = inputs(layers)
    torch.manual_seed(5)
    got = outputs_and_grads(lambda: siblings.run_together(layers, x), layers, x, dys)

    torch.manual_seed(5)  # the function draws its one seed from the CPU generator first thing
    seed = int(torch.randint(2**31, ()))
    masks = [keep_mask(seed + j, 33, 48, 0.2).to(DEVICE).reshape(3, 11, 48) for j in range(3)]

    def formula():
        return [layer.base_layer(x) + layer.lora_B(layer.lora_A(x * m * keep_scale(0.2))) * layer.scaling
                for layer, m in zip(layers, masks)]

    ref = outputs_and_grads(formula, layers, x, dys)
    for ours, theirs in zip(got[0] + got[1], ref[0] + ref[1]):
        assert rel_err(ours, theirs) < FP32_BOUND


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_without_dropout_equal_the_layers_one_by_one(bias):
    layers = sibling_layers(bias, dropout=0.0)
    x, dys = inputs(layers)
    got = outputs_and_grads(lambda: siblings.run_together(layers, x), layers, x, dys)
    ref = outputs_and_grads(lambda: [layer(x) for layer in layers], layers, x, dys)
    for ours, theirs in zip(got[0] + got[1], ref[0] + ref[1]):
        assert rel_err(ours, theirs) < 1e-6


def test_run_together_declines_what_it_cannot_do(monkeypatch):
    x = torch.randn(2, 5, 48, device=DEVICE)
    # torch's dropout: each layer draws its own mask, in order, as PEFT does
    assert siblings.run_together(sibling_layers(False, dropout=0.1), x) is None
    # four with fused dropout: the kernels take up to three
    monkeypatch.setattr(state, "kernels_on", lambda device: True)
    four = sibling_layers(False, dropout=0.1, outs=(8, 8, 8, 8))
    assert siblings.run_together(four, x) is None and len(siblings.run_together(four[:3], x)) == 3
    # unequal ranks, a layer without LoRA, inference, a merged one, a base weight that trains
    layers = sibling_layers(False, dropout=0.0)
    assert siblings.run_together(layers[:2] + sibling_layers(False, 0.0, r=4)[2:], x) is None
    assert siblings.run_together(layers[:2] + [layers[2].base_layer], x) is None
    with torch.no_grad():
        assert siblings.run_together([layer.eval() for layer in layers], x) is None
    assert len(siblings.run_together([layer.train() for layer in layers], x)) == 3
    layers[0].merge()
    assert siblings.run_together(layers, x) is None
    layers[0].unmerge()
    layers[1].base_layer.weight.requires_grad_(True)
    assert siblings.run_together(layers, x) is None


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q, k and v with biases
def test_fast_models_run_siblings_together(make_model_dir, arch, nf4, monkeypatch):
    # Every layer's q/k/v and gate/up go through one function each, the gradients stay the
    # reference model's, and no projection keeps a precomputed output after the step.
    calls = []
    apply = siblings.LoRASiblingsFunction.apply
    monkeypatch.setattr(siblings.LoRASiblingsFunction, "apply", lambda *a: calls.append(len(a)) or apply(*a))

    def lora_grads(use_fast):
        model = quant.load_model(make_model_dir(arch), quant="nf4" if nf4 else "none", compute_dtype=torch.float32,
                                 device="cpu")
        torch.manual_seed(0)  # the same A for both
        lora.inject(model, "all-linear", r=4, alpha=8, dropout=0.0)
        for m in lora.lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        if use_fast:
            fast.enable(model, compile=False)
        model.train()
        ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(1))
        total, n = causal_lm_loss(model.model(input_ids=ids).last_hidden_state, model.lm_head, ids)
        (total / n).backward()
        assert all(fast_lora(m).precomputed is None for m in lora.lora_modules(model).values() if use_fast)
        return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}, len(model.model.layers)

    (reference, _), (faster, n_layers) = lora_grads(False), lora_grads(True)
    # x, bases, scalings, dropout, dtype, then A and B per member: q/k/v (11), gate/up (9)
    assert sorted(calls) == [9] * n_layers + [11] * n_layers
    assert reference.keys() == faster.keys()
    for k in reference:
        assert rel_err(faster[k], reference[k]) < 1e-5, k
