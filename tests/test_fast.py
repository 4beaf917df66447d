"""fast/ against the reference: a model after `fast.enable` trains the same numbers as the model
as written (lora/layer.py's formula and transformers' own modules, through plain autograd).

Kernels off throughout (`compile=False`, and no GPU here): the fast path then runs its autograd
functions in eager PyTorch with torch's dropout. tests/test_lora_kernels.py and
tests/test_siblings.py cover the Triton kernels (hash masks, which no reference draws).

Tolerance: 1e-5 relative (norm-wise) on logits, loss and every gradient. Both sides compute the
same fp32 products from the same weights (NF4 included: both dequantize through bitsandbytes to
the same W), but in another order: the LoRA term first with the base GEMM adding onto it,
siblings' input gradients summed in place, RMSNorm's backward written out. Each such op moves
a result by a few fp32 ulps (~1e-7 relative); through two layers and the loss it stays well
under 1e-5 (measured: logits 3e-7, gradients 2e-6 at most, Mixtral's experts the largest),
where a wrong or missing term moves results by 1e-3 or more (checked below: the adapters do
change the logits). With dropout the two sides draw equal masks: the fast path
calls torch.native_dropout in the order nn.Dropout is called, and the siblings run one by one.
"""

import copy

import pytest
import torch

import fast
import lora
import quant
from fast import dense_weights, lora_function, ops, siblings
from fast.patch import fast_lora
from training import grad_ckpt, memory_plan

TOL = 1e-5  # see the module docstring


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_and_fast(make_model_dir, arch, nf4, dropout, targets="all-linear"):
    """The same LoRA model twice (B away from zero), the second with fast.enable; both in train mode."""
    model = quant.load_model(make_model_dir(arch), quant="nf4" if nf4 else None, compute_dtype=torch.float32,
                             device="cpu")
    torch.manual_seed(0)
    lora.inject(model, targets, r=4, alpha=8, dropout=dropout)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)  # B = 0 would hide every A-gradient
    faster = copy.deepcopy(model)
    fast.enable(faster, compile=False)
    return model.train(), faster.train()


def step(model, ids):
    """Logits, loss and the gradient of every trainable parameter, for one seeded forward + backward."""
    torch.manual_seed(7)  # the dropout masks
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_training(reference, faster, ids):
    logits, loss, grads = step(reference, ids)
    fast_logits, fast_loss, fast_grads = step(faster, ids)
    assert rel_err(fast_logits, logits) <= TOL and rel_err(fast_loss, loss) <= TOL
    assert grads.keys() == fast_grads.keys() and grads
    for k in grads:
        assert grads[k].norm() > 0, k
        assert rel_err(fast_grads[k], grads[k]) <= TOL, k
    return logits


def ids(seed=1):
    return torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mixtral"])
