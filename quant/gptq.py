"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): 4-bit weights from a few hundred calibration samples.

    gptq_quantize_layer(W, H)      one weight matrix -> QuantizedWeight (codes, scales, zeros, g_idx, Ŵ)
    rtn_quantize(W)                round-to-nearest on the same grid: the baseline
    quantize_model(model, batches) every decoder layer in order, each fed the quantized layers' outputs

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

The checkpoint format and the layer that reads it: quant/gptq_checkpoint.py; quantizing a model
directory with calibration data: quantize.py.
"""

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rawqlora.errors import BadInput

BITS = 4  # the only width the checkpoint format and its kernels take (quant/gptq_checkpoint.py)
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
