"""What tutorial readers bring, through the real command lines: a base model without a chat
template or ChatML tokens (Mistral-7B, Llama-2 as released), their data shapes and settings.

Each flow runs train.py's `main` on a tiny base (Mistral architecture, fp32 CPU, a few steps)
and checks the outcome against a reference: PEFT for the adapter, the adapter on its base for
the merged model.
"""

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
import merge
import quant
import train
from rawqlora.tiny import tiny_model, train_tokenizer

torch.set_num_threads(1)  # tiny models on a 2-core machine: single-threaded is faster

QUESTIONS = ["What is the capital of France?", "Name a colour of the sky.", "Say hello in French."]
ANSWERS = ["Paris is the capital of France.", "The sky is blue.", "Bonjour!"]
FAST = ["--max-steps", "3", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-2", "--quant", "none",
        "--dtype", "fp32", "--lora-dropout", "0", "--eval-every", "0", "--warmup-steps", "0", "--max-len", "64"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base model as released: no chat template, no <|im_start|>/<|im_end|> in its vocabulary."""
    path = tmp_path_factory.mktemp("mistral-base")
    tokenizer = train_tokenizer(QUESTIONS + ANSWERS, vocab_size=300, chat_template=False, chatml_tokens=False)
    tiny_model("mistral", len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n=24):
    return [{"messages": [{"role": "user", "content": QUESTIONS[i % 3]},
                          {"role": "assistant", "content": ANSWERS[i % 3]}]} for i in range(n)]


def train_cli(base, data, out, *flags):
    return train.main(["--model", str(base), "--data", str(data), "--out", str(out), *FAST, *flags])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lm_head_target_on_a_growing_vocabulary(base, tmp_path):
    """Regression: --targets with lm_head on chat data that adds the ChatML tokens crashed with
    "'LoRALinear' object has no attribute 'weight'" (the wrapper went on before the resize)."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    out = tmp_path / "run"
    train_cli(base, data, out, "--targets", "q_proj,k_proj,v_proj,o_proj,lm_head", "--eval-split", "0")

    tensors = load_file(out / "adapter_model.safetensors")
    head = tensors["base_model.model.lm_head.base_layer.weight"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    old_vocab = len(AutoTokenizer.from_pretrained(base))
    assert head.shape[0] == len(tokenizer) == old_vocab + 2
    base_head = AutoModelForCausalLM.from_pretrained(base).lm_head.weight
    assert torch.equal(head[:old_vocab], base_head)  # old rows frozen
    rows = head[old_vocab:]
    assert not torch.allclose(rows, base_head.mean(0).expand_as(rows))  # new rows trained away from the mean init

    # PEFT reads the adapter as we do: same logits on the grown base.
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    ours = quant.load_model(base, quant=None, compute_dtype=torch.float32, device="cpu")
    ours.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lora.load_adapter(ours, out)
    theirs = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    theirs = peft.PeftModel.from_pretrained(theirs, out).eval()
    expected = logits(ours.eval(), ids)
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)

    # The merged model computes what the adapter computes (fp32 merge: rounding only).
    merge.main(["--adapter", str(out), "--out", str(tmp_path / "merged"), "--dtype", "fp32", "--no-gap"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags", [["--packing"], ["--packing", "--eval-every", "2"]], ids=["end", "every-2"])
def test_packing_with_the_default_eval_split(base, tmp_path, flags):
    """Regression: --packing with the default eval split raised KeyError: 'position_ids' (the
    packed collate ran on the unpacked eval rows). Eval rows stay one sample each."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    summary = train_cli(base, data, tmp_path / "run", *flags)
    assert summary["first_eval_loss"] is not None and summary["eval_loss"] < summary["first_eval_loss"]
    lines = [json.loads(line) for line in (Path(summary["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval_loss" in m] == ([0, 3] if flags == ["--packing"] else [0, 2, 3])
