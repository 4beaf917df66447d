"""What train.py tells the user: the summary at the end, and the one-line errors that stop a run."""

from pathlib import Path

import torch

from training import plot
from training.metrics import append_record, read_records


def stop_message(step, what, last_ckpt):
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (f"non-finite {what} at step {step}: training stopped; {where}. Lower --lr, check the data, "
            "or use --dtype bf16/fp32")


def finish(out, summary, model, data, device, questions):
    """The run's summary as the last line of metrics.jsonl, the loss curve beside it, and on screen."""
    append_record(out / "metrics.jsonl", dict(summary={k: v for k, v in summary.items() if k != "out"}))
    plot.write_loss_svg(read_records(out / "metrics.jsonl"), out / "loss.svg", title=f"{Path(model).name} on {Path(data).name}")
    print_summary(summary, out, device, questions[0]["question"] if questions else "What is the capital of France?")


def print_summary(s, out, device, question):
    evals = ""
    if s["eval_loss"] is not None and s["first_eval_loss"] is not None:
        evals = f"; eval loss {s['first_eval_loss']:.3f} -> {s['eval_loss']:.3f}"
    peak = f", peak memory {s['peak_mem_gib']:.2f} GiB" if s["peak_mem_gib"] else ""
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.0f}s ({s['tok_s']:.0f} tokens/s{peak}); "
          f"train loss {s['train_loss']:.3f} (mean of the last {min(50, s['steps'])} steps){evals}")
    if "heldout_total" in s:
        before = f"{s['heldout_before']}/{s['heldout_total']}" if s["heldout_before"] is not None else "not measured: resumed"
        print(f"held-out questions answered correctly: {s['heldout_correct']}/{s['heldout_total']} "
              f"(before fine-tuning: {before})")
    print(f"adapter: {out}")
    print(f"loss curve: {out / 'loss.svg'}")
    print("next:")
    print(f"  python merge.py --adapter {out} --out {out}-merged")
    print(f"  python generate.py --model {out}-merged --device {device} \"{question}\"")


def oom_message(cfg):
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    ckpt = {"on": "; gradient checkpointing is already on",
            "auto": ", or --memory-budget below the GPU's memory (--grad-ckpt auto then recomputes more layers)",
            "off": ", or turn on gradient checkpointing (--grad-ckpt auto or on: recomputes activations instead of "
                   "storing them)"}[cfg.grad_ckpt]
    return (f"CUDA out of memory (peak {peak:.1f} GiB allocated of {total:.1f} GiB): lower --batch-size "
            f"(now {cfg.batch_size}; --auto-batch finds the largest that fits, keeping the effective batch) "
            f"or --max-len (now {cfg.max_len}){ckpt}")
