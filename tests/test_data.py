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

from rawqlora.errors import BadInput
from rawqlora.tiny import tiny_model, train_tokenizer
from training.data import (
    CHATML_TEMPLATE,
    IGNORE,
    alpaca_prompt,
    batches,
    chat_prompt_ids,
    collate,
    collate_packed,
    detect_format,
    encode,
    ensure_chat_template,
    fitting_formats,
    load_records,
    pack,
    parse_columns,
    parse_roles,
    prepare,
)
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
OPENORCA = {"id": "niv.1", "system_prompt": "Be brief.", "question": "Add 2 and 3.", "response": "5"}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
# A messages column under other names (--columns, --roles), as in podcast transcripts.
LEX = {"id": 7, "conversation": [{"from": "Guest", "text": "What is the capital of France?"},
                                 {"from": "Lex", "text": "Paris."}]}
# Tutorials' prompt formats rendered into a text column: openassistant-guanaco (turns joined
# with nothing between them, as in timdettmers/openassistant-guanaco) and Llama 2's [INST].
GUANACO = {"text": "### Human: What is the capital of France?### Assistant: Paris."
                   "### Human: And of Italy?### Assistant: Rome."}
LLAMA2 = {"text": "<s>[INST] What is the capital of France? [/INST] Paris. </s>"}


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
        (
            OPENORCA, "prompt-response",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
            f"<|im_start|>assistant\n5<|im_end|>{EOS}\n",
            [f"5<|im_end|>{EOS}"],
        ),
        # text: every token is a target except BOS, which nothing predicts.
        (TEXT, "text", TEXT["text"] + EOS, [TEXT["text"] + EOS]),
    ],
    ids=["chat", "sharegpt", "alpaca", "alpaca-no-input", "prompt-response", "question-answer", "openorca", "text"],
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
    (tmp_path / "pretty.jsonl").write_text(json.dumps(records, indent=1))  # a JSON array, whatever the name says
    (tmp_path / "object.json").write_text(json.dumps({"version": "1.0", "data": records}, indent=1))  # field="data"
    pq.write_table(pa.Table.from_pylist(expected), tmp_path / "d.parquet")
    for name in ["d.jsonl", "array.json", "lines.json", "pretty.jsonl", "object.json", "d.parquet"]:
        loaded = load_records(str(tmp_path / name))
        assert [dict(r) for r in loaded] == expected, name  # keys the first record lacks survive
    (tmp_path / "d.csv").write_text('\ufeffinstruction,input,output\n"a\n\nb",,b\nc,d,e\n')  # BOM, multi-line cell
    assert list(load_records(str(tmp_path / "d.csv"))) == [
        {"instruction": "a\n\nb", "input": "", "output": "b"},
        {"instruction": "c", "input": "d", "output": "e"},
    ]


def test_json_object_with_the_records_under_a_field(tmp_path):
    """What load_dataset("json", field=...) reads: the records in a field of one object, found
    when it is the object's only list of objects, else named by `field` (--data-field)."""
    records = [{"text": "a"}, {"text": "b"}]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": records, "test": records[:1], "version": 2}, indent=2))
    with pytest.raises(BadInput, match=r"splits.json holds one object with several lists of records \(train, test\); "
                                       "pick one with --data-field$"):
        load_records(str(path))
    assert list(load_records(str(path), field="test")) == records[:1]
    with pytest.raises(BadInput, match=r"--data-field 'dev': .*splits.json has no such field "
                                       r"\(fields: train, test, version\)$"):
        load_records(str(path), field="dev")
    # An object with no list of records is one record; a chat's turns are a record's, not the file's.
    (tmp_path / "one.json").write_text(json.dumps(TEXT, indent=2))
    (tmp_path / "chat.json").write_text(json.dumps(CHAT, indent=2))
    assert list(load_records(str(tmp_path / "one.json"))) == [TEXT]
    assert list(load_records(str(tmp_path / "chat.json"))) == [CHAT]
    # --data-field where there is no object to take it from.
    write_jsonl(tmp_path / "d.jsonl", records * 2)
    (tmp_path / "d.csv").write_text("text\na\n")
    for name, what in [("d.jsonl", "holds JSON lines, not one object"), ("d.csv", "applies to JSON files, not to")]:
        with pytest.raises(BadInput, match=f"--data-field.*{what}"):
            load_records(str(tmp_path / name), field="data")


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
        # A pretty-printed document gets its own error, not the JSON-lines one.
        ("pretty.json", '{\n  "data": [\n    {"text": "a"},\n  ]\n}',
         r"pretty.json line 4: malformed JSON \(Expecting value\); fix the file$"),
        ("number.json", "3", "number.json holds a JSON int; it needs a list of records"),
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
    assert detect_format(["id", "system_prompt", "question", "response"]) == "prompt-response"  # OpenOrca
    assert detect_format(["text", "id"]) == "text"
    assert fitting_formats(["messages", "prompt", "response", "text"]) == ["chat", "prompt-response", "text"]
    with pytest.raises(BadInput, match=r"columns \['body', 'title'\].*expected messages.*--columns maps other names$"):
        detect_format(["title", "body"])


