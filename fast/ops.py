"""RMSNorm, the SwiGLU gate and rotary embeddings as autograd functions with their backward
written out, and LoRA dropout masks kept as bits.

Why: in a 4-bit LoRA step the matrix products already run near the GPU's peak; what is left
is memory-bound elementwise work, and the largest share of it sits in the model's own
RMSNorm and SiLU-gate (profile in bench/RESULTS.md). transformers writes RMSNorm as six
eager passes (upcast, square, mean, scale, downcast, weight) and autograd keeps their fp32
intermediates for backward; the gate `silu(g) * u` keeps silu(g) as well as g and u.
Written out, each is one function of its inputs:

    RMSNorm    r  = 1 / sqrt(mean(x²) + eps)                 per row, fp32
               x̂  = x · r   (rounded to x's dtype)           y = w ⊙ x̂
      backward g  = w ⊙ dy
               dx = r · (g − x̂ · mean(g ⊙ x̂))               dw = Σ_rows dy ⊙ x̂ (if w trains)
      saves    x (the layer already holds it) and r: one float per row

    Residual stream  a decoder layer adds each branch to the stream, h = x + branch, and
               the next norm reads h: y = RMSNorm(h). Backward, h's gradient is the stream's dh
               plus the norm's dx. One pass each way instead of two (the add, the norm): the
               add goes into the norm's kernel, and the gradients' sum into its backward, so
               autograd no longer adds two [tokens, hidden] gradients in a pass of its own.
               The first norm of a layer has no branch (h = x) but still takes the sum.

    SwiGLU     y  = silu(g) ⊙ u = g σ(g) ⊙ u
      backward du = dy ⊙ g σ(g)
               dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g)))
      saves    g and u, not silu(g)

    Rotary     y  = x ⊙ cos + rot(x) ⊙ sin,   rot(x) = (−x₂, x₁) for x's two halves
      backward dx = dy ⊙ cos − rot(dy ⊙ sin)                  (rot's transpose is −rot)
      saves    cos and sin, shared by all layers: one kernel for q and k instead of eight
               eager passes (mul, negate, concatenate, mul, add, for each) and their backward

    Dropout mask  kept for backward as 1 bit per element (packed 8 to a byte), not as a bool
               byte: 7/8 of the masks' memory, 0.5 GiB at 16k tokens on a 7B model. Unpacking
               fuses into the kernel that applies the mask.

Where `state.kernels_on(device)` (fast/state.py: CUDA, after `fast.enable(model)`), each
function here is compiled with torch.compile into one fused kernel (rotary: a Triton kernel by
hand, fast/rotary_kernel.py); elsewhere the same Python runs eagerly. tests/test_fused.py checks
both against transformers' modules. Which models' modules use them is fast/patch.py's business.
"""

import math

import torch
import torch.nn.functional as F

import fast.rotary_kernel as rotary_kernel
import fast.state as state


def rms_norm_forward(x, weight, eps):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward(dy, x, weight, rstd):
    x_hat = x.float() * rstd
    g = dy.float() * weight.float()
    return (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)


def residual_rms_norm_forward(x, branch, weight, eps):
    h = x + branch
    return (h, *rms_norm_forward(h, weight, eps))


def rms_norm_backward_with_residual(dy, x, weight, rstd, d_residual):
    """dx of the norm, rounded as `rms_norm_backward` rounds it, plus the residual stream's
    gradient: the sum autograd would form, in the same pass."""
    return rms_norm_backward(dy, x, weight, rstd) + d_residual


def rms_norm_weight_grad(dy, x, weight, rstd):
    x_hat = (x.float() * rstd).to(x.dtype)
    return (dy * x_hat).float().flatten(0, -2).sum(0).to(weight.dtype)


def swiglu_forward(gate, up):
    return F.silu(gate) * up


