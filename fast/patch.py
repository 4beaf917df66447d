"""`enable(model)`: the fast path, installed beside the reference. The only file in fast/ that
names model classes.

Each module keeps its class, parameters and state dict; only its bound `forward` is swapped
(an instance attribute), and each fast forward hands back to the module's own one at inference
(eval mode without gradients, `state.is_inference`), so generation runs the model as written:

    LoRALinear (lora/layer.py)       -> fast/lora_function.py `FastLoRAForward`: one autograd
                                        function per layer (or, below, per group of siblings)
    RMSNorm      FUSABLE_NORMS       -> fast/ops.py `RMSNormFunction`
    SwiGLU MLP   FUSABLE_MLPS        -> gate/up together (fast/siblings.py), then the gate and
                                        down_proj as one (fast/swiglu_down.py) where it applies,
                                        else `SwiGLUFunction` and down_proj; in a checkpoint's
                                        recompute down_proj without its GEMM
    attention    FUSABLE_ATTENTIONS  -> q/k/v together, rotary through `RotaryFunction`
    decoder layer                    -> the residual stream through `ResidualRMSNormFunction`:
                 FUSABLE_DECODERS       the add before the second norm inside that norm's kernel,
                                        and in backward the stream's gradient added inside both
                                        norms' (the layer's norms are then not called as modules)

Only the classes whose math is exactly fast/ops.py's formulas are swapped; others, such as
Gemma's (1 + w) norm, keep their own forward. `state.use_kernels(compile)` decides whether the
fast forwards run Triton kernels and torch.compile's fusions on CUDA (fast/state.py).
"""

import contextvars
import sys
import types

import torch

import fast.state as state
from fast.lora_function import FastLoRAForward
from fast.ops import (ResidualRMSNormFunction, RMSNormFunction, RotaryFunction, SwiGLUFunction, kernel,
                      swiglu_forward)
from fast.siblings import run_together
from fast.swiglu_down import run_fused
from lora.layer import LoRALinear
from training.grad_ckpt import is_lean, is_recomputing

# RMSNorm classes whose forward is `w * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)`.
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm")
# MLP classes of the form `down_proj(act(gate_proj(x)) * up_proj(x))` (act checked to be SiLU)
# whose decoder layers add the MLP's output straight into the residual stream.
FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
# Attention classes whose forward calls their modeling module's global
# `apply_rotary_pos_emb(q, k, cos, sin)`, written as fast/ops.py's Rotary formula.
FUSABLE_ATTENTIONS = ("LlamaAttention", "MistralAttention", "MixtralAttention", "Qwen2Attention")
# Decoder layers whose forward is exactly `h = x + attn(norm1(x)); return h + mlp(norm2(h))`,
# with their norms in FUSABLE_NORMS and keyword arguments passed on to the attention.
FUSABLE_DECODERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "MixtralDecoderLayer", "Qwen2DecoderLayer")
# Projections that read the same input as their siblings (attention's q/k/v; the SwiGLU
# gate/up, Mixtral's w1/w3): with torch's dropout, their backward keeps that input once.
SHARED_INPUT_NAMES = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"}


def fast_lora(module):
    """The FastLoRAForward that `enable` set on `module`, or None (not a LoRA layer, or LoRA came after)."""
    forward = vars(module).get("forward")
    return forward if isinstance(forward, FastLoRAForward) else None


def _swapped(module):
    """`enable` has already given `module` its fast forward."""
    return getattr(vars(module).get("forward"), "rawqlora_fast", False)


def _fast_forward(forward):
    """Mark `forward`, a function of (module, *inputs), as one of the fast forwards `_install` binds."""
    forward.rawqlora_fast = True
    return forward


def _install(module, forward):
    """Give `module` the fast `forward`, bound to it as a method, and keep the forward it had.
    Bound, not a closure over `module`: copy.deepcopy of the model then binds the copy's forward
    to the copied module, where a closure would go on computing with the original's weights."""
    module._forward_before_fast = module.forward
    module.forward = types.MethodType(forward, module)


@_fast_forward
def _fused_norm_forward(norm, hidden_states):
    if state.is_inference(norm):
        return norm._forward_before_fast(hidden_states)
    return RMSNormFunction.apply(hidden_states, norm.weight, norm.variance_epsilon)


def _rebuilt_in_backward(t, rebuild):
    """Saved-tensor hooks under which a tensor saved for backward that is `t` (or a reshape of
    it: same storage, same size) is not kept but rebuilt by `rebuild()` when backward needs it.
    Every other saved tensor is kept as usual (and is invisible to outer hooks, such as
    training/memory_plan.py's SavedBytes: only down_proj's small [tokens, r] product is inside)."""
    storage, size = t.untyped_storage().data_ptr(), t.numel()

    def pack(saved):
        if saved.untyped_storage().data_ptr() == storage and saved.numel() == size and saved.is_contiguous():
            return ("rebuild", saved.shape)
        return saved

    def unpack(packed):
        return rebuild().reshape(packed[1]) if isinstance(packed, tuple) else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@_fast_forward
