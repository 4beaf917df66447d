"""Speed and memory of rawqlora against the seeds' stack, on one CUDA GPU, in one run.

    python bench/bench.py                          # Mistral-7B-shaped model, rows 512x16, 2048x4, 2048x8
    python bench/bench.py --layers 2 --rows 512x2  # a quick smoke run
    python bench/bench.py --rows "" --max-seq --decode   # longest sequence in 24 GiB; batch-1 decode
    python bench/bench.py --rows "" --systems rawqlora-offload --max-seq \
        --attention flex_attention --mlp-chunk 8192   # rawqlora's long-sequence setup
    python bench/bench.py --rows "2048x8:rawqlora:ckpt=auto:budget=24,2048x8:seed-stack:ckpt=off"

A row is SEQxBATCH[:SYSTEM[:KEY=VALUE...]]. Keys: ckpt=on|auto|off (gradient checkpointing;
the stack takes on|off), and for ckpt=auto budget=GiB (0: the free memory; a budget also caps
the process there with torch.cuda.set_per_process_memory_fraction, so a plan that overshoots
fails as it would on a card of that size), place=first|last|spread (which layers are
checkpointed: training/memory_plan.py), keep=N (keep N layers whatever the budget, to
measure the plan's peak formula) and dense=on|off (whether room left goes to dequantized 4-bit
weights, fast/dense_weights.py; on, as in train.py). --grad-ckpt, --memory-budget, --ckpt-place and
--stack-grad-ckpt set the defaults.

The seeds' stack: transformers + bitsandbytes + PEFT + HF Trainer, paged_adamw_32bit,
gradient checkpointing (unless ckpt=off), bf16, the model loaded with BitsAndBytesConfig(nf4,
double quant, bf16 compute) and prepare_model_for_kbit_training. rawqlora: quant.load_model +
lora.inject + fast.enable + grad_ckpt.enable (+ training/memory_plan.py with ckpt=auto) +
train.py's step, as train.py builds it on CUDA ("rawqlora-offload": --offload-activations).
Both: a randomly initialised `MistralConfig()` model (built once, saved to /dev/shm), LoRA
r=16, alpha=16 on q,k,v,o,gate,up,down, random tokens with no padding, the median step time
after warm-up. Each (system, row) runs in its own process so that peak-memory readings do not
mix. Peak memory is max_memory_allocated over the timed steps (the optimizer's state
included); max_memory_reserved beside it, and with ckpt=auto the plan's prediction of the first.

Writes bench/results.json (after every row, so a run cut short keeps what it measured) and
prints a table; bench/RESULTS.md is written from it by hand with the context (device,
versions, command, date) that results.json records.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = Path("/dev/shm/rawqlora-bench-model")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(layers):
    """A random Mistral-7B-shaped model saved in bf16 (built on the GPU: seconds instead of minutes)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    path = MODEL_DIR.with_name(f"{MODEL_DIR.name}-{layers}")
    if (path / "config.json").exists():
        return path
    config = MistralConfig(num_hidden_layers=layers) if layers else MistralConfig()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def batches(seq, batch, n, vocab):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield ids


# ------------------------------------------------------------------------------------------
# Workers: one (system, seq, batch) per process.
# ------------------------------------------------------------------------------------------
def load_seed_stack(path, dropout, grad_ckpt=True):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def load_rawqlora(path, dropout, offload=False, fused_kernels=True, attention="sdpa", mlp_chunk=0, grad_ckpt_on=True):
    """As train.py builds it: 4-bit base, LoRA, fast.enable (`fused_kernels`: --fast), checkpointed
    layers (all of them; `plan_layers` then keeps some with ckpt=auto; none with `grad_ckpt_on` False)."""
    import fast
    import lora
    import quant
    from training import grad_ckpt

    model = quant.load_model(path, quant="nf4", double_quant=True, compute_dtype=torch.bfloat16, device="cuda")
    model.set_attn_implementation(attention)
    lora.inject(model, TARGETS, r=16, alpha=16, dropout=dropout)
    if fused_kernels:
        fast.enable(model)
    if grad_ckpt_on:
        grad_ckpt.enable(model.get_decoder().layers, offload=offload, mlp_chunk=mlp_chunk)
    model.train()
    return model


