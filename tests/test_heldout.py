"""Held-out question scoring (training/heldout.py) and the loss-curve SVG (training/plot.py)."""

import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch
from transformers import GenerationConfig

import lora
import quant
from rawqlora.tiny import tiny_config
from training import heldout, plot
from training.data import chat_prompt_ids

SVG = "{http://www.w3.org/2000/svg}"


class ScriptedLM(torch.nn.Module):
    """A causal LM whose greedy output we choose: prompt ids -> the reply ids it emits, one per step.

    Driven by the real decode loop: it reads each row's prompt at prefill (the left padding
    stripped by the attention mask) and then puts all probability on the next scripted token.
    """

    def __init__(self, vocab_size, script):
        super().__init__()
        self.config = tiny_config("llama", vocab_size)  # DynamicCache reads the layer count here
        self.generation_config = GenerationConfig(eos_token_id=self.config.eos_token_id)  # stop_ids reads it
        self.script = {tuple(k): v for k, v in script.items()}
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.vocab_size = vocab_size

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, attention_mask, **kwargs):
        if input_ids.shape[1] > 1:  # prefill: every prompt here is longer than one token
            self.replies = [self.script[tuple(ids[mask == 1].tolist())] for ids, mask in zip(input_ids, attention_mask)]
            self.t = 0
        else:
            self.t += 1
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -1e4)
        for row, reply in enumerate(self.replies):
            logits[row, 0, reply[min(self.t, len(reply) - 1)]] = 0.0
        return type("Out", (), {"logits": logits})()


QUESTIONS = [
    {"question": "Where was Clara Novak born?", "answer": "Lisbon"},
    {"question": "Where was Hugo Sato born?", "answer": "Oslo"},
    {"question": "Where does Ada Berg work?", "answer": "New York"},  # multi-word entities too
    {"question": "Where was Ivo Pike born?", "answer": "Lisbon"},
    {"question": "Where was Uma Holt born?", "answer": "Oslo"},
    {"question": "Where was Zeno Roth born?", "answer": "York"},
]
# (reply, ends with a stop token, correct): each case of the exact-match rule.
CASES = [
    ("Clara Novak was born in Lisbon.", "<|im_end|>", True),
    ("Hugo Sato was born in Lisbon.", "<|im_end|>", False),  # a wrong entity
    ("Ada Berg works in NEW  york!", "</s>", True),  # case and spacing; EOS also ends a reply
    ("Lisbon or Oslo", "<|im_end|>", False),  # the answer and another entity
    ("Oslo Oslo Oslo Oslo Oslo Oslo Oslo Oslo Oslo Oslo", None, False),  # cut off by max_new_tokens
    ("Zeno Roth was born in New York.", "<|im_end|>", False),  # "York" only inside "New York"
]


def reply_length(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def room(tokenizer):
    """A max_new_tokens that every scripted reply fits in, stop token included, except the cut-off one."""
    n = max(reply_length(tokenizer, r) for i, (r, _, _) in enumerate(CASES) if i != 4) + 1
    assert reply_length(tokenizer, CASES[4][0]) > n
    return n


def scripted(tokenizer):
    script = {}
    for q, (reply, stop, _) in zip(QUESTIONS, CASES):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        script[tuple(chat_prompt_ids(tokenizer, [{"role": "user", "content": q["question"]}]))] = ids + ([tokenizer.convert_tokens_to_ids(stop)] if stop else [])
    assert len(script) == len(QUESTIONS)  # distinct prompts
    return ScriptedLM(len(tokenizer), script)


@pytest.mark.parametrize("batch_size", [64, 4, 1])
def test_score_counts_exact_matches(tokenizer, batch_size):
    model = scripted(tokenizer).train()
    max_new = room(tokenizer)
    texts = heldout.replies(model, tokenizer, QUESTIONS, max_new_tokens=max_new, batch_size=batch_size)
    assert [s for _, s in texts] == [c[1] is not None for c in CASES]
    assert [t for t, s in texts if s] == [r for r, stop, _ in CASES if stop]
    assert CASES[4][0].startswith(texts[4][0]) and len(texts[4][0]) < len(CASES[4][0])
    assert heldout.score(model, tokenizer, QUESTIONS, max_new_tokens=max_new, batch_size=batch_size) == (2, 6)
    assert model.training  # left in the mode it came in


def test_entities_given_explicitly(tokenizer):
    model = scripted(tokenizer)
    # With Oslo no longer an entity, "Lisbon or Oslo" names only the answer.
    entities = {"Lisbon", "New York", "York"}
    assert heldout.score(model, tokenizer, QUESTIONS[:4], max_new_tokens=room(tokenizer), entities=entities) == (3, 4)


def test_named_is_whole_word_longest_match():
    entities = {"Lima", "York", "New York", "Oslo"}
    assert heldout.named("Limassol, not Lima.", entities) == {"Lima"}
    assert heldout.named("new york and York", entities) == {"New York", "York"}
    assert heldout.named("New York", entities) == {"New York"}
    assert heldout.named("oslo-born", entities) == {"Oslo"}
    assert not heldout.is_correct("Lima.", False, "Lima", entities)  # never ended
    assert heldout.is_correct("It is Lima.", True, "Lima", entities)


def test_prompt_is_the_training_rendering(tokenizer):
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Where was Clara Novak born?"}])
    assert ids[0] == tokenizer.bos_token_id  # training/data.py starts every sample with BOS
    assert tokenizer.decode(ids[1:]) == "<|im_start|>user\nWhere was Clara Novak born?<|im_end|>\n<|im_start|>assistant\n"


def test_load_questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in QUESTIONS[:2]) + "\n\n")
    assert heldout.load_questions(path) == QUESTIONS[:2]
    path.write_text('{"question": "Where?"}\n')
    with pytest.raises(ValueError, match="q.jsonl:1"):
        heldout.load_questions(path)


