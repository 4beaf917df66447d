"""fast/dropout_kernels.py: the fused-dropout Triton kernels against the plain formulas, with
the masks rebuilt here from the hash the module documents.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py turns it on), which
executes the same kernel code with NumPy: block loops, masks and hashing included, so a wrong
index, offset or hash fails here. On a GPU they run for real.
"""

import pytest
import torch

import fast
import lora
from fast import dropout_kernels as kernels
from fast import state
from test_grad_ckpt import lora_grads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 end to end: the interpreter's products are fp32 (reordering only: 1e-5); on a GPU the
# kernels' fp32 products are tf32 (A rounded to 10 bits: ~5e-4 per product, less over a sum).
FP32_BOUND = 2e-3 if DEVICE.type == "cuda" else 1e-5
UINT32 = 0xFFFFFFFF


def mul32(h, c):
    """h · c mod 2³² for int64 tensors h < 2³² (split so the product never overflows int64)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & UINT32


def fmix32(h):
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(seed, rows, cols, p):
    """The module docstring's mask, in int64 PyTorch."""
    row_h = fmix32(torch.arange(rows) ^ fmix32(torch.tensor(seed)))
    column = torch.arange(cols)
    h = fmix32(row_h[:, None] ^ mul32(column // 2, 0x9E3779B1)[None, :])
    bits = torch.where(column % 2 == 0, h & 0xFFFF, h >> 16)
    return bits >= round(p * 2**16)


def keep_scale(p):
    """1 / the mask's exact keep rate."""
    return 2**16 / (2**16 - round(p * 2**16))


@pytest.fixture(autouse=True)
def kernels_on_this_device(monkeypatch):
    # fast/state.py's switch on for every device: on the CPU, Triton's interpreter runs the kernels
    monkeypatch.setattr(state, "kernels_on", lambda device: True)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# Rows and columns off the 64-blocks, a rank under 16 (padded for tl.dot) and one over it,
# more rows than one backward program walks (1024), so several partial dA are summed; one
# adapter, and two and three side by side (fast/siblings.py: member j's mask from seed + j).
@pytest.mark.parametrize("n,k,r,p", [(150, 96, 4, 0.3), (1100, 64, 24, 0.05), (7, 200, 16, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("members", [1, 2, 3])
def test_kernels_equal_plain_formulas(n, k, r, p, dtype, members):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    lora_a = torch.randn(members * r, k, generator=g).to(DEVICE)
    g_a = torch.randn(n, members * r, generator=g).to(DEVICE, dtype)
    dx = torch.randn(n, k, generator=g).to(DEVICE, dtype)
    seed = 12345 + n
    masks = [keep_mask(seed + j, n, k, p).to(DEVICE) for j in range(members)]
    x_d = [x.double() * m * keep_scale(p) for m in masks]
    rows = [slice(j * r, (j + 1) * r) for j in range(members)]
    a_used = lora_a.to(dtype).double()  # the kernels' products run in x's dtype, A cast to it

    a = kernels.dropout_a_forward(x, lora_a, seed, p, members=members)
    a_ref = torch.cat([x_d[j] @ a_used[rows[j]].t() for j in range(members)], dim=1)
    dx_ref = dx.double() + sum((g_a[:, rows[j]].double() @ a_used[rows[j]]) * masks[j] * keep_scale(p)
                               for j in range(members))
    d_a_ref = torch.cat([g_a[:, rows[j]].double().t() @ x_d[j] for j in range(members)])
    d_a = kernels.dropout_a_backward(x, g_a, lora_a, dx, seed, p, members=members)
    # fp32: the interpreter's fp32 products (1e-6); on a GPU tf32 rounds A to 10 bits (5e-4).
    # bf16: products of bf16 values, exact in the fp32 accumulator; the outputs a and dx are
    # rounded to bf16 (8 bits: 4e-3 per element).
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert a.dtype == dtype and rel_err(a, a_ref) < bound
    assert d_a.dtype == torch.float32 and rel_err(d_a, d_a_ref) < 1e-3
    assert dx.dtype == dtype and rel_err(dx, dx_ref) < bound
    # without dx (an input that needs no gradient) dA is the same
    assert torch.equal(kernels.dropout_a_backward(x, g_a, lora_a, None, seed, p, members=members), d_a)


def test_mask_statistics():
    # 4M draws: keep-rate within 5 standard deviations of q; masks of two neighbouring seeds
    # (siblings run on seed, seed + 1, ...), of neighbouring rows, of neighbouring columns and
    # of the two columns that share a hash agree at the independent rate q² + p².
    p, q = 0.05, 0.95
    m1, m2 = keep_mask(1, 2048, 2048, p).float(), keep_mask(2, 2048, 2048, p).float()
    sd = (p * q / m1.numel()) ** 0.5
    assert abs(m1.mean() - q) < 5 * sd and abs(m2.mean() - q) < 5 * sd
    agree = q * q + p * p
    for a, b in [(m1, m2), (m1[1:], m1[:-1]), (m1[:, 1:], m1[:, :-1]), (m1[:, 0::2], m1[:, 1::2])]:
        assert abs((a == b).float().mean() - agree) < 5 * (agree * (1 - agree) / a.numel()) ** 0.5


def test_layer_with_fused_dropout_equals_plain_autograd():
    # The whole LoRA layer's fast forward through the kernels against autograd over the formula
    # as written, dropout applied with the mask the layer's seed gives.
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).to(DEVICE).requires_grad_(False)  # frozen, as inject leaves it
    layer = lora.LoRALinear(base, r=8, alpha=16, dropout=0.2)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    fast.enable(layer, compile=False)  # the kernels: this module's fixture
    x = torch.randn(3, 11, 48, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 11, 40, device=DEVICE)

    torch.manual_seed(5)
    y = layer(x)
    y.backward(dy)
    got = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]

    torch.manual_seed(5)  # the layer draws its seed from the CPU generator first thing
    seed = int(torch.randint(2**31, ()))
    m = keep_mask(seed, 33, 48, 0.2).to(DEVICE).reshape(3, 11, 48)
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    ref = base(x) + layer.lora_B(layer.lora_A(x * m * keep_scale(0.2))) * layer.scaling
    ref.backward(dy)
    assert rel_err(y, ref) < FP32_BOUND
    for g, t in zip(got, (x, layer.lora_A.weight, layer.lora_B.weight)):
        assert rel_err(g, t.grad) < FP32_BOUND


@pytest.mark.parametrize("offload", [False, True])
def test_checkpoint_recompute_regenerates_the_mask(offload, monkeypatch):
    # The recompute must draw the same seed, hence the same mask: checkpointed gradients
    # equal un-checkpointed ones with fused dropout on (and the kernels must have run).
    calls = []
    forward = kernels.dropout_a_forward
    monkeypatch.setattr(kernels, "dropout_a_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    run = dict(dropout=0.1, use_fast=True, device=DEVICE)
    plain = lora_grads(offload=False, checkpointing=False, **run)
    ckpt = lora_grads(offload=offload, checkpointing=True, **run)
    assert calls and plain.keys() == ckpt.keys()
    for name in plain:  # the same products in the same order: only accumulation order differs
        assert rel_err(ckpt[name], plain[name]) < 1e-5, name
