"""The LoRA linear layer as one autograd function, with its backward written out.

For input rows x [N, in], frozen W [out, in] (dense, or 4-bit and dequantized on use),
trainable A [r, in], B [out, r], dropout mask m with keep-probability q = 1 - p:

    forward    x_d = x * m / q                      (x_d = x when p = 0)
               a   = x_d Aᵀ                         [N, r]
               y   = x Wᵀ + bias + a (s B)ᵀ         the LoRA term, then the GEMM adds onto it
    backward   g_a = dy (s B)                       [N, r]
               dB  = s · dyᵀ a                      [out, r]
               dA  = g_aᵀ x_d                       [r, in]
               dx  = dy W + (g_a A) * m / q         W dequantized again: never stored

Why by hand rather than autograd over `base(x) + B(A(dropout(x))) * s` (the reference,
lora/layer.py, which is what runs without the fast path):
  * autograd over the plain expression keeps an fp32 (or a dropped-out) copy of x per
    adapter and runs five elementwise passes over [N, out] outputs (scale, cast, add ...);
    on a 7B model at 16k tokens those passes cost about as much as the matrix products.
    Here the base GEMM adds onto the LoRA term in place (`addmm_`, beta = 1), and
    backward saves only x_d (x itself when p = 0), the mask and the small `a`.
  * the 4-bit weight is dequantized once in forward and once in backward, and neither
    dequantized copy is saved for backward: that would cost 2 bytes per weight per layer for as
    long as the layer's activations live. (Where the memory plan has room to spare, every
    layer's dequantized weights are kept for the whole run instead: fast/dense_weights.py.)
  * with dropout the mask is kept as bits (1/16 of x_d's size, fast/ops.py), and layers
    whose input is shared (`shared_input`: q, k and v read the same normed x, so do gate and
    up) keep x itself rather than x_d and rebuild x_d in backward (one fused pass): one saved
    tensor for the three instead of three dropped-out copies. At 16k tokens on a 7B model the
    two save 1 GiB. Other layers keep x_d: rebuilding it would cost the pass and save nothing.
  * `fused_dropout` (fast/state.py's `kernels_on`: CUDA): the mask is a hash of a seed and each
    element's position, recomputed inside two Triton kernels that also do the products with A
    (fast/dropout_kernels.py): no mask, no x_d, no extra passes; backward keeps x and the seed.
  * `output_needed=False` (a checkpoint's recompute of the MLP's last projection, whose
    output nobody reads) runs only what backward saves: dropout and `a`, no W GEMM.

Everything runs in the compute dtype (the autocast dtype, else the base's dtype); A and B
stay fp32 master weights and are cast for the products, as autocast would do. Dropout goes
through `torch.native_dropout`, which draws the same random numbers as `nn.Dropout`, so
this layer and the reference (lora/layer.py, PEFT's too) produce the same masks from the same
seed (not so with `fused_dropout`).

Which LoRA layers run this, and when they hand back to their own forward, is written below
(`uses_reference`, `FastLoRAForward`); fast/patch.py installs it.
"""

import torch
from torch import nn

import fast.b_grads_kernel as b_grads_kernel
import fast.dense_weights as dense_weights
import fast.dropout_kernels as kernels
import fast.state as state
from fast.ops import add_masked_, apply_mask, kernel, pack_mask
from lora.layer import LoRALinear
from quant.linear4bit import Linear4bit, dequantize


def uses_reference(layer):
    """`layer` (a LoRALinear) runs its own forward, the formula of lora/layer.py, not the fast
    one: merged (the update is inside W); inference (its 4-bit base then runs bitsandbytes' own
    kernels, a fused 4-bit GEMV at batch 1, where dequantizing all of W per token, as the
    functions here do, would be 5x slower); or a base weight that trains (an output head's rows
    for added tokens, train.py): the functions here treat W as frozen."""
    return layer.merged or state.is_inference(layer) or layer.base_layer.weight.requires_grad


def compute_dtype(layer, x):
    """Autocast's dtype when it is on (bf16 training), else the base's (its weight's, or a 4-bit
    layer's compute_dtype), like bnb's own Linear4bit. The fp32 A and B are cast to it for the
    products, as autocast would cast them."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if isinstance(layer.base_layer, Linear4bit):
        return layer.base_layer.compute_dtype or x.dtype
    return layer.base_layer.weight.dtype


def training_dropout(layer):
    """The dropout probability `layer`'s forward applies: p in training mode, else 0."""
    return layer.lora_dropout.p if layer.training and isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def dense_weight(base, dtype):
    """W [out, in] in `dtype`: for a 4-bit base its kept dense copy (fast/dense_weights.py) or a
    new dequantization, for a dense one the weight itself."""
    if isinstance(base, Linear4bit):
        copy = dense_weights.kept(base, dtype)
        return dequantize(base, dtype) if copy is None else copy
    return base.weight.to(dtype)  # no copy when the dtype matches


def dropout_seed():
    """One seed per call for fast/dropout_kernels.py's masks, from the CPU generator: a checkpoint's
    recompute replays that generator, so it draws the same seed and rebuilds the same mask."""
    return int(torch.randint(2**31, ()))


def scaled_b(lora_b, scaling, dtype):
    """s·B in the compute dtype, made once per forward: the output's product uses it, and backward
    (g_a = dy (s B)) gets it saved rather than made again."""
    return (lora_b * scaling).to(dtype)


