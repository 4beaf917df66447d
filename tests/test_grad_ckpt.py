import pytest
import torch

import fast
import lora
from fast import lora_function
from training import grad_ckpt, loss, memory_plan
from training.auto_batch import longest_rows_probe
from training.loss import causal_lm_loss
from rawqlora.tiny import tiny_config, tiny_model

GIB = 2**30


def tiny_lora_model(dropout, use_fast=False, layers=2, device="cpu"):
    model = tiny_model("llama", 101, seed=0, layers=layers).to(device)
    lora.inject(model, "all-linear", r=4, alpha=8, dropout=dropout)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)  # B = 0 would zero every A-gradient
    if use_fast:
        fast.enable(model, compile=False)
    return model


def loss_of(model, ids):
    total, n = causal_lm_loss(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state, model.lm_head, ids)
    return total / n


def lora_grads(offload, checkpointing, dropout, mlp_chunk=0, use_fast=False, device="cpu", checkpointed=None,
               layers=2, lean=False):
    """Every trainable parameter's gradient for one step of a tiny Llama: the reference, or with
    `use_fast` after fast.enable (kernels off unless a test switches fast/state.py's on).
    `checkpointed`: the layer indices grad_ckpt checkpoints (None: all)."""
    model = tiny_lora_model(dropout, use_fast, layers, device)
    if checkpointing:
        grad_ckpt.enable(model.get_decoder().layers, offload=offload, mlp_chunk=mlp_chunk, checkpointed=checkpointed)
        grad_ckpt.set_lean(model.get_decoder().layers, lean)
    elif mlp_chunk:
        for layer in model.get_decoder().layers:
            grad_ckpt.chunk_mlp(layer.mlp, mlp_chunk)
    model.train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(7)  # the same dropout masks for every variant
    loss_of(model, ids).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_gradients_equal_plain_backward(offload, dropout):
    # Recomputation repeats the same fp32 operations with the same random state, so the
    # gradients (layer 0's included: its input needs no grad) match the un-checkpointed
    # run to within reordering of the accumulation (1e-6 relative).
    plain = lora_grads(offload=False, checkpointing=False, dropout=dropout)
    ckpt = lora_grads(offload=offload, checkpointing=True, dropout=dropout)
    assert plain.keys() == ckpt.keys() and any("layers.0." in k for k in ckpt)
    for k in plain:
        assert ckpt[k] is not None, k
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("offload", [False, True])
def test_chunked_mlp_gradients(offload):
    # 26 tokens in chunks of 5: six chunks, the last one short. Without dropout the MLP is
    # the same function chunked or not, so the gradients match the plain backward's, up to
    # the order of summation: an MLP weight's gradient is now a sum of six per-chunk
    # products (fp32 reassociation, ~1e-8 absolute on gradients of ~1e-3).
    plain = lora_grads(offload=False, checkpointing=False, dropout=0.0)
    chunked = lora_grads(offload=offload, checkpointing=True, dropout=0.0, mlp_chunk=5)
    for k in plain:
        torch.testing.assert_close(chunked[k], plain[k], rtol=1e-5, atol=1e-7)
    # With dropout each chunk draws its own mask, so compare with chunking alone: the layer
    # recompute and the chunk recompute must both replay exactly the masks of the forward.
    alone = lora_grads(offload=False, checkpointing=False, dropout=0.1, mlp_chunk=5)
    both = lora_grads(offload=offload, checkpointing=True, dropout=0.1, mlp_chunk=5)
    for k in alone:
        torch.testing.assert_close(both[k], alone[k], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mlp_chunk", [0, 5])
@pytest.mark.parametrize("offload", [False, True])
def test_recompute_skips_the_mlp_output_projection(offload, mlp_chunk, monkeypatch):
    # With the fast MLP, a recompute runs down_proj for its saved tensors only: its base
    # weight is used twice per layer (forward, backward), not three times, and the
    # gradients are the reference's, dropout included.
    uses = []
    real = lora_function.dense_weight
    monkeypatch.setattr(lora_function, "dense_weight", lambda base, dtype: uses.append(base) or real(base, dtype))
    plain = lora_grads(offload=False, checkpointing=False, dropout=0.1, mlp_chunk=mlp_chunk)
    uses.clear()
    ckpt = lora_grads(offload=offload, checkpointing=True, dropout=0.1, mlp_chunk=mlp_chunk, use_fast=True)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
    config = tiny_config("llama", 101)
    down = [b for b in uses if b.in_features == config.intermediate_size]
    chunks = 1 if mlp_chunk == 0 else 6  # 26 tokens in chunks of 5
    assert len(down) == 2 * config.num_hidden_layers * chunks


def test_offload_two_forwards_then_one_backward():
    # Each forward parks its own copies, so a loss over two passes (as in preference
    # training: chosen and rejected) backpropagates each pass through its own inputs.
    def grads(offload):
        model = tiny_model("llama", 101, seed=0)
        lora.inject(model, "all-linear", r=4, alpha=8)
        for m in lora.lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
        grad_ckpt.enable(model.get_decoder().layers, offload=offload)
        model.train()
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(2):
            ids = torch.randint(0, 101, (2, 9), generator=g)
            losses.append(loss_of(model, ids))
        (losses[0] + 2 * losses[1]).backward()
        return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    on_gpu, parked = grads(False), grads(True)
    for k in on_gpu:
        torch.testing.assert_close(parked[k], on_gpu[k], rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------
# Some layers checkpointed, the others keeping their activations (--grad-ckpt auto).
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_fast", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_partial_plan_gradients_equal_full_checkpointing(offload, use_fast):
    # A checkpointed layer's recompute replays its forward's operations with its forward's random
    # state, and a kept layer draws its dropout masks once, so the generator stream (and every
    # mask) is the same whichever layers are checkpointed; and each layer's backward runs the same
    # operations on the same saved values in the same order (PyTorch's checkpoint rebuilds the
    # very graph of the plain forward; the offloaded one backpropagates each layer on its own,
    # which is also what a kept layer's part of the graph does). So the gradients match bit for bit.
    full = lora_grads(offload, True, dropout=0.1, use_fast=use_fast, layers=4)
    for checkpointed in [{0, 1}, {0, 2}, {3}, set()]:
        partial = lora_grads(offload, True, dropout=0.1, use_fast=use_fast, layers=4, checkpointed=checkpointed)
        assert partial.keys() == full.keys()
        for k in full:
            assert torch.equal(partial[k], full[k]), (checkpointed, k)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_kept_layers_gradients_equal_full_checkpointing(dropout):
    # A lean kept layer rebuilds down_proj's input h = silu(g)·u in backward with SwiGLU's own
    # forward function on the same g and u: the same bits, so the same gradients, bit for bit.
    full = lora_grads(False, True, dropout=dropout, use_fast=True, layers=4)
    for checkpointed in [{0, 1}, set()]:
        lean = lora_grads(False, True, dropout=dropout, use_fast=True, layers=4, checkpointed=checkpointed, lean=True)
        for k in full:
            assert torch.equal(lean[k], full[k]), (checkpointed, k)


def lean_probe(layers, lean):
    """memory_plan.measure of a tiny fast model's top layer (dropout 0: down_proj saves h itself)."""
    model = tiny_lora_model(dropout=0.0, use_fast=True, layers=layers)
    grad_ckpt.enable(model.get_decoder().layers)
    grad_ckpt.set_lean(model.get_decoder().layers, lean)
    model.train()
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))

    def run_step():
        loss_of(model, ids).backward()
        model.zero_grad(set_to_none=True)

    return model, run_step


