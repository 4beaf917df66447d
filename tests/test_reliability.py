"""No lost work, no silent damage, a clear error for every bad input.

- one table of bad inputs through the real CLIs (train.py, merge.py, generate.py): exit 2,
  one `error: ...` line on stderr, and the output directory that existed is untouched;
- a real `kill -9` of `python train.py`, then `--resume`: bit-identical to a run never stopped;
- a crash while a checkpoint is written, non-finite losses and weights, CUDA out of memory,
  and the --auto-batch search (its probe faked on the CPU).

Rows marked "proc" run as subprocesses (all at once, ~8 s of imports each); the others call
the same `cli.run(main, argv)` in-process, which is what `if __name__ == "__main__"` runs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import generate
import lora
import merge
import quant
import train
from rawqlora import cli
from training import data
from training.optim import LossScaler
from rawqlora.errors import BadInput
from rawqlora.tiny import tiny_model, train_tokenizer
from training import checkpoint
from training.auto_batch import auto_batch_size, longest_rows_probe

torch.set_num_threads(1)  # tiny forwards on a busy 2-core machine: much faster single-threaded

REPO = Path(train.__file__).resolve().parent
DEFAULT_MODEL = REPO / "default" / "model"
DEFAULT_DATA = REPO / "default" / "data" / "chat.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TOOLS = {"train": train, "merge": merge, "generate": generate}


# ----------------------------------------------------------------------------- inputs


def make_adapter(model_dir, path, poison=False):
    """A LoRA adapter (no training: B set non-zero by hand) saved for the base `model_dir`."""
    model = quant.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    lora.inject(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    if poison:  # what a diverged run would have written, had nothing stopped it
        next(iter(lora.lora_modules(model).values())).lora_B.weight.data[0, 0] = float("inf")
    lora.save_adapter(model, path, base_model=str(model_dir))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_model_dir):
    """Paths for the table's placeholders: good inputs and one bad thing each."""
    d = tmp_path_factory.mktemp("inputs")
    lines = DEFAULT_DATA.read_text().splitlines()
    (d / "data.jsonl").write_text("\n".join(lines[:60]) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text("\n".join(lines[:2] + ['{"messages": [}'] + lines[2:5]) + "\n")
    alpaca = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say no"}]
    (d / "missing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    (d / "wrongtype.jsonl").write_text(json.dumps({"instruction": 5, "output": "five"}) + "\n")

    (d / "notmodel").mkdir()
    (d / "notmodel" / "README.md").write_text("not a model\n")
    for name, config in [("unknown-arch", {"model_type": "nonesuch"}), ("not-causal", {"model_type": "t5"}),
                         ("remote-code", {"model_type": "evilnet", "auto_map": {"AutoConfig": "evil.EvilConfig"}})]:
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(config))
    (d / "remote-code" / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    weights = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    for name, blob in [("truncated", weights[: len(weights) // 2]),
                       ("corrupted", b"\x10\0\0\0\0\0\0\0{not json header}" + weights[100:]),
                       ("pickle", None)]:
        shutil.copytree(DEFAULT_MODEL, d / name)
        if blob is None:  # only PyTorch pickle weights: never unpickled, it can run code
            (d / name / "model.safetensors").rename(d / name / "pytorch_model.bin")
        else:
            (d / name / "model.safetensors").write_bytes(blob)

    # Adapters: one for the default model, one with an inf, one for another model's shapes.
    make_adapter(DEFAULT_MODEL, d / "adapter")
    make_adapter(DEFAULT_MODEL, d / "inf-adapter", poison=True)
    narrow = make_model_dir("llama", layers=4)  # the default's module names, hidden size 64 instead of 256
    moe = make_model_dir("mixtral")  # experts instead of gate/up/down_proj
    # A run to --resume whose checkpoint adapter is the default model's.
    ckpt = d / "run" / "checkpoints" / "step-1"
    make_adapter(DEFAULT_MODEL, ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (d / "file").write_text("a file, not a directory\n")
    return dict(bad=d, data=d / "data.jsonl", model=DEFAULT_MODEL, narrow=narrow, moe=moe,
                adapter=d / "adapter", inf_adapter=d / "inf-adapter", run=d / "run")


def make_old_out(path):
    """An existing output directory: it must look exactly like this after every failed run."""
    path.mkdir(parents=True)
    (path / "keep.jsonl").write_text(DEFAULT_DATA.read_text().split("\n", 1)[0] + "\n")  # also valid data
    (path / "adapter_config.json").write_text('{"precious": true}\n')
    return path


def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the table

T = "--model {model} --data {data} --out {old} --overwrite"  # train: valid, replacing {old} on success
TRAIN_OK = T + " --max-steps 1"
MERGE = "--adapter {adapter} --out {old} --overwrite --no-gap"
BAD_INPUTS = [
    # id, how, tool, argv, a phrase the one stderr line must hold
    # train.py: the model
    ("model-missing", "", "train", T.replace("{model}", "{bad}/nope"), "does not exist"),
    ("model-not-a-model-dir", "", "train", T.replace("{model}", "{bad}/notmodel"), "has no config.json"),
    ("model-is-a-file", "", "train", T.replace("{model}", "{bad}/data.jsonl"), "is not a directory"),
    ("model-unknown-arch", "", "train", T.replace("{model}", "{bad}/unknown-arch"), "not an architecture transformers knows"),
    ("model-not-causal", "", "train", T.replace("{model}", "{bad}/not-causal"), "no causal-LM class"),
    ("model-remote-code", "", "train", T.replace("{model}", "{bad}/remote-code"), "--trust-remote-code"),
    ("model-truncated", "", "train", T.replace("{model}", "{bad}/truncated"), "truncated or corrupted"),
    ("model-corrupted", "", "train", T.replace("{model}", "{bad}/corrupted"), "truncated or corrupted"),
    ("model-pickle-only", "", "train", T.replace("{model}", "{bad}/pickle"), "never reads"),
    # train.py: the data
    ("data-missing", "", "train", T.replace("{data}", "{bad}/nope.jsonl"), "does not exist"),
    ("data-empty", "", "train", T.replace("{data}", "{bad}/empty.jsonl"), "is empty"),
    ("data-missing-field", "", "train", T.replace("{data}", "{bad}/missing.jsonl"), "field 'output' is missing"),
    ("data-wrong-type", "", "train", T.replace("{data}", "{bad}/wrongtype.jsonl"), "field 'instruction' has type int"),
    ("data-all-masked", "", "train", T + " --max-len 2", "all labels masked"),
    ("data-inside-overwritten-out", "", "train", T.replace("{data}", "{old}/keep.jsonl"), "--overwrite would delete"),
    # train.py: flags
    ("flag-unknown", "", "train", T + " --bogus 1", "unknown option --bogus"),
    ("flag-tutorial-name", "", "train", T + " --learning-rate 1e-4", "TrainingArguments' name; rawqlora's is --lr"),
    ("flag-bad-every", "", "train", T + " --save-every weekly", "or 'epoch'"),
    ("flag-bad-int", "", "train", T + " --lora-r abc", "invalid int value"),
    ("flag-bad-choice", "", "train", T + " --quant nf3", "invalid choice"),
    ("flag-r-zero", "", "train", T + " --lora-r 0", "--lora-r must be > 0"),
    ("flag-r-negative", "", "train", T + " --lora-r -4", "--lora-r must be > 0"),
    ("flag-lr-nan", "", "train", T + " --lr nan", "--lr and --epochs must be > 0"),
    ("targets-match-nothing", "", "train", T + " --targets nope_proj", "match no module"),
    ("targets-regex-nothing", "", "train", T + " --targets .*nope.*", "fully matches no module"),
    ("auto-batch-on-cpu", "", "train", T + " --auto-batch", "--auto-batch needs a CUDA GPU"),
    ("flex-on-cpu", "", "train", T + " --attention flex_attention", "needs a CUDA GPU"),
    ("mlp-chunk-negative", "", "train", T + " --mlp-chunk -1", "--mlp-chunk must be >= 0"),
    ("mlp-chunk-without-ckpt", "", "train", T + " --mlp-chunk 64 --grad-ckpt off", "goes with --grad-ckpt"),
    ("resume-and-overwrite", "", "train", T + " --resume", "contradict"),
    # train.py: the output directory
    ("out-exists", "", "train", "--model {model} --data {data} --out {old}", "exists and is not empty"),
    ("out-is-a-file", "", "train", "--model {model} --data {data} --out {bad}/file", "is a file"),
    ("resume-nothing", "", "train", "--model {model} --data {data} --out {old} --resume", "no complete checkpoint"),
    ("resume-adapter-other-shapes", "", "train", "--model {narrow} --data {data} --out {run} --resume",
     "another base model"),
    # merge.py
    ("merge-adapter-missing", "", "merge", MERGE.replace("{adapter}", "{bad}/nope"), "does not exist"),
    ("merge-out-exists", "", "merge", "--adapter {adapter} --out {old}", "already exists"),
    ("merge-other-arch", "", "merge", MERGE + " --model {moe}", "does not fit"),
    ("merge-other-shapes", "", "merge", MERGE + " --model {narrow}", "trained on another model"),
    ("merge-truncated-base", "", "merge", MERGE + " --model {bad}/truncated", "truncated or corrupted"),
    ("merge-bad-size", "", "merge", MERGE + " --max-shard-size 5XB", "--max-shard-size"),
    ("merge-unknown-flag", "", "merge", MERGE + " --bogus", "unrecognized arguments"),
    # generate.py (writes nothing; {old} must still be untouched)
    ("generate-model-missing", "", "generate", "--model {bad}/nope hi", "does not exist"),
    ("generate-not-a-model-dir", "", "generate", "--model {bad}/notmodel hi", "has no config.json"),
    ("generate-other-arch", "", "generate", "--model {moe} --adapter {adapter} hi", "does not fit"),
    ("generate-other-shapes", "", "generate", "--model {narrow} --adapter {adapter} hi", "another base model"),
    ("generate-inf-adapter", "", "generate", "--model {model} --adapter {inf_adapter} hi", "NaN/inf"),
    ("generate-bad-value", "", "generate", "--model {model} --top-p 2 hi", "--top-p must be in"),
    # true subprocesses, one per tool (last: they run while the rows above do)
    ("data-malformed-line", "proc", "train", T.replace("{data}", "{bad}/malformed.jsonl"), "line 3: malformed JSON"),
    ("merge-inf-adapter", "proc", "merge", MERGE.replace("{adapter}", "{inf_adapter}"), "NaN/inf"),
    ("generate-truncated-model", "proc", "generate", "--model {bad}/truncated hi", "truncated or corrupted"),
]


def argv_of(template, inputs, old):
    return [a.format(old=old, **inputs) for a in template.split()]


@pytest.fixture(scope="module", autouse=True)
def subprocess_rows(inputs, tmp_path_factory):
    """Every "proc" row started as a real subprocess before the module's first test, so that their
    imports overlap the in-process tests: row id -> (Popen, old, snapshot of old)."""
    running = {}
    for row_id, how, tool, template, _ in BAD_INPUTS:
        if how == "proc":
            old = make_old_out(tmp_path_factory.mktemp(row_id) / "old")
            cmd = [sys.executable, str(REPO / f"{tool}.py"), *argv_of(template, inputs, old)]
            proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True)
            running[row_id] = (proc, old, snapshot(old))
    yield running
    for proc, _, _ in running.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("row_id, how, tool, template, phrase", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input(row_id, how, tool, template, phrase, inputs, tmp_path, capsys, subprocess_rows):
    if how == "proc":
        proc, old, before = subprocess_rows[row_id]
        _, err = proc.communicate(timeout=120)
        rc = proc.returncode
    else:
        old = make_old_out(tmp_path / "old")
        before = snapshot(old)
        with pytest.raises(SystemExit) as exit_info:
            cli.run(TOOLS[tool].main, argv_of(template, inputs, old))
        rc, err = exit_info.value.code, capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], lines[0]
    assert snapshot(old) == before  # nothing that existed was overwritten
    assert not any(p.name.startswith(".") for p in old.parent.iterdir())  # no temporary directories left


def test_debug_keeps_the_traceback(inputs, tmp_path):
    with pytest.raises(BadInput, match="has no config.json"):
        cli.run(train.main, argv_of(T.replace("{model}", "{bad}/notmodel") + " --debug", inputs, tmp_path / "o"))


def test_chat_data_without_template_falls_back_to_chatml(inputs, tmp_path, capsys):
    # A base whose tokenizer has no chat template: ChatML, with a notice, and training runs.
    texts = [m["content"] for line in inputs["data"].read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts, vocab_size=300, chat_template=False)
    base = tmp_path / "base"
    tiny_model("llama", len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    cli.run(train.main, argv_of(TRAIN_OK.replace("{model}", str(base)), inputs, tmp_path / "out"))
    assert "note: the tokenizer has no chat template; using ChatML" in capsys.readouterr().err
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_trust_remote_code_is_off_unless_asked():
    assert train.TrainConfig().trust_remote_code is False
    assert merge.parse_args(["--adapter", "a", "--out", "o"]).trust_remote_code is False
    assert generate.parse_args(["--model", str(DEFAULT_MODEL), "hi"]).trust_remote_code is False
    assert train.parse_config(["--model", "m", "--data", "d", "--trust-remote-code"]).trust_remote_code is True


# ----------------------------------------------------------------------------- kill -9 and resume

KILL_RUN = ["--model", str(DEFAULT_MODEL), "--data", str(DEFAULT_DATA), "--max-steps", "14", "--save-every", "1",
            "--keep-last", "2", "--max-len", "29", "--batch-size", "2", "--grad-accum", "1", "--eval-every", "0",
            "--lr", "1e-3", "--schedule", "cosine", "--warmup-steps", "2"]


def train_proc(*flags):
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def logged(out):  # every metric but the wall-clock throughput and the run's summary (its seconds)
    return [{k: v for k, v in record.items() if k != "tok_s"}
            for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "summary" not in record]


def assert_same_adapter(a, b):
    a, b = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = train_proc(*KILL_RUN, "--out", str(straight))
    victim = train_proc(*KILL_RUN, "--out", str(crashed))
    deadline = time.time() + 120
    while not (crashed / "checkpoints" / "step-3").exists():  # poll until checkpoint 3 is in place
        assert victim.poll() is None, victim.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)  # mid-step or mid-save, wherever it is
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (crashed / "adapter_model.safetensors").exists()  # it really did not finish

    out, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err
    assert "truncated to --max-len 29" in out  # long samples: counted and reported, not an error
    assert json.loads((straight / "train_config.json").read_text())["resolved"]["data"]["train"]["truncated"] > 0

    resumed = train_proc("--out", str(crashed), "--resume")  # the saved config supplies the rest
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    step = int(out.split("resumed from ")[1].split("step-")[1].split()[0])
    assert step >= 3, out
    assert_same_adapter(straight, crashed)
    assert logged(straight) == logged(crashed)
    kept = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert kept == ["step-13", "step-14"]  # --keep-last 2, no temporary directory left


# ----------------------------------------------------------------------------- in-process runs

SMALL_RUN = ["--max-steps", "4", "--save-every", "1", "--keep-last", "0", "--max-len", "64", "--batch-size", "2",
             "--grad-accum", "1", "--eval-every", "0", "--eval-split", "0", "--lr", "1e-3", "--warmup-steps", "0"]


def small_run(inputs, out, *flags):
    return train.main(["--model", str(DEFAULT_MODEL), "--data", str(inputs["data"]), "--out", str(out),
                       *SMALL_RUN, *flags])


def test_crash_while_writing_a_checkpoint(inputs, tmp_path, monkeypatch):
    small_run(inputs, tmp_path / "straight")
    real_save, calls = torch.save, []

    def save_then_crash(obj, f, *args, **kwargs):  # two files a checkpoint: the 5th is step 3's optimizer
        calls.append(f)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed while writing checkpoint 3")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        small_run(inputs, tmp_path / "crashed")
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert (ckpts / ".tmp-step-3" / "adapter_model.safetensors").is_file()  # half written, never renamed
    assert [p.name for p in checkpoint.complete(ckpts)] == ["step-1", "step-2"]

    summary = train.main(["--out", str(tmp_path / "crashed"), "--resume"])
    assert summary["steps"] == 4
    assert not (ckpts / ".tmp-step-3").exists()
    assert_same_adapter(tmp_path / "straight", tmp_path / "crashed")
    assert logged(tmp_path / "straight") == logged(tmp_path / "crashed")


def test_disk_full_while_checkpointing_is_one_clear_error(inputs, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_at_step_2(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    with pytest.raises(BadInput, match=r"cannot write checkpoint .*step-2 .*No space left.*newest complete "
                                       r"checkpoint is .*step-1: free space, then --resume"):
        small_run(inputs, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-1"]


def assert_no_non_finite_adapter(out):
    for f in out.rglob("adapter_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(f).values()), f


def test_non_finite_loss_stops_with_step_and_last_checkpoint(inputs, tmp_path, monkeypatch):
    real = train.optimizer_step_grads
    calls = []

    def poison_step_3(model, *args):  # an inf in a LoRA weight: the loss of step 3 is no longer finite
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(iter(lora.lora_modules(model).values())).lora_A.weight[0, 0] = float("inf")
        return real(model, *args)

    monkeypatch.setattr(train, "optimizer_step_grads", poison_step_3)
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"non-finite loss at step 3: training stopped; the last good checkpoint "
                                       r"is .*step-2"):
        small_run(inputs, out)
    assert not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in checkpoint.complete(out / "checkpoints")] == ["step-1", "step-2"]
    assert_no_non_finite_adapter(out)


def bare_run(fp16, weight):
    """A train.Run with only what Run.update reads: SGD on `weight`, loss scaling for fp16."""
    return train.Run(cfg=train.TrainConfig(lr=0.5, max_grad_norm=1.0), model=None,
                     optimizer=torch.optim.SGD([weight], lr=0.5), scaler=LossScaler(enabled=fp16), autocast=None,
                     device=torch.device("cpu"), out=None, save_adapter=None, eval_batches=[], window=None,
                     total_steps=10, warmup=0, steps_per_epoch=10)


@pytest.mark.parametrize("fp16", [False, True], ids=["bf16/fp32", "fp16"])
def test_update_steps_before_it_reads_the_loss_and_norm(fp16):
    # Run.update queues the clip and the optimizer step before it reads the loss and the gradient
    # norm (no host sync before the step). A finite step returns them as numbers; with a
    # non-finite gradient bf16/fp32 training stops after the step it took (the weights it left
    # are never saved: check_weights), while fp16 skips the step, halves the scale and goes on.
    weight = torch.nn.Parameter(torch.ones(2))
    run = bare_run(fp16, weight)
    scale = run.scaler.scale
    weight.grad = torch.tensor([3.0, 4.0]) * scale  # norm 5 once unscaled: clipped to 1
    loss, norm, lr = run.update(0, [weight], torch.tensor(2.5, dtype=torch.float64), last_ckpt=None)
    assert (loss, norm, lr) == (2.5, 5.0, 0.5) and type(loss) is float and type(norm) is float
    assert torch.allclose(weight.detach(), torch.tensor([1 - 0.5 * 0.6, 1 - 0.5 * 0.8]))

    before = weight.detach().clone()
    weight.grad = torch.tensor([float("inf"), 0.0])
    if fp16:
        loss, norm, _ = run.update(1, [weight], torch.tensor(2.5, dtype=torch.float64), last_ckpt=None)
        assert norm == float("inf") and run.scaler.skipped == 1 and run.scaler.scale == scale / 2
        assert torch.equal(weight.detach(), before)  # the step was skipped
        assert weight.grad is None
    else:
        with pytest.raises(BadInput, match="non-finite gradients at step 2: training stopped; no checkpoint"):
            run.update(1, [weight], torch.tensor(2.5, dtype=torch.float64), last_ckpt=None)
        weight.grad = torch.tensor([1.0, 0.0])
        with pytest.raises(BadInput, match="non-finite loss at step 3"):
            run.update(2, [weight], torch.tensor(float("nan"), dtype=torch.float64), last_ckpt=None)


def test_weights_that_overflow_never_reach_a_checkpoint(inputs, tmp_path, monkeypatch):
    # A step with a finite loss and finite gradients can still overflow the weights (a huge
    # learning rate, an optimizer bug): here the optimizer's first step leaves an inf behind.
    real = train.make_optimizer

    def overflowing_optimizer(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def step_then_overflow():
            step()
            optimizer.param_groups[0]["params"][0].data[0, 0] = float("inf")

        optimizer.step = step_then_overflow
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", overflowing_optimizer)
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"non-finite weights \(.*lora_.*\) at step 1: training stopped; "
                                       r"no checkpoint was written yet"):
        small_run(inputs, out)
    assert checkpoint.complete(out / "checkpoints") == []
    assert_no_non_finite_adapter(out)


# ----------------------------------------------------------------------------- GPU memory


def test_out_of_memory_is_one_line_with_what_to_change(monkeypatch, capsys):
    def oom(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, ["--model", "m", "--data", "d", "--batch-size", "8", "--max-len", "2048",
                             "--grad-ckpt", "off"])
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    for phrase in ["CUDA out of memory (peak", "--batch-size (now 8", "--auto-batch", "--max-len (now 2048)",
                   "gradient checkpointing (--grad-ckpt"]:
        assert phrase in line, line


@pytest.mark.parametrize("batch, accum, limit, expected", [
    (8, 2, 8, (8, 2, 8)),   # fits at once: nothing changes
    (8, 2, 5, (4, 4, 5)),   # 5 fits, but 4 divides the effective batch of 16
    (8, 2, 3, (2, 8, 3)),
    (6, 1, 3, (3, 2, 3)),
    (7, 3, 6, (3, 7, 6)),   # effective 21: its largest divisor <= 6 is 3
    (16, 1, 1, (1, 16, 1)),
])
def test_auto_batch_search(batch, accum, limit, expected):
    tried = []

    def probe(n):  # the GPU, faked: a micro-batch above `limit` runs out of memory
        tried.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError(f"fake OOM at {n}")

    assert auto_batch_size(probe, batch, accum) == expected
    assert len(tried) <= 2 * batch.bit_length()  # halving then bisection, not every size
    assert expected[2] in tried and (expected[2] == batch or expected[2] + 1 in tried)  # the largest: one more failed


def test_auto_batch_nothing_fits():
    def probe(n):
        raise torch.cuda.OutOfMemoryError("fake")

    with pytest.raises(BadInput, match="even one sample"):
        auto_batch_size(probe, 8, 1)


def test_probe_batch_leaves_no_trace(make_model_dir, tokenizer):
    # The probe must not shift the run: no gradients left behind, the random state as it was.
    model = quant.load_model(make_model_dir("llama"), quant=None, compute_dtype=torch.float32, device="cpu")
    lora.inject(model, "all-linear", r=4, alpha=8, dropout=0.1)
    model.train()
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 9, 7)]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    step = lambda batch: train.optimizer_step_grads(model, [batch], torch.autocast("cpu", enabled=False), 1.0)
    probe = longest_rows_probe(step, model, rows, lambda r: data.collate(r, tokenizer.pad_token_id),
                               torch.device("cpu"))
    probe(2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("tool, argv", [("train", ["--help"]), ("train", ["--learning-rate", "1"]),
                                        ("merge", ["--help"]), ("merge", ["--adapter", "a"]),
                                        ("generate", ["--help"]), ("generate", ["--top-p", "2"])])
def test_help_and_flag_errors_answer_before_torch_loads(tool, argv):
    """--help and a bad flag are answered before torch, transformers and bitsandbytes are imported
    (seconds of imports): the script exits from its early parse with torch not in sys.modules."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{tool + '.py'!r}, *{argv!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(REPO / (tool + '.py'))!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    code = 0 if "--help" in argv else 2
    assert done.stdout.splitlines()[-1] == f"exit {code} False", done.stdout + done.stderr
