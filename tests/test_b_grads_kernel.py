"""fast/b_grads_kernel.py: g_a = dy B_s and dyᵀ a from one read of dy, against the two products.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest.py), with fp32 products.
"""

import pytest
import torch

from fast import b_grads_kernel, state
from fast.lora_function import b_side_grads, scaled_b

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_tiles(monkeypatch):
    # Tiles smaller than the shapes below: several row splits and column groups, the last of
    # each partly outside the tensor, and more than one BK step per group.
    monkeypatch.setattr(b_grads_kernel, "COLS", 64)
    monkeypatch.setattr(b_grads_kernel, "TILE", dict(ROWS=64, BK=32, num_warps=4, num_stages=2))


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliced", [False, True], ids=["a", "a column slice"])
def test_kernel_equals_the_two_products(small_tiles, dtype, sliced):
    # Both outputs accumulate in fp32 and the bf16 inputs' products are exact in it, so against
    # float64 products of the same inputs only the summation order differs (~1e-6) until g_a is
    # rounded to dy's dtype: bf16's half-ulp, 2^-9 relative, bounds it there. fp32 inputs: exact
    # products in the interpreter; on a GPU tf32's (10-bit mantissas: ~1e-3 relative per product,
    # less over a sum), which is why fp32 training keeps cuBLAS (next test).
    torch.manual_seed(0)
    n, out, r = 150, 200, 4
    dy = torch.randn(n, out, device=DEVICE).to(dtype)
    wide = torch.randn(n, 3 * r, device=DEVICE).to(dtype)
    a = wide[:, r:2 * r] if sliced else wide[:, :r].contiguous()
    b_s = torch.randn(out, r, device=DEVICE).to(dtype)
    g_a, dyt_a = b_grads_kernel.b_grads(dy, a, b_s)
    assert g_a.dtype == dtype and dyt_a.dtype == torch.float32
    assert g_a.shape == (n, r) and dyt_a.shape == (out, r)
    fp32_bound = 2e-3 if DEVICE.type == "cuda" else 1e-5
    assert rel_err(g_a, dy.double() @ b_s.double()) <= (2**-9 if dtype == torch.bfloat16 else fp32_bound)
    assert rel_err(dyt_a, dy.double().t() @ a.double()) <= (1e-5 if dtype == torch.bfloat16 else fp32_bound)


def test_b_side_grads_with_and_without_the_kernel(small_tiles, monkeypatch):
    # The kernel's dB stays fp32 until it is scaled; the two bf16 products round it to bf16
    # first: the two agree to bf16's rounding.
    torch.manual_seed(1)
    n, out, r = 100, 96, 8
    dy = torch.randn(n, out, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(n, r, device=DEVICE, dtype=torch.bfloat16)
    lora_b = torch.randn(out, r, device=DEVICE)
    monkeypatch.setattr(state, "kernels_on", lambda device: True)
    fused = b_side_grads(dy, a, scaled_b(lora_b, 0.5, torch.bfloat16), 0.5, torch.float32)
    monkeypatch.setattr(state, "kernels_on", lambda device: False)
    apart = b_side_grads(dy, a, scaled_b(lora_b, 0.5, torch.bfloat16), 0.5, torch.float32)
    for f, p in zip(fused, apart):
        assert f.dtype == p.dtype and rel_err(f, p.double()) <= 2**-8
    # fp32 compute never takes the kernel (its products would be tf32 on a GPU)
    monkeypatch.setattr(state, "kernels_on", lambda device: True)
    monkeypatch.setattr(b_grads_kernel, "b_grads", None)
    b_side_grads(dy.float(), a.float(), scaled_b(lora_b, 0.5, torch.float32), 0.5, torch.float32)