def test_lean_kept_layer_saves_less_by_the_swiglu_output():
    model, run_step = lean_probe(3, lean=False)
    plain = memory_plan.measure(model.get_decoder().layers, run_step)
    model, run_step = lean_probe(3, lean=True)
    lean = memory_plan.measure(model.get_decoder().layers, run_step)
    config = model.config
    tokens = 2 * 13
    h = tokens * config.intermediate_size * 4  # fp32 on the CPU
    # saved inside the rebuild hooks, unseen there: down_proj's LoRA product a [tokens, r] and its
    # s·B [hidden, r] (its A is the parameter itself in fp32, which the probe does not count)
    a = tokens * 4 * 4
    b_s = config.hidden_size * 4 * 4
    assert plain.saved - lean.saved == h + a + b_s


def test_apply_goes_lean_only_when_memory_binds():
    model, run_step = lean_probe(3, lean=False)
    layers = model.get_decoder().layers
    c = memory_plan.measure(layers, run_step).per_layer
    roomy = memory_plan.apply(layers, run_step, budget=3 * c * 10 // 9 + 10)
    assert roomy.kept == 3 and not roomy.lean and not any(layer._lean for layer in layers)
    tight = memory_plan.apply(layers, run_step, budget=(c - 1) * 10 // 9)  # room for less than one more c
    assert tight.lean and tight.kept > 1 and all(layer._lean for layer in layers)
    assert tight.measurement.per_layer < c
    assert "lean" in tight.summary()


def test_apply_keeps_the_loss_log_probs_when_the_room_left_holds_them():
    # On the CPU the probe reads saved tensors only (P1 = 0): a budget for every kept layer plus
    # the loss's bytes keeps them; one byte less recomputes the loss's logits in backward.
    model, run_step = lean_probe(3, lean=False)
    layers, head = model.get_decoder().layers, model.get_output_embeddings()
    activations = 2 * memory_plan.measure(layers, run_step).per_layer  # the top layer comes free
    nbytes = loss.kept_bytes(2 * 13, model.config.vocab_size)

    def plan_for(room):
        return memory_plan.apply(layers, run_step, budget=int((activations + room) / 0.9) + 1, loss_head=head,
                                 loss_bytes=nbytes)

    roomy = plan_for(nbytes)
    assert roomy.kept == 3 and roomy.loss_bytes == nbytes and head.loss_keeps_log_probs
    assert roomy.predicted_peak == activations + nbytes and "log-probabilities" in roomy.summary()
    tight = plan_for(nbytes - 2)  # budget rounding gives up to one byte back
    assert tight.kept == 3 and tight.loss_bytes == 0 and not head.loss_keeps_log_probs


def test_partial_plan_with_chunked_mlp_equals_full_checkpointing():
    # mlp_chunk applies to checkpointed layers only, so layers 2 and 3 run their MLPs whole here
    # and chunked in `full`. Without dropout that is the same function, its weight gradients
    # summed chunk by chunk in `full` (fp32 reassociation, as in test_chunked_mlp_gradients).
    full = lora_grads(False, True, dropout=0.0, mlp_chunk=5, layers=4)
    partial = lora_grads(False, True, dropout=0.0, mlp_chunk=5, layers=4, checkpointed={0, 1})
    for k in full:
        torch.testing.assert_close(partial[k], full[k], rtol=1e-5, atol=1e-7)


def test_offload_and_mlp_chunk_apply_to_checkpointed_layers_only(monkeypatch):
    parked, chunked = [], []
    park, chunked_apply = grad_ckpt.HostParking.park, grad_ckpt.ChunkedMLP.apply
    monkeypatch.setattr(grad_ckpt.HostParking, "park", lambda self, i, x: parked.append(i) or park(self, i, x))
    monkeypatch.setattr(grad_ckpt.ChunkedMLP, "apply",  # records the MLP whose forward it chunks
                        lambda x, forward, *a: chunked.append(forward.__self__) or chunked_apply(x, forward, *a))
    model = tiny_lora_model(dropout=0.1, layers=4)
    layers = model.get_decoder().layers
    grad_ckpt.enable(layers, offload=True, mlp_chunk=5, checkpointed={0, 1})
    model.train()
    loss_of(model, torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))).backward()
    assert parked == [0, 1]
    assert {id(m) for m in chunked} == {id(layers[0].mlp), id(layers[1].mlp)}  # forward and recompute


