"""Whether a decode step computes the same numbers eagerly, again, and replayed from its CUDA graph (issue 16).

    python bench/step_parity.py                      # bf16, batches 1, 8 and 32, 128 steps
    python bench/step_parity.py --models bf16,nf4,gptq --batches 8 --sdpa default,efficient_attention

bench/decode.py found the graph loop's greedy tokens at batch 8 and 32 parting from the eager
loop's after tens of tokens, at near-ties. This script asks which computation differs, from one
state: a StaticDecoder (rawqlora/decode.py) prefills random 64-token prompts, its state (KV
cache, position, token, masks) is saved, and one decode step then runs from that state
eagerly, eagerly again, eagerly once more as the capture's warm-up, and replayed from its
graph; then, at every later step along the eager path, once eagerly and once replayed. A
forward hook on every module copies the module's output into a buffer made for it in the
first pass of each kind (outside any capture, so the capture only copies into fixed memory, as
the captured step itself does). The first module, in call order, whose outputs differ is
where two passes compute differently. Last, the whole loops (`generate`) run twice each.
`--sdpa` repeats all of it under each of sdpa's backends in turn (its answer, session 8:
cuDNN's one-token attention varies from run to run at batch 8 and 32; the memory-efficient
kernel does not, which is why rawqlora/decode.py's steps use it).

Prints one JSON line per model, backend and batch; writes $OUT/step_parity.json when OUT is set.
"""

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import (PROMPT, build_dense, first_difference, random_prompts, timed,  # noqa: E402 (bench/decode.py)
                    to_gptq, to_nf4_lora)
from rawqlora import cuda_graph, sibling_projections  # noqa: E402
from rawqlora.decode import Sampling, StaticDecoder, generate, left_pad  # noqa: E402

STEP_COLUMNS = 64  # the decode step's columns beyond the prompt: the graph loop's rounding at batch > 1


class Recorder:
    """Forward hooks that copy every module's (first) output tensor into `buffers[kind][name]`."""

    def __init__(self, model):
        self.kind, self.buffers, self.order = None, {}, []
        self.handles = [module.register_forward_hook(self.hook(name)) for name, module in model.named_modules()]

    def hook(self, name):
        def record(module, args, out):
            if self.kind is None:
                return
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
            if not isinstance(out, torch.Tensor):
                return
            kept = self.buffers.setdefault(self.kind, {})
            if name not in kept:  # only in a kind's first pass, which never runs under a capture
                kept[name] = torch.empty_like(out)
                if self.kind == "eager":
                    self.order.append(name)
            kept[name].copy_(out)
        return record

    def remove(self):
        for handle in self.handles:
            handle.remove()


def state_tensors(decoder):
    """Every tensor a decode step reads or changes in place."""
    tensors = [decoder.report, decoder.pos, decoder.finished, decoder.col, decoder.real]
    if decoder.seen is not None:
        tensors.append(decoder.seen)
    return tensors + decoder.cache.keys + decoder.cache.values


def first_parting(recorder, a, b):
    """(module name, max |difference|, how many modules differ) of the first module whose outputs
    in passes a and b differ, or None when every one is bit-equal."""
    first, second = recorder.buffers[a], recorder.buffers[b]
    differing = [name for name in recorder.order if not torch.equal(first[name], second[name])]
    if not differing:
        return None
    name = differing[0]
    diff = (first[name].float() - second[name].float()).abs().max().item()
    return dict(module=name, max_abs_diff=diff, modules_differing=len(differing), modules=len(recorder.order))


@torch.inference_mode()
def parity(model, batch, vocab, steps):
    prompts = random_prompts(vocab, [PROMPT] * batch, 3)
    decoder = StaticDecoder(model, batch, Sampling(), (), 0, PROMPT + steps + STEP_COLUMNS)
    recorder = Recorder(model)
    try:
        with torch.cuda.stream(decoder.stream):
            ids, mask = left_pad(prompts, 0, model.device)
            decoder.prefill(ids, mask)
            saved = [t.clone() for t in state_tensors(decoder)]

            def restore():
                for t, s in zip(state_tensors(decoder), saved):
                    t.copy_(s)

            for kind in ("eager", "eager again", "graph"):  # "graph": its warm-up allocates the buffers
                restore()
                recorder.kind = kind
                decoder.run_step()
            restore()
            graph = cuda_graph.capture(decoder.run_step, decoder.stream)
            restore()
            graph.replay()
            result = dict(batch=batch, eager_vs_eager=first_parting(recorder, "eager", "eager again"),
                          eager_vs_graph=first_parting(recorder, "eager", "graph"))
            # Then along the eager loop's own path: from each state the eager steps reach, one
            # eager step and one replay.
            result["later_steps_differing"] = []
            for step in range(1, steps):
                restore()
                recorder.kind = None
                decoder.run_step()  # the eager step from the last state: the next state
                saved = [t.clone() for t in state_tensors(decoder)]  # what restore() now returns to
                recorder.kind = "eager"
                decoder.run_step()
                restore()
                graph.replay()
                parting = first_parting(recorder, "eager", "graph")
                if parting is not None:
                    result["later_steps_differing"].append(dict(step=step, **parting))
            decoder.stream.synchronize()
        return result
    finally:
        recorder.remove()


def loops(model, batch, vocab, steps):
    """The whole loops, as bench/decode.py runs them: each loop twice; where their tokens part."""
    prompts = random_prompts(vocab, [PROMPT] * batch, 3)
    runs, seconds = {}, {}
    for kind, kw in (("eager", dict(cache="static", graph=False)), ("graph", dict(graph=True))):
        timed_runs = [timed(lambda: generate(model, prompts, steps, **kw)) for _ in range(2)]
        runs[kind] = [out.tokens for out, _ in timed_runs]
        seconds[kind] = round(timed_runs[1][1], 4)

    def parted(a, b):
        return [first_difference(x, y) for x, y in zip(a, b)]

    return dict(eager_vs_eager=parted(*runs["eager"]), graph_vs_graph=parted(*runs["graph"]),
                eager_vs_graph=parted(runs["eager"][0], runs["graph"][0]), seconds=seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bf16")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: MistralConfig's 32)")
    p.add_argument("--steps", type=int, default=128, help="decode steps compared (issue 16's 128 new tokens)")
    p.add_argument("--sdpa", default="default", help="comma-separated sdpa backends to run under, each in turn: "
                   "default (torch's choice), flash_attention, efficient_attention, math, cudnn_attention")
    p.add_argument("--no-fuse", action="store_true", help="q/k/v and gate/up as separate products")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/step_parity.py needs a CUDA GPU: it compares a captured step with an eager one")
    args.cpu = False
    dense = build_dense(args, torch.device("cuda"))
    results = []
    for name in args.models.split(","):
        model = {"bf16": lambda: dense, "nf4": lambda: to_nf4_lora(dense), "gptq": lambda: to_gptq(dense)}[name]()
        if not args.no_fuse:
            sibling_projections.fuse(model)
        for backend in args.sdpa.split(","):
            for batch in map(int, args.batches.split(",")):
                chosen = None if backend == "default" else getattr(SDPBackend, backend.upper())
                with contextlib.nullcontext() if chosen is None else sdpa_kernel(chosen):
                    r = dict(model=name, sdpa=backend, **parity(model, batch, dense.config.vocab_size, args.steps),
                             loops=loops(model, batch, dense.config.vocab_size, args.steps))
                results.append(r)
                print(json.dumps(r), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "step_parity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