def swiglu_backward(dy, gate, up):
    g, u, d = gate.float(), up.float(), dy.float()
    sig = torch.sigmoid(g)
    d_up = d * g * sig
    d_gate = d * u * sig * (1 + g * (1 - sig))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_forward(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_backward(dq, dk, cos, sin):
    return dq * cos - rotate_half(dq * sin), dk * cos - rotate_half(dk * sin)


def pack_mask(mask):
    """bool mask (any shape) -> uint8 [ceil(numel / 8)]; bit i of byte k holds element 8k + i."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    # Eight shifted columns OR-ed, not a sum over the last dim: compiled, a pointwise kernel
    # (the sum compiled to a reduction 20x slower than this on an H100).
    packed = flat[:, 0]
    for i in range(1, 8):
        packed = packed | (flat[:, i] << i)
    return packed


def unpack_mask(packed, shape):
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape).bool()


def apply_mask(x, packed, scale):
    """Dropout from a packed mask: x ⊙ m · scale."""
    return x * unpack_mask(packed, x.shape) * scale


def add_masked_(out, t, packed, scale):
    """out += t ⊙ m · scale, in place."""
    return out.addcmul_(t, unpack_mask(packed, t.shape), value=scale)


_compiled = {}  # fn -> its torch.compile'd version


def kernel(fn, device):
    """`fn` as it runs on `device`: torch.compile'd where `state.kernels_on(device)`, else itself.
    (Compiled on CUDA only, even where a test turns the kernels on for the CPU to run the Triton
    kernels in Triton's interpreter: there inductor would build C++, slowly, for nothing.)"""
    if not (state.kernels_on(device) and device.type == "cuda"):
        return fn
    if fn not in _compiled:
        # dynamic: one kernel for every sequence length, not a recompile per batch shape
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        with torch.autocast(x.device.type, enabled=False):
            y, rstd = kernel(rms_norm_forward, x.device)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dx = kernel(rms_norm_backward, x.device)(dy, x, weight, rstd)
            # norm weights are frozen in QLoRA; this is for completeness
            dw = rms_norm_weight_grad(dy, x, weight, rstd) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class ResidualRMSNormFunction(torch.autograd.Function):
    """(h, RMSNorm(h)) for h = x + branch, or h = x where `branch` is None (module docstring,
    "Residual stream"): a decoder layer's stream h goes on to the next add, the norm's output
    into the attention or the MLP. Backward returns one gradient, dh + the norm's dx, to x and
    to the branch alike."""

    @staticmethod
    def forward(ctx, x, branch, weight, eps):
        with torch.autocast(x.device.type, enabled=False):
            if branch is None:
                h = x.view_as(x)  # the stream passes through; its gradient comes back in backward
                y, rstd = kernel(rms_norm_forward, x.device)(x, weight, eps)
            else:
                h, y, rstd = kernel(residual_rms_norm_forward, x.device)(x, branch, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_branch = branch is not None
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            # dh is never None: autograd materializes an unused output's gradient as zeros
            dx = kernel(rms_norm_backward_with_residual, h.device)(dy, h, weight, rstd, dh)
            dw = rms_norm_weight_grad(dy, h, weight, rstd) if ctx.needs_input_grad[2] else None
        return dx, dx if ctx.has_branch else None, dw, None


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        with torch.autocast(gate.device.type, enabled=False):
            y = kernel(swiglu_forward, gate.device)(gate, up)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        with torch.autocast(gate.device.type, enabled=False):
            return kernel(swiglu_backward, gate.device)(dy, gate, up)


class RotaryFunction(torch.autograd.Function):
    """q, k [batch, heads, seq, head_dim] rotated; cos, sin [batch, 1, seq, head_dim].

    With kernels on a hand-written Triton kernel (fast/rotary_kernel.py: torch.compile's ran at
    30% of the bandwidth on these transposed views), else the functions above.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        with torch.autocast(q.device.type, enabled=False):
            if state.kernels_on(q.device):
                q_out, k_out = rotary_kernel.rotate(q, cos, sin), rotary_kernel.rotate(k, cos, sin)
            else:
                q_out, k_out = rotary_forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        with torch.autocast(dq.device.type, enabled=False):
            if state.kernels_on(dq.device):
                dq, dk = (rotary_kernel.rotate(t, cos, sin, backward=True) for t in (dq, dk))
            else:
                dq, dk = rotary_backward(dq, dk, cos, sin)
        return dq, dk, None, None
