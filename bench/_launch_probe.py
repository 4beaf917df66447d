"""Probe (issue 16): CPU time per call, back to back, of one 4096 x 4096 product at M = 1 (eager)."""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quant import gptq  # noqa: E402
from quant.gptq_checkpoint import GPTQLinear  # noqa: E402

w = torch.randn(4096, 4096, device="cuda") * 0.02
q = gptq.rtn_quantize(w, group_size=128)
ours, tiny = GPTQLinear.from_quantized(q), GPTQLinear.from_quantized(q)
ours.prepare(torch.bfloat16)
tiny.prepare_int4()
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
wb = w.bfloat16()
tile, zeros, ws = ours.own


def per_call(fn, n=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


with torch.no_grad():
    for name, fn in {
        "F.linear bf16": lambda: F.linear(x, wb),
        "GPTQLinear tinygemm": lambda: tiny(x),
        "GPTQLinear ours (eager launch)": lambda: ours(x),
        "custom op rawqlora::gptq_gemv": lambda: torch.ops.rawqlora.gptq_gemv(
            x, ours.qweight, ours.scales, zeros, ws.partials, ws.counters, 128, list(tile)),
    }.items():
        print(f"{name:34s} {per_call(fn):7.1f} us/call", flush=True)
