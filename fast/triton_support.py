"""Triton, where there is one: CUDA builds of torch ship it, CPU-only builds do not.

Every Triton kernel here has a plain PyTorch twin that runs where Triton does not, and the
tests run the kernels through Triton's CPU interpreter (tests/conftest.py).
"""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def available(device):
    """Triton kernels can run on `device`'s tensors: Triton is installed and they live on CUDA."""
    return triton is not None and device.type == "cuda"
