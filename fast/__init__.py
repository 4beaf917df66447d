"""The speed layer: the same math as lora/ and transformers' modules, as fused autograd
functions and kernels, installed beside the reference once, by `enable(model)`.

Imports lora/ and quant/; nothing there imports this package.
"""
