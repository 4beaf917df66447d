"""fast/ops.py: the fused RMSNorm, SwiGLU and rotary functions against transformers' own modules,
and which modules fast.enable swaps (fast/patch.py). Whole models after fast.enable against the
reference: tests/test_fast.py.

Tolerances. In fp32 the written-out backward is the same calculus as autograd's, in another
order of operations: ~1e-7 per op, well under the 1e-5 relative allowed. In bf16 the
forward is bit-equal (same ops, same roundings), but the backward rounds in other places
(it keeps w ⊙ dy in fp32 where autograd rounds it to bf16), and RMSNorm's backward is a
difference of near-equal terms, so single elements can differ by many ulps of their own
size. There the test asks for what matters: against an fp64 reference, our gradient is at
least as accurate as autograd's bf16 one (a wrong formula is off by O(1)). The compiled
path is checked on the CPU too: inductor emits C++ there and Triton on CUDA from the same
traced graph.
"""

import copy

import pytest
import torch

import fast
from fast import ops
from rawqlora.tiny import tiny_model


def norm_and_mlp(dtype):
    model = tiny_model("llama", 101, seed=0, dtype=dtype)
    layer = model.model.layers[0]
    return layer.input_layernorm, layer.mlp


def grads_of(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def assert_gradients_match(got, autograd, fn64, inputs):
    """fp32: close to autograd's. bf16: no further from fp64 (`fn64` on `inputs`) than autograd's."""
    if got[0].dtype == torch.float32:
        for g, a in zip(got, autograd):
            torch.testing.assert_close(g, a, rtol=1e-5, atol=1e-6)
        return
    _, exact = grads_of(fn64, *(t.double() for t in inputs))
    for g, a, e in zip(got, autograd, exact):
        ours, theirs = (g.double() - e).norm(), (a.double() - e).norm()
        assert ours <= 1.25 * theirs + 1e-12, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    norm, _ = norm_and_mlp(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)  # not all ones, so the weight's place in backward matters
    x = torch.randn(3, 7, norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(dtype)
    ref_y, ref_d = grads_of(norm, x)
    y, d = grads_of(lambda t: ops.RMSNormFunction.apply(t, norm.weight, norm.variance_epsilon), x)
    assert torch.equal(y, ref_y)
    assert_gradients_match(d, ref_d, copy.deepcopy(norm).double(), [x])


@pytest.mark.parametrize("branch", [False, True], ids=["stream-only", "stream+branch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_norm_is_the_add_and_the_norm_bit_for_bit(dtype, branch):
    # ResidualRMSNormFunction against what the decoder layer did before it: `x + branch` (or x),
    # then RMSNormFunction, with autograd summing the stream's and the norm's gradients. The
    # same roundings in the same order (eager here), so bit-equal, gradients included.
    norm, _ = norm_and_mlp(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
    g = torch.Generator().manual_seed(0)
    x, b = (torch.randn(3, 7, norm.weight.shape[0], generator=g).to(dtype) for _ in range(2))
    dh, dy = (torch.randn(3, 7, norm.weight.shape[0], generator=g).to(dtype) for _ in range(2))

    def run(fused):
        inputs = [t.clone().requires_grad_() for t in (x, b)]
        branch_in = inputs[1] if branch else None
        if fused:
            h, y = ops.ResidualRMSNormFunction.apply(inputs[0], branch_in, norm.weight, norm.variance_epsilon)
        else:
            h = inputs[0] + branch_in if branch else inputs[0]
            y = ops.RMSNormFunction.apply(h, norm.weight, norm.variance_epsilon)
        torch.autograd.backward([h, y], [dh, dy])
        return h.detach(), y.detach(), inputs[0].grad, inputs[1].grad

    for got, want in zip(run(True), run(False)):
        assert (got is None) == (want is None)
        assert got is None or torch.equal(got, want)


def test_rms_norm_weight_gradient_when_it_trains():
    norm, _ = norm_and_mlp(torch.float32)
    x = torch.randn(5, norm.weight.shape[0], generator=torch.Generator().manual_seed(0))
    _, (_, ref_dw) = grads_of(lambda t, w: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)), x,
                              norm.weight)
    _, (_, dw) = grads_of(lambda t, w: ops.RMSNormFunction.apply(t, w, 1e-6), x, norm.weight)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_silu_times_up(dtype):
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(4, 9, 64, generator=g).mul(3).to(dtype) for _ in range(2))  # SiLU's bend at |g|~3
    ref_y, ref_d = grads_of(lambda a, b: torch.nn.functional.silu(a) * b, gate, up)
    y, d = grads_of(ops.SwiGLUFunction.apply, gate, up)
    assert torch.equal(y, ref_y)
    assert_gradients_match(d, ref_d, lambda a, b: torch.nn.functional.silu(a) * b, [gate, up])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    plain = getattr(apply_rotary_pos_emb, "rawqlora_plain", apply_rotary_pos_emb)  # unwrapped, if enable() ran
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16, generator=g).to(dtype), torch.randn(2, 2, 7, 16, generator=g).to(dtype)
    angles = torch.randn(2, 7, 16, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)

    def run(fn, *inputs):
        q_, k_ = (t.detach().clone().requires_grad_() for t in inputs)
        out = fn(q_, k_)
        torch.autograd.backward(out, (dq.to(out[0].dtype), dk.to(out[0].dtype)))
        return out, (q_.grad, k_.grad)

    ref_out, ref_d = run(lambda a, b: plain(a, b, cos, sin), q, k)
    out, d = run(lambda a, b: ops.RotaryFunction.apply(a, b, cos.unsqueeze(1), sin.unsqueeze(1)), q, k)
    for o, r in zip(out, ref_out):
        assert torch.equal(o, r)  # same ops in the same order
    # The backward is exact in any precision up to one rounding of dy ⊙ sin (a permutation and
    # sign flips are exact): fp32 to 1e-6, bf16 against fp64 no worse than autograd's.
    if dtype == torch.float32:
        for a, b in zip(d, ref_d):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:
        _, exact = run(lambda a, b: plain(a, b, cos.double(), sin.double()), q.double(), k.double())
        for a, b, e in zip(d, ref_d, exact):
            assert (a.double() - e).norm() <= 1.25 * (b.double() - e).norm() + 1e-12


def test_rotary_dispatch_touches_only_fast_models(monkeypatch):
    # The dispatcher sits in transformers' modeling module, but only a fast model's
    # attention turns it on: a plain model in the same process keeps the plain function.
    calls = []
    apply = ops.RotaryFunction.apply
    monkeypatch.setattr(ops.RotaryFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    faster, plain = tiny_model("llama", 101, seed=0), tiny_model("llama", 101, seed=0)
    fast.enable(faster, compile=False)
    ids = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(1))
    plain(input_ids=ids).logits.sum().backward()
    assert calls == []
    faster(input_ids=ids).logits.sum().backward()
    assert len(calls) == len(faster.model.layers)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_equal_eager(device, dtype):
    # torch.compile traces the same Python into one kernel per function (C++ on the CPU,
    # Triton on CUDA), which may round once where eager rounds twice: within a few ulps, so
    # the whole-tensor relative error is ~1e-7 in fp32 and under one bf16 ulp (2^-8) in bf16.
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(6, 48, generator=g), torch.randn(6, 48, generator=g)
    w = 1 + 0.3 * torch.randn(48, generator=g)
    gate, up = 3 * torch.randn(6, 48, generator=g), torch.randn(6, 48, generator=g)
    x, dy, w, gate, up = (t.to(device, dtype) for t in (x, dy, w, gate, up))
    rstd = ops.rms_norm_forward(x, w, 1e-6)[1]
    packed = ops.pack_mask(torch.rand(6, 48, generator=g).to(device) > 0.1)
    cases = [
        (ops.pack_mask, (torch.rand(6, 48, generator=g).to(device) > 0.1,)),
        (ops.apply_mask, (x, packed, 1 / 0.9)),
        (ops.add_masked_, (dy.clone(), gate, packed, 1 / 0.9)),
        (ops.rms_norm_forward, (x, w, 1e-6)),
        (ops.rms_norm_backward, (dy, x, w, rstd)),
        (ops.residual_rms_norm_forward, (x, dy, w, 1e-6)),
        (ops.rms_norm_backward_with_residual, (dy, x, w, rstd, gate)),
        (ops.swiglu_forward, (gate, up)),
        (ops.swiglu_backward, (dy, gate, up)),
    ]
    bound = 1e-6 if dtype == torch.float32 else 2**-8
    for fn, args in cases:
        fresh = lambda: [a.clone() if torch.is_tensor(a) else a for a in args]  # add_masked_ writes its first
        compiled, eager = torch.compile(fn, dynamic=True)(*fresh()), fn(*fresh())
        for c, e in zip(*(t if isinstance(t, tuple) else (t,) for t in (compiled, eager))):
            assert c.dtype == e.dtype and c.shape == e.shape
            assert (c.double() - e.double()).norm() <= bound * e.double().norm(), fn.__name__


@pytest.mark.parametrize("shape", [(4, 16), (3, 5, 7), (1,)])
def test_dropout_mask_round_trips_through_bits(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = ops.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(ops.unpack_mask(packed, mask.shape), mask)


def test_look_alike_mlps_are_left_alone():
    # Same attribute names and activation, but not a class known to feed the residual add
    # directly (e.g. OLMo-2 normalises the MLP's output): its forward must stay its own.
    class OtherMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(8, 8) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

    mlp = OtherMLP()
    assert fast.enable(mlp, compile=False) == 0 and "forward" not in vars(mlp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_equals_formula(dtype):
    # The Triton kernel (CPU interpreter without a GPU) against the eager formulas: q as the
    # transposed view the attention passes, head counts and head_dim halves off powers of two,
    # cos broadcast over the batch. fp32 arithmetic, one rounding: bf16 within an ulp.
    from fast import rotary_kernel

    device = DEVICES[-1]
    g = torch.Generator().manual_seed(0)
    for batch, heads, seq, dim, cos_batch in [(2, 4, 7, 16, 2), (1, 3, 5, 12, 1)]:
        x = torch.randn(batch, seq, heads * dim, generator=g).view(batch, seq, heads, dim).transpose(1, 2)
        angles = torch.randn(cos_batch, 1, seq, dim, generator=g)
        x, cos, sin = x.to(device, dtype), angles.cos().to(device, dtype), angles.sin().to(device, dtype)
        for backward, formula in [(False, ops.rotary_forward), (True, ops.rotary_backward)]:
            ref = formula(x.double(), x.double(), cos.double(), sin.double())[0]
            out = rotary_kernel.rotate(x, cos, sin, backward=backward)
            assert out.dtype == dtype and out.stride() == x.stride()
            bound = 1e-6 if dtype == torch.float32 else 2**-8
            assert (out.double() - ref).norm() <= bound * ref.norm()
