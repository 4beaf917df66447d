"""Where a batch-1 decode step's GPU time goes (issue 16): the kernels of our replayed step, per step.

    python bench/decode_profile.py                    # bf16 and gptq, graph and graph+compile
    python bench/decode_profile.py --models bf16 --no-plain

For each model (bench/decode.py builds them: random Mistral-7B-shaped, 64-token prompt; q/k/v and
gate/up fused as generate.py does, unless --no-fuse) and each kind of step (captured as it is, or
compiled first): one warm-up call (the capture, the compile), --repeats timed calls of 128 new
tokens (the median one reported), then one profiled call. Prints the time per step, the GPU time
per step the profile saw, where the greedy tokens part from the eager loop's (if they do), and the
top kernels with their time and launches per step. Writes $OUT/decode_profile.txt when OUT is set.
"""

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import (NEW, PROMPT, build_dense, first_difference, random_prompts, timed,  # noqa: E402 (bench/decode.py)
                    to_gptq)
from quant import gptq_checkpoint  # noqa: E402
from rawqlora import cuda_graph, sibling_projections  # noqa: E402
from rawqlora.decode import generate  # noqa: E402


def kernel_table(prof, steps, top):
    """Kernels by GPU time: (name, µs per step, launches per step), and the GPU µs per step in all."""
    time, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            time[e.name] += e.device_time_total
            count[e.name] += 1
    total = sum(time.values()) / steps
    rows = sorted(time, key=time.get, reverse=True)[:top]
    return total, [(name[:90], time[name] / steps, count[name] / steps) for name in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bf16,gptq")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: MistralConfig's 32)")
    p.add_argument("--no-plain", action="store_true", help="only the compiled step")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the median one is reported")
    p.add_argument("--no-fuse", action="store_true", help="q/k/v and gate/up as separate products")
    p.add_argument("--tinygemm", action="store_true", help="GPTQ on tinygemm, not our kernels (quant/gptq_gemv.py, gptq_matmul.py)")
    args = p.parse_args()
    args.cpu = False
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    if args.tinygemm:
        gptq_checkpoint.GPTQLinear.own_kernels_fit = lambda self: False
    dense = build_dense(args, torch.device("cuda"))
    prompt = random_prompts(dense.config.vocab_size, [PROMPT], 0)
    models = {name: dense if name == "bf16" else to_gptq(dense) for name in args.models.split(",")}
    for name, model in models.items():
        if not args.no_fuse:  # after every model was built from the dense one
            sibling_projections.fuse(model)
    for name, model in models.items():
        eager = generate(model, prompt, NEW, cache="static", graph=False).tokens[0]
        for compile in ([True] if args.no_plain else [False, True]):
            cuda_graph.release(model)
            generate(model, prompt, NEW, graph=True, compile=compile)  # capture (and compile): kept
            runs = sorted((timed(lambda: generate(model, prompt, NEW, graph=True, compile=compile))
                           for _ in range(args.repeats)), key=lambda r: r[1])
            out, seconds = runs[len(runs) // 2]  # the median call
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                generate(model, prompt, NEW, graph=True, compile=compile)
                torch.cuda.synchronize()
            steps = NEW - 1
            total, rows = kernel_table(prof, steps, args.top)
            say(f"\n== {name}, {'graph + compile' if compile else 'graph'}: {NEW / seconds:.1f} tok/s "
                f"(median of {args.repeats} calls: {', '.join(f'{NEW / r[1]:.1f}' for r in runs)}), "
                f"{1e3 * out.decode_seconds / steps:.3f} ms a decode step, GPU busy {total / 1e3:.3f} ms a step "
                f"(prefill included, spread over the steps)")
            parts = first_difference(out.tokens[0], eager)
            say(f"greedy tokens vs the eager loop's: {'equal' if parts is None else f'part at token {parts}'}")
            say(f"{'µs/step':>9} {'launches/step':>13}  kernel")
            for kernel, us, n in rows:
                say(f"{us:9.1f} {n:13.2f}  {kernel}")
        cuda_graph.release(model)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "decode_profile.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