def output(x, a, b_s, base, dtype):
    """y = x Wᵀ + bias + a (s B)ᵀ: the LoRA term first, then the base GEMM adds onto it (beta = 1).
    Its epilogue reads the term while the tensor cores work, where adding it afterwards would be
    one more pass over y ([N, out], the largest tensor here)."""
    y = a @ b_s.t() if base.bias is None else torch.addmm(base.bias.to(dtype), a, b_s.t())
    return y.addmm_(x, dense_weight(base, dtype).t())


def b_side_grads(dy, a, b_s, scaling, b_dtype):
    """g_a = dy (s B) [N, r], what dA and dx need, and dB = s · dyᵀ a in `b_dtype` (B's). Where
    the kernels run and dy is 16-bit, both from one read of dy (fast/b_grads_kernel.py; dB then
    leaves the kernel in fp32 rather than dy's dtype); else two products (fp32 dy: full fp32
    products, which the kernel's tf32 would not be)."""
    if state.kernels_on(dy.device) and b_s.dtype != torch.float32:
        g_a, dyt_a = b_grads_kernel.b_grads(dy, a, b_s)
    else:
        g_a, dyt_a = dy @ b_s, dy.t() @ a
    return g_a, dyt_a.mul_(scaling).to(b_dtype)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling, dropout, dtype, shared_input=False, output_needed=True,
                fused_dropout=False):
        shape, x_dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            # A and s·B in the compute dtype, made once here and kept for backward (r x in, out x r)
            a_w, b_s = lora_a.to(dtype), scaled_b(lora_b, scaling, dtype)
            mask, ctx.seed = None, None
            if dropout > 0 and fused_dropout:
                ctx.seed = dropout_seed()
                x_d, a = x, kernels.dropout_a_forward(x, a_w, ctx.seed, dropout)
            else:
                if dropout > 0:
                    x_d, mask = torch.native_dropout(x, dropout, True)
                    mask = kernel(pack_mask, x.device)(mask)
                else:
                    x_d = x
                a = x_d @ a_w.t()
            if output_needed:
                y = output(x, a, b_s, base, dtype)
            else:  # a recompute that only needs the saved tensors: zeros, no memory, no GEMM
                y = x.new_zeros(()).expand(x.shape[0], base.out_features)
        ctx.rebuild_x_d = mask is not None and shared_input
        ctx.save_for_backward(x if ctx.rebuild_x_d else x_d, mask, a, a_w, b_s)
        ctx.base, ctx.scaling, ctx.dropout, ctx.dtype = base, scaling, dropout, dtype
        ctx.weight_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.x_shape, ctx.x_dtype = shape, x_dtype
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_or_x_d, mask, a, a_w, b_s = ctx.saved_tensors
        dtype, keep = ctx.dtype, 1 - ctx.dropout
        a_dtype, b_dtype = ctx.weight_dtypes
        dy = dy.reshape(-1, dy.shape[-1]).to(dtype)
        with torch.autocast(dy.device.type, enabled=False):
            g_a, d_b = b_side_grads(dy, a, b_s, ctx.scaling, b_dtype)
            if ctx.seed is not None:  # one kernel: dA, and the masked LoRA term into dx
                dx = dy @ dense_weight(ctx.base, dtype) if ctx.needs_input_grad[0] else None
                d_a = kernels.dropout_a_backward(x_or_x_d, g_a, a_w, dx, ctx.seed, ctx.dropout)
                d_a = d_a.to(a_dtype)
            else:
                x_d = kernel(apply_mask, dy.device)(x_or_x_d, mask, 1 / keep) if ctx.rebuild_x_d else x_or_x_d
                d_a = (g_a.t() @ x_d).to(a_dtype)
                del x_d
                dx = None
                if ctx.needs_input_grad[0]:
                    dx = dy @ dense_weight(ctx.base, dtype)
                    if mask is None:  # the LoRA term goes straight into dx's GEMM
                        dx.addmm_(g_a, a_w)
                    else:  # one fused pass: dx += (g_a A) * m / q
                        kernel(add_masked_, dx.device)(dx, g_a @ a_w, mask, 1 / keep)
            if dx is not None:
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return dx, d_a, d_b, None, None, None, None, None, None, None


class FastLoRAForward:
    """One LoRALinear's forward on the fast path: fast.enable sets it as that instance's
    `forward` (the class, and so every layer it was not set on, keeps the reference).

    `shared_input`: the layer reads the same input as its siblings (q/k/v, gate/up), so with
    torch's dropout its backward keeps that input, not a dropped-out copy (see above).
    `precomputed`: (x, y), this layer's output y for input x, already computed together with its
    siblings (fast/siblings.py, set by the fast attention forward); the next call with that very
    x returns it.
    """

    rawqlora_fast = True  # fast/patch.py's mark of a forward it has swapped in

    def __init__(self, layer, shared_input):
        self.layer, self.shared_input, self.precomputed = layer, shared_input, None

    def __call__(self, x, output_needed=True):
        layer = self.layer
        if self.precomputed is not None and self.precomputed[0] is x:
            y, self.precomputed = self.precomputed[1], None
            return y
        if uses_reference(layer):
            return LoRALinear.forward(layer, x)
        return LoRALinearFunction.apply(x, layer.lora_A.weight, layer.lora_B.weight, layer.base_layer, layer.scaling,
                                        training_dropout(layer), compute_dtype(layer, x), self.shared_input,
                                        output_needed, state.kernels_on(x.device))
