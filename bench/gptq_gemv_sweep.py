"""Probe (issue 16): quant/gptq_gemv.py's tiles against tinygemm and cuBLAS bf16, per 7B decode shape, M = 1.

    python bench/gptq_gemv_sweep.py [--budget S]     writes $OUT/sweep.json

Timing as bench/gemv.py: 50 calls in one CUDA graph cycling weight copies past 4x L2, median of 20 replays.
"""
import argparse, itertools, json, os, sys, time, copy
from pathlib import Path
import torch
import torch.nn.functional as F
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from gemv import graph_us, copies_for, CALLS  # noqa: E402
from quant import gptq  # noqa: E402
from quant.gptq_checkpoint import GPTQLinear, unpack  # noqa: E402
from quant.gptq_gemv import GemvTile, Workspace, gptq_gemv, gptq_gemv_reference, tile_for  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GROUP = 128
CANDIDATES = [(128, 128, 1, 1), (512, 128, 1, 4), (256, 32, 4, 2), (128, 32, 4, 1), (512, 32, 4, 4),
              (256, 64, 1, 2), (512, 64, 1, 4), (256, 64, 2, 1), (256, 128, 2, 2), (256, 128, 1, 1)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=480)
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args()
    t0 = time.time()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        q = gptq.rtn_quantize(w.float(), group_size=GROUP)
        layer = GPTQLinear.from_quantized(q)
        layer.prepare(torch.bfloat16)
        zeros = (unpack(layer.qzeros.T).T + 1).to(torch.uint8)
        x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
        ref = gptq_gemv_reference(x, layer.qweight, layer.scales, zeros, GROUP).float()
        nbytes = layer.qweight.numel() * 4 + layer.scales.numel() * 2 + zeros.numel()
        ncopies = copies_for(nbytes, l2, CALLS)
        copies = [(layer.qweight, layer.scales, zeros)] + [
            (layer.qweight.clone(), layer.scales.clone(), zeros.clone()) for _ in range(ncopies - 1)]
        # baselines
        wb = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2, l2, CALLS) - 1)]
        us = graph_us([lambda wi=wb[i % len(wb)]: F.linear(x, wi) for i in range(CALLS)], True)
        out["rows"].append(dict(shape=name, variant="bf16", us=us, tbs=w.numel() * 2 / us / 1e6))
        tg_bytes = layer.int4.numel() * layer.int4.element_size() + layer.int4_scales.numel() * 2
        layers = [layer]
        for _ in range(copies_for(tg_bytes, l2, CALLS) - 1):
            c = copy.copy(layer)
            c.int4, c.int4_scales = layer.int4.clone(), layer.int4_scales.clone()
            layers.append(c)
        us = graph_us([lambda li=layers[i % len(layers)]: li(x) for i in range(CALLS)], True)
        err = ((layer(x).float() - ref).abs().max() / ref.abs().max()).item()
        out["rows"].append(dict(shape=name, variant="tinygemm", us=us, tbs=tg_bytes / us / 1e6, err=err))
        print(name, "bf16", round(out["rows"][-2]["us"], 2), "tinygemm", round(us, 2), flush=True)
        default = tile_for(n, k, GROUP)
        tiles = [default]
        for bn, bk, steps, warps in CANDIDATES:
            t = GemvTile(bn, bk, steps, warps)
            if n % bn or k % (bk * steps) or t == default:
                continue
            tiles.append(t)
        for t in tiles:
            if time.time() - t0 > args.budget:
                print("budget reached", flush=True)
                break
            try:
                ws = Workspace.for_tile(n, k, t, dev)
                y1 = gptq_gemv(x, layer.qweight, layer.scales, zeros, GROUP, t, ws)
                y2 = gptq_gemv(x, layer.qweight, layer.scales, zeros, GROUP, t, ws)
                err = ((y1.float() - ref).abs().max() / ref.abs().max()).item()
                same = torch.equal(y1, y2)
                calls = [lambda c=copies[i % len(copies)]: gptq_gemv(x, c[0], c[1], c[2], GROUP, t, ws)
                         for i in range(CALLS)]
                us = graph_us(calls, True)
                y3 = gptq_gemv(x, layer.qweight, layer.scales, zeros, GROUP, t, ws)
                row = dict(shape=name, variant="splitk", tile=list(t), us=us, tbs=nbytes / us / 1e6, err=err,
                           repeat_equal=same and torch.equal(y1, y3), counters_zero=int(ws.counters.abs().sum()) == 0)
            except Exception as e:  # noqa: BLE001
                row = dict(shape=name, variant="splitk", tile=list(t), error=repr(e)[:300])
            out["rows"].append(row)
            print(row, flush=True)
    best = {}
    for r in out["rows"]:
        if r.get("variant") == "splitk" and "us" in r and r["err"] < 1e-2 and r["repeat_equal"]:
            if r["shape"] not in best or r["us"] < best[r["shape"]]["us"]:
                best[r["shape"]] = r
    out["best"] = best
    for s, r in best.items():
        print("BEST", s, r["tile"], round(r["us"], 2), "us", round(r["tbs"], 2), "TB/s")
    path = Path(os.environ.get("OUT", ".")) / "sweep.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
