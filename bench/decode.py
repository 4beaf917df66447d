"""Decode speed and correctness on one CUDA GPU (issue 16): our eager loop, our CUDA-graph loop and
transformers' `generate` on the same Mistral-7B-shaped model, in its three forms.

    python bench/decode.py            # 32 layers: about 5 minutes on an H200
    python bench/decode.py --quick    # 2 layers, single repeats: a smoke run of every path, about 1 minute
    python bench/decode.py --cpu      # a toy model on the CPU: the script's own logic, no graphs (for a CPU machine)

Models, random init, built on the GPU in seconds (nothing is read from disk):
    bf16   the dense model, as a merged model is
    nf4    every decoder Linear quantized as quant.load_model does it (NF4, double quantization,
           bf16 compute) + a LoRA adapter, r=16 alpha=16 on every linear, B random (non-zero), unmerged
    gptq   every decoder Linear rounded to nearest on GPTQ's grid (4 bits, groups of 128), packed
           as a GPTQ checkpoint stores it, then GPTQLinear.prepare: our int4 kernels for one row
           (quant/gptq_gemv.py) and for prefills (gptq_matmul.py), PyTorch's tinygemm for batches

q/k/v and gate/up are fused into one product each where generate.py fuses them (bf16, gptq;
--no-fuse keeps them apart), and transformers' generate runs on the same model.

Rows: batch 1 (a 64-token prompt, 128 new tokens): our eager loop on the static cache, our eager
loop on the dynamic cache (the loop before issue 16), our CUDA-graph loop cold (capture included)
and warm (the kept graph), transformers' generate. Batch 8 and 32: eager and graph (each call captures).
Last, batch 1 with the step and the prefill compiled (compile=True, compile_prefill=True): cold (both
compiles, the prefill eager) and warm (the kept decoder: the compiled prefill and step).
tok/s = new tokens / the whole call (prefill included); median of the repeats, after a warm-up.

Checks, per model: the graph's greedy tokens equal the eager loop's (batch 1, and a left-padded
batch of 8); both equal transformers' generate, or part from it only at a near-tie (the two
candidates' logits, teacher-forced, within 4 bf16 ulps: bf16 kernels that sum in another order may
order such a pair either way, and transformers' steps run cuDNN's attention, whose order changes
from run to run at batch 8 and 32, where ours run the memory-efficient kernel); seeded sampling draws the same
tokens eagerly and replayed; a kept graph replays right for another prompt; and each 4-bit or
int4 layer alone is captured and replayed bit-exactly (bitsandbytes' kernels, issue 16's question).
At batch 8 and 32 the eager loop runs twice: where those two part, the kernels themselves differ
from run to run (bench/step_parity.py finds where).

Prints a table; writes $OUT/decode.json (or --json PATH) when OUT is set.
"""

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lora  # noqa: E402
import quant  # noqa: E402
from quant import gptq  # noqa: E402
from quant.gptq_checkpoint import GPTQLinear  # noqa: E402
from quant.linear4bit import bnb  # noqa: E402
from rawqlora import cuda_graph, sibling_projections  # noqa: E402
from rawqlora.decode import Sampling, generate, left_pad  # noqa: E402

PROMPT, NEW = 64, 128  # issue 16's workload
TARGETS = {"bf16": 200, "nf4": 80, "gptq": 400}  # issue 16: batch-1 tok/s on the H200


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


# ----------------------------------------------------------------------------- the three models


def build_dense(args, device):
    from transformers import AutoModelForCausalLM, MistralConfig

    if args.cpu:  # a toy shape: the script's logic, not a measurement
        config = MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                               num_key_value_heads=4, vocab_size=1000)
    else:
        config = MistralConfig(num_hidden_layers=args.layers) if args.layers else MistralConfig()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # Random weights: no token means "end", so every row runs its full length in every system.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def to_nf4_lora(dense):
    model = copy.deepcopy(dense)
    for name in quant.quantized_modules(model):  # every Linear but the head, as quant.load_model picks them
        model.set_submodule(name, quant.quantize_weight(model.get_submodule(name).weight.data, "nf4", True))
    lora.inject(model, "all-linear", r=16, alpha=16)
    torch.manual_seed(1)
    for layer in lora.lora_modules(model).values():
        nn.init.normal_(layer.lora_B.weight, std=1e-3)  # B away from zero: the adapter is part of the work
    return model.eval()


