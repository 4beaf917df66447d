"""LoRALinear and inject against PEFT, on tiny dense and NF4 models of every architecture: the
reference, lora/layer.py's formula through plain autograd, with no fast/ anywhere here
(tests/test_fast.py holds the fast path equal to this reference).

Tolerances. Our forward runs the same fp32 operations in the same order as PEFT's
(`lora_B(lora_A(dropout(x))) * scaling`, cast, add), so logits and gradients should agree to
the last bit; we allow 1e-5 relative so that an equally valid reassociation (e.g. scaling
applied before lora_B) would pass: that moves a few fp32 ulps (~1e-7) per op, amplified by a
two-layer network to well under 1e-5. Real mistakes (missing or wrong scaling, dropout in
the wrong place, a dropped cast) move the logits by ~1e-2, which every test checks is
happening by comparing against the base model too.
"""

import copy

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn

from lora import LoRALinear, inject, lora_modules
from rawqlora.errors import BadInput
from reference import load_hf

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Mixtral's experts are fused 3-D tensors until quant/ splits them: attention only here.
TARGETS = {"llama": ATTENTION + MLP, "mistral": ATTENTION + MLP, "qwen2": ATTENTION + MLP}
TARGETS["mixtral"] = ATTENTION
TOL = 1e-5  # see the module docstring


