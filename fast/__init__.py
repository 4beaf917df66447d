"""The speed layer: the same math as lora/ and transformers' modules, as autograd functions
with their backward written out and Triton kernels, installed beside the reference once, by
`fast.enable(model)` (fast/patch.py).

    state.py           the one switch: when the fast path runs, and whether its kernels do
    patch.py           enable(model): swaps the fast forwards in; the only file naming model classes
    lora_function.py   one LoRA layer as one autograd function, and the per-layer fast forward
    siblings.py        adapters that share an input (q/k/v, gate/up) as one autograd function
    swiglu_down.py     the SwiGLU gate and down_proj as one autograd function, two Triton kernels (CUDA)
    ops.py             RMSNorm, SwiGLU and rotary as autograd functions; dropout masks as bits
    dropout_kernels.py LoRA dropout inside the products with A: two Triton kernels (CUDA)
    b_grads_kernel.py  a LoRA layer's two products with dy from one read of it: a Triton kernel (CUDA)
    rotary_kernel.py   rotary embedding as a Triton kernel (CUDA)
    dense_weights.py   4-bit weights kept dequantized where the memory plan has room
    triton_support.py  Triton, where there is one

Imports lora/, quant/ and training.grad_ckpt; nothing there imports this package. Without it,
training runs lora/layer.py's formula and the model's own modules through plain autograd.
"""

from fast.patch import enable

__all__ = ["enable"]
