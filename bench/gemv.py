"""The products of decode on one CUDA GPU: cuBLAS bf16, tinygemm int4 and ours (quant/gptq_gemv.py, gptq_matmul.py).

    python bench/gemv.py                # every 7B shape at M = 1 and 64, the fused ones at 8 and 32 too
    python bench/gemv.py --quick        # q/o, the fused qkv and gate_up, down
    TRITON_INTERPRET=1 python bench/gemv.py --cpu   # toy shapes on the CPU: the script's own logic only

Shapes (N outputs, K inputs) of a Mistral-7B-shaped model: q/o 4096x4096, k/v 1024x4096, q+k+v fused
6144x4096, gate/up 14336x4096, gate+up fused 28672x4096, down 4096x14336, lm_head 32000x4096.
Rows M: 1 (batch-1 decode), 8 and 32 (batched decode), 64 (the prefill of bench/decode.py's prompt).

Variants, for y = x Ŵᵀ with x [M, K] bf16:
    bf16      F.linear(x, W), W [N, K] bf16: cuBLAS
    tinygemm  GPTQLinear.int4_forward: torch.ops.aten._weight_int4pack_mm on tinygemm's repacked codes
    ours      the GPTQ checkpoint's tensors read in place: gptq_gemv at M = 1, gptq_matmul above

The weight is random (normal, std 0.02, bf16) rounded to nearest on GPTQ's grid (4 bits, groups of
128, gptq.rtn_quantize); the int4 variants compute the same Ŵ (tinygemm with its scales rounded to
bf16). The bf16 variant multiplies the unquantized W.

Timing: launch overhead must not count, so each variant's 50 back-to-back calls are captured in one
CUDA graph (after 3 warm-up calls on the capture stream) and the graph is replayed 20 times; the
median replay / 50 is the time per call. The 50 calls cycle through copies of the weight, enough
for 4x the L2 cache (at most 50 copies: 2x for int4 k/v): a decode step reads 3.6 GB of distinct
weights, none of them from L2, while one weight of 2-8 MB called 50 times would be read from L2 and
report L2's bandwidth. GB/s = bytes of the weight each variant reads per call / time per call.

Checks (before timing): each int4 variant against an fp32 product with GPTQLinear.dequantize()'s Ŵ,
max |y − ref| / max |ref| (bf16's own rounding of y is up to 2^-9 ≈ 2e-3 of that): within 1e-2 for
ours, 3e-2 for tinygemm (bf16 scales). A failed check prints FAIL; a variant that raises prints its
traceback and the others go on; either makes the script exit 1 at the end.

Per decode step, 32 layers: q, k, v, o, gate, up, down as separate products, and fused as
generate.py runs them (qkv, o, gate_up, down); lm_head (bf16 in a GPTQ model) once on top.
Prints a table; writes $OUT/gemv.json (or --json PATH) when OUT is set.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quant import gptq  # noqa: E402
from fast.triton_support import triton  # noqa: E402
from quant.gptq_checkpoint import GPTQLinear  # noqa: E402
from quant import split_k  # noqa: E402
from quant.gptq_gemv import gptq_gemv, tile_for  # noqa: E402
from quant.gptq_matmul import gptq_matmul, matmul_fits, workspace_need  # noqa: E402

SHAPES = [  # (name, N, K); the fused ones are also measured at M = 8
    ("q/o", 4096, 4096),
    ("k/v", 1024, 4096),
    ("qkv", 6144, 4096),
    ("gate/up", 14336, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 32000, 4096),
]
FUSED = {"qkv", "gate_up"}
ROWS = {"fused": (1, 8, 32, 64), "other": (1, 64)}
QUICK = {"q/o", "qkv", "gate_up", "down"}
LAYERS = 32
PER_LAYER = {  # products per decoder layer, by shape
    "separate (q, k, v, o, gate, up, down)": {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1},
    "fused (qkv, o, gate_up, down)": {"qkv": 1, "q/o": 1, "gate_up": 1, "down": 1},
}
GROUP = 128
CALLS, WARMUP, REPLAYS = 50, 3, 20
TOLERANCE = {"ours": 1e-2, "tinygemm": 3e-2}
VARIANTS = ("bf16", "tinygemm", "ours")


# ----------------------------------------------------------------------------- timing


def graph_us(calls, cuda):
    """Median µs per call of the calls (zero-argument functions) run back to back in one CUDA graph."""
    if not cuda:  # --cpu: the script's logic; a wall-clock time that means nothing
        for fn in calls[:WARMUP]:
            fn()
        start = time.perf_counter()
        for fn in calls:
            fn()
        return (time.perf_counter() - start) * 1e6 / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:WARMUP]:
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for fn in calls:
            fn()
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copies_for(nbytes, l2_bytes, calls):
    """Copies of a weight to cycle through so that the calls read at least 4x the L2 cache."""
    return max(1, min(calls, math.ceil(4 * l2_bytes / nbytes)))


def rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------- one shape


def prepare_shape(n, k, device, seed):
    """The bf16 weight and its RTN quantization as a GPTQLinear (tinygemm's codes prepared on CUDA)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
    layer = GPTQLinear.from_quantized(gptq.rtn_quantize(w.float(), group_size=GROUP))
    if device.type == "cuda":
        layer.prepare_int4()  # tinygemm, whatever prepare() would choose
    return w, layer


def variant_calls(variant, w, layer, x, l2_bytes, n_calls):
    """(calls: n_calls zero-argument functions over copies of the weight, bytes read per call,
    one-call function for the check, copies), or a string saying why the variant does not run."""
    if variant == "bf16":
        nbytes = w.numel() * w.element_size()
        weights = [w] + [w.clone() for _ in range(copies_for(nbytes, l2_bytes, n_calls) - 1)]
        calls = [lambda wi=weights[i % len(weights)]: F.linear(x, wi) for i in range(n_calls)]
        return calls, nbytes, None, len(weights)
    if variant == "tinygemm":
        if layer.int4 is None:
            return "not available (needs CUDA, bf16, sm80+: GPTQLinear.int4_eligible)"
        nbytes = sum(t.numel() * t.element_size() for t in (layer.int4, layer.int4_scales))
        layers = [layer]
        for _ in range(copies_for(nbytes, l2_bytes, n_calls) - 1):
            c = copy.copy(layer)  # shares the checkpoint buffers; its own copy of the kernel's tensors
            c.int4, c.int4_scales = layer.int4.clone(), layer.int4_scales.clone()
            layers.append(c)
        calls = [lambda li=layers[i % len(layers)]: li.int4_forward(x) for i in range(n_calls)]
        return calls, nbytes, lambda: layer.int4_forward(x), len(layers)
    if variant == "ours":
        n, k, g = layer.out_features, layer.in_features, layer.group_size
        tile = tile_for(n, k, g)
        if triton is None or tile is None or not matmul_fits(n, k, g):
            return "not available (no Triton, or a shape our kernels do not take)"
        zeros = layer.zero_points().to(torch.uint8)
        ws = split_k.workspace(x.device, *(max(a, b) for a, b in zip(tile.workspace_need(n, k), workspace_need(n, k))))
        nbytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, zeros))
        weights = [(layer.qweight, layer.scales, zeros)] + [
            (layer.qweight.clone(), layer.scales.clone(), zeros.clone())
            for _ in range(copies_for(nbytes, l2_bytes, n_calls) - 1)]

        def call(qweight, scales, zeros):
            if x.shape[0] == 1:
                return gptq_gemv(x, qweight, scales, zeros, g, tile, ws)
            return gptq_matmul(x, qweight, scales, zeros, g, ws)

        calls = [lambda wi=weights[i % len(weights)]: call(*wi) for i in range(n_calls)]
        return calls, nbytes, lambda: call(*weights[0]), len(weights)
    raise ValueError(variant)


