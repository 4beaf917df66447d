"""When the fast path runs, and whether its kernels do: the fast path's one piece of state.

    fast.enable(model, compile=True)     swaps the fast forwards in (fast/patch.py) and sets
                                         the state below to `compile`
    kernels_on(device)                   True when that was compile=True, Triton is installed and
                                         `device` is CUDA: then fast/ runs its Triton kernels
                                         (LoRA dropout: fast/dropout_kernels.py, rotary:
                                         fast/rotary_kernel.py) and torch.compile's fusions
                                         (fast/ops.py `kernel`); otherwise the same autograd
                                         functions in eager PyTorch, torch's dropout included
    is_inference(module)                 eval mode without gradients: every fast forward hands
                                         back to the module's own (the reference) forward

The state is process-wide, as torch.compile's caches are: one training run, one `enable` call.
"""

import torch

from fast.triton_support import triton

_kernels = False  # set by `use_kernels`, which only fast.enable calls


def use_kernels(on):
    global _kernels
    _kernels = bool(on)


def kernels_on(device):
    """The fast path runs Triton kernels and compiled fusions for tensors on `device`."""
    return _kernels and triton is not None and device.type == "cuda"


def is_inference(module):
    """Eval mode without gradients (generation): the reference forwards, and bitsandbytes'
    inference kernels under them. A training-mode pass without gradients (the first pass of an
    offloaded checkpoint) is not inference: it must compute exactly what its recompute will."""
    return not (module.training or torch.is_grad_enabled())
