"""One 4-bit layout on every CPU: bitsandbytes' AVX512-BF16 repacking never touches our layers.

bitsandbytes 0.50 repacks a Linear4bit's weight in place at its first eval-mode, no-grad
forward on CPUs with AVX512-BF16 (quant/linear4bit.py says what that changes). These tests
run that very sequence (inference first, then training, then merging) and demand the results
of a model that never ran inference. On a CPU without AVX512-BF16 bitsandbytes never takes
that path, so the tests that need it are skipped, saying so; the device host's Xeon runs them.
"""

import copy

import pytest
import torch

import lora
import quant
from quant.linear4bit import Linear4bit, bnb, keep_standard_layout
from rawqlora.errors import BadInput

HAS_AVX512_BF16 = bnb.functional.has_avx512bf16()
needs_avx512_bf16 = pytest.mark.skipif(
    not HAS_AVX512_BF16,
    reason="this CPU lacks AVX512-BF16: bitsandbytes never takes its repacking path here, nothing to regress",
)


def layers_4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def snapshot(model):
    """The packed codes and the (double-quantized) scale codes of every 4-bit layer."""
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in layers_4bit(model).items()}


def trained_step(model, ids):
    """Logits and every LoRA gradient of one training-mode forward and backward."""
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def merged_weights(model):
    """What merge.py writes for each LoRA layer: the dequantized base plus scaling·B·A."""
    return {n: quant.dequantize(m.base_layer) + m.delta_weight() for n, m in lora.lora_modules(model).items()}


@needs_avx512_bf16
def test_bitsandbytes_repacks_a_layer_we_did_not_make():
    """The hazard itself: a plain Linear4bit is repacked by one inference forward (this is the
    path the test below must survive), and such a layer is refused by keep_standard_layout."""
    layer = Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    # Params4bit.to(device) quantizes, as every 4-bit loader does
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4", module=layer).to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu
    with pytest.raises(BadInput, match="repacked"):
        keep_standard_layout(layer)


@needs_avx512_bf16
def test_inference_then_training_then_merge_equals_a_model_that_never_ran_inference(make_model_dir):
    model = quant.load_model(make_model_dir("llama"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    lora.inject(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    untouched = copy.deepcopy(model)
    before = snapshot(model)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    model.eval()
    with torch.no_grad():  # the forward bitsandbytes repacks at: eval mode, no gradients
        inference_logits = model(ids).logits
    after = snapshot(model)
    for name, (codes, scales) in before.items():
        assert torch.equal(after[name][0], codes) and torch.equal(after[name][1], scales), name
        assert not getattr(layers_4bit(model)[name].weight.quant_state, "packing_format_for_cpu", False), name

    untouched.eval()
    with torch.no_grad():
        assert torch.equal(inference_logits, untouched(ids).logits)
    logits, grads = trained_step(model, ids)
    ref_logits, ref_grads = trained_step(untouched, ids)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    ours, ref = merged_weights(model), merged_weights(untouched)
    assert all(torch.equal(ours[n], ref[n]) for n in ours)


def test_every_4bit_layer_we_make_or_wrap_has_repacking_off(make_model_dir):
    """Holds on every CPU (the flag is bitsandbytes' switch for the path above)."""
    model = quant.load_model(make_model_dir("qwen2"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    assert layers_4bit(model) and all(not m.support_avx512bf16_for_cpu for m in layers_4bit(model).values())
    plain = Linear4bit(32, 32, quant_type="nf4")
    assert plain.support_avx512bf16_for_cpu == HAS_AVX512_BF16  # bitsandbytes' own default
    wrapped = lora.LoRALinear(plain, r=2, alpha=2)
    assert not wrapped.base_layer.support_avx512bf16_for_cpu
