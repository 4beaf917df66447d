"""rawqlora/sibling_projections.py: q/k/v and gate/up as one product give the unfused model's values."""

import copy

import pytest
import torch
from torch import nn

import lora
from quant import gptq
from quant.gptq_checkpoint import GPTQLinear
from rawqlora import sibling_projections
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
