"""The GPTQ checkpoint (AutoGPTQ format v1) and the layer that computes with it.

    GPTQLinear                     y = x Ŵᵀ + b from the packed tensors (int4 kernels on CUDA)
    save_gptq(model, results, out) quant/gptq.py's results -> a new model directory
    is_gptq(path), load_gptq(path) -> a transformers model whose Linears are GPTQLinear

Checkpoint (AutoGPTQ v1, what transformers/optimum, vLLM and TGI read), per Linear:
    qweight int32 [in/8, out]   code of input i at bits 4·(i mod 8) of row i // 8 (lowest first)
    qzeros  int32 [in/g, out/8] zero − 1 of output o at bits 4·(o mod 8) of column o // 8
    scales  fp16  [in/g, out]   g_idx int32 [in]   bias fp16 [out] if any
Ŵ[o, i] = scales[g_idx[i], o] · (code[i, o] − (qzero[g_idx[i], o] + 1)). Everything else
(embeddings, norms, lm_head) stays 16-bit.
"""

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from quant import split_k
from quant.experts import module_key, unfuse_experts
from quant.gptq import BITS, DAMP, dequantize
from quant.gptq_gemv import gptq_gemv, tile_for
from quant.gptq_matmul import gptq_matmul, matmul_fits, workspace_need
from quant.load import (checkpoint_files, open_checkpoint, place, read_config, read_tensor,
                        rebuild_computed_buffers)
from quant.save import MAX_SHARD_BYTES, write_model
from rawqlora.errors import BadInput


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

    Call prepare(dtype) once after the buffers are on their device: on CUDA in bf16 it sets up our
    int4 kernels (where they do not fit, it repacks the codes for PyTorch's tinygemm); elsewhere it
    caches the dense Ŵ in `dtype`, which costs out·in·itemsize bytes per layer (a bf16 copy of the
    model beside the packed one).
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
        self.dense = self.int4 = self.own = None  # runtime forms, built by prepare(); not in the state dict

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

    def zero_points(self):
        """int32 [in/g, out]: the zeros z of Ŵ = s·(q − z) (the checkpoint stores z − 1)."""
        return unpack(self.qzeros.T).T + 1

    def column_groups(self):
        """int64 [in]: input k's group without act-order, k // g."""
        return torch.arange(self.in_features, device=self.g_idx.device) // self.group_size

    def dequantize(self):
        """fp32 Ŵ [out, in] from the packed tensors."""
        return dequantize(unpack(self.qweight).T, self.scales, self.zero_points(), self.g_idx)

    def prepare(self, dtype):
        self.dense = self.int4 = self.own = None
        on_cuda_bf16 = (self.qweight.is_cuda and dtype == torch.bfloat16
                        and torch.cuda.get_device_capability(self.qweight.device) >= (8, 0))
        if on_cuda_bf16 and self.own_kernels_fit():
            self.prepare_own()
        elif on_cuda_bf16 and self.int4_eligible():
            self.prepare_int4()
        else:
            self.dense = self.dequantize().to(dtype)

    def forward(self, x):
        if self.own is not None:
            return self.own_forward(x)
        if self.int4 is not None:
            return self.int4_forward(x)
        weight = self.dense if self.dense is not None else self.dequantize().to(x.dtype)  # unprepared: slow, correct
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    # --- CUDA (sm80+, bf16). Our Triton kernels read the checkpoint's qweight in place: quant/gptq_gemv.py
    # for one row of x (batch-1 decode), quant/gptq_matmul.py for more (batches, prefill); faster than
    # tinygemm, and no second copy of the codes (bench/RESULTS.md, session 11). Their tests run them in
    # Triton's CPU interpreter. Where they do not fit (act-order, groups under 128, odd widths):
    # PyTorch's int4 kernel (tinygemm), as gpt-fast uses it; not testable on a CPU machine,
    # tinygemm_layout() is tested through the CPU twin of the kernel (tests/test_gptq.py).

    def own_kernels_fit(self):
        return (tile_for(self.out_features, self.in_features, self.group_size) is not None
                and matmul_fits(self.out_features, self.in_features, self.group_size)
                and torch.equal(self.g_idx.long(), self.column_groups()))

    def prepare_own(self):
        n, k = self.out_features, self.in_features
        tile = tile_for(n, k, self.group_size)
        zeros = self.zero_points().to(torch.uint8)
        (p1, c1), (p2, c2) = tile.workspace_need(n, k), workspace_need(n, k)
        self.own = (tile, zeros, split_k.workspace(self.qweight.device, max(p1, p2), max(c1, c2)))

    def own_forward(self, x):
        tile, zeros, ws = self.own
        x2 = x.reshape(-1, self.in_features)
        # Only the conversions needed: eager decode pays the host's time for every call, even a no-op one.
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.shape[0] == 1:
            y = gptq_gemv(x2, self.qweight, self.scales, zeros, self.group_size, tile, ws)
        else:
            y = gptq_matmul(x2, self.qweight, self.scales, zeros, self.group_size, ws)
        return self._finish(y, x)

    def int4_eligible(self):
        # tinygemm: sm80+ (prepare checks), groups of 32..256, in_features a multiple of
        # 16·inner_k_tiles (>= 2), out a multiple of 8.
        return (self.group_size in (32, 64, 128, 256)
                and self.in_features % 32 == 0 and self.out_features % 8 == 0 and self.tinygemm_layout() is not None)

    def tinygemm_layout(self):
        """(codes [out, in] int32 with each group's columns contiguous, column order or None, scales_and_zeros).

        tinygemm computes w = (q − 8)·s + zero per group; ours is w = s·(q − z), so zero = (8 − z)·s
        (0 for sym). act-order groups are scattered over the columns: sorting the columns by g_idx
        makes them contiguous, and the input is permuted the same way at every call.
        scales_and_zeros: fp32 [in/g, out, 2].
        """
        codes, zeros = unpack(self.qweight).T, self.zero_points()
        g_idx, ordered = self.g_idx.long(), self.column_groups()
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
        return self._finish(y, x)

    def _finish(self, y, x):
        """The kernels' y [rows, out] bf16: + bias, in x's shape and dtype."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


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