def test_columns_that_fit_two_formats_say_which_won_and_how_to_pick_the_other(tmp_path, tokenizer):
    """An Alpaca CSV that also has a text column trains as alpaca (loss on the output only),
    with a line that says so and names --format text, which trains on the text as TRL would."""
    path = tmp_path / "alpaca.csv"
    path.write_text("instruction,input,output,text\n"
                    'Translate to French.,good morning,bonjour,"Q: good morning A: bonjour"\n')
    train, _, stats = prepare(str(path), tokenizer, eval_split=0)
    assert stats["format"] == "alpaca"
    assert stats["notices"] == [
        "the columns input, instruction, output, text fit alpaca and text; training as alpaca (Alpaca's prompt, "
        "loss on the output): structured formats come first; --format text: the text as written, loss on all "
        "of it, as TRL's dataset_text_field"
    ]
    assert target_runs(train[0], tokenizer) == [f"bonjour{EOS}"]
    train, _, stats = prepare(str(path), tokenizer, fmt="text", eval_split=0)
    assert stats["format"] == "text" and stats["notices"] == []
    assert target_runs(train[0], tokenizer) == [f"Q: good morning A: bonjour{EOS}"]


# ----------------------------------------------------------------------------- other names: --columns, --roles


def test_columns_and_roles_map_other_names(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [LEX])
    train, _, stats = prepare(path, tokenizer, eval_split=0, columns="messages=conversation, role=from, content=text",
                              roles="user=Guest,assistant=Lex")
    assert stats["format"] == "chat"
    assert tokenizer.decode(train[0]["input_ids"]) == (
        "<s><|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        f"<|im_start|>assistant\nParis.<|im_end|>{EOS}\n"
    )
    assert target_runs(train[0], tokenizer) == [f"Paris.<|im_end|>{EOS}"]
    assert parse_columns("messages=conversation,role=from,content=text") == (
        {"conversation": "messages"}, {"role": ("from",), "content": ("text",)})
    assert parse_roles("user=Guest,user=Caller") == {
        "system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
        "Guest": "user", "Caller": "user"}
    # Top-level names of any format; ours gives way to the column mapped onto it.
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "The quick brown fox.", "text": "unused"}])
    train, _, stats = prepare(path, tokenizer, eval_split=0, columns="text=body")
    assert stats["format"] == "text" and tokenizer.decode(train[0]["input_ids"]) == f"<s>The quick brown fox.{EOS}"


@pytest.mark.parametrize(
    "columns, roles, message",
    [
        ("messages", "", r"^--columns 'messages': 'messages' is not OURS=THEIRS; e.g. --columns messages=conv"),
        ("messages=", "", "'messages=' is not OURS=THEIRS"),
        ("conversation=messages", "", r"'conversation' is none of our names \(messages, .*\); write OURS=THEIRS"),
        ("messages=conversation,messages=turns", "", "'messages' is mapped twice"),
        ("messages=dialogue", "", r"^--columns: .*d.jsonl has no column 'dialogue' \(its columns: id, conversation\)"),
        ("", "Guest=user", r"^--roles 'Guest=user': 'Guest' is not one of our roles \(system, user, assistant\); "
                           "write OURS=THEIRS, e.g. user=Guest$"),
        ("messages=conversation,role=from,content=text", "user=Guest",
         r"record 0 \(0-based\): messages\[1\] has role 'Lex'; .*map yours with --roles"),
        ("messages=conversation,role=from", "user=Guest,assistant=Lex",
         r"messages\[0\] has content None; every message needs a string content/value$"),
    ],
)
def test_bad_columns_and_roles_are_one_line(tmp_path, tokenizer, columns, roles, message):
    with pytest.raises(BadInput, match=message):
        prepare(write_jsonl(tmp_path / "d.jsonl", [LEX]), tokenizer, eval_split=0, columns=columns, roles=roles)


# ----------------------------------------------------------------------------- tutorials' prompt formats as text


@pytest.mark.parametrize("record", [GUANACO, LLAMA2], ids=["guanaco", "llama2-inst"])
def test_tutorial_prompt_formats_train_as_text(tokenizer, record):
    """Loss on every token; a text that writes its own <s> and </s> gets no second one."""
    sample, _ = encode(record, tokenizer, "text", max_len=512)
    ids = sample["input_ids"]
    expected = record["text"] if record is LLAMA2 else f"<s>{record['text']}{EOS}"
    assert tokenizer.decode(ids) == expected
    assert ids.count(tokenizer.bos_token_id) == ids.count(tokenizer.eos_token_id) == 1
    assert sample["labels"] == [IGNORE] + ids[1:]


