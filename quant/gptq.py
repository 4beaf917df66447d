"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): 4-bit weights from a few hundred calibration samples.

    gptq_quantize_layer(W, H)      one weight matrix -> QuantizedWeight (codes, scales, zeros, g_idx, Ŵ)
    rtn_quantize(W)                round-to-nearest on the same grid: the baseline
    quantize_model(model, batches) every decoder layer in order, each fed the quantized layers' outputs
    save_gptq / quantize_directory a model directory -> a GPTQ checkpoint (AutoGPTQ format v1)
    load_gptq(path)                -> a transformers model whose Linears are GPTQLinear

The problem, per Linear with weight W [out, in] and calibration inputs X [in, n]:

    Ŵ = argmin ‖WX − ŴX‖²  over Ŵ on the 4-bit grid,   H = 2/n · X Xᵀ  (the loss's Hessian)

Rows are independent given H. GPTQ rounds one column q at a time and moves the error onto the
columns F not yet rounded, optimally for the quadratic loss (the OBS update):

    δ_F = −(w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}
    H_{F∖q}⁻¹ = H_F⁻¹ − H_F⁻¹[:,q] H_F⁻¹[q,:] / [H_F⁻¹]_qq          (the inverse without column q)

In a fixed column order every downdated inverse is already in the upper Cholesky factor U of
H⁻¹ (H⁻¹ = UᵀU): row q of U is (H_F⁻¹)[q, q:] / √[H_F⁻¹]_qq. So with err = (w_q − quant(w_q)) / U_qq
the update is W[:, q:] −= err ⊗ U[q, q:], no inverse is ever downdated, and the updates of a
block of 128 columns are applied to the columns after it as one matrix product (lazy batches).
Damping adds 0.01 · mean(diag H) to the diagonal; a column no input touched (diag 0) gets
H_qq = 1, which decouples it: it is rounded, with no error feedback.

The grid (AutoGPTQ's, sym=True): per row and group of g input columns a scale s stored in fp16
and a zero point z = 2^(bits−1) = 8, codes q ∈ [0, 15], Ŵ = s · (q − z), s = 2·max|w| / 15 taken
over the group's *current* (error-updated) weights when its first column comes up. The scale is
rounded to fp16 before any code is chosen, so Ŵ is exactly what the checkpoint describes.
act-order (desc_act) visits columns by descending diag(H); groups are then formed in that order
and g_idx records each original column's group.

Checkpoint (AutoGPTQ v1, what transformers/optimum, vLLM and TGI read), per Linear:
    qweight int32 [in/8, out]   code of input i at bits 4·(i mod 8) of row i // 8 (lowest first)
    qzeros  int32 [in/g, out/8] zero − 1 of output o at bits 4·(o mod 8) of column o // 8
    scales  fp16  [in/g, out]   g_idx int32 [in]   bias fp16 [out] if any
Ŵ[o, i] = scales[g_idx[i], o] · (code[i, o] − (qzero[g_idx[i], o] + 1)). Everything else
(embeddings, norms, lm_head) stays 16-bit.
"""

import copy
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from quant.experts import module_key, unfuse_experts
from quant.load import (checkpoint_files, load_model, open_checkpoint, place, read_config, read_tensor,
                        rebuild_computed_buffers)
from quant.save import MAX_SHARD_BYTES, write_model
from training import data
from rawqlora.cli import ArgumentParser, run
from rawqlora.errors import BadInput

BITS = 4  # the only width the checkpoint kernels (and this file) pack
GROUP_SIZES = (32, 64, 128)
DAMP = 0.01  # of the mean Hessian diagonal
BLOCK = 128  # columns per lazy batch: the paper's choice, a multiple of every group size
FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal fp16: a scale below it would lose bits


@dataclass
class QuantizedWeight:
    """Ŵ[o, i] = scales[g_idx[i], o] · (codes[o, i] − zeros[g_idx[i], o])."""

    codes: torch.Tensor  # uint8 [out, in], in [0, 2^bits): one byte a weight until packing
    scales: torch.Tensor  # fp16 [in/g, out]
    zeros: torch.Tensor  # int32 [in/g, out], the zero point itself (the file stores zero − 1)
    g_idx: torch.Tensor  # int32 [in], group of each input column
    error: float | None = None  # mean ‖(W − Ŵ)x‖² over the calibration tokens
    rtn_error: float | None = None  # the same for round-to-nearest on the same grid

    @property
    def weight(self):
        return dequantize(self.codes, self.scales, self.zeros, self.g_idx)


def dequantize(codes, scales, zeros, g_idx):
    """fp32 Ŵ [out, in]; exact: an fp16 scale times an integer of at most 4 bits fits fp32's mantissa."""
    g = g_idx.long()
    return scales.float()[g].T * (codes.int() - zeros[g].T).float()


# ----------------------------------------------------------------------------- the algorithm


def group_scale(w, bits):
    """Scale per row of the group w [rows, g]: 2·max|w| / (2^bits − 1), rounded to fp16 as stored."""
    amax = w.abs().amax(dim=1)
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # an all-zero group: any scale, AutoGPTQ's 1
    scale = (2 * amax / (2**bits - 1)).clamp(FP16_TINY, torch.finfo(torch.float16).max)
    return scale.to(torch.float16).to(w.dtype)


def round_to_grid(w, scale, bits):
    """Codes of w on the grid s·(q − z): q = clamp(round(w / s) + z, 0, 2^bits − 1)."""
    return torch.clamp(torch.round(w / scale) + 2 ** (bits - 1), 0, 2**bits - 1)


def rtn_quantize(W, bits=BITS, group_size=128):
    """Round-to-nearest: every group's scale from its own weights, every weight rounded alone."""
    rows, cols = W.shape
    groups = W.reshape(rows, cols // group_size, group_size).transpose(0, 1)  # [groups, rows, g]
    scales = torch.stack([group_scale(grp, bits) for grp in groups])  # [groups, rows]
    codes = round_to_grid(groups, scales[..., None], bits).transpose(0, 1).reshape(rows, cols)
    g_idx = torch.arange(cols, device=W.device) // group_size
    return QuantizedWeight(codes.to(torch.uint8), scales.half(), torch.full_like(scales, 2 ** (bits - 1)).int(),
                           g_idx.int())


def gptq_quantize_layer(W, H, bits=BITS, group_size=128, act_order=False, damp=DAMP, block_size=BLOCK):
    """GPTQ of W [out, in] against H [in, in] (2/n Σ x xᵀ); W and H are not modified.

    Computes in W's dtype when it is float64 (tests), else in float32.
    """
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W, H = W.to(dtype, copy=True), H.to(dtype, copy=True)
    rows, cols = W.shape
    if cols % group_size or block_size % group_size:
        raise ValueError(f"group size {group_size} must divide in_features {cols} and the block size {block_size}")
    diag = H.diagonal()
    diag[diag == 0] = 1  # dead columns: decoupled, so simply rounded (an unused expert keeps its weights)
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, damp)

    codes = torch.empty_like(W)
    scales = torch.empty(cols // group_size, rows, dtype=dtype, device=W.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block, err = W[:, b0:b1].clone(), torch.empty(rows, b1 - b0, dtype=dtype, device=W.device)
        for j in range(b1 - b0):
            if (b0 + j) % group_size == 0:  # a group lies inside one block, so `block` is up to date
                scale = scales[(b0 + j) // group_size] = group_scale(block[:, j : j + group_size], bits)
            w = block[:, j]
            q = round_to_grid(w, scale, bits)
            err[:, j] = (w - scale * (q - 2 ** (bits - 1))) / U[b0 + j, b0 + j]
            block[:, j:].addr_(err[:, j], U[b0 + j, b0 + j : b1], alpha=-1)  # OBS update, inside the block
            codes[:, b0 + j] = q
        W[:, b1:].addmm_(err, U[b0:b1, b1:], alpha=-1)  # the block's deferred update of every later column

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=W.device) // group_size)[inverse]  # column perm[k] is in group k // g
    return QuantizedWeight(codes[:, inverse].to(torch.uint8), scales.half(),
                           torch.full_like(scales, 2 ** (bits - 1)).int(), g_idx.int())


def inverse_cholesky(H, damp):
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean diag H (× 10 per retry if H is not definite)."""
    mean = H.diagonal().mean()
    for attempt in range(4):
        eye = torch.eye(len(H), dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(H + damp * 10**attempt * mean * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 1000x damping (NaN activations?)")


def output_error(W, What, H):
    """Mean ‖(W − Ŵ)x‖² over the tokens behind H = 2/n Σ x xᵀ: ½ tr(Δ H Δᵀ)."""
    D = W.to(H.dtype) - What.to(H.dtype)
    return 0.5 * ((D @ H) * D).sum().item()


# ----------------------------------------------------------------------------- the model


class _Stop(Exception):
    """Raised from a hook to end a forward pass early, once the inputs we came for are recorded."""


def decoder_layers(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, decoder.layers


def _to(obj, device, dtype):
    """Tensors inside kwargs (tuples included) to `device`, floating ones to `dtype` (masks stay bool)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


class Hessian:
    """Running H = 2/n Σ x xᵀ over every token seen, in fp32."""

    def __init__(self, features, device):
        self.H, self.n = torch.zeros(features, features, device=device), 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1])
        self.H *= self.n / (self.n + len(x))
        self.n += len(x)
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            xtx = torch.mm(x.T, x, out_dtype=torch.float32)  # tensor cores, fp32 sums: as exact as fp32 inputs
        else:
            xtx = x.T.float() @ x.float()
        self.H.add_(xtx, alpha=2 / self.n)


@torch.no_grad()
def quantize_model(model, calibration_batches, bits=BITS, group_size=128, act_order=False, device=None,
                   damp=DAMP, true_sequential=True):
    """GPTQ every nn.Linear of the decoder layers in place (Ŵ written into .weight); returns {name: QuantizedWeight}.

    calibration_batches: input_ids tensors [batch, seq] (rows of equal length, no padding: every
    token counts in H). The model stays where it is (the CPU); each decoder layer in turn goes
    to `device` with its calibration inputs, computing in the model's dtype there (fp32 on the
    CPU, where half precision is slow), and comes back with Ŵ rounded to the model's dtype.
    true_sequential: each set of Linears that share an input (q/k/v, o, gate/up, down) is
    quantized before the next set's H is collected, so o_proj's H already sees the quantized q/k/v.
    The returned codes take one byte a weight on the host.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dtype = next(model.parameters()).dtype
    dtype = torch.float32 if device.type == "cpu" else model_dtype
    decoder, layers = decoder_layers(model)

    # Layer 0's inputs and keyword arguments (mask, position ids, rotary cos/sin), one set per batch.
    inputs, kwargs = [], []

    def grab(module, args, kw):
        inputs.append((args[0] if args else kw.pop("hidden_states")).to(dtype))
        kwargs.append(_to(kw, device, dtype))
        raise _Stop

    outside = [m for m in decoder.children() if m is not layers]  # embeddings, rotary embedding, final norm
    embed = model.get_input_embeddings()
    for m in outside:
        m.to(device)
    embed.to(dtype)  # hidden states, and the rotary cos/sin that follow their dtype, in the compute dtype
    hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calibration_batches:
            try:
                decoder(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
        embed.to(model_dtype)
        for m in outside:
            m.to("cpu")
    if not inputs:
        raise BadInput("no calibration batches: give at least one row of token ids")

    results = {}
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for index, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer", disable=None)):
        layer.to(device=device, dtype=dtype)
        linears = {n: m for n, m in layer.named_modules() if type(m) is nn.Linear}
        groups = shared_input_groups(layer, linears, inputs[0], kwargs[0])
        for stage in (groups if true_sequential else [sum(groups, [])]):
            stage_groups = [g for g in groups if g[0] in stage]
            hessians = collect_hessians(layer, linears, stage_groups, inputs, kwargs)
            for group in stage_groups:
                H = hessians[group[0]].H
                W = torch.cat([linears[n].weight for n in group]).float()  # rows are independent given H
                q = gptq_quantize_layer(W, H, bits, group_size, act_order, damp)
                What = q.weight
                rtn = rtn_quantize(W, bits, group_size).weight
                row = 0
                for name in group:
                    module = linears[name]
                    rows = slice(row, row + module.out_features)
                    row += module.out_features
                    module.weight.copy_(What[rows])  # the next stages and layers see the quantized layer
                    results[f"{prefix}.{index}.{name}"] = QuantizedWeight(
                        q.codes[rows].cpu(), q.scales[:, rows].cpu(), q.zeros[:, rows].cpu(), q.g_idx.cpu(),
                        output_error(W[rows], What[rows], H), output_error(W[rows], rtn[rows], H))
            del hessians
        for i, (x, kw) in enumerate(zip(inputs, kwargs)):  # the next layer's inputs, from this quantized one
            out = layer(x, **kw)
            inputs[i] = out[0] if isinstance(out, tuple) else out
        layer.to(device="cpu", dtype=model_dtype)
    return results


def shared_input_groups(layer, linears, x, kw):
    """The layer's Linears grouped by the input tensor they are called on, in call order (one probe pass).

    Llama: [q, k, v], [o], [gate, up], [down]. Linears the probe never calls (an expert no token
    was routed to) come last, one group each.
    """
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: calls.append((n, args[0]))) for n, m in linears.items()]
    try:
        layer(x, **kw)
    finally:
        for h in hooks:
            h.remove()
    groups = []  # [(names, input)]
    for name, tensor in calls:
        group = next((g for g in groups if g[1] is tensor), None)
        if group is None:
            groups.append(([name], tensor))
        elif name not in group[0]:
            group[0].append(name)
    seen = {n for n, _ in calls}
    return [names for names, _ in groups] + [[n] for n in linears if n not in seen]


def collect_hessians(layer, linears, groups, inputs, kwargs):
    """H of each group's shared input over all calibration batches; a pass stops once every group has run."""
    hessians = {g[0]: Hessian(linears[g[0]].in_features, linears[g[0]].weight.device) for g in groups}
    wanted = {n for g in groups for n in g}
    called = set()

    def record(module, args, name):
        if name in hessians:  # the first of its group: the others see the same tensor
            hessians[name].add(args[0])
        called.add(name)
        if called >= wanted:
            raise _Stop  # the rest of the layer computes nothing this stage needs

    hooks = [linears[n].register_forward_pre_hook(lambda m, args, n=n: record(m, args, n)) for n in wanted]
    try:
        for x, kw in zip(inputs, kwargs):
            called.clear()
            try:
                layer(x, **kw)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return hessians


# ----------------------------------------------------------------------------- the checkpoint format


def pack(values, bits=BITS):
    """int [n, m] with values < 2^bits -> int32 [n·bits/32, m]: value 8r + j at bits 4j..4j+3 of row r."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])
    shifts = (torch.arange(per, device=v.device) * bits)[None, :, None]
    packed = (v << shifts).sum(1)  # disjoint bit ranges: the sum is the bitwise or
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


def unpack(packed, bits=BITS):
    """The inverse of pack: int32 [n/8, m] -> int32 [n, m]."""
    shifts = (torch.arange(32 // bits, device=packed.device, dtype=torch.int32) * bits)[None, :, None]
    return ((packed[:, None, :] >> shifts) & (2**bits - 1)).reshape(-1, packed.shape[1])


class GPTQLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ stored GPTQ-packed; its state dict is exactly the checkpoint's tensors.

    Call prepare(dtype) once after the buffers are on their device: on CUDA in bf16 it repacks
    the codes for PyTorch's int4 kernel (tinygemm); elsewhere it caches the dense Ŵ in `dtype`,
    which costs out·in·itemsize bytes per layer (a bf16 copy of the model beside the packed one).
    """

    def __init__(self, in_features, out_features, bias, group_size, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16, device=device) if bias else None)
        self.dense = self.int4 = None  # runtime forms, built by prepare(); not in the state dict

    @classmethod
    def from_quantized(cls, q, bias=None):
        out_features, in_features = q.codes.shape
        if out_features % 8:
            raise BadInput(f"out_features {out_features} is not a multiple of 8: the GPTQ format cannot pack its zeros")
        layer = cls(in_features, out_features, bias is not None, in_features // q.scales.shape[0], device="meta")
        layer.qweight, layer.qzeros = pack(q.codes.T), pack((q.zeros - 1).T).T.contiguous()
        layer.scales, layer.g_idx = q.scales.half(), q.g_idx.int()
        if bias is not None:
            layer.bias = bias.detach().half().cpu()
        return layer

    def dequantize(self):
        """fp32 Ŵ [out, in] from the packed tensors."""
        codes, zeros = unpack(self.qweight).T, unpack(self.qzeros.T).T + 1
        return dequantize(codes, self.scales, zeros, self.g_idx)

    def prepare(self, dtype):
        self.dense = self.int4 = None
        if self.qweight.is_cuda and dtype == torch.bfloat16 and self.int4_eligible():
            self.prepare_int4()
        else:
            self.dense = self.dequantize().to(dtype)

    def forward(self, x):
        if self.int4 is not None:
            return self.int4_forward(x)
        weight = self.dense if self.dense is not None else self.dequantize().to(x.dtype)  # unprepared: slow, correct
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    # --- CUDA: PyTorch's int4 kernel (tinygemm), as gpt-fast uses it. Not testable on a CPU machine;
    # tinygemm_layout() is tested through the CPU twin of the kernel (tests/test_gptq.py).

    def int4_eligible(self):
        # tinygemm: sm80+, groups of 32..256, in_features a multiple of 16·inner_k_tiles (>= 2), out a multiple of 8.
        return (torch.cuda.get_device_capability(self.qweight.device) >= (8, 0)
                and self.group_size in (32, 64, 128, 256)
                and self.in_features % 32 == 0 and self.out_features % 8 == 0 and self.tinygemm_layout() is not None)

    def tinygemm_layout(self):
        """(codes [out, in] int32 with each group's columns contiguous, column order or None, scales_and_zeros).

        tinygemm computes w = (q − 8)·s + zero per group; ours is w = s·(q − z), so zero = (8 − z)·s
        (0 for sym). act-order groups are scattered over the columns: sorting the columns by g_idx
        makes them contiguous, and the input is permuted the same way at every call.
        scales_and_zeros: fp32 [in/g, out, 2].
        """
        codes, zeros = unpack(self.qweight).T, unpack(self.qzeros.T).T + 1
        g_idx = self.g_idx.long()
        ordered = torch.arange(self.in_features, device=g_idx.device) // self.group_size
        perm = None
        if not torch.equal(g_idx, ordered):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], ordered):
                return None  # groups of unequal sizes: not a layout tinygemm has
            codes = codes[:, perm]
        s = self.scales.float()
        return codes.contiguous(), perm, torch.stack([s, (8 - zeros) * s], dim=-1).contiguous()

    def prepare_int4(self):
        codes, perm, scales_and_zeros = self.tinygemm_layout()
        # torch >= 2.5 takes two codes a byte, the even column in the high nibble (torch's test_linalg, torchao).
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
        self.int4 = torch.ops.aten._convert_weight_to_int4pack(packed, tiles)
        self.int4_scales = scales_and_zeros.to(torch.bfloat16)  # the kernel takes bf16 only: fp16 scales round here
        self.int4_perm = perm

    def int4_forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.int4_perm is not None:
            x2 = x2[:, self.int4_perm]
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.int4, self.group_size, self.int4_scales)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantization_config(group_size, act_order, damp=DAMP):
    """config.json's quantization_config as AutoGPTQ / optimum write it (format v1)."""
    return {"quant_method": "gptq", "bits": BITS, "group_size": group_size, "sym": True, "desc_act": act_order,
            "checkpoint_format": "gptq", "damp_percent": damp, "static_groups": False, "true_sequential": True,
            "lm_head": False, "meta": {"quantizer": ["rawqlora"]}}