def plan_layers(model, seq, batch, args):
    """--grad-ckpt auto as train.py runs it: one probe step of this row's shape (random state
    forked, gradients dropped), then training/memory_plan.py's plan; returns the Plan."""
    import train
    from training import loss, memory_plan

    ids = next(batches(seq, batch, 1, model.config.vocab_size)).cuda()
    b = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def run_step():
        with torch.random.fork_rng(devices=[ids.device]):
            train.optimizer_step_grads(model, [b], autocast, 1.0)
        model.zero_grad(set_to_none=True)

    unseen = memory_plan.unseen_bytes([p for p in model.parameters() if p.requires_grad], args.optim)
    return memory_plan.apply(model.get_decoder().layers, run_step, budget=int(args.memory_budget * 2**30),
                             unseen=unseen, offload=args.system == "rawqlora-offload", placement=args.ckpt_place,
                             kept=None if args.keep < 0 else args.keep,
                             dense_dtype=torch.bfloat16 if args.dense == "on" else None,
                             loss_head=model.get_output_embeddings(),
                             loss_bytes=loss.kept_bytes(seq * batch, model.config.vocab_size))


def seed_stack_steps(model, seq, batch, n, grad_ckpt=True):
    """The HF Trainer's loop, timed per step with a callback (synchronised)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    vocab = model.config.vocab_size
    rows = [{"input_ids": r, "labels": r.clone()} for ids in batches(seq, batch, n, vocab) for r in ids]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=n,
                             optim="paged_adamw_32bit", bf16=True, gradient_checkpointing=grad_ckpt,
                             gradient_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
                             learning_rate=2e-4,
                             max_grad_norm=0.3, lr_scheduler_type="constant", logging_steps=10**6,
                             save_strategy="no", report_to=[], dataloader_num_workers=0,
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Timer()]).train()
    return times


def rawqlora_steps(model, seq, batch, n, optim="adamw"):
    import train
    from training.optim import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if getattr(model, "bench_optimizer", None) is None:  # one optimizer across calls: a profile sees warm state
        model.bench_optimizer = make_optimizer(optim, params, lr=2e-4, weight_decay=0.0)
    opt = model.bench_optimizer
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    times = []
    for ids in batches(seq, batch, n, model.config.vocab_size):
        torch.cuda.synchronize()
        t = time.perf_counter()
        ids = ids.cuda()
        b = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        train.optimizer_step_grads(model, [b], autocast, 1.0)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def worker(args):
    auto = args.system != "seed-stack" and args.grad_ckpt == "auto"
    if auto and args.memory_budget > 0:  # the process gets the budget and no more: a card of that size
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.memory_budget * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if args.system == "seed-stack":
        model = load_seed_stack(args.model_dir, args.dropout, grad_ckpt=args.grad_ckpt != "off")
    else:  # "rawqlora", or "rawqlora-offload" with activations parked in host memory
        model = load_rawqlora(args.model_dir, args.dropout, offload=args.system == "rawqlora-offload",
                              fused_kernels=not args.no_fused, attention=args.attention, mlp_chunk=args.mlp_chunk,
                              grad_ckpt_on=args.grad_ckpt != "off")
    torch.cuda.synchronize()
    load_s, load_gib = time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30
    result = dict(system=args.system, seq=args.seq, batch=args.batch, dropout=args.dropout, grad_ckpt=args.grad_ckpt,
                  **({} if args.system == "seed-stack" else dict(optim=args.optim, fused=not args.no_fused,
                                                                    attention=args.attention, mlp_chunk=args.mlp_chunk)),
                  load_s=load_s, load_peak_gib=load_gib)
    if auto and not (args.decode or args.max_seq):
        t = time.perf_counter()
        plan = plan_layers(model, args.seq, args.batch, args)
        print(plan.summary(), flush=True)
        result.update(memory_budget_gib=args.memory_budget, ckpt_place=args.ckpt_place, plan_s=time.perf_counter() - t,
                      plan=plan.as_dict(), predicted_peak_gib=plan.predicted_peak / 2**30)
    steps = (lambda *a: seed_stack_steps(*a, grad_ckpt=args.grad_ckpt != "off")) if args.system == "seed-stack" else \
        lambda *a: rawqlora_steps(*a, optim=args.optim)
    if args.decode:
        result["decode_tok_s"] = decode_speed(model, args.system)
    elif args.max_seq:
        lengths = [int(n) for n in args.max_seq_lengths.split(",") if n]
        result["max_seq_24gib"] = longest_sequence(model, args.system, steps, args.max_seq_from, lengths)
    else:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()  # alloc_retries below: the timed steps' only
        times = steps(model, args.seq, args.batch, args.warmup + args.steps)[args.warmup :]
        step_s = statistics.median(times)
        result.update(step_s=step_s, tok_s=args.seq * args.batch / step_s,
                      peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                      # > 0: the allocator ran out of cached blocks, freed them all and retried (a sync, slow)
                      alloc_retries=torch.cuda.memory_stats().get("num_alloc_retries", 0))
        if args.profile:
            profile(steps, model, args)
    print("RESULT " + json.dumps(result), flush=True)


def profile(steps, model, args):
    """Where one step's GPU time goes: the top operators by CUDA time, then where the GPU waited
    (`idle_gaps`), into --profile's file."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        steps(model, args.seq, args.batch, 1)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=70, max_name_column_width=60)
    Path(args.profile).write_text(table + "\n" + idle_gaps(prof.profiler.kineto_results.events()))