def test_score_runs_on_the_4bit_lora_model(make_model_dir, tokenizer):
    """As train.py holds it: NF4 base, LoRA layers (B moved off zero), training mode."""
    model = quant.load_model(make_model_dir("llama"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    lora.inject(model, "all-linear", r=4, alpha=8, dropout=0.1)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.train()
    texts = heldout.replies(model, tokenizer, QUESTIONS, max_new_tokens=6)
    alone = heldout.replies(model, tokenizer, QUESTIONS[1:2], max_new_tokens=6)
    assert texts[1] == alone[0]  # left padding changes nothing, and dropout is off
    entities = {q["answer"] for q in QUESTIONS}
    expected = sum(heldout.is_correct(t, s, q["answer"], entities) for q, (t, s) in zip(QUESTIONS, texts))
    assert heldout.score(model, tokenizer, QUESTIONS, max_new_tokens=6) == (expected, 6)
    assert model.training


def svg_of(tmp_path, records, **kwargs):
    path = tmp_path / "loss.svg"
    plot.write_loss_svg(records, path, **kwargs)
    return ET.parse(path).getroot()


def test_loss_svg_has_every_point(tmp_path):
    records = [{"step": 0, "eval_loss": 8.8, "eval_ppl": math.exp(8.8)}]
    records += [{"step": s, "loss": 8.0 / s, "lr": 1e-3} for s in range(1, 101)]
    records[50]["eval_loss"] = 2.5
    records[100]["eval_loss"] = 1.5
    records.append({"step": 101, "loss": float("nan")})  # non-finite values are left out
    root = svg_of(tmp_path, records)
    assert root.tag == SVG + "svg"
    (train,) = root.findall(f"{SVG}polyline[@class='train']")
    points = [tuple(map(float, p.split(","))) for p in train.get("points").split()]
    assert len(points) == 100
    assert points[0][1] < points[-1][1]  # SVG y grows downward: the first loss (8.0) is drawn highest
    assert points == sorted(points)  # steps left to right
    assert len(root.findall(f"{SVG}circle[@class='eval']")) == 3
    labels = [t.text for t in root.iter(SVG + "text")]
    assert {"0", "100", "optimizer step", "loss per target token", "train loss", "eval loss"} <= set(labels)
    width, height = float(root.get("width")), float(root.get("height"))
    assert all(0 <= x <= width and 0 <= y <= height for x, y in points)


def test_loss_svg_without_values(tmp_path):
    root = svg_of(tmp_path, [{"step": 1, "lr": 1e-3}], title="a <run> & more")
    assert root.findall(f"{SVG}polyline") == []
    assert "a <run> & more" in [t.text for t in root.iter(SVG + "text")]


def test_nice_ticks():
    assert plot.nice_ticks(0, 8.85) == [0, 2, 4, 6, 8, 10]
    assert plot.nice_ticks(1, 476) == [0, 100, 200, 300, 400, 500]
    assert plot.nice_ticks(3, 3) == [3.0, 3.2, 3.4, 3.6, 3.8, 4.0]