def to_gptq(dense):
    model = copy.deepcopy(dense)
    for name in quant.quantized_modules(model):
        linear = model.get_submodule(name)
        # Round-to-nearest on GPTQ's grid: the same format and kernel as GPTQ's codes, without calibration.
        q = gptq.rtn_quantize(linear.weight.data.float(), group_size=128)
        layer = GPTQLinear.from_quantized(q, linear.bias)
        layer.prepare(torch.bfloat16)  # CUDA bf16: the int4 kernels; elsewhere a cached dense weight
        model.set_submodule(name, layer)
    return model.eval()


# ----------------------------------------------------------------------------- runs


def ours(model, prompts, n, **kw):
    out, seconds = timed(lambda: generate(model, prompts, n, **kw))
    return dict(tokens=out.tokens, seconds=seconds, ttft=out.prefill_seconds, capture=out.capture_seconds,
                graph=out.graph, cache=out.cache, new=out.new_tokens)


def transformers_generate(model, prompts, n):
    ids, mask = left_pad(prompts, 0, model.device)
    out, seconds = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                max_new_tokens=n, pad_token_id=0))
    tokens = out[:, ids.shape[1]:].tolist()
    return dict(tokens=tokens, seconds=seconds, ttft=None, capture=0.0, graph=False, cache="transformers",
                new=sum(map(len, tokens)))


