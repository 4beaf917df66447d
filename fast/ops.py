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

On CUDA each function here is compiled with torch.compile into one fused kernel (rotary:
a Triton kernel by hand, rawqlora/rotary_kernel.py); elsewhere (and with compile=False) the
same Python runs eagerly. tests/test_fused.py checks
both against transformers' modules. Only the norms and MLPs whose math is exactly the
above are replaced (`FUSABLE_NORMS`, `FUSABLE_MLPS` with a SiLU, `FUSABLE_ATTENTIONS`);
others, such as Gemma's (1 + w) norm, keep their own forward.
"""

import contextvars
import math
import sys

import torch
import torch.nn.functional as F

from fast import rotary_kernel, triton_support
from training.grad_ckpt import is_recomputing

# RMSNorm classes whose forward is `w * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)`.
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm")
# MLP classes of the form `down_proj(act(gate_proj(x)) * up_proj(x))` (act checked to be SiLU)
# whose decoder layers add the MLP's output straight into the residual stream.
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
# Attention classes whose forward calls their modeling module's global
# `apply_rotary_pos_emb(q, k, cos, sin)`, written as the Rotary formula above.
FUSABLE_ATTENTIONS = ("LlamaAttention", "MistralAttention", "MixtralAttention", "Qwen2Attention")


def rms_norm_forward(x, weight, eps):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward(dy, x, weight, rstd):
    x_hat = x.float() * rstd
    g = dy.float() * weight.float()
    return (rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))).to(x.dtype)


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
COMPILE_ON_CUDA = False  # enable() turns it on: without it (--no-fused-kernels) everything runs eager


def triton_kernels_on(device):
    """The hand-written Triton kernels run on `device`: enable() has run and Triton is there."""
    return COMPILE_ON_CUDA and triton_support.available(device)


def kernel(fn, device):
    """`fn` as it runs on `device`: compiled on CUDA once `enable()` has run, else itself."""
    if not (COMPILE_ON_CUDA and device.type == "cuda"):
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
            dw = None
            if ctx.needs_input_grad[1]:  # norm weights are frozen in QLoRA; this is for completeness
                x_hat = (x.float() * rstd).to(x.dtype)
                dw = (dy * x_hat).float().flatten(0, -2).sum(0).to(weight.dtype)
        return dx, dw, None


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

    On CUDA a hand-written Triton kernel (rawqlora/rotary_kernel.py: torch.compile's ran at
    30% of the bandwidth on these transposed views), elsewhere the functions above.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        with torch.autocast(q.device.type, enabled=False):
            if triton_kernels_on(q.device):
                q_out, k_out = rotary_kernel.rotate(q, cos, sin), rotary_kernel.rotate(k, cos, sin)
            else:
                q_out, k_out = rotary_forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        with torch.autocast(dq.device.type, enabled=False):
            if triton_kernels_on(dq.device):
                dq, dk = (rotary_kernel.rotate(t, cos, sin, backward=True) for t in (dq, dk))
            else:
                dq, dk = rotary_backward(dq, dk, cos, sin)
        return dq, dk, None, None


# ------------------------------------------------------------------------------------------
# Swapping them in: the modules keep their names, parameters and state dict; only the
# bound forward changes, and only for training (the no-grad first pass of a checkpointed layer
# included); inference, in eval mode without gradients, keeps the model's own.
# ------------------------------------------------------------------------------------------
def is_inference(module):
    """Eval mode without gradients (generation): the model's own forward and bitsandbytes'
    inference kernels. A training-mode pass without gradients (the first pass of an offloaded
    checkpoint) is not inference: it must compute exactly what its recompute will. LoRALinear
    decides its path with this too, so the two never disagree."""
    return not (module.training or torch.is_grad_enabled())


def _fused_norm_forward(norm):
    plain = norm.forward

    def forward(hidden_states):
        if is_inference(norm):
            return plain(hidden_states)
        return RMSNormFunction.apply(hidden_states, norm.weight, norm.variance_epsilon)

    return forward


def _fused_mlp_forward(mlp, run_together):
    plain = mlp.forward

    def forward(x):
        if is_inference(mlp):
            return plain(x)
        gate_up = run_together((mlp.gate_proj, mlp.up_proj), x)
        h = SwiGLUFunction.apply(*(gate_up or (mlp.gate_proj(x), mlp.up_proj(x))))
        if is_recomputing() and hasattr(mlp.down_proj, "lora_A"):
            # In these decoder layers the MLP's output only feeds the residual add, which is
            # the layer's output: in a recompute nobody reads it, so down_proj (a LoRA layer)
            # runs for its saved tensors only and skips its [tokens x 14336 x 4096] GEMM.
            return mlp.down_proj(h, output_needed=False)
        return mlp.down_proj(h)

    return forward


# Rotary embedding is a module-level function that the attention forward looks up by name, so
# the fused one goes in there: once per modeling module, as a dispatcher that runs
# transformers' own function unless a fused attention's forward is on the stack (this flag).
# Every other model, and inference, keeps the plain function.
_rotary_fused_here = contextvars.ContextVar("rotary_fused_here", default=False)


def _install_rotary_dispatch(modeling):
    plain = modeling.apply_rotary_pos_emb
    if getattr(plain, "rawqlora_plain", None) is not None:
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not _rotary_fused_here.get():
            return plain(q, k, cos, sin, unsqueeze_dim)
        return RotaryFunction.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))

    apply_rotary_pos_emb.rawqlora_plain = plain
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _fused_attention_forward(attention, run_together):
    plain = attention.forward
    _install_rotary_dispatch(sys.modules[type(attention).__module__])

    def forward(*args, **kwargs):
        if is_inference(attention):
            return plain(*args, **kwargs)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)  # LoRA may come after enable()
        # q, k and v as one (lora/siblings.py): the attention then calls each projection on
        # this same hidden_states, and each hands back its share (LoRALinear.precomputed).
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        outputs = run_together(projections, x)
        for projection, y in zip(projections, outputs or ()):
            projection.precomputed = (x, y)
        token = _rotary_fused_here.set(True)
        try:
            return plain(*args, **kwargs)
        finally:
            _rotary_fused_here.reset(token)
            for projection in projections if outputs is not None else ():
                projection.precomputed = None  # never kept past this call, taken or not

    return forward


def is_swiglu_mlp(module):
    """`down(silu(gate(x)) * up(x))` in a decoder layer whose MLP output only feeds the residual
    add. Named classes only: a look-alike elsewhere (OLMo-2 normalises the MLP's output, so its
    backward reads it) must keep its own forward, or the recompute shortcut would be wrong."""
    return (type(module).__name__ in FUSABLE_MLPS
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def enable(model, compile=True):
    """Route every fusable RMSNorm, SwiGLU MLP and attention's rotary embedding of `model`
    through the functions above.

    Also turns on LoRA layers' fused dropout (lora/kernels.py; Triton, so CUDA only), and
    runs the LoRA layers of q/k/v and of gate/up together where they can (lora/siblings.py).
    Returns how many modules were swapped. `compile=False` keeps the eager path on CUDA too.
    """
    from fast.siblings import run_together  # lora imports this module: imported here, not above

    global COMPILE_ON_CUDA
    COMPILE_ON_CUDA = compile
    swapped = 0
    for module in model.modules():
        if hasattr(module, "fused_dropout"):  # a LoRALinear (lora/ imports this module, not the reverse)
            module.fused_dropout = compile
            continue
        if type(module).__name__ in FUSABLE_NORMS:
            module.forward = _fused_norm_forward(module)
        elif is_swiglu_mlp(module):
            module.forward = _fused_mlp_forward(module, run_together)
        elif type(module).__name__ in FUSABLE_ATTENTIONS:
            module.forward = _fused_attention_forward(module, run_together)
        else:
            continue
        swapped += 1
    return swapped