def idle_gaps(events, shown=15, least_us=20):
    """The step's GPU timeline: busy and idle time, and the longest stretches with no kernel,
    memcpy or memset running, each named by the operator that launched the work after it (the
    CPU op whose span holds that launch: a sync before it, or a stretch the CPU could not
    launch fast enough). The profiler slows the CPU side, so gaps read longer than unprofiled."""
    gpu = sorted((e for e in events if e.device_type() == torch.autograd.DeviceType.CUDA
                  and not e.is_user_annotation()), key=lambda e: e.start_ns())
    cpu = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    launches = {e.correlation_id(): e for e in cpu if e.correlation_id()}
    ops = [e for e in cpu if not e.correlation_id() and not e.is_user_annotation()]
    if not gpu:
        return "no GPU activity recorded\n"
    gaps, end, busy = [], gpu[0].start_ns(), 0
    for before, e in zip([None] + gpu[:-1], gpu):
        if e.start_ns() - end > least_us * 1000:
            gaps.append((e.start_ns() - end, before, e))
        busy += max(0, e.end_ns() - max(end, e.start_ns()))
        end = max(end, e.end_ns())
    span = end - gpu[0].start_ns()

    def launcher(kernel):
        launch = launches.get(kernel.correlation_id())
        if launch is None:
            return "?"
        holding = [op for op in ops if op.start_ns() <= launch.start_ns() <= op.end_ns()
                   and op.start_thread_id() == launch.start_thread_id()]
        return max(holding, key=lambda op: op.start_ns()).name() if holding else launch.name()

    lines = [f"GPU timeline: span {span / 1e6:.2f} ms, busy {busy / 1e6:.2f} ms, idle {(span - busy) / 1e6:.2f} ms "
             f"of which {sum(g for g, _, _ in gaps) / 1e6:.2f} ms in {len(gaps)} gaps over {least_us} us; longest:"]
    for gap, before, after in sorted(gaps, key=lambda g: -g[0])[:shown]:
        lines.append(f"  {gap / 1e3:9.1f} us after {before.name()[:50]!r} before {after.name()[:50]!r}, "
                     f"launched in {launcher(after)[:60]!r}")
    return "\n".join(lines) + "\n"