# ----------------------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="q/o, qkv, gate_up and down only")
    p.add_argument("--cpu", action="store_true", help="toy shapes on the CPU: checks the script, measures nothing")
    p.add_argument("--json", default=None, help="where to write the results (default: $OUT/gemv.json if OUT is set)")
    args = p.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/gemv.py needs a CUDA GPU (--cpu runs toy shapes to check the script)")
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is an fp32 matmul
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    n_calls = CALLS
    if args.cpu:  # toy sizes of the same structure, few calls: the interpreter is slow
        shapes = [(name, n // 16, k // 16) for name, n, k in shapes]
        n_calls = WARMUP + 2
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) if cuda else 0
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, triton=getattr(triton, "__version__", None), l2_bytes=l2_bytes,
                group_size=GROUP, calls_per_graph=n_calls, replays=REPLAYS, quick=args.quick,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    log(f"{info}")

    rows, failures = [], []

    def record(row):
        rows.append(row)
        us = f"{row['us']:9.2f}" if row.get("us") is not None else "        -"
        gbs = f"{row['gbps']:8.0f}" if row.get("gbps") is not None else "       -"
        check = ""
        if row.get("rel_err") is not None:
            check = f"rel err {row['rel_err']:.1e} {'ok' if row['ok'] else 'FAIL'}"
        note = row.get("note") or ""
        log(f"{row['shape']:8s} {row['N']:6d} x {row['K']:5d}  M={row['M']}  {row['variant']:9s}{us} µs{gbs} GB/s"
            f"  {check:22s} {note}")

    for seed, (name, n, k) in enumerate(shapes):
        base = dict(shape=name, N=n, K=k)
        try:
            w, layer = prepare_shape(n, k, device, seed)
        except Exception as e:  # noqa: BLE001 (one shape must not cost the others)
            traceback.print_exc()
            failures.append(f"{name}: building the weights: {type(e).__name__}: {e}")
            continue
        dense = layer.dequantize()
        for m in ROWS["fused" if name in FUSED else "other"]:
            g = torch.Generator(device=device).manual_seed(1000 + seed)
            x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
            ref = x.float() @ dense.T  # fp32, not rounded
            for variant in VARIANTS:
                row = dict(base, M=m, variant=variant, us=None, gbps=None, rel_err=None, ok=None, note=None)
                try:
                    made = variant_calls(variant, w, layer, x, l2_bytes, n_calls)
                    if isinstance(made, str):
                        row["note"] = made
                        record(row)
                        continue
                    calls, nbytes, one_call, copies = made
                    if one_call is not None:  # correctness first (and Triton's compiles, outside the graph)
                        row["rel_err"] = rel_err(one_call(), ref)
                        row["ok"] = row["rel_err"] <= TOLERANCE[variant]
                        if not row["ok"]:
                            failures.append(f"{name} M={m} {variant}: rel err {row['rel_err']:.2e} "
                                            f"> {TOLERANCE[variant]:.0e}")
                    row["us"] = graph_us(calls, cuda)
                    row["gbps"] = nbytes / (row["us"] * 1e-6) / 1e9
                    row["bytes"], row["copies"] = nbytes, copies
                    del calls
                except Exception as e:  # noqa: BLE001 (one failing variant must not stop the others)
                    traceback.print_exc()
                    row["note"] = f"ERROR {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                    failures.append(f"{name} M={m} {variant}: {row['note']}")
                record(row)
        del w, layer, dense
        if cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ summary
    def us_of(shape, variant, m=1):
        return next((r["us"] for r in rows if r["shape"] == shape and r["variant"] == variant and r["M"] == m
                     and r["us"] is not None), None)

    print("\nPer call (µs; GB/s of weight read):")
    print(f"  {'shape':8s} {'N':>6s} {'K':>6s} {'M':>2s}" + "".join(f"{v:>20s}" for v in VARIANTS)
          + "   (! = failed check)")
    for name, n, k in shapes:
        for m in ROWS["fused" if name in FUSED else "other"]:
            cells = []
            for v in VARIANTS:
                r = next((r for r in rows if r["shape"] == name and r["M"] == m and r["variant"] == v), None)
                if r is None or r["us"] is None:
                    cells.append(f"{'-':>20s}")
                else:
                    flag = " " if r["ok"] in (None, True) else "!"
                    cells.append(f"{r['us']:9.2f}{flag}{r['gbps']:5.0f} GB/s")
            print(f"  {name:8s} {n:6d} {k:6d} {m:2d}" + "".join(cells))

    per_step = {}
    head = us_of("lm_head", "bf16")
    print(f"\nPer decode step, {LAYERS} layers (ms), M = 1" + (f"; + lm_head bf16 {head / 1e3:.3f} ms" if head else ""))
    for plan, counts in PER_LAYER.items():
        per_step[plan] = {}
        line = []
        for v in VARIANTS:
            parts = [us_of(s, v) for s in counts]
            total = None
            if all(t is not None for t in parts):
                total = LAYERS * sum(c * t for c, t in zip(counts.values(), parts))
            per_step[plan][v] = total
            failed = any(r["ok"] is False for r in rows if r["shape"] in counts and r["variant"] == v and r["M"] == 1)
            if total is None:
                line.append(f"{v} -")
            else:
                ceiling = 1e6 / (total + (head or 0))
                line.append(f"{v} {total / 1e3:.3f} ms (≤ {ceiling:.0f} tok/s){' FAILED CHECK' if failed else ''}")
        print(f"  {plan:40s} " + "   ".join(line))
    print("  (tok/s: if the GEMVs, lm_head in bf16 included, were the whole step)")

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
    out = args.json or (os.path.join(os.environ["OUT"], "gemv.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(info=info, rows=rows, per_step_us=per_step, failures=failures,
                                             seconds=time.perf_counter() - started), indent=1))
        log(f"wrote {out}")
    log("done" + (" with failures" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