def test_set_checkpointed_changes_which_layers_recompute():
    model = tiny_lora_model(dropout=0.0, layers=4)
    layers = model.get_decoder().layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # A pre-hook: PyTorch's checkpoint stops a recompute once the last saved tensor is rebuilt,
        # inside the MLP here, so a hook after the MLP's forward would not run.
        layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    grad_ckpt.enable(layers)
    model.train()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    for checkpointed, expected in [(None, [2, 2, 2, 2]), ({0, 1}, [2, 2, 1, 1]), (set(), [1, 1, 1, 1])]:
        grad_ckpt.set_checkpointed(layers, checkpointed)
        assert grad_ckpt.checkpointed_indices(layers) == (set(range(4)) if checkpointed is None else checkpointed)
        calls[:] = [0] * 4
        loss_of(model, ids).backward()
        assert calls == expected, checkpointed  # a checkpointed layer's MLP runs again in backward
    with pytest.raises(ValueError, match="never passed"):
        grad_ckpt.set_checkpointed(tiny_model("llama", 101, layers=1).model.layers, None)


# ------------------------------------------------------------------------------------------
# The planner's arithmetic.
# ------------------------------------------------------------------------------------------
def measured(peak_gib, per_layer_gib):
    return memory_plan.Measurement(peak=int(peak_gib * GIB), per_layer=int(per_layer_gib * GIB), saved=0,
                                   allocated=0, layer_input=0)