def test_fast_trains_what_the_reference_trains(make_model_dir, arch, nf4, dropout, monkeypatch):
    calls = []
    apply = lora_function.LoRALinearFunction.apply
    monkeypatch.setattr(lora_function.LoRALinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    reference, faster = reference_and_fast(make_model_dir, arch, nf4, dropout)
    logits = assert_same_training(reference, faster, ids())
    assert calls  # the fast path did run
    with torch.no_grad():
        for m in lora.lora_modules(reference).values():
            m.lora_B.weight.zero_()
        torch.manual_seed(7)
        assert rel_err(logits, reference(input_ids=ids()).logits) > 1e-3  # the adapters matter


@pytest.mark.parametrize("offload", [False, True])
def test_fast_with_gradient_checkpointing(make_model_dir, offload):
    # Checkpointed, the fast MLP's recompute skips down_proj's GEMM and every recompute replays
    # the random state, so the masks are drawn again equal: still the reference's numbers.
    reference, faster = reference_and_fast(make_model_dir, "qwen2", nf4=True, dropout=0.1)
    grad_ckpt.enable(faster.get_decoder().layers, offload=offload)
    assert_same_training(reference, faster, ids())


def test_decoder_layers_residual_stream_changes_no_bit(make_model_dir, monkeypatch):
    # fast/patch.py's decoder forward moves the residual adds into the norms' kernels (fast/ops.py
    # ResidualRMSNormFunction) and adds no rounding: against the same fast model with
    # transformers' decoder forward put back, every logit and gradient is the same bit for bit.
    _, faster = reference_and_fast(make_model_dir, "mistral", nf4=True, dropout=0.1)
    unfused = copy.deepcopy(faster)
    for layer in unfused.get_decoder().layers:
        layer.forward = layer._forward_before_fast
    calls = []
    apply = ops.ResidualRMSNormFunction.apply
    monkeypatch.setattr(ops.ResidualRMSNormFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    logits, loss, grads = step(faster, ids())
    assert len(calls) == 2 * len(faster.get_decoder().layers)
    want_logits, want_loss, want_grads = step(unfused, ids())
    assert len(calls) == 2 * len(faster.get_decoder().layers)  # the unfused model made none
    assert torch.equal(logits, want_logits) and torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for k in grads:
        assert torch.equal(grads[k], want_grads[k]), k


def test_inference_runs_the_models_own_forwards(make_model_dir, monkeypatch):
    reference, faster = reference_and_fast(make_model_dir, "llama", nf4=True, dropout=0.1)
    used = []
    for fn in (lora_function.LoRALinearFunction, siblings.LoRASiblingsFunction, ops.RMSNormFunction,
               ops.ResidualRMSNormFunction, ops.SwiGLUFunction, ops.RotaryFunction):
        monkeypatch.setattr(fn, "apply", lambda *a, _fn=fn.apply: used.append(1) or _fn(*a))
    with torch.no_grad():  # eval, no gradients: generation
        assert torch.equal(faster.eval()(input_ids=ids()).logits, reference.eval()(input_ids=ids()).logits)
    assert not used
    assert faster.state_dict().keys() == reference.state_dict().keys()
    # Instances got a forward of their own; the class, and so the reference model, did not.
    assert all(fast_lora(m) for m in lora.lora_modules(faster).values())
    assert not any("forward" in vars(m) for m in reference.modules())
    faster.train()
    with torch.no_grad():  # training mode without gradients (an offloaded checkpoint's first pass): fast
        faster(input_ids=ids())
    assert used


def test_merged_layer_and_trained_base_weight_run_the_reference(make_model_dir, monkeypatch):
    # train.py trains an output head's rows for added tokens in lm_head.base_layer.weight when
    # lm_head is a LoRA target; the autograd function treats W as frozen, so that layer must
    # take its own forward (and its base weight its gradient). A merged layer too.
    reference, faster = reference_and_fast(make_model_dir, "llama", nf4=False, dropout=0.0,
                                           targets=["q_proj", "v_proj", "lm_head"])
    for model in (reference, faster):
        model.lm_head.base_layer.weight.requires_grad_(True)
    fast_head = fast_lora(faster.lm_head)
    uses = []
    real = lora.LoRALinear.forward
    monkeypatch.setattr(lora.LoRALinear, "forward", lambda self, x: uses.append(self) or real(self, x))
    assert_same_training(reference, faster, ids())
    assert fast_head is not None
    assert [m for m in uses if any(m is f for f in lora.lora_modules(faster).values())] == [faster.lm_head]
    assert faster.lm_head.base_layer.weight.grad.norm() > 0

    q_proj = faster.model.layers[0].self_attn.q_proj
    q_proj.merge()
    uses.clear()
    x = torch.randn(2, 3, q_proj.base_layer.in_features)
    torch.testing.assert_close(q_proj(x), q_proj.base_layer(x), rtol=0, atol=0)
    assert uses == [q_proj]


def test_enable_swaps_instances_once(make_model_dir):
    model = quant.load_model(make_model_dir("llama"), quant=None, compute_dtype=torch.float32, device="cpu")
    wrapped = lora.inject(model, "all-linear", r=4, alpha=8)
    layers = len(model.model.layers)
    # every LoRA layer, then 2 norms, the MLP, the attention and the layer itself per layer, and the final norm
    assert fast.enable(model, compile=False) == len(wrapped) + 5 * layers + 1
    assert fast.enable(model, compile=False) == 0  # twice is a no-op
    shared = {name.rsplit(".", 1)[-1]: fast_lora(m).shared_input for name, m in lora.lora_modules(model).items()}
    assert shared == dict(q_proj=True, k_proj=True, v_proj=True, o_proj=False, gate_proj=True, up_proj=True,
                          down_proj=False)


def test_kept_dense_weights_train_bit_for_bit_the_same(make_model_dir, monkeypatch):
    # fast/dense_weights.py keeps what dequantize returns, so the steps are equal bit for bit, and
    # with every layer's copy kept no dequantization runs in the step at all.
    _, faster = reference_and_fast(make_model_dir, "mistral", nf4=True, dropout=0.1)
    _, kept = reference_and_fast(make_model_dir, "mistral", nf4=True, dropout=0.1)  # the same model again
    layers = kept.get_decoder().layers
    dense_weights.keep(layers, torch.float32)
    bases = [b for layer in layers for b in dense_weights.fast_4bit_bases(layer)]
    assert len(bases) == 7 * len(layers)  # every projection, fast and 4-bit
    logits, loss, grads = step(faster, ids())
    calls = []
    monkeypatch.setattr(lora_function, "dequantize", lambda *a: calls.append(1))
    kept_logits, kept_loss, kept_grads = step(kept, ids())
    assert not calls
    assert torch.equal(kept_logits, logits) and torch.equal(kept_loss, loss)
    assert all(torch.equal(kept_grads[k], grads[k]) for k in grads)


def test_memory_plan_spends_the_room_left_on_dense_weights(make_model_dir):
    # On the CPU the probe reads saved tensors only (P1 = 0): a budget for every kept layer plus
    # the dense copies of exactly one layer keeps one; less room keeps none.
    _, faster = reference_and_fast(make_model_dir, "mistral", nf4=True, dropout=0.1)
    layers = faster.get_decoder().layers
    grad_ckpt.enable(layers)

    def run_step():
        step(faster, ids())
        faster.zero_grad(set_to_none=True)

    c = memory_plan.measure(layers, run_step).per_layer
    one = dense_weights.nbytes(layers[0], torch.float32)
    activations = (len(layers) - 1) * c  # the top layer comes free (memory_plan.plan)

    def plan_for(room):
        return memory_plan.apply(layers, run_step, budget=int((activations + room) / 0.9) + 1,
                                 dense_dtype=torch.float32)

    p = plan_for(one + one // 2)
    assert p.kept == len(layers) and p.dense == 1 and p.dense_bytes == one
    assert dense_weights.kept(dense_weights.fast_4bit_bases(layers[0])[0], torch.float32) is not None
    assert dense_weights.kept(dense_weights.fast_4bit_bases(layers[1])[0], torch.float32) is None
    assert p.predicted_peak == activations + one and "kept dequantized" in p.summary()
    assert plan_for(one - 1).dense == 0  # planning again drops the copies the last plan kept
    assert dense_weights.kept(dense_weights.fast_4bit_bases(layers[0])[0], torch.float32) is None


@pytest.mark.parametrize("checkpointed", [False, True], ids=["fast", "fast+checkpointed"])
def test_a_deep_copy_computes_with_its_own_weights(make_model_dir, checkpointed):
    # fast.enable and grad_ckpt.enable bind their forwards to each module as methods, so a deep
    # copy's forwards are bound to the copy. (Closures over the modules, as they were, left the
    # copy computing its norms, MLPs and attention with the original's weights.)
    _, faster = reference_and_fast(make_model_dir, "mistral", nf4=False, dropout=0.0)
    if checkpointed:  # every wrapper grad_ckpt has: offloaded checkpoints, chunked MLPs
        grad_ckpt.enable(faster.get_decoder().layers, offload=True, mlp_chunk=8)
    twin = copy.deepcopy(faster)
    logits, loss, grads = step(faster, ids())
    with torch.no_grad():
        for p in faster.parameters():
            p.mul_(1.5)
    twin_logits, twin_loss, twin_grads = step(twin, ids())
    assert torch.equal(twin_logits, logits) and torch.equal(twin_loss, loss)
    assert grads.keys() == twin_grads.keys() and all(torch.equal(twin_grads[k], grads[k]) for k in grads)
