"""rawqlora/sibling_projections.py: q/k/v and gate/up as one product give the unfused model's values."""

import copy

import pytest
import torch
from torch import nn

import lora
from quant import gptq
from quant.gptq_checkpoint import GPTQLinear
from rawqlora import sibling_projections
from rawqlora.sibling_projections import GATE_UP
from rawqlora.decode import generate
from rawqlora.tiny import tiny_model

# One product over the concatenated weight instead of three sums the same terms per output, but
# a CPU GEMM may block the reduction differently for another width: equal to fp32 rounding.
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])  # qwen2: q/k/v with biases
def test_fused_model_gives_the_same_logits_and_tokens(arch):
    model = tiny_model(arch, 101, seed=0, layers=2).eval()
    fused = copy.deepcopy(model)
    assert sibling_projections.fuse(fused) == 4  # two groups a layer
    attention = fused.model.layers[0].self_attn
    assert isinstance(attention.q_proj, sibling_projections.SiblingView)
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, **TOL)
    prompts = [ids[0].tolist(), ids[1, :5].tolist()]
    assert generate(fused, prompts, 12).tokens == generate(model, prompts, 12).tokens
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())


def test_views_answer_in_any_order_and_for_any_input():
    parent = nn.Module()
    for name, width in [("q_proj", 8), ("k_proj", 4), ("v_proj", 4)]:
        setattr(parent, name, nn.Linear(16, width, bias=False))
    plain = copy.deepcopy(parent)
    assert sibling_projections.fuse(parent) == 1
    x, other = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        # v before q, one input then another, the same one twice: each its own slice of its own input.
        for name, inp in [("v_proj", x), ("q_proj", other), ("k_proj", x), ("q_proj", x), ("q_proj", x)]:
            torch.testing.assert_close(getattr(parent, name)(inp), getattr(plain, name)(inp), **TOL)


def gptq_siblings():
    parent = nn.Module()
    torch.manual_seed(0)
    for name, width in [("gate_proj", 24), ("up_proj", 24)]:
        q = gptq.rtn_quantize(torch.randn(width, 64), group_size=32)
        layer = GPTQLinear.from_quantized(q)
        layer.prepare(torch.float32)
        setattr(parent, name, layer)
    return parent


def test_gptq_siblings_fuse_to_the_same_weights():
    parent = gptq_siblings()
    plain = copy.deepcopy(parent)
    assert sibling_projections.fuse(parent) == 1
    fused = parent.gate_proj.group.fused
    torch.testing.assert_close(fused.dequantize(), torch.cat([plain.gate_proj.dequantize(), plain.up_proj.dequantize()]),
                               rtol=0, atol=0)
    x = torch.randn(2, 64)
    for name in ("gate_proj", "up_proj"):
        torch.testing.assert_close(getattr(parent, name)(x), getattr(plain, name)(x), **TOL)


def test_unfusable_groups_stay():
    # LoRA-wrapped projections (an unmerged adapter) and GPTQ layers of different act-order
    # permutations are left as they are.
    model = tiny_model("llama", 101, seed=0, layers=1)
    lora.inject(model, ["q_proj", "k_proj", "v_proj"], r=2, alpha=4)
    assert sibling_projections.fuse(model) == 1  # gate/up only
    assert isinstance(model.model.layers[0].self_attn.q_proj, lora.LoRALinear)
    parent = gptq_siblings()
    parent.up_proj.g_idx = parent.up_proj.g_idx.flip(0)
    assert sibling_projections.fuse(parent) == 0


def test_gptq_gate_up_ends_in_silu_for_one_row():
    # A Mistral MLP on GPTQ layers with our kernels (Triton's interpreter on the CPU): fused, gate and
    # up interleave, and one row's gate+up product ends in silu(gate) · up (quant/gptq_gemv.py,
    # swiglu=True). Against the unfused MLP on the same kernels: the products are the same sums, and
    # the epilogue rounds to bf16 where the three separate operations do. Those roundings are to
    # nearest on a GPU, but the interpreter's float -> bf16 cast truncates: up to 3 ulps (2^-7 of
    # |h| each) apart here; on a GPU silu's exp alone may differ, by 1 ulp, rarely.
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralMLP

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mlp = MistralMLP(MistralConfig(hidden_size=128, intermediate_size=256))
    for name in GATE_UP + ("down_proj",):
        linear = getattr(mlp, name)
        layer = GPTQLinear.from_quantized(gptq.rtn_quantize(linear.weight.detach() * 0.02, group_size=128)).to(device)
        layer.prepare_own() if name in GATE_UP else layer.prepare(torch.bfloat16)
        setattr(mlp, name, layer)
    plain = copy.deepcopy(mlp)
    assert sibling_projections.fuse(mlp) == 1
    fused = mlp.gate_proj.group.fused
    assert mlp.gate_proj.group.interleaved and fused.own is not None
    torch.testing.assert_close(fused.dequantize()[0::2], plain.gate_proj.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(fused.dequantize()[1::2], plain.up_proj.dequantize(), rtol=0, atol=0)
    x = torch.randn(1, 1, 128).to(device, torch.bfloat16)
    calls = []
    real = sibling_projections.gptq_gemv
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sibling_projections, "gptq_gemv", lambda *a, **k: calls.append(k) or real(*a, **k))
        h_ref = plain.act_fn(plain.gate_proj(x)) * plain.up_proj(x)
        h = sibling_projections.gptq_gemv(x.reshape(1, 128), fused.qweight, fused.scales, fused.own[1], 128,
                                          fused.own[0], fused.own[2], swiglu=True).reshape(1, 1, 256)
        assert calls == [{"swiglu": True}]
        ulps = ((h.float() - h_ref.float()).abs() / (2**-7 * h_ref.float().abs().clamp(min=1e-30))).max()
        assert ulps <= (1 if device == "cuda" else 3)
        assert torch.equal(mlp(x), plain.down_proj(h))  # the forward takes this path
        rows = torch.randn(2, 3, 128).to(device, torch.bfloat16)  # more than one row: the model's forward, interleaved views
        torch.testing.assert_close(mlp(rows), plain(rows), rtol=0, atol=0)