def _fused_mlp_forward(mlp, x):
    if state.is_inference(mlp):
        return mlp._forward_before_fast(x)
    pair = (mlp.gate_proj, mlp.up_proj)
    gate_up = run_together(pair, x) if all(map(fast_lora, pair)) else None
    gate, up = gate_up or (mlp.gate_proj(x), mlp.up_proj(x))
    if not fast_lora(mlp.down_proj):
        return mlp.down_proj(SwiGLUFunction.apply(gate, up))
    # The gate and down_proj as one function (fast/swiglu_down.py), where it applies; in a
    # recompute it skips the GEMM as the branch below does.
    fused = run_fused(mlp.down_proj, gate, up, output_needed=not is_recomputing())
    if fused is not None:
        return fused
    h = SwiGLUFunction.apply(gate, up)
    if is_recomputing():
        # In these decoder layers the MLP's output only feeds the residual add, which is
        # the layer's output: in a recompute nobody reads it, so down_proj (a LoRA layer)
        # runs for its saved tensors only and skips its [tokens x 14336 x 4096] GEMM.
        return mlp.down_proj(h, output_needed=False)
    if is_lean():
        # A lean kept layer (training/grad_ckpt.py): down_proj's backward gets h = silu(g)·u
        # rebuilt from g and u, which SwiGLU's backward keeps anyway, instead of keeping h
        # (intermediate-size wide: the largest tensor a kept layer would hold alone).
        with _rebuilt_in_backward(h, lambda: _swiglu_value(gate, up)):
            return mlp.down_proj(h)
    return mlp.down_proj(h)


def _swiglu_value(gate, up):
    """h as SwiGLUFunction's forward computed it: the same kernel on the same inputs, the same bits."""
    with torch.no_grad(), torch.autocast(gate.device.type, enabled=False):
        return kernel(swiglu_forward, gate.device)(gate, up)


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


@_fast_forward
def _fused_attention_forward(attention, *args, **kwargs):
    plain = attention._forward_before_fast
    if state.is_inference(attention):
        return plain(*args, **kwargs)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    fast = [fast_lora(p) for p in projections]
    # q, k and v as one (fast/siblings.py): the attention then calls each projection on
    # this same hidden_states, and each hands back its share (FastLoRAForward.precomputed).
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    outputs = run_together(projections, x) if all(fast) else None
    for forward_of, y in zip(fast, outputs or ()):
        forward_of.precomputed = (x, y)
    token = _rotary_fused_here.set(True)
    try:
        return plain(*args, **kwargs)
    finally:
        _rotary_fused_here.reset(token)
        for forward_of in fast if outputs is not None else ():
            forward_of.precomputed = None  # never kept past this call, taken or not


@_fast_forward
def _fused_decoder_forward(layer, hidden_states, *args, **kwargs):
    """transformers' decoder layer, h = x + attention(norm1(x)) and out = h + mlp(norm2(h)), with
    the stream and both norms through `ResidualRMSNormFunction` (fast/ops.py): per layer, one
    pass less forward (x + attention's output inside norm2's kernel) and two backward (the
    stream's gradient added inside each norm's backward instead of by autograd). The same
    arithmetic: the sums are the ones autograd formed, in the same dtype. The attention and the
    MLP run as modules, their fast forwards included."""
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if state.is_inference(layer) or args or not all(type(norm).__name__ in FUSABLE_NORMS for norm in norms):
        return layer._forward_before_fast(hidden_states, *args, **kwargs)
    x, normed = ResidualRMSNormFunction.apply(hidden_states, None, norms[0].weight, norms[0].variance_epsilon)
    attended, _ = layer.self_attn(hidden_states=normed, **kwargs)
    h, normed = ResidualRMSNormFunction.apply(x, attended, norms[1].weight, norms[1].variance_epsilon)
    return h + layer.mlp(normed)


def is_swiglu_mlp(module):
    """`down(silu(gate(x)) * up(x))` in a decoder layer whose MLP output only feeds the residual
    add. Named classes only: a look-alike elsewhere (OLMo-2 normalises the MLP's output, so its
    backward reads it) must keep its own forward, or the recompute shortcut would be wrong."""
    return (type(module).__name__ in FUSABLE_MLPS
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def enable(model, compile=True):
    """Install the fast path on `model`, after LoRA went on (lora.inject / load_adapter) and
    before gradient checkpointing (training.grad_ckpt.enable wraps the forwards set here).

    Every LoRALinear trains through fast/lora_function.py (q/k/v and gate/up as one function
    where their dropout allows, fast/siblings.py); every fusable RMSNorm, SwiGLU MLP, attention's
    rotary embedding and decoder layer's residual stream through fast/ops.py. `compile` sets
    fast/state.py's one switch: True runs the Triton kernels and torch.compile's fusions on CUDA
    (LoRA dropout then draws hash masks, not torch's); False keeps every fast function eager,
    with torch's dropout.
    Returns how many modules' forwards were swapped, LoRA layers included; a second call swaps none.
    """
    state.use_kernels(compile)
    swapped = 0
    for name, module in model.named_modules():
        if _swapped(module):
            continue
        if isinstance(module, LoRALinear):
            module.forward = FastLoRAForward(module, name.rsplit(".", 1)[-1] in SHARED_INPUT_NAMES)
        elif type(module).__name__ in FUSABLE_NORMS:
            _install(module, _fused_norm_forward)
        elif is_swiglu_mlp(module):
            _install(module, _fused_mlp_forward)
        elif type(module).__name__ in FUSABLE_ATTENTIONS:
            _install_rotary_dispatch(sys.modules[type(module).__module__])
            _install(module, _fused_attention_forward)
        elif type(module).__name__ in FUSABLE_DECODERS:
            _install(module, _fused_decoder_forward)
        else:
            continue
        swapped += 1
    return swapped