def save_gptq(model, results, out, group_size, act_order, tokenizer_source=None, dtype=torch.float16,
              max_shard_bytes=MAX_SHARD_BYTES):
    """Write `model` with the Linears of `results` (quantize_model's) packed, as the new directory `out`.

    The model's Linears are swapped for GPTQLinear on the way (the model is spent afterwards).
    The other tensors are written in `dtype`, fp16 as AutoGPTQ does. The directory appears
    complete or not at all (quant.write_model); an existing non-empty `out` is refused.
    """
    for name, q in results.items():
        model.set_submodule(name, GPTQLinear.from_quantized(q, model.get_submodule(name).bias))
    for p in model.parameters():  # GPTQLinear has buffers only, so this leaves the packed tensors alone
        p.data = p.data.to(dtype)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.quantization_config = quantization_config(group_size, act_order)
    write_model(model, out, config, tokenizer_source, max_shard_bytes=max_shard_bytes)


def is_gptq(path):
    """Whether the model directory `path` holds a GPTQ checkpoint (config.json's quant_method)."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "gptq"


def load_gptq(path, device=None, dtype=torch.bfloat16, trust_remote_code=False):
    """A GPTQ directory (ours or AutoGPTQ's v1, 4-bit, symmetric or not) -> model in eval mode.

    Quantized Linears become GPTQLinear (prepared for `device`: int4 kernel on CUDA in bf16,
    cached dense weights otherwise); every other tensor is loaded in `dtype`.
    """
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = read_config(path, trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    if not qc or qc.get("quant_method") != "gptq":
        raise BadInput(f"{path} is not a GPTQ checkpoint (no quantization_config with quant_method gptq in config.json)")
    if qc.get("bits") != BITS or qc.get("checkpoint_format", qc.get("format", "gptq")) != "gptq":
        raise BadInput(f"{path}: only 4-bit GPTQ in checkpoint format v1 ('gptq') loads; it is "
                       f"{qc.get('bits')}-bit, format {qc.get('checkpoint_format', qc.get('format'))!r}")
    bare = copy.deepcopy(config)
    del bare.quantization_config  # a plain model skeleton: transformers' own GPTQ path needs optimum
    tensors = {}  # all at once: a GPTQ checkpoint is a quarter of the 16-bit model
    for file in checkpoint_files(path):
        with open_checkpoint(file) as f:
            tensors.update({k: read_tensor(f, file, k) for k in f.keys()})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bare, dtype=dtype, trust_remote_code=trust_remote_code)
        unfuse_experts(model)
    model.config.quantization_config = qc
    for key in [k for k in tensors if k.endswith(".qweight")]:
        stem = key.removesuffix(".qweight")
        name = module_key(config.model_type, stem)
        stored = {a: tensors.pop(f"{stem}.{a}", None) for a in ("qweight", "qzeros", "scales", "g_idx", "bias")}
        in_features, out_features = stored["qweight"].shape[0] * 8, stored["qweight"].shape[1]
        if stored["scales"] is None or stored["qzeros"] is None:
            raise BadInput(f"{path}: {key} has no scales or qzeros beside it; the checkpoint is incomplete")
        layer = GPTQLinear(in_features, out_features, stored["bias"] is not None,
                           in_features // stored["scales"].shape[0], device="meta")
        for attr, t in stored.items():
            if t is not None:
                setattr(layer, attr, t.to(device, copy=True))  # own memory, not a view of the file
        if stored["g_idx"] is None:  # older checkpoints without act-order may omit it
            layer.g_idx = (torch.arange(in_features, device=device) // layer.group_size).int()
        model.set_submodule(name, layer)
    for key, t in tensors.items():
        place(model, module_key(config.model_type, key), t, device, dtype, path)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise BadInput(f"{path} has no weights for {len(missing)} parameters (first: {missing[0]})")
    rebuild_computed_buffers(model, device)
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.prepare(dtype)
    return model.eval()


# ----------------------------------------------------------------------------- calibration and the command


def calibration_batches(spec, tokenizer, samples, seq_len, batch_size=8, seed=0):
    """Rows of seq_len token ids from a data file, rendered as train.py renders it, for calibration.

    Records are shuffled (seeded), encoded by training.data (chat template, BOS, EOS after each
    response) and concatenated, as the paper cuts 2048-token segments from a text stream; the
    stream is cut into at most `samples` rows of exactly seq_len tokens (one shorter row when the
    data has fewer). Equal rows need no padding, so every token in H is a real one.
    """
    records = data.load_records(spec)  # BadInput for a missing, empty or malformed file
    fmt = data.detect_format(records.column_names)
    if fmt in ("chat", "prompt-response"):
        _, new_ids = data.ensure_chat_template(tokenizer)
        if new_ids:
            raise BadInput(f"calibration data {spec} is {fmt} but the model's tokenizer lacks the ChatML tokens; "
                           "calibrate on the merged model (it has them) or on text data")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    stream = []
    for i in order:
        if len(stream) >= samples * seq_len:
            break
        try:
            stream += data.encode(records[i], tokenizer, fmt, seq_len)[0]["input_ids"]
        except BadInput as e:
            raise BadInput(f"calibration data {spec} record {i} (0-based): {e}") from None
    rows = [stream[k : k + seq_len] for k in range(0, len(stream) - seq_len + 1, seq_len)][:samples] or [stream]
    ids = torch.tensor(rows)
    return list(ids.split(batch_size))


def quantize_directory(model_dir, out_dir, calibration, samples=128, seq_len=2048, group_size=128, act_order=False,
                       device="auto", tokenizer_dir=None, batch_size=8, trust_remote_code=False):
    """GPTQ of the 16-bit model directory `model_dir` into the new directory `out_dir` (merge.py --quantize gptq).

    Every bad input is refused before the model is loaded. Returns quantize_model's results.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # write_model's own rule, checked early
        raise BadInput(f"{out_dir} already exists: choose a new --out")
    if group_size not in GROUP_SIZES:
        raise BadInput(f"group size {group_size} is not supported: use one of {', '.join(map(str, GROUP_SIZES))}")
    config = read_config(model_dir, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise BadInput(f"{model_dir} is already quantized (config.json has a quantization_config): "
                       "give the 16-bit model")
    if not calibration:
        raise BadInput("no calibration data: pass --calibration PATH (any data file train.py reads)")
    with torch.device("meta"):  # the module tree only, to check the group size before any real work
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        unfuse_experts(skeleton)
    for name, m in decoder_layers(skeleton)[1].named_modules():
        if type(m) is nn.Linear and m.in_features % group_size:
            fits = ", ".join(str(g) for g in GROUP_SIZES if m.in_features % g == 0) or "none of 32/64/128"
            raise BadInput(f"group size {group_size} does not divide in_features {m.in_features} of layers.{name}; "
                           f"use --group-size {fits}")
        if type(m) is nn.Linear and m.out_features % 8:
            raise BadInput(f"layers.{name} has {m.out_features} outputs, not a multiple of 8: the GPTQ format "
                           "packs 8 zero points an int32")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise BadInput(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda, but this PyTorch sees no CUDA GPU: use --device cpu (slow) or auto")
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load a tokenizer from {tokenizer_dir}: {str(e).splitlines()[0]}") from e
    batches = calibration_batches(calibration, tokenizer, samples, seq_len, batch_size)
    dtype = getattr(config, "dtype", None) or torch.bfloat16  # the checkpoint's own, for the host copy
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = load_model(model_dir, quant=None, compute_dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    tokens = sum(b.numel() for b in batches)
    print(f"GPTQ {model_dir}: {tokens:,} calibration tokens ({sum(len(b) for b in batches)} rows) from {calibration}, "
          f"group size {group_size}{', act-order' if act_order else ''}, on {device}", file=sys.stderr)
    results = quantize_model(model, batches, BITS, group_size, act_order, device)
    gain = sum(q.error for q in results.values()) / max(sum(q.rtn_error for q in results.values()), 1e-30)
    save_gptq(model, results, out_dir, group_size, act_order, tokenizer_source=tokenizer_dir)
    print(f"wrote {out_dir}: {len(results)} Linears in 4 bits; output error {gain:.3f} of round-to-nearest's",
          file=sys.stderr)
    return results


def main(argv=None):
    p = ArgumentParser(prog="python -m quant.gptq", description="Quantize a Hugging Face model directory with GPTQ.")
    p.add_argument("--model", required=True, help="16-bit model directory (e.g. merge.py's --out)")
    p.add_argument("--out", required=True, help="new directory for the GPTQ checkpoint")
    p.add_argument("--calibration", help="calibration data: any file train.py reads (.jsonl/.json/.csv/.parquet/.txt)")
    p.add_argument("--samples", type=int, default=128, help="calibration rows (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens a row (default 2048)")
    p.add_argument("--group-size", type=int, default=128, help="input columns sharing a scale: 32, 64 or 128")
    p.add_argument("--act-order", action="store_true", help="quantize columns by descending activation (desc_act)")
    p.add_argument("--device", default="auto", help="where each layer is quantized: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    if args.samples < 1 or args.seq_len < 2:
        raise BadInput("--samples must be >= 1 and --seq-len >= 2")
    quantize_directory(args.model, args.out, args.calibration, args.samples, args.seq_len, args.group_size,
                       args.act_order, args.device, trust_remote_code=args.trust_remote_code)


if __name__ == "__main__":
    run(main)