def decode_speed(model, system, new_tokens=128):
    """Batch-1 greedy decode tokens/s: our decode loop, or transformers' generate on the PEFT model."""
    from rawqlora import decode

    model.eval()
    for m in model.modules():  # LoRA B is zero after init: make the adapter part of the work
        if hasattr(m, "lora_B"):
            w = m.lora_B.weight if system != "seed-stack" else m.lora_B["default"].weight
            torch.nn.init.normal_(w, std=1e-3)
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for attempt in range(2):  # the first run warms up kernels and allocator
            torch.cuda.synchronize()
            t = time.perf_counter()
            if system == "seed-stack":
                out = model.generate(input_ids=prompt.cuda(), attention_mask=torch.ones_like(prompt).cuda(),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                n = out.shape[1] - prompt.shape[1]
            else:
                out = decode.generate(model, [prompt[0].tolist()], max_new_tokens=new_tokens)
                n = len(out.tokens[0])
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
    return n / elapsed


def longest_sequence(model, system, steps, start=2048, lengths=()):
    """Longest batch-1 sequence whose training step fits in 24 GiB: doubling from `start`, then
    bisecting to 2k or 1/16 of it; or, given `lengths`, the last of them (ascending) that fits."""
    limit = 24 * 2**30
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)

    def fits(seq):
        t = time.perf_counter()
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            steps(model, seq, 1, 1)
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        # Offloaded runs park activations in pinned host memory, which torch caches; each probe
        # is longer than the last, so without this the cache of every earlier probe stays
        # pinned (at 160k tokens the host ran out: 40 GiB per probe). Private API, hence the getattr.
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None) or torch._C._accelerator_emptyHostCache
        empty_host_cache()
        print(f"probe {system} seq {seq}: {'fits' if ok else 'OOM'}, peak {torch.cuda.max_memory_allocated() / 2**30:.2f}"
              f" GiB, {time.perf_counter() - t:.0f}s", flush=True)
        return ok

    if lengths:
        best = 0
        for seq in sorted(lengths):
            if not fits(seq):
                break
            best = seq
        return best
    lo, hi = 0, start
    while fits(hi) and hi < 2**20:
        lo, hi = hi, hi * 2
    while hi - lo > max(2048, lo // 16):
        mid = (lo + hi) // 2 // 2048 * 2048
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------------
# Driver.
# ------------------------------------------------------------------------------------------
ROW_KEYS = {"ckpt": "grad_ckpt", "budget": "memory_budget", "place": "ckpt_place", "keep": "keep", "dense": "dense"}


def row_options(system, options, ns):
    """A row's checkpointing settings: its KEY=VALUE options over the command line's defaults."""
    stack = system == "seed-stack"
    settings = dict(grad_ckpt=ns.stack_grad_ckpt if stack else ns.grad_ckpt, memory_budget=ns.memory_budget,
                    ckpt_place=ns.ckpt_place, keep=-1, dense="on")
    for option in filter(None, options.split(":")):
        key, _, value = option.partition("=")
        if key not in ROW_KEYS:
            raise SystemExit(f"row option {option!r}: keys are {', '.join(ROW_KEYS)}")
        settings[ROW_KEYS[key]] = value
    if settings["grad_ckpt"] not in (["on", "off"] if stack else ["on", "auto", "off"]):
        raise SystemExit(f"{system}: ckpt={settings['grad_ckpt']} is not one of on, off" + ("" if stack else ", auto"))
    return settings


def run_worker(system, seq, batch, model_dir, ns, max_seq=False, decode=False, options=""):
    settings = row_options(system, options, ns)
    cmd = [sys.executable, __file__, "--worker", "--system", system, "--seq", str(seq), "--batch", str(batch),
           "--model-dir", str(model_dir), "--steps", str(ns.steps), "--warmup", str(ns.warmup),
           "--dropout", str(ns.dropout), "--optim", ns.optim, "--attention", ns.attention,
           "--mlp-chunk", str(ns.mlp_chunk), "--max-seq-from", str(ns.max_seq_from),
           "--max-seq-lengths", ns.max_seq_lengths, "--grad-ckpt", settings["grad_ckpt"],
           "--memory-budget", str(settings["memory_budget"]), "--ckpt-place", settings["ckpt_place"],
           "--keep", str(settings["keep"]), "--dense", settings["dense"]] + (["--no-fused"] if ns.no_fused else []) \
        + (["--max-seq"] if max_seq else []) + (["--decode"] if decode else []) \
        + (["--profile", f"{ns.profile}.{system}.{seq}x{batch}.txt"] if ns.profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(("probe ", "--grad-ckpt auto")):
            print(line, flush=True)
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(f"worker {system} {seq}x{batch} failed (exit code {proc.returncode}):\n{tail}", file=sys.stderr)
    return dict(system=system, seq=seq, batch=batch, **settings, error=tail[-500:])


def versions():
    import importlib.metadata as md

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ["transformers", "bitsandbytes", "peft", "accelerate"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="512x16,2048x4,2048x8,2048x1:rawqlora",
                   help="seq x batch[:system], comma separated")
    p.add_argument("--systems", default="seed-stack,rawqlora")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: MistralConfig's 32)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--optim", default="adamw", help="rawqlora's optimizer: adamw (train.py's default: ours, "
                   "multi-tensor, state counted in peak memory) or paged_adamw (the stack's)")
    p.add_argument("--no-fused", action="store_true", help="rawqlora without the speed layer (train.py --no-fast)")
    p.add_argument("--attention", default="sdpa", help="rawqlora's attention: sdpa or flex_attention (train.py --attention)")
    p.add_argument("--mlp-chunk", type=int, default=0, help="rawqlora's MLP token chunk (train.py --mlp-chunk)")
    p.add_argument("--max-seq", action="store_true", help="also find the longest batch-1 sequence within 24 GiB")
    p.add_argument("--max-seq-from", type=int, default=2048, help="first length the --max-seq doubling tries")
    p.add_argument("--max-seq-lengths", default="", help="instead of searching, try these lengths (ascending) "
                   "and report the last that fits")
    p.add_argument("--decode", action="store_true", help="also measure batch-1 decode tokens/s of both systems")
    p.add_argument("--profile", default="", help="write a torch.profiler table of one rawqlora step to this file")
    p.add_argument("--grad-ckpt", default="on", choices=["on", "auto", "off"],
                   help="rawqlora's gradient checkpointing (train.py --grad-ckpt); a row's :ckpt= overrides")
    p.add_argument("--memory-budget", type=float, default=0.0,
                   help="GiB for --grad-ckpt auto (0: the free memory); a row's :budget= overrides")
    p.add_argument("--ckpt-place", default="first", choices=["first", "last", "spread"],
                   help="which layers --grad-ckpt auto checkpoints (first: the plan's); a row's :place= overrides")
    p.add_argument("--stack-grad-ckpt", default="on", choices=["on", "off"],
                   help="the seeds' stack's gradient checkpointing; a row's :ckpt= overrides")
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    # worker-only
    p.add_argument("--worker", action="store_true")
    p.add_argument("--system")
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--model-dir")
    p.add_argument("--keep", type=int, default=-1)
    p.add_argument("--dense", choices=["on", "off"], default="on")
    ns = p.parse_args()
    if ns.worker:
        return worker(ns)

    t = time.perf_counter()
    model_dir = build_model(ns.layers)
    print(f"model at {model_dir} ({time.perf_counter() - t:.0f}s)", flush=True)
    rows = []
    result = dict(device=torch.cuda.get_device_name(0), versions=versions(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command="python bench/bench.py " + " ".join(sys.argv[1:]), layers=ns.layers or 32, rows=rows)

    def record(r):
        print(json.dumps(r), flush=True)
        rows.append(r)
        Path(ns.out).write_text(json.dumps(result, indent=2))

    for row in filter(None, ns.rows.split(",")):
        row, _, rest = row.partition(":")  # "2048x1:rawqlora" runs one system only
        only, _, options = rest.partition(":")  # "2048x8:rawqlora:ckpt=auto:budget=24"
        seq, batch = map(int, row.split("x"))
        for system in [only] if only else ns.systems.split(","):
            record(run_worker(system, seq, batch, model_dir, ns, options=options))
    for flag in ["max_seq", "decode"]:
        if getattr(ns, flag):
            for system in ns.systems.split(","):
                record(run_worker(system, 0, 1, model_dir, ns, **{flag: True}))
    print_table(rows)


def print_table(rows):
    """One line per row; speed and memory against the stack's row of the same shape with checkpointing on."""
    base = {(r["seq"], r["batch"]): r for r in rows
            if r["system"] == "seed-stack" and "tok_s" in r and r.get("grad_ckpt", "on") == "on"}
    print(f"{'system':<16} {'seq x batch':>11} {'ckpt':>10} {'tok/s':>8} {'peak GiB':>9} {'predicted':>9} "
          f"{'reserved':>9} {'speed':>6} {'memory':>7} {'load s':>7}")
    for r in rows:
        ckpt = r.get("grad_ckpt", "on")
        if "plan" in r:
            ckpt = f"auto {r['plan']['kept']}/{r['plan']['layers']}"
        if "tok_s" not in r:
            extra = (f"max seq in 24 GiB: {r['max_seq_24gib']}" if "max_seq_24gib" in r else
                     f"decode: {r['decode_tok_s']:.1f} tok/s" if "decode_tok_s" in r else r.get("error", "")[-60:])
            print(f"{r['system']:<16} {r['seq']:>5} x {r['batch']:<3} {ckpt:>10} {extra}")
            continue
        b = base.get((r["seq"], r["batch"]))
        speed = f"{r['tok_s'] / b['tok_s']:.2f}x" if b else ""
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b else ""
        predicted = f"{r['predicted_peak_gib']:.2f}" if "predicted_peak_gib" in r else ""
        print(f"{r['system']:<16} {r['seq']:>5} x {r['batch']:<3} {ckpt:>10} {r['tok_s']:>8.0f} {r['peak_gib']:>9.2f} "
              f"{predicted:>9} {r.get('peak_reserved_gib', 0):>9.2f} {speed:>6} {mem:>7} {r['load_s']:>7.1f}")


if __name__ == "__main__":
    main()