def test_plan_keeps_as_many_layers_as_the_budget_holds():
    m = measured(10, 2)
    # 24 GiB: 21.6 usable after the allocator's 10%, less 0.5 of optimizer state, less P1 = 11.1
    # GiB of room: the top layer free, then 5 more at 2 GiB each.
    p = memory_plan.plan(m, 32, 24 * GIB, unseen=GIB // 2)
    assert p.kept == 6 and p.checkpointed == set(range(26))
    assert p.predicted_peak == int(10.5 * GIB) + 5 * 2 * GIB
    # Every budget: the plan's predicted peak fits, one more kept layer would not.
    for budget in [GIB * x / 4 for x in range(30, 400)]:
        p = memory_plan.plan(m, 32, budget)
        usable = budget * (1 - memory_plan.FRAGMENTATION)
        if p.kept == 0:
            assert m.peak > usable
            continue
        assert p.predicted_peak <= usable
        assert p.kept == 32 or memory_plan.predicted_peak(
            m, 32, memory_plan.checkpointed_layers(32, p.kept + 1)) > usable
    assert memory_plan.plan(m, 32, 10 * GIB).kept == 0  # below P1: full checkpointing, all 32
    assert memory_plan.plan(m, 32, 10 * GIB).checkpointed == set(range(32))
    assert memory_plan.plan(m, 32, 200 * GIB).checkpointed == frozenset()


def test_first_layers_checkpointed_peak_one_layer_lower():
    # The kept layers are the last ones: the top layer is then free, where keeping the first
    # ones (the top checkpointed) costs one more layer's activations for the same recompute.
    m, n = measured(10, 2), 6
    first, last, spread = (memory_plan.checkpointed_layers(32, n, place) for place in ["first", "last", "spread"])
    assert first == set(range(26)) and last == set(range(6, 32))
    assert len(spread) == 26 and 0 in spread and 31 not in spread and max(spread) - min(spread) > 26
    peaks = [memory_plan.predicted_peak(m, 32, c) for c in (first, last, spread)]
    assert peaks == [20 * GIB, 22 * GIB, 20 * GIB]
    assert memory_plan.predicted_peak(m, 32, set(range(32))) == memory_plan.predicted_peak(m, 32, set(range(31)))


def test_unseen_bytes_counts_adamw_state_and_accumulated_grads():
    params = [torch.zeros(10, 4), torch.zeros(3, dtype=torch.bfloat16)]
    assert memory_plan.unseen_bytes(params, "adamw") == 8 * 43  # two fp32 moments each
    assert memory_plan.unseen_bytes(params, "adamw", grad_accum=4) == 8 * 43 + 4 * 40 + 2 * 3
    assert memory_plan.unseen_bytes(params, "paged_adamw") == 0


# ------------------------------------------------------------------------------------------
# Measuring: saved-tensor bytes against independent counts.
# ------------------------------------------------------------------------------------------
def graph_saved_bytes(outputs, exclude):
    """An independent count: walk the autograd graph back from `outputs` and add up the distinct
    storages its nodes hold (built-in nodes' `_saved_*` attributes, custom Functions'
    saved_tensors), less those of `exclude` and of the outputs. 0-d tensors are left out: a Python
    number an op was given (`x * scaling`) is saved as a wrapped 0-d tensor, which the saved-tensor
    hooks are not shown (8 bytes, on the host)."""
    key = memory_plan._storage_key
    skip = {key(t) for t in list(exclude) + list(outputs)}
    storages, seen, todo = {}, set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                held += [value] if isinstance(value, torch.Tensor) else \
                    [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else []
        if hasattr(node, "saved_tensors"):  # a custom autograd Function's context
            held += [t for t in node.saved_tensors if t is not None]
        for t in held:
            if key(t) not in skip and t.dim() > 0:
                storages[key(t)] = t.untyped_storage().nbytes()
        todo += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


def test_saved_bytes_of_a_small_mlp_by_hand():
    # x [7, 5] -> Linear(5, 11) -> SiLU -> Linear(11, 3), fp32. Saved: x and the weights (left
    # out), the first output (SiLU's input) and SiLU's output (the second Linear's input):
    # two [7, 11] fp32 tensors.
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 11), torch.nn.SiLU(), torch.nn.Linear(11, 3))
    x = torch.randn(7, 5, requires_grad=True)
    with memory_plan.SavedBytes(exclude=[x, *mlp.parameters()]) as saved:
        y = mlp(x)
    assert saved.bytes == 2 * 7 * 11 * 4
    assert graph_saved_bytes([y], [x, *mlp.parameters()]) == saved.bytes