@pytest.mark.parametrize(
    "record, response_marker, prompt_marker, targets",
    [
        (GUANACO, "### Assistant:", "### Human:", [" Paris.", f" Rome.{EOS}"]),
        (LLAMA2, "[/INST]", "[INST]", [f" Paris. {EOS}"]),
        # No prompt marker: everything after the first response marker (TRL without an instruction template).
        (GUANACO, "### Assistant:", "", [f" Paris.### Human: And of Italy?### Assistant: Rome.{EOS}"]),
    ],
    ids=["guanaco", "llama2-inst", "response-marker-only"],
)
def test_response_markers_put_the_loss_on_the_responses(tmp_path, tokenizer, record, response_marker, prompt_marker,
                                                        targets):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    train, _, _ = prepare(path, tokenizer, eval_split=0, response_marker=response_marker, prompt_marker=prompt_marker)
    assert target_runs(train[0], tokenizer) == targets


@pytest.mark.parametrize(
    "record, markers, message",
    [
        (ALPACA, {"response_marker": "### Response:"}, "--response-marker applies to text data; alpaca data says"),
        (GUANACO, {"prompt_marker": "### Human:"}, r"--prompt-marker needs --response-marker"),
    ],
)
def test_response_markers_where_they_do_not_apply_are_refused(tmp_path, tokenizer, record, markers, message):
    with pytest.raises(BadInput, match=message):
        prepare(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer, eval_split=0, **markers)


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


CHATML_TEXT = {"text": chatml(("user", "What is the capital of France?"), ("assistant", "Paris."))}


def test_text_that_holds_chatml_gets_its_tokens_and_template(tmp_path):
    """OpenAssistant converted to ChatML, in a text column, on a base without ChatML: the markers
    become single tokens (rows the model must add and train), the template ChatML."""
    tok = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320, chat_template=False, chatml_tokens=False)
    train, _, stats = prepare(write_jsonl(tmp_path / "d.jsonl", [CHATML_TEXT, TEXT]), tok, eval_split=0)
    assert stats["format"] == "text"
    assert stats["notices"] == [
        "the text holds ChatML (<|im_start|>/<|im_end|>): they become single tokens, "
        "and generation stops at <|im_end|>",
        "the tokenizer has no chat template; using ChatML",
        "added <|im_start|> <|im_end|> to the vocabulary as special tokens (ids [320, 321])",
    ]
    assert stats["new_token_ids"] == [320, 321] and len(tok) == 322 and tok.chat_template == CHATML_TEMPLATE
    ids = train[0]["input_ids"]
    assert (ids.count(320), ids.count(321)) == (2, 2)  # one token per marker
    assert tok.decode(ids) == "<s>" + CHATML_TEXT["text"] + EOS
    assert train[0]["labels"] == [IGNORE] + ids[1:]  # text: loss on all of it


def test_chatml_text_keeps_another_template_unless_forced(tmp_path):
    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = write_jsonl(tmp_path / "d.jsonl", [CHATML_TEXT])
    for force, template, last_notice in [
        (False, other, "the tokenizer's chat template is not ChatML, so chat prompts will not look like this text; "
                       "--add-chatml-tokens makes ChatML the template"),
        (True, CHATML_TEMPLATE, "added <|im_start|> <|im_end|> to the vocabulary as special tokens (ids [320, 321])"),
    ]:
        tok = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320, chat_template=False, chatml_tokens=False)
        tok.chat_template = other
        _, _, stats = prepare(path, tok, eval_split=0, force_chatml=force)
        assert stats["new_token_ids"] == [320, 321] and tok.chat_template == template
        assert stats["notices"][-1] == last_notice


@pytest.mark.parametrize(
    "record, message",
    [(TEXT, r"this text data \(its text holds no <\|im_start\|>/<\|im_end\|>\); drop it$"),
     (ALPACA, r"this alpaca data \(Alpaca's prompt uses no chat template\); drop it$")],
    ids=["text", "alpaca"],
)
def test_force_chatml_is_refused_where_it_would_change_nothing(tmp_path, tokenizer, record, message):
    with pytest.raises(BadInput, match="^--add-chatml-tokens does nothing for " + message):
        prepare(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer, eval_split=0, force_chatml=True)


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


def test_chat_prompt_ids_is_how_training_renders_the_prompt(tokenizer):
    """generate.py and the held-out questions prompt the model with what training fed it before each
    answer: the same ids, BOS first even though this ChatML template does not write one."""
    user = {"role": "user", "content": "What is the capital of France?"}
    sample, _ = encode({"messages": [user, {"role": "assistant", "content": "Paris."}]}, tokenizer, "chat", 256)
    prompt = chat_prompt_ids(tokenizer, [user])
    assert prompt[0] == tokenizer.bos_token_id and "bos_token" not in tokenizer.chat_template
    assert sample["input_ids"][: len(prompt)] == prompt
    assert all(label == IGNORE for label in sample["labels"][: len(prompt)])
    assert sample["labels"][len(prompt)] != IGNORE  # the answer starts right after