def repeat(fn, times):
    """`times` runs of fn (a dict with "seconds"); the median run's figures, every run's seconds."""
    runs = [fn() for _ in range(times)]
    runs.sort(key=lambda r: r["seconds"])
    best = dict(runs[len(runs) // 2])
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["same_tokens_every_run"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return best


def bf16_ulp(x):
    return 2.0 ** (torch.floor(torch.log2(x.abs().clamp(min=1e-30))).item() - 7)


def first_difference(a, b):
    """The first position where token lists a and b differ (the shorter one's length when it is a
    prefix of the other), or None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(model, prompts, ours_tokens, ref_tokens):
    """'equal', or where each row parts and whether at a near-tie (both candidates within 4 bf16 ulps)."""
    if ours_tokens == ref_tokens:
        return dict(equal=True, ok=True, detail="equal")
    details, ok = [], True
    for row, (prompt, a, b) in enumerate(zip(prompts, ours_tokens, ref_tokens)):
        k = first_difference(a, b)
        if k is None:
            continue
        if k >= min(len(a), len(b)):
            details.append(f"row {row}: lengths {len(a)} vs {len(b)}")
            ok = False
            continue
        with torch.inference_mode():
            ids = torch.tensor([prompt + a[:k]], device=model.device)
            logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        gap = (logits[a[k]] - logits[b[k]]).abs().item()
        tol = 4 * bf16_ulp(logits.max())
        tie = gap <= tol
        ok = ok and tie
        details.append(f"row {row} parts at token {k}: logit gap {gap:.3g} ({'near-tie' if tie else 'NOT a tie'}, "
                       f"tolerance {tol:.3g})")
    return dict(equal=False, ok=ok, detail="; ".join(details))


def random_prompts(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------- capture of single layers


def capture_check(fn, make_input):
    """Capture fn(x) on a static x, replay it on a new x: 'ok' if bit-equal to an eager call."""
    try:
        with torch.inference_mode():
            static = make_input()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy set-up (cuBLAS workspace, bitsandbytes' kernel attributes) before it
                    fn(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):  # the warm-up's stream, as the decode loop does
                out = fn(static)
            fresh = make_input()
            static.copy_(fresh)
            graph.replay()
            sync()
            expected = fn(fresh)
            if torch.equal(out, expected):
                return "ok"
            return f"mismatch (max diff {(out - expected).abs().max().item():.3g})"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def layer_capture_checks(hidden, intermediate, device):
    torch.manual_seed(0)
    results = {}
    dense_w = torch.randn(intermediate, hidden, device=device, dtype=torch.bfloat16) * 0.02
    nf4 = quant.quantize_weight(dense_w, "nf4", True)  # NF4, double quantization, bf16 compute: load_model's layer
    wrapped = lora.LoRALinear(quant.quantize_weight(dense_w, "nf4", True), r=16, alpha=16).eval()
    nn.init.normal_(wrapped.lora_B.weight, std=1e-3)
    q = gptq.rtn_quantize(dense_w.float(), group_size=128)
    int4 = GPTQLinear.from_quantized(q)
    int4.prepare(torch.bfloat16)
    state = nf4.weight.quant_state
    for m in (1, 8, 32):
        def x(m=m):
            return torch.randn(m, 1, hidden, device=device, dtype=torch.bfloat16)
        results[f"Linear4bit nf4 M={m}"] = capture_check(nf4, x)
        results[f"GPTQLinear int4 M={m}"] = capture_check(int4, x)
    results["LoRALinear(Linear4bit) M=1"] = capture_check(wrapped, lambda: torch.randn(1, 1, hidden, device=device,
                                                                                      dtype=torch.bfloat16))
    # The batch-1 GEMV op older bitsandbytes routed M=1 through (0.50's Linear4bit calls gemm_4bit instead).
    results["bnb.functional.gemv_4bit M=1"] = capture_check(
        lambda a: bnb.functional.gemv_4bit(a, nf4.weight.t(), state=state),
        lambda: torch.randn(1, 1, hidden, device=device, dtype=torch.bfloat16))
    results["int4 kernels"] = ", ".join(name for name, there in (("ours", int4.own is not None),
                                                                 ("tinygemm", int4.int4 is not None)) if there) or "none (dense fallback)"
    return results


# ----------------------------------------------------------------------------- the bench


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, one repeat: every path once, fast")
    p.add_argument("--cpu", action="store_true", help="a toy model on the CPU: checks the script, measures nothing")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: MistralConfig's 32; --quick: 2)")
    p.add_argument("--models", default="bf16,nf4,gptq")
    p.add_argument("--budget", type=float, default=360, help="seconds; later parts are skipped past it")
    p.add_argument("--no-compile", action="store_true", help="skip the graph + torch.compile rows")
    p.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate products "
                   "(generate.py fuses them: rawqlora/sibling_projections.py)")
    p.add_argument("--json", default=None, help="where to write the results (default: $OUT/decode.json if OUT is set)")
    args = p.parse_args()
    if args.quick and not args.layers:
        args.layers = 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU (--cpu runs a toy model to check the script)")
    cuda = device.type == "cuda"
    reps = dict(fast=1 if args.quick else 3, slow=1 if args.quick else 2)
    started = time.perf_counter()

    def elapsed():
        return time.perf_counter() - started

    def log(msg):
        print(f"[{elapsed():6.1f}s] {msg}", flush=True)

    import importlib.metadata as md
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, quick=args.quick, layers=args.layers or 32)
    for pkg in ("transformers", "bitsandbytes"):
        info[pkg] = md.version(pkg)
    log(f"{info}")
    results = dict(info=info, rows=[], checks=[], layer_capture={}, skipped=[])

    def row(model_name, batch, system, r):
        tok_s = r["new"] / r["seconds"]
        decode_s = r["seconds"] - (r["ttft"] or 0)
        entry = dict(model=model_name, batch=batch, system=system, tok_s=tok_s, seconds=r["seconds"],
                     all_seconds=r.get("all_seconds", [r["seconds"]]), ttft=r["ttft"], capture=r["capture"],
                     graph=r["graph"], cache=r["cache"], new_tokens=r["new"],
                     decode_tok_s=(r["new"] - batch) / decode_s if r["ttft"] is not None and decode_s > 0 else None)
        results["rows"].append(entry)
        log(f"{model_name:5s} b{batch:<3d} {system:23s} {tok_s:8.1f} tok/s"
            + (f"  ttft {r['ttft'] * 1e3:.0f} ms" if r["ttft"] is not None else "")
            + (f"  capture {r['capture'] * 1e3:.0f} ms" if r["capture"] else ""))

    def check(model_name, what, ok, detail):
        results["checks"].append(dict(model=model_name, check=what, ok=bool(ok), detail=detail))
        log(f"{model_name:5s} CHECK {what}: {'PASS' if ok else 'FAIL'} ({detail})")

    def guarded(name, fn):
        if elapsed() > args.budget:
            results["skipped"].append(name)
            log(f"skipped {name}: past the {args.budget:.0f} s budget")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (one failing part must not cost the rest of the run)
            results["checks"].append(dict(model=name, check="ran", ok=False, detail=f"{type(e).__name__}: {e}"))
            log(f"ERROR in {name}: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")

    # ---- 1. single layers in a graph
    dense = build_dense(args, device)
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    if cuda:
        results["layer_capture"] = layer_capture_checks(hidden, intermediate, device)
        for name, verdict in results["layer_capture"].items():
            log(f"capture {name}: {verdict}")
    models = {}
    for name in args.models.split(","):
        begin = time.perf_counter()
        models[name] = {"bf16": lambda: dense, "nf4": lambda: to_nf4_lora(dense),
                        "gptq": lambda: to_gptq(dense)}[name]()
        log(f"built {name} in {time.perf_counter() - begin:.1f} s"
            + (f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated" if cuda else ""))
    if not args.no_fuse:  # as generate.py loads them; after the others were built from the dense one
        for name, model in models.items():
            log(f"{name}: {sibling_projections.fuse(model)} sibling groups fused")
    vocab = dense.config.vocab_size
    prompt = random_prompts(vocab, [PROMPT], 0)
    graph_kw = dict(graph=True) if cuda else dict(cache="static", graph=False)

    # ---- 2. batch 1: the workload, every system
    b1_eager = {}  # model -> the eager loop's greedy tokens, the reference of the later checks

    def batch_one(name, model):
        generate(model, prompt, 8, cache="static", graph=False)  # warm-up: kernels, cuBLAS, allocator
        eager = repeat(lambda: ours(model, prompt, NEW, cache="static", graph=False), reps["slow"])
        row(name, 1, "ours eager (static)", eager)
        b1_eager[name] = eager["tokens"]
        dynamic = repeat(lambda: ours(model, prompt, NEW, cache="dynamic"), 1)
        row(name, 1, "ours eager (dynamic)", dynamic)
        # Its own warm-up: in runs T1, U4 and U6 the first model's transformers row (bf16, the
        # process's first generate call) measured 15-27 tok/s where D1/D2 had 40-45.
        transformers_generate(model, prompt, 8)
        hf = repeat(lambda: transformers_generate(model, prompt, NEW), reps["slow"])
        row(name, 1, "transformers generate", hf)
        c = compare(model, prompt, eager["tokens"], hf["tokens"])
        check(name, "b1 eager (static) vs transformers", c["ok"], c["detail"])
        c = compare(model, prompt, dynamic["tokens"], hf["tokens"])
        check(name, "b1 eager (dynamic) vs transformers", c["ok"], c["detail"])
        if cuda:
            cuda_graph.release(model)
            cold = ours(model, prompt, NEW, graph=True)
            row(name, 1, "ours graph (cold)", cold)
            warm = repeat(lambda: ours(model, prompt, NEW, graph=True), reps["fast"])
            row(name, 1, "ours graph (warm)", warm)
            # Bit-exact: a replay launches the very kernels the eager step launched.
            check(name, "b1 graph == eager", cold["tokens"] == eager["tokens"] == warm["tokens"]
                  and warm["same_tokens_every_run"] and cold["graph"] and warm["capture"] == 0.0,
                  f"graph replayed: {cold['graph']}, warm runs reused it: {warm['capture'] == 0.0}; "
                  + compare(model, prompt, cold["tokens"], eager["tokens"])["detail"])

    for name, model in models.items():
        guarded(f"{name} batch 1", lambda: batch_one(name, model))

    # ---- 3. correctness beyond batch 1
    def batched_check(name, model):
        prompts = random_prompts(vocab, [16, 64, 23, 40, 64, 31, 57, 9], 1)  # left padding on every row but two
        eager = ours(model, prompts, 32, cache="static", graph=False)
        replayed = ours(model, prompts, 32, **graph_kw)
        hf = transformers_generate(model, prompts, 32)
        check(name, "b8 left-padded graph == eager",
              eager["tokens"] == replayed["tokens"] and replayed["graph"] == cuda,
              f"graph replayed: {replayed['graph']}; "
              + compare(model, prompts, replayed["tokens"], eager["tokens"])["detail"])
        c = compare(model, prompts, eager["tokens"], hf["tokens"])
        check(name, "b8 left-padded eager vs transformers", c["ok"], c["detail"])

    def sampling_check(name, model):
        s = Sampling(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=1234)
        eager = ours(model, prompt, 32, sampling=s, cache="static", graph=False)
        first = ours(model, prompt, 32, sampling=s, **graph_kw)
        again = ours(model, prompt, 32, sampling=s, **graph_kw)
        other = ours(model, prompt, 32, sampling=Sampling(**{**vars(s), "seed": 99}), **graph_kw)
        check(name, "seeded sampling: graph == eager, repeats, another seed differs",
              eager["tokens"] == first["tokens"] == again["tokens"] != other["tokens"],
              f"graph replayed: {first['graph']}, second call reused the graph: {again['capture'] == 0.0}")

    def reuse_check(name, model):
        other = random_prompts(vocab, [40], 2)
        ours(model, prompt, NEW, **graph_kw)  # the kept batch-1 graph, for a 64-token prompt
        # graph=None (the default): fits the same 256 columns, replays it (the CPU: the static cache, eager)
        replayed = ours(model, other, 100, **({} if cuda else dict(cache="static")))
        eager = ours(model, other, 100, cache="static", graph=False)
        check(name, "default call replays the kept graph for another prompt == eager",
              replayed["tokens"] == eager["tokens"] and replayed["graph"] == cuda
              and (replayed["capture"] == 0.0 or not cuda), f"captured again: {replayed['capture'] > 0}")

    def stop_and_stream_check(name, model):
        # Two rows; a stop token that row 0 first emits at step 10 and row 1 never emits before.
        prompts = random_prompts(vocab, [PROMPT, 50], 4)
        free = ours(model, prompts, 40, cache="static", graph=False)["tokens"]
        k = next((k for k in range(10, 40) if free[0][k] not in free[0][:k] and free[0][k] not in free[1]), None)
        if k is None:
            check(name, "stop token and streaming", True, "skipped: no suitable stop token in row 0")
            return
        steps = []
        out = generate(model, prompts, 40, stop_ids=[free[0][k]], on_step=steps.append, **graph_kw)
        streamed = [[s[row] for s in steps if s[row] is not None] for row in range(2)]
        check(name, "stop token ends its row; streaming on_step sees every token in order",
              out.tokens == [free[0][:k], free[1]] and out.stopped == [True, False] and streamed == out.tokens
              and len(steps) == 40 and out.graph == cuda, f"row 0 stops at step {k}, graph replayed: {out.graph}")

    for name, model in models.items():
        guarded(f"{name} batched check", lambda: batched_check(name, model))
        guarded(f"{name} sampling check", lambda: sampling_check(name, model))
        guarded(f"{name} reuse check", lambda: reuse_check(name, model))
        guarded(f"{name} stop and stream check", lambda: stop_and_stream_check(name, model))

    # ---- 4. batch 8 and 32
    def batch_rows(name, model, batch):
        prompts = random_prompts(vocab, [PROMPT] * batch, 3)
        generate(model, prompts, 4, cache="static", graph=False)  # warm-up at this batch size
        def eager_run():
            return ours(model, prompts, NEW, cache="static", graph=False)

        eager = repeat(eager_run, 1)
        row(name, batch, "ours eager (static)", eager)
        # The eager loop against itself: a parting here is the kernels' own run-to-run difference
        # (cuDNN's attention had it: bench/step_parity.py).
        again = eager_run()
        check(name, f"b{batch} eager == eager, run again", again["tokens"] == eager["tokens"],
              compare(model, prompts, again["tokens"], eager["tokens"])["detail"])
        if cuda:
            replayed = repeat(lambda: ours(model, prompts, NEW, graph=True), reps["slow"])
            row(name, batch, "ours graph (cold)", replayed)
            detail = (compare(model, prompts, replayed["tokens"], eager["tokens"])["detail"]
                      + f"; the {reps['slow']} graph runs agree: {replayed['same_tokens_every_run']}")
            check(name, f"b{batch} graph == eager", replayed["tokens"] == eager["tokens"], detail)

    for batch in (8, 32):
        for name, model in models.items():
            guarded(f"{name} batch {batch}", lambda: batch_rows(name, model, batch))

    # ---- 5. batch 1, the step compiled (fused small kernels) before it is captured
    def compiled(name, model):
        if name not in b1_eager:
            b1_eager[name] = ours(model, prompt, NEW, cache="static", graph=False)["tokens"]
        cuda_graph.release(model)
        # the compiles (the step's, the prefill's) happen in this call
        cold = ours(model, prompt, NEW, graph=True, compile=True, compile_prefill=True)
        row(name, 1, "ours graph+compile cold", cold)
        warm = repeat(lambda: ours(model, prompt, NEW, graph=True, compile=True, compile_prefill=True), reps["fast"])
        row(name, 1, "ours graph+compile warm", warm)
        # cold prefills eagerly, warm with the kept decoder's compiled prefill: each against the eager loop
        c, c_cold = (compare(model, prompt, r["tokens"], b1_eager[name]) for r in (warm, cold))
        check(name, "b1 graph+compile vs eager", c["ok"] and c_cold["ok"] and warm["same_tokens_every_run"]
              and warm["capture"] == 0.0, f"warm: {c['detail']}; cold: {c_cold['detail']}")

    compile_models = [] if args.no_compile or not cuda else [n for n in ("bf16", "gptq", "nf4") if n in models]
    if args.quick:
        compile_models = compile_models[:1]  # one compile proves the path; each costs tens of seconds
    for name in compile_models:  # last, as optional: each compile of the 7B step takes tens of seconds
        guarded(f"{name} compile", lambda: compiled(name, models[name]))

    # ---- the table
    results["seconds"] = elapsed()
    print("\nmodel  batch  system                     tok/s   decode tok/s  TTFT ms  capture ms")
    for r in results["rows"]:
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        ttft = f"{r['ttft'] * 1e3:.0f}" if r["ttft"] is not None else "-"
        cap = f"{r['capture'] * 1e3:.0f}" if r["capture"] else "-"
        print(f"{r['model']:5s}  {r['batch']:5d}  {r['system']:23s} {r['tok_s']:8.1f} {dec:>14s} {ttft:>8s} {cap:>11s}")
    for name, target in TARGETS.items():
        best = max((r for r in results["rows"] if r["model"] == name and r["batch"] == 1
                    and r["system"].startswith("ours")), default=None, key=lambda r: r["tok_s"])
        if best is not None:
            hf = next((r["tok_s"] for r in results["rows"] if r["model"] == name and r["batch"] == 1
                       and r["system"] == "transformers generate"), None)
            results.setdefault("targets", {})[name] = dict(target=target, best=best["tok_s"], system=best["system"],
                                                           transformers=hf)
            print(f"target {name}: {best['tok_s']:.1f} tok/s ({best['system']}) against {target}"
                  + (f"; transformers generate {hf:.1f}" if hf else "") + (" MET" if best["tok_s"] >= target else ""))
    failed = [c for c in results["checks"] if not c["ok"]]
    print(f"\nchecks: {len(results['checks']) - len(failed)} passed, {len(failed)} failed"
          + "".join(f"\n  FAIL {c['model']}: {c['check']}: {c['detail']}" for c in failed))
    if results["layer_capture"]:
        print("single layers captured: " + ", ".join(f"{k}: {v}" for k, v in results["layer_capture"].items()))
    if results["skipped"]:
        print(f"skipped (time budget): {', '.join(results['skipped'])}")
    print(f"total {results['seconds']:.0f} s")
    path = args.json or (os.path.join(os.environ["OUT"], "decode_quick.json" if args.quick else "decode.json")
                         if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(results, indent=1))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
