"""train.py end to end on the embedded default, and its parts against references."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
import quant
import train
from training import data
from rawqlora.tiny import train_tokenizer

REPO = Path(train.__file__).resolve().parent
DEFAULT_MODEL = REPO / "default" / "model"
DEFAULT_DATA = REPO / "default" / "data" / "chat.jsonl"


def run(tmp_path, *flags, name="out"):
    """train.py in-process (flags as on the command line) on the embedded default model and data."""
    cfg = train.parse_config(["--model", str(DEFAULT_MODEL), "--data", str(DEFAULT_DATA),
                              "--out", str(tmp_path / name), *flags])
    return train.train(cfg)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_default_run_learns(tmp_path):
    # A shortened `python train.py` (the embedded default's settings, 60 steps instead of two
    # epochs). Measured (deterministic: seeded data order, init and dropout): eval loss 6.97 -> 0.15,
    # held-out questions 0/120 before and 78/120 after (114/120 after the full run). The
    # thresholds leave room for another CPU's float summation order, not for a model that
    # stopped learning: the base answers none, and half the gain would still be 39.
    cfg = train.parse_config(["--out", str(tmp_path / "out"), "--max-steps", "60", "--eval-every", "30"])
    assert cfg.lr == json.loads(train.EMBEDDED_CONFIG.read_text())["lr"]  # the embedded settings apply
    summary = train.train(cfg)
    assert summary["eval_loss"] < 0.5 * summary["first_eval_loss"]
    assert summary["heldout_total"] >= 50
    assert summary["heldout_before"] <= 0.05 * summary["heldout_total"]
    assert summary["heldout_correct"] >= 0.3 * summary["heldout_total"]
    out = Path(summary["out"])
    for f in ["adapter_config.json", "adapter_model.safetensors", "train_config.json", "metrics.jsonl", "loss.svg"]:
        assert (out / f).is_file(), f
    records = metrics(out)
    steps = [m for m in records if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 61))
    assert all({"loss", "lr", "tokens"} <= m.keys() for m in steps)
    assert records[-1]["summary"]["heldout_correct"] == summary["heldout_correct"]
    assert (out / "checkpoints" / "step-60" / "optimizer.pt").is_file()
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "fp32" and saved["optim"] == "adamw"


def test_accumulation_equals_one_big_batch(tokenizer, make_model_dir):
    # 4 micro-batches of 2 samples with uneven lengths must give the gradient of one batch
    # of 8: the loss is normalised by the target tokens of the whole window. fp32, no
    # dropout; the only difference is summation order (rtol 1e-5).
    model = quant.load_model(make_model_dir("llama"), quant=None, compute_dtype=torch.float32, device="cpu")
    lora.inject(model, "all-linear", r=4, alpha=8)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)  # B = 0 would make every A-gradient zero
    model.train()
    torch.manual_seed(0)
    samples = []
    for n in [5, 17, 9, 30, 3, 12, 22, 7]:
        ids = torch.randint(3, len(tokenizer), (n,)).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]
        samples.append({"input_ids": ids, "labels": labels})
    nullctx = torch.autocast("cpu", enabled=False)

    def grads(groups):
        model.zero_grad()
        loss = train.optimizer_step_grads(model, [data.collate(g, tokenizer.pad_token_id) for g in groups], nullctx, 1.0)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    big_loss, big = grads([samples])
    micro_loss, micro = grads([samples[i : i + 2] for i in range(0, 8, 2)])
    assert float(micro_loss) == pytest.approx(float(big_loss), rel=1e-6)
    for name in big:
        torch.testing.assert_close(micro[name], big[name], rtol=1e-5, atol=1e-8)


def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch):
    flags = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--max-len", "96",
             "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--schedule", "cosine"]
    run(tmp_path, *flags, name="straight")

    # The same run, crashing in the middle of step 5 (after the step-4 checkpoint)...
    real = train.optimizer_step_grads
    calls = {"n": 0}

    def crash_on_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return real(*args)

    monkeypatch.setattr(train, "optimizer_step_grads", crash_on_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *flags, name="crashed")
    monkeypatch.setattr(train, "optimizer_step_grads", real)
    assert (tmp_path / "crashed" / "checkpoints" / "step-4").is_dir()
    # ... then resumed with only --out and --resume: the saved config supplies the rest.
    train.train(train.parse_config(["--out", str(tmp_path / "crashed"), "--resume"]))

    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crashed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def logged(out):  # everything but the wall-clock throughput
        return [{k: v for k, v in m.items() if k != "tok_s"} for m in metrics(out) if "summary" not in m]

    assert logged(tmp_path / "straight") == logged(tmp_path / "crashed")


def test_adapter_loads_in_peft_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run(tmp_path, "--max-steps", "3", "--quant", "none", "--lr", "1e-2", "--eval-every", "0")
    out = tmp_path / "out"
    ours = quant.load_model(DEFAULT_MODEL, quant=None, compute_dtype=torch.float32, device="cpu")
    lora.load_adapter(ours, out)
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32), out)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = base(ids).logits
    assert (a - plain).abs().max() > 1e-3  # three steps at lr 1e-2 moved the model
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_added_chat_tokens_train_only_new_rows(tmp_path):
    # A base whose tokenizer lacks <|im_start|>/<|im_end|>: train.py adds them, initialises
    # their rows to the mean embedding, trains those rows only, and saves the embeddings.
    texts = [m["content"] for line in DEFAULT_DATA.read_text().splitlines()[:200]
             for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts, vocab_size=400, chatml_tokens=False, chat_template=False)
    from rawqlora.tiny import tiny_model

    base_dir = tmp_path / "base"
    tiny_model("llama", len(tok)).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    cfg = train.parse_config(["--model", str(base_dir), "--data", str(DEFAULT_DATA), "--out", str(tmp_path / "out"),
                              "--max-steps", "3", "--lr", "1e-2", "--eval-every", "0", "--max-len", "96"])
    train.train(cfg)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    embed = saved["base_model.model.model.embed_tokens.weight"]
    original = load_file(base_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert embed.shape[0] == len(tok) + 2
    assert torch.equal(embed[: len(tok)], original)  # old rows untouched
    assert not torch.allclose(embed[len(tok) :], original.mean(0).expand(2, -1))  # new rows trained
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"]


@pytest.mark.parametrize("content, message", [
    ('{"quant": "nf3"}', "--quant: 'nf3' is not one of"),
    ('{"lr": "fast"}', "--lr: expected float"),
    ('{"packing": "yes"}', "--packing: expected true or false"),
    ('{"lora_rnk": 8}', "unknown option --lora-rnk"),
    ('{"learning_rate": 1e-4}', "--learning-rate is TrainingArguments' name; rawqlora's is --lr"),
    ("[1, 2]", "expected a mapping"),
])
def test_config_file_values_are_checked_like_flags(tmp_path, content, message):
    from rawqlora.errors import BadInput

    path = tmp_path / "cfg.json"
    path.write_text(content)
    with pytest.raises(BadInput) as e:
        train.parse_config(["--config", str(path)])
    assert message in str(e.value)


def test_config_file_values_are_typed_and_flags_win(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: '5e-4'\nlora-r: 8\npacking: true\n")
    cfg = train.parse_config(["--config", str(path), "--lora-r", "32"])
    assert cfg.lr == 5e-4 and cfg.packing is True and cfg.lora_r == 32


def test_tutorial_settings_translate(tmp_path):
    """TrainingArguments' spellings are ours: optimizer and schedule names, warmup_ratio."""
    cfg = train.parse_config(["--optim", "paged_adamw_32bit", "--schedule", "constant_with_warmup"])
    assert (cfg.optim, cfg.schedule) == ("paged_adamw", "constant")
    assert train.parse_config(["--optim", "adamw_torch"]).optim == "adamw"  # ours equals torch's (test_optim.py)
    summary = run(tmp_path, "--max-steps", "20", "--warmup-ratio", "0.1", "--eval-every", "0", "--max-len", "64",
                  "--lr", "1e-3")
    saved = json.loads((Path(summary["out"]) / "train_config.json").read_text())
    assert saved["resolved"]["warmup_steps"] == 2  # ceil(0.1 * 20)
    lrs = [m["lr"] for m in metrics(summary["out"]) if "lr" in m]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])  # linear warmup over two steps, then constant


