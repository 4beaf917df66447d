"""Probe (session 12, removed after): the GPTQ kernels before and after, side by side on one GPU.

    python bench/_kernels_probe.py            # on CUDA
    TRITON_INTERPRET=1 python bench/_kernels_probe.py --cpu   # toy shapes: the script's logic only

GEMV (M = 1): head = HEAD's gptq_gemv (bench/_probe/head_gemv.py), new = quant/gptq_gemv.py (x read as
int32 pairs, the LOP3's constant kept in a register); pairs / reg = one of the two alone (_probe/gemv_flags.py).
Matmul (M = 8, 32, 64): head = HEAD's (host-side reorder and sums, its config), new = quant/gptq_matmul.py
(the same kernel, the reorder and sums in one small kernel, split up to 64 rows), natural = one [128, 64]
product a step on codes reshaped to input order (_probe/natural_matmul.py), at M = 64 only.
Timed as bench/gemv.py times (50 calls over weight copies in one CUDA graph). Then the host's cost
of an eager call (1,000 back to back on a small weight, the GPU idle behind them).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gemv import CALLS, WARMUP, copies_for, graph_us, prepare_shape, rel_err  # noqa: E402
from _probe import gemv_flags, head_gemv, head_matmul, natural_matmul  # noqa: E402
from quant import split_k  # noqa: E402
from quant.gptq_gemv import gptq_gemv, tile_for  # noqa: E402
from quant.gptq_matmul import gptq_matmul  # noqa: E402

SHAPES = [("o", 4096, 4096), ("qkv", 6144, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def variants(m, tile, group, ws):
    if m == 1:
        return {"head": lambda x, q, s, z: head_gemv._launch(x, q, s, z, ws.partials, ws.counters, group, tile),
                "new": lambda x, q, s, z: gptq_gemv(x, q, s, z, group, tile, ws),
                "pairs": lambda x, q, s, z: gemv_flags._launch(x, q, s, z, ws.partials, ws.counters, group, tile,
                                                               reg=False),
                "reg": lambda x, q, s, z: gemv_flags._launch(x, q, s, z, ws.partials, ws.counters, group, tile,
                                                             pairs=False)}
    chosen = {"head": lambda x, q, s, z: head_matmul._launch(x, q, s, z, ws.partials, ws.counters, group),
              "new": lambda x, q, s, z: gptq_matmul(x, q, s, z, group, ws)}
    if m == 64:
        chosen["natural"] = lambda x, q, s, z: natural_matmul._launch(x, q, s, z, ws.partials, ws.counters, group)
    return chosen


def main():
    cpu = "--cpu" in sys.argv
    device = torch.device("cpu" if cpu else "cuda")
    shapes = [("o", 256, 512), ("down", 512, 1024)] if cpu else SHAPES
    n_calls = WARMUP + 2 if cpu else CALLS
    l2 = 0 if cpu else torch.cuda.get_device_properties(device).L2_cache_size
    ws = split_k.workspace(device, 64 * 28672 * 16, 4096)
    rows = []
    for seed, (name, n, k) in enumerate(shapes):
        w, layer = prepare_shape(n, k, device, seed)
        zeros = layer.zero_points().to(torch.uint8)
        nbytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, zeros))
        copies = [(layer.qweight, layer.scales, zeros)] + [
            (layer.qweight.clone(), layer.scales.clone(), zeros.clone()) for _ in range(copies_for(nbytes, l2, n_calls) - 1)]
        dense = layer.dequantize()
        tile = tile_for(n, k, 128)
        for m in (1, 8, 32, 64):
            x = torch.randn(m, k, device=device, generator=torch.Generator(device).manual_seed(m)).to(torch.bfloat16)
            ref = x.float() @ dense.T
            outs = {}
            for vname, fn in variants(m, tile, 128, ws).items():
                y = fn(x, *copies[0])
                outs[vname] = y
                calls = [lambda c=copies[i % len(copies)], fn=fn: fn(x, *c) for i in range(n_calls)]
                us = graph_us(calls, not cpu)
                row = dict(shape=name, N=n, K=k, M=m, variant=vname, us=us, gbps=nbytes / us / 1e3,
                           rel_err=rel_err(y, ref), equal_to_head=bool(torch.equal(y, outs["head"])))
                rows.append(row)
                print(f"{name:8s} M={m:2d} {vname:8s} {us:8.2f} µs {row['gbps']:6.0f} GB/s  err {row['rel_err']:.1e}"
                      f"  same bits as head: {row['equal_to_head']}", flush=True)
        del copies, dense
    host = {}
    n, k = (256, 512) if cpu else (512, 4096)
    w, layer = prepare_shape(n, k, device, 99)
    zeros = layer.zero_points().to(torch.uint8)
    tile = tile_for(n, k, 128)
    for m in (1, 64):
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        for vname, fn in variants(m, tile, 128, ws).items():
            reps = 20 if cpu else 1000
            for _ in range(3):
                fn(x, layer.qweight, layer.scales, zeros)
            if not cpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                fn(x, layer.qweight, layer.scales, zeros)
            host[f"M={m} {vname}"] = (time.perf_counter() - start) * 1e6 / reps
            if not cpu:
                torch.cuda.synchronize()
            print(f"host µs per eager call, {n}x{k}, M={m} {vname}: {host[f'M={m} {vname}']:.1f}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "kernels_probe.json").write_text(json.dumps(dict(rows=rows, host_us=host), indent=1))


if __name__ == "__main__":
    main()
