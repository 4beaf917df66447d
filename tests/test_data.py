"""The SFT data pipeline: loading, format checks, loss masks, batching and packing.

Masks are checked by decoding: the whole sample must decode to the expected text, and each
run of target tokens to one expected response + EOS, so every other token is masked.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from rawqlora.data import (
    IGNORE,
    alpaca_prompt,
    batches,
    collate,
    collate_packed,
    detect_format,
    encode,
    ensure_chat_template,
    load_records,
    pack,
    prepare,
)
from rawqlora.errors import BadInput
from rawqlora.tiny import CHATML_TEMPLATE, tiny_model, train_tokenizer
from conftest import TOKENIZER_TEXTS

EOS = "</s>"
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Add 2 and 3."},
        {"from": "gpt", "value": "5"},
    ]
}
ALPACA = {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"}
ALPACA_NO_INPUT = {"instruction": "Write a haiku about autumn.", "input": "", "output": "Leaves fall on the river."}
PROMPT_RESPONSE = {"system_prompt": "You write code.", "prompt": "def add(a, b):", "response": "    return a + b"}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}


def chatml(*turns):
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


def target_runs(sample, tokenizer):
    """The decoded text of each maximal run of consecutive target tokens."""
    runs, run = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        assert label in (IGNORE, token)
        if label == token:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(r) for r in runs + ([run] if run else [])]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ----------------------------------------------------------------------------- masks, per format


@pytest.mark.parametrize(
    "record, fmt, text, targets",
    [
        (
            CHAT, "chat",
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            f"<|im_start|>assistant\nParis.<|im_end|>{EOS}\n"
            "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
            f"<|im_start|>assistant\nRome.<|im_end|>{EOS}\n",
            [f"Paris.<|im_end|>{EOS}", f"Rome.<|im_end|>{EOS}"],
        ),
        (
            SHAREGPT, "chat",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
            f"<|im_start|>assistant\n5<|im_end|>{EOS}\n",
            [f"5<|im_end|>{EOS}"],
        ),
        (
            ALPACA, "alpaca",
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nTranslate to French.\n\n### Input:\ngood morning\n\n### Response:\n"
            f"bonjour{EOS}",
            [f"bonjour{EOS}"],
        ),
        (
            ALPACA_NO_INPUT, "alpaca",
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nWrite a haiku about autumn.\n\n### Response:\n"
            f"Leaves fall on the river.{EOS}",
            [f"Leaves fall on the river.{EOS}"],
        ),
        (
            PROMPT_RESPONSE, "prompt-response",
            "<|im_start|>system\nYou write code.<|im_end|>\n<|im_start|>user\ndef add(a, b):<|im_end|>\n"
            f"<|im_start|>assistant\n    return a + b<|im_end|>{EOS}\n",
            [f"    return a + b<|im_end|>{EOS}"],
        ),
        (
            {"question": "2+2?", "answer": "4"}, "prompt-response",
            f"<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>{EOS}\n",
            [f"4<|im_end|>{EOS}"],
        ),
        # text: every token is a target except BOS, which nothing predicts.
        (TEXT, "text", TEXT["text"] + EOS, [TEXT["text"] + EOS]),
    ],
    ids=["chat", "sharegpt", "alpaca", "alpaca-no-input", "prompt-response", "question-answer", "text"],
)
def test_masks_cover_exactly_the_responses(tokenizer, record, fmt, text, targets):
    sample, truncated = encode(record, tokenizer, fmt, max_len=512)
    assert not truncated
    assert sample["input_ids"][0] == tokenizer.bos_token_id and sample["labels"][0] == IGNORE
    assert tokenizer.decode(sample["input_ids"]) == "<s>" + text
    assert target_runs(sample, tokenizer) == targets
    # Every EOS is a target (one per response).
    eos = [label for token, label in zip(sample["input_ids"], sample["labels"]) if token == tokenizer.eos_token_id]
    assert eos == [tokenizer.eos_token_id] * len(targets)


def test_train_on_prompt_puts_loss_on_every_token_but_the_first(tokenizer):
    sample, _ = encode(CHAT, tokenizer, "chat", max_len=512, train_on_prompt=True)
    assert sample["labels"] == [IGNORE] + sample["input_ids"][1:]


def test_template_that_ends_turns_with_eos_gets_no_second_eos(tokenizer):
    template = CHATML_TEMPLATE.replace("'<|im_end|>'", "'</s>'")
    tok = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320)
    tok.chat_template = template
    sample, _ = encode(CHAT, tok, "chat", max_len=512)
    assert target_runs(sample, tok) == [f"Paris.{EOS}", f"Rome.{EOS}"]


def test_alpaca_prompt_is_the_prompt_encode_trains_on():
    assert alpaca_prompt("Do it.").endswith("### Instruction:\nDo it.\n\n### Response:\n")
    assert "### Input:\nx\n\n" in alpaca_prompt("Do it.", "x")


# ----------------------------------------------------------------------------- loading


def test_every_file_type_loads_the_same_records(tmp_path):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    expected = [{"instruction": "a", "output": "b", "input": None}, {"instruction": "c", "output": "e", "input": "d"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "array.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "lines.json").write_text(open(jsonl).read())
    pq.write_table(pa.Table.from_pylist(expected), tmp_path / "d.parquet")
    for name in ["d.jsonl", "array.json", "lines.json", "d.parquet"]:
        loaded = load_records(str(tmp_path / name))
        assert [dict(r) for r in loaded] == expected, name  # keys the first record lacks survive
    (tmp_path / "d.csv").write_text('\ufeffinstruction,input,output\n"a\n\nb",,b\nc,d,e\n')  # BOM, multi-line cell
    assert list(load_records(str(tmp_path / "d.csv"))) == [
        {"instruction": "a\n\nb", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]


def test_txt_is_one_record_per_paragraph(tmp_path):
    (tmp_path / "t.txt").write_text("def f():\n    return 1\n\n\n  \nSecond paragraph.\n")
    assert load_records(str(tmp_path / "t.txt"))["text"] == ["def f():\n    return 1", "Second paragraph."]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "", "is empty"),
        ("blank.jsonl", "\n  \n", "is empty"),
        ("data.xlsx", "x", "unsupported file type .xlsx"),
        ("bad.jsonl", '{"text": "a"}\n\n{"text": "b",}\n', "bad.jsonl line 3: malformed JSON"),
        ("bad.json", '[\n{"text": "a"},\n{"text" "b"}\n]', "bad.json line 3: malformed JSON"),
        ("list.jsonl", '{"text": "a"}\n["b"]\n', "list.jsonl line 2: a JSON list, not an object"),
        ("cells.csv", "text\na\nb,c\n", "cells.csv line 3: more cells than the header"),
    ],
)
def test_bad_files_are_named_with_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(BadInput, match=message):
        load_records(str(path))


# ----------------------------------------------------------------------------- formats and bad records


def test_detect_format():
    assert detect_format(["messages"]) == "chat"
    assert detect_format(["conversations", "id"]) == "chat"
    assert detect_format(["instruction", "input", "output", "text"]) == "alpaca"  # tatsu-lab/alpaca
    assert detect_format(["prompt", "response", "system_prompt"]) == "prompt-response"
    assert detect_format(["question", "answer"]) == "prompt-response"
    assert detect_format(["text", "id"]) == "text"
    with pytest.raises(BadInput, match=r"columns \['body', 'title'\].*expected messages"):
        detect_format(["title", "body"])


@pytest.mark.parametrize(
    "records, message",
    [
        ([ALPACA, {"instruction": "x"}], "record 1 \\(0-based\\): field 'output' is missing"),
        ([ALPACA, {"instruction": "x", "output": 5}], "record 1 \\(0-based\\): field 'output' has type int"),
        ([{"text": ["a"]}], "record 0 \\(0-based\\): field 'text' has type list"),
        ([{"messages": "hi"}], "record 0 \\(0-based\\): field 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "tool", "content": "x"}]}], r"messages\[0\] has role 'tool'"),
        ([{"conversations": [{"from": "human"}]}], r"conversations\[0\] has content None"),
        ([{"messages": [{"role": "assistant", "content": "x"}]}], "starts with an assistant turn"),
        ([{"title": "x"}], "can't tell the data format"),
        # Every label masked: no assistant turn at all.
        ([{"messages": [{"role": "user", "content": "hi"}]}] * 3, "every one of the 3 samples has all labels masked"),
    ],
)
def test_bad_records_name_the_record_and_field(tmp_path, tokenizer, records, message):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(BadInput, match=message):
        prepare(path, tokenizer, eval_split=0)


def test_template_that_is_not_prefix_stable_is_refused(tokenizer):
    tok = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320)
    # Marks the last message, as templates that strip earlier reasoning do in effect.
    tok.chat_template = "{% for m in messages %}{% if loop.last %}*{% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(BadInput, match="not prefix-stable"):
        encode(CHAT, tok, "chat", max_len=512)


def test_truncation_and_dropping_are_counted(tmp_path, tokenizer):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 10
    records = [ALPACA, {**ALPACA, "output": long_answer}, {**ALPACA, "instruction": long_answer * 3}]
    train, evals, stats = prepare(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, max_len=200, eval_split=0)
    # Record 0 fits; record 1 loses the end of its answer; record 2's prompt alone fills max_len.
    assert stats["format"] == "alpaca" and evals == []
    assert stats["train"] | {"tokens": 0, "target_tokens": 0} == dict(
        records=3, samples=2, truncated=2, dropped=1, tokens=0, target_tokens=0
    )
    assert [len(s["input_ids"]) for s in train][1] == 200
    assert stats["train"]["tokens"] == sum(len(s["input_ids"]) for s in train)
    assert stats["train"]["target_tokens"] == sum(l != IGNORE for s in train for l in s["labels"])
    with pytest.raises(BadInput, match="all labels masked \\(3 truncated at max_len=20\\)"):
        prepare(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, max_len=20, eval_split=0)


def test_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    records = [{"text": f"sample number {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    train, evals, stats = prepare(path, tokenizer, eval_split=0.1, seed=3)
    again, evals_again, _ = prepare(path, tokenizer, eval_split=0.1, seed=3)
    assert (train, evals) == (again, evals_again)
    assert (stats["train"]["samples"], stats["eval"]["samples"]) == (18, 2)
    decoded = {tokenizer.decode(s["input_ids"]) for s in train + evals}
    assert len(decoded) == 20  # every record once
    _, evals_given, stats = prepare(path, tokenizer, eval_data=write_jsonl(tmp_path / "e.jsonl", records[:4]))
    assert stats["train"]["records"] == 20 and len(evals_given) == 4


# ----------------------------------------------------------------------------- ChatML fallback


def test_chatml_fallback_sets_template_and_adds_tokens(tmp_path):
    tok = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320, chat_template=False, chatml_tokens=False)
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, CHAT])
    train, _, stats = prepare(path, tok, eval_split=0)
    assert stats["notices"][0] == "the tokenizer has no chat template; using ChatML"
    assert "added <|im_start|> <|im_end|>" in stats["notices"][1]
    assert stats["new_token_ids"] == [320, 321] and len(tok) == 322
    assert tok.chat_template == CHATML_TEMPLATE
    assert target_runs(train[0], tok) == [f"Paris.<|im_end|>{EOS}", f"Rome.<|im_end|>{EOS}"]
    assert train[0]["input_ids"].count(321) == 5  # one <|im_end|> token per message
    assert ensure_chat_template(tok) == ([], [])  # second call: nothing left to do


def test_chatml_fallback_keeps_existing_tokens_and_force_replaces_a_template(tokenizer):
    tok = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320, chat_template=False)
    assert ensure_chat_template(tok) == (["the tokenizer has no chat template; using ChatML"], [])
    tok.chat_template = "{{ messages[0]['content'] }}"
    notices, new_ids = ensure_chat_template(tok, force_chatml=True)
    assert notices == ["using ChatML instead of the tokenizer's chat template"] and new_ids == []
    assert tok.chat_template == CHATML_TEMPLATE
    assert ensure_chat_template(tokenizer) == ([], [])  # has a template: untouched


# ----------------------------------------------------------------------------- batching


def samples_of_lengths(lengths):
    return [{"input_ids": [5] * n, "labels": [IGNORE] + [5] * (n - 1)} for n in lengths]


def test_batches_are_deterministic_per_epoch_and_cover_every_sample():
    samples = samples_of_lengths(torch.randint(2, 200, (1000,), generator=torch.Generator().manual_seed(0)).tolist())
    for group in (True, False):
        epoch0 = batches(samples, 8, seed=1, epoch=0, group_by_length=group)
        assert epoch0 == batches(samples, 8, seed=1, epoch=0, group_by_length=group)
        assert epoch0 != batches(samples, 8, seed=1, epoch=1, group_by_length=group)
        assert sorted(i for b in epoch0 for i in b) == list(range(1000))
        assert [len(b) for b in epoch0].count(8) == 125

    def padding(order):
        return sum(len(b) * max(len(samples[i]["input_ids"]) for i in b) for b in order)

    grouped = batches(samples, 8, seed=1, epoch=0)
    assert padding(grouped) < 0.6 * padding(batches(samples, 8, seed=1, epoch=0, group_by_length=False))
    assert max(len(s["input_ids"]) for s in samples) in [len(samples[i]["input_ids"]) for i in grouped[0]]


def test_collate_pads_right_with_masked_labels():
    batch = collate(samples_of_lengths([3, 1]), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 5, 5], [5, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 5], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pack_restarts_positions_and_masks_each_first_label():
    samples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
               {"input_ids": [6, 7, 8], "labels": [IGNORE, 7, 8]}]
    rows = pack(samples, max_len=5)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8], "labels": [IGNORE, 7, 8], "position_ids": [0, 1, 2]},
    ]
    batch = collate_packed(rows, pad_id=0)
    assert batch["input_ids"].tolist()[1] == [6, 7, 8, 0, 0]
    assert batch["labels"].tolist()[1] == [IGNORE, 7, 8, IGNORE, IGNORE]
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 0, 1]  # padding is a block of its own
    assert "attention_mask" not in batch


# ----------------------------------------------------------------------------- packing == no packing


def summed_losses(logits, labels):
    """Per-position summed cross-entropy of the shifted labels (0 where the label is -100)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=IGNORE)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_losses(tokenizer, attn):
    records = [(CHAT, "chat"), (SHAREGPT, "chat"), (ALPACA, "alpaca"), (ALPACA_NO_INPUT, "alpaca"),
               (PROMPT_RESPONSE, "prompt-response"), (TEXT, "text")]
    samples = [encode(r, tokenizer, fmt, max_len=512)[0] for r, fmt in records]
    model = tiny_model("llama", len(tokenizer), attn_implementation=attn).eval()
    with torch.no_grad():
        # Reference: each sample alone, and the same samples in one padded batch.
        alone = [summed_losses(model(input_ids=torch.tensor([s["input_ids"]])).logits,
                               torch.tensor([s["labels"]])).sum() for s in samples]
        padded = collate(samples, pad_id=tokenizer.pad_token_id)
        per_row = summed_losses(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                                padded["labels"]).sum(1)
        rows = pack(samples, max_len=256)
        assert len(rows) < len(samples) and any(len(set(r["position_ids"])) < len(r["position_ids"]) for r in rows)
        batch = collate_packed(rows, pad_id=tokenizer.pad_token_id)
        per_token = summed_losses(model(**batch, use_cache=False).logits, batch["labels"])
        # With the default use_cache=True transformers skips the packed-sequence mask: samples leak.
        leaky = summed_losses(model(**batch).logits, batch["labels"])
    packed = []
    for row, losses in zip(rows, per_token):
        starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        # position j's loss scores label j + 1, so sample [a, b) owns losses [a - 1, b - 1).
        packed += [losses[max(a - 1, 0) : b - 1].sum() for a, b in zip(starts, starts[1:])]
    # fp32, but different shapes and masks change the summation order inside the matmuls and
    # the softmax: agreement to ~1e-6 relative is the floor, 1e-5 leaves room for that.
    torch.testing.assert_close(torch.stack(packed), torch.stack(alone), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_row, torch.stack(alone), rtol=1e-5, atol=0)
    assert not torch.allclose(leaky, per_token, rtol=1e-3)