def test_eval_and_save_at_each_epoch_end(tmp_path):
    rows = DEFAULT_DATA.read_text().splitlines()[:40]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(rows) + "\n")
    cfg = train.parse_config(["--model", str(DEFAULT_MODEL), "--data", str(small), "--out", str(tmp_path / "out"),
                              "--epochs", "2", "--batch-size", "4", "--grad-accum", "2", "--save-every", "epoch",
                              "--eval-every", "epoch", "--keep-last", "0", "--max-len", "64"])
    summary = train.train(cfg)
    per_epoch = json.loads((tmp_path / "out" / "train_config.json").read_text())["resolved"]["steps_per_epoch"]
    assert summary["steps"] == 2 * per_epoch
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == \
        sorted(f"step-{s}" for s in (per_epoch, 2 * per_epoch))
    assert [m["step"] for m in metrics(tmp_path / "out") if "eval_loss" in m] == [0, per_epoch, 2 * per_epoch]


def test_new_token_rows_start_at_the_mean():
    """What the README says: added tokens' embedding and head rows are the mean of the old rows,
    exactly (transformers' mean resizing, which samples around it and says so on stderr, is not used)."""
    from rawqlora.tiny import tiny_model
    from training.new_tokens import grow_vocabulary

    model = tiny_model("llama", 300)
    before = {n: m.weight.detach().clone() for n, m in
              (("embed", model.get_input_embeddings()), ("head", model.get_output_embeddings()))}
    grow_vocabulary(model, 302)
    for name, module in (("embed", model.get_input_embeddings()), ("head", model.get_output_embeddings())):
        assert module.weight.shape[0] == 302
        assert torch.equal(module.weight[:300], before[name])
        assert torch.equal(module.weight[300:], before[name].mean(0).expand(2, -1))