@pytest.mark.parametrize("use_fast", [False, True])
def test_saved_bytes_of_a_decoder_layer_match_the_graph(use_fast):
    model = tiny_lora_model(dropout=0.1, use_fast=use_fast)
    model.train()
    layer = model.get_decoder().layers[0]
    captured = {}
    layer.register_forward_pre_hook(lambda m, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model.get_decoder()(input_ids=torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1)))
    x = captured["args"][0].detach().requires_grad_()
    others = memory_plan._tensors((captured["kwargs"], captured["args"][1:])) + list(layer.parameters())
    with memory_plan.SavedBytes(exclude=others) as saved:
        y = layer(x, *captured["args"][1:], **captured["kwargs"])
    outputs = memory_plan._tensors(y)
    saved.forget(outputs)
    assert saved.bytes == graph_saved_bytes(outputs, others) > 4 * x.numel() * 4
    y[0].sum().backward() if isinstance(y, tuple) else y.sum().backward()  # the hooks changed nothing


@pytest.mark.parametrize("offload", [False, True])
def test_probe_measures_the_top_layer_and_leaves_no_trace(offload):
    # On the CPU the probe reads saved tensors only (no allocator statistics: the peak is 0); the
    # top layer's count must be a direct count of that layer's saved tensors at the same shape,
    # less the input a checkpointed layer keeps (none when offloaded). The probe must leave no
    # gradients and the random stream where it was, and the layers checkpointed as before.
    model = tiny_lora_model(dropout=0.1, use_fast=True, layers=3)
    layers = model.get_decoder().layers
    grad_ckpt.enable(layers, offload=offload)
    model.train()
    rows = [{"input_ids": torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n))} for n in (5, 13, 9)]
    probe = longest_rows_probe(lambda ids: loss_of(model, ids).backward(), model, rows,
                               lambda rs: torch.stack([r["input_ids"] for r in rs]), torch.device("cpu"))
    captured = {}
    layers[-1].register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    rng = torch.get_rng_state()
    m = memory_plan.measure(layers, lambda: probe(1), offload=offload)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert grad_ckpt.checkpointed_indices(layers) == {0, 1, 2}
    x = captured["args"][0].detach().requires_grad_()
    assert m.layer_input == x.numel() * 4 == 13 * 64 * 4
    others = memory_plan._tensors((captured["kwargs"], captured["args"][1:])) + list(layers[-1].parameters())
    y = layers[-1]._plain_forward(x, *captured["args"][1:], **captured["kwargs"])
    direct = graph_saved_bytes(memory_plan._tensors(y), others)
    assert m.saved == m.per_layer == direct - (0 if offload else m.layer_input)
    assert m.peak == 0 and m.allocated == 0
    # apply() with a budget: on the CPU only the per-layer cost counts (P1 = 0).
    p = memory_plan.apply(layers, lambda: probe(1), budget=int(2.5 * m.per_layer / 0.9), offload=offload)
    assert p.kept == 3 and grad_ckpt.checkpointed_indices(layers) == set()
