"""Triton, where there is one: CUDA builds of torch ship it, CPU-only builds do not.

`triton` and `tl` are None without it. Every Triton kernel in fast/ has a plain PyTorch twin that
runs where Triton does not (fast/state.py's `kernels_on` chooses), and the tests run the kernels
through Triton's CPU interpreter (tests/conftest.py).
"""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