def randomize_lora(model, seed=0):
    """Give every LoRA layer random A and B (B away from zero, or LoRA would be invisible)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.normal_(0, 0.1)
            m.lora_B.weight.normal_(0, 0.1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tokens(seed=0, vocab=256):
    torch.manual_seed(seed)
    return torch.randint(3, vocab, (2, 9))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("arch", list(TARGETS))
def test_matches_peft_logits_and_grads(make_model_dir, arch, nf4, rslora):
    ours = load_hf(make_model_dir(arch), nf4)
    theirs = copy.deepcopy(ours)  # same base weights, NF4 packing included
    ids = tokens()
    with torch.no_grad():
        base_logits = ours(ids).logits

    r, alpha, dropout = 4, 8, 0.1
    wrapped = inject(ours, TARGETS[arch], r=r, alpha=alpha, dropout=dropout, rslora=rslora)
    randomize_lora(ours)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
        target_modules=TARGETS[arch], task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(theirs, config)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            for ab in ("lora_A", "lora_B"):
                peft_name = f"base_model.model.{name}.{ab}.default.weight"
                peft_params[peft_name].copy_(getattr(m, ab).weight)

    base_type = bnb.nn.Linear4bit if nf4 else nn.Linear
    assert all(type(m.base_layer) is base_type for m in lora_modules(ours).values())
    assert len(wrapped) == 2 * len(TARGETS[arch])  # two decoder layers

    # Train mode with dropout on: both walk the LoRA layers in the same order and draw one
    # mask each, so equal seeds give equal masks and dropout's position is tested too.
    ours.train()
    theirs.train()
    torch.manual_seed(1)
    out = ours(ids, labels=ids)
    torch.manual_seed(1)
    ref = theirs(ids, labels=ids)
    assert rel_err(out.logits, ref.logits) <= TOL
    assert rel_err(out.logits, base_logits) > 1e-3  # the adapter does change the output
    out.loss.backward()
    ref.loss.backward()
    for name, m in lora_modules(ours).items():
        for ab in ("lora_A", "lora_B"):
            grad = getattr(m, ab).weight.grad
            ref_grad = peft_params[f"base_model.model.{name}.{ab}.default.weight"].grad
            assert grad.norm() > 0
            assert rel_err(grad, ref_grad) <= TOL, f"{name}.{ab}"
    # Nothing but A and B receives a gradient.
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{n}.{ab}.weight" for n in wrapped for ab in ("lora_A", "lora_B")
    }


def test_fresh_layer_is_identity_plus_zero():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0 at init
    assert layer.lora_A.weight.abs().sum() > 0
    assert layer.scaling == 2.0
    assert LoRALinear(base, r=4, alpha=8, rslora=True).scaling == 4.0  # alpha / sqrt(r)


def test_bf16_base_keeps_fp32_adapter_and_bf16_output():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, dtype=torch.bfloat16), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, 0, 0.1)
    out = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer.lora_B.weight.grad.dtype == torch.float32


def test_merge_unmerge(make_model_dir):
    model = load_hf(make_model_dir("llama"))
    inject(model, ATTENTION + MLP, r=4, alpha=8)
    randomize_lora(model)
    ids = tokens()
    weights = {n: m.base_layer.weight.clone() for n, m in lora_modules(model).items()}
    with torch.no_grad():
        unmerged = model(ids).logits
        for m in lora_modules(model).values():
            m.merge()
        merged_weights = {n: m.base_layer.weight.clone() for n, m in lora_modules(model).items()}
        for m in lora_modules(model).values():
            m.merge()  # second merge: no-op
            assert m.merged
        merged = model(ids).logits
        for n, m in lora_modules(model).items():
            assert torch.equal(m.base_layer.weight, merged_weights[n])
            # W + delta really is the merged weight; merged forward must skip the LoRA path,
            # or the update would count twice and `merged` would differ from `unmerged`.
            torch.testing.assert_close(m.base_layer.weight, weights[n] + m.delta_weight())
        # (W + BA)x vs Wx + B(Ax): same math, different fp32 rounding order: see TOL.
        assert rel_err(merged, unmerged) <= TOL
        for m in lora_modules(model).values():
            m.unmerge()
            m.unmerge()
            assert not m.merged
        for n, m in lora_modules(model).items():
            # W + d - d is W up to one fp32 rounding of |W + d| (~0.1 * 2^-24); 1e-6 is ample.
            torch.testing.assert_close(m.base_layer.weight, weights[n], rtol=0, atol=1e-6)
        assert rel_err(model(ids).logits, unmerged) <= TOL


def test_merge_refuses_4bit(make_model_dir):
    model = load_hf(make_model_dir("llama"), nf4=True)
    inject(model, ["q_proj"], r=4, alpha=8)
    layer = next(iter(lora_modules(model).values()))
    with pytest.raises(TypeError, match="4-bit"):
        layer.merge()
    assert layer.delta_weight().shape == (64, 64) and layer.delta_weight().dtype == torch.float32


def test_all_linear_skips_head_and_router(make_model_dir):
    model = load_hf(make_model_dir("mixtral"))
    wrapped = inject(model, "all-linear", r=2, alpha=4)
    # Fused experts are not nn.Linear, the router is a MixtralTopKRouter, lm_head is the head.
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(ATTENTION)
    assert inject(model, ["lm_head"], r=2, alpha=4) == ["lm_head"]


def test_target_forms(make_model_dir):
    model = load_hf(make_model_dir("qwen2"))
    regex = r"model\.layers\.1\.self_attn\.(q|v)_proj"
    assert inject(model, regex, r=2, alpha=4) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    ]
    assert inject(model, ["0.self_attn.q_proj"], r=2, alpha=4) == [
        "model.layers.0.self_attn.q_proj"
    ]


def test_bad_inputs(make_model_dir):
    model = load_hf(make_model_dir("llama"))
    with pytest.raises(BadInput, match=r"\['qproj'\] match no module.*k_proj, lm_head, o_proj"):
        inject(model, ["q_proj", "qproj"], r=4, alpha=8)
    with pytest.raises(BadInput, match="regex 'layers' fully matches no module"):
        inject(model, "layers", r=4, alpha=8)
    with pytest.raises(BadInput, match="model.layers.0.mlp is a LlamaMLP, not a linear layer"):
        inject(model, ["mlp"], r=4, alpha=8)
    for r in (0, -1):
        with pytest.raises(BadInput, match=f"rank r must be a positive integer, got {r}"):
            inject(model, ["q_proj"], r=r, alpha=8)
    with pytest.raises(BadInput, match="rank r must be a positive integer"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    assert lora_modules(model) == {}  # failed calls changed nothing
    inject(model, ["q_proj"], r=4, alpha=8)
    with pytest.raises(BadInput, match="layers.0.self_attn.q_proj already has a LoRA adapter"):
        inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert not isinstance(model.model.layers[0].self_attn.q_proj.base_layer, LoRALinear)
