"""The SFT data pipeline: files -> records -> token ids with loss labels -> batches.

    load_records(spec)          a local .json/.jsonl/.csv/.parquet/.txt file, or a Hub dataset name
    parse_columns, parse_roles  the data's own names (--columns, --roles) -> ours
    detect_format(columns)      "chat" | "alpaca" | "prompt-response" | "text"
    prepare_tokenizer(tok, ...) the chat template and tokens a format needs: ChatML when the
                                tokenizer has no template, ChatML's tokens when text holds ChatML
    encode(record, ...)         one record -> input_ids, labels (-100 where there is no loss)
    prepare(spec, ...)          all of the above for a train and an eval split, with counts
    batches, collate            deterministic length-grouped batches, right padding
    pack, collate_packed        several samples per row, kept apart by restarting position_ids

Labels follow transformers: labels[i] is the target *at* position i and the model shifts
them, so logits[i] is scored against labels[i + 1]. labels[0] is therefore never a target,
and encode() sets it to -100 so that token counts are honest and packing is safe (see pack).

What gets a loss: the responses only (every assistant turn of a chat, alpaca's output,
the response of prompt-response), each followed by EOS as a target so the model learns to
stop; all tokens for text, or its responses when a --response-marker says where they start.
`train_on_prompt=True` puts the loss on everything instead.
"""

import csv
import dataclasses
import io
import json
import os
import random
import re

import datasets
import jinja2
import pyarrow.parquet as pq
import torch

from rawqlora.errors import BadInput
from training.loss import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # the label that gets no loss (training/loss.py skips it)
FORMATS = ("chat", "alpaca", "prompt-response", "text")
EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".txt")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML, the template most chat models use; rendered by the tokenizer's Jinja engine.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Roles as written in the data -> roles the chat template knows (ShareGPT says human/gpt);
# --roles adds more (parse_roles).
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
# Where each part of a record may sit, first match wins. A chat turn's keys: role/content, or
# ShareGPT's from/value (--columns role=...,content=... names others).
CHAT_COLUMNS = ("messages", "conversations")
PROMPT_COLUMNS = ("prompt", "question")
RESPONSE_COLUMNS = ("response", "answer")
TURN_KEYS = {"role": ("role", "from"), "content": ("content", "value")}
# Our column names, the ones --columns can map the data's onto.
COLUMNS = ("messages", "instruction", "input", "output", "prompt", "response", "system_prompt", "text")
# What each format trains on, for the line that says which one was picked.
TRAINS_ON = {"chat": "loss on the assistant turns", "alpaca": "Alpaca's prompt, loss on the output",
             "prompt-response": "the chat template, loss on the response",
             "text": "the text as written, loss on all of it, as TRL's dataset_text_field"}

# Stanford Alpaca's prompts, verbatim, so alpaca-style checkpoints keep working.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# ----------------------------------------------------------------------------- loading


def load_records(spec, split="train", field=None):
    """Records from a local file (by extension) or, when `spec` is no local path, from the Hub.

    .json/.jsonl: read as one JSON document when the file is one: an array of objects, or one
    object holding the records under a field (what load_dataset("json", field=...) reads;
    `field` names it, else the object's only field that holds a list of objects); otherwise
    JSON lines, one object a line (blank lines skipped). .csv: a header row, every cell a
    string. .parquet: one record a row. .txt: one {"text": ...} record per paragraph (blocks
    separated by blank lines), so that multi-line documents such as code or poems stay whole.
    `split` is used for Hub datasets only, `field` for local JSON only.
    """
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return _load_file(path, field)
    if os.path.exists(path):
        raise BadInput(f"{spec} is a directory; give a data file ({', '.join(EXTENSIONS)})")
    if path.endswith(EXTENSIONS) or spec.startswith(("/", ".", "~")):
        raise BadInput(f"data file {spec} does not exist; check the path")
    if field:
        raise BadInput(f"--data-field applies to local JSON files, not to the Hub dataset {spec!r}; drop it")
    try:
        records = datasets.load_dataset(spec, split=split)
    except (OSError, ValueError) as e:  # not on the Hub, offline, no such split
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"{spec!r} is no local file and could not be loaded from the Hub ({reason}); "
            "check the path, the dataset name or the split"
        ) from e
    if len(records) == 0:
        raise BadInput(f"Hub dataset {spec!r} split {split!r} has no records; pick another split")
    return records


def _load_file(path, field=None):
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise BadInput(f"{path}: unsupported file type {ext or '(none)'}; use one of {', '.join(EXTENSIONS)}")
    if field and ext not in (".json", ".jsonl"):
        raise BadInput(f"--data-field applies to JSON files, not to {path}; drop it")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path} is empty; it needs at least one record")
    if ext == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drop a BOM if present
                text = f.read()
        except UnicodeDecodeError as e:
            raise BadInput(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
        if ext == ".csv":
            rows = _csv_rows(path, text)
        elif ext == ".txt":
            rows = [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
        else:
            rows = _json_rows(path, text, ext, field)
    if not rows:
        raise BadInput(f"{path} is empty (no records); it needs at least one record")
    # Columns from every record, not just the first (from_list would drop keys the first
    # record lacks); fields of mixed types stay as they are, so that encode() can name the
    # record with the wrong type instead of pyarrow failing on the whole column.
    columns = {key: [row.get(key) for row in rows] for row in rows for key in row}
    return datasets.Dataset.from_dict(columns, on_mixed_types="use_json")


def _csv_rows(path, text):
    reader = csv.DictReader(io.StringIO(text))  # a file object, so quoted cells may span lines
    rows = []
    for row in reader:
        if None in row:  # DictReader's key for cells beyond the header
            raise BadInput(f"{path} line {reader.line_num}: more cells than the header has columns; quote cells that contain commas")
        rows.append(row)
    return rows


def _json_rows(path, text, ext, field):
    """A JSON file's records: the whole file as one JSON document when it parses as one, else
    JSON lines. A malformed file is reported line by line only when it looks like JSON lines
    (.jsonl, or a first line that is an object on its own); a broken pretty-printed document
    gets the document's error, not "line 1: ... each line must be one JSON object"."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if not (ext == ".jsonl" or _first_line_is_an_object(text)):
            raise BadInput(f"{path} line {e.lineno}: malformed JSON ({e.msg}); fix the file") from e
        if field:
            raise BadInput(f"--data-field {field!r}: {path} holds JSON lines, not one object with fields; drop it")
        return _json_lines(path, text)
    if isinstance(document, dict):
        document = _records_in_object(path, document, ext, field)
    elif field:
        raise BadInput(f"--data-field {field!r}: {path} holds a JSON {type(document).__name__}, "
                       "not one object with fields; drop it")
    if not isinstance(document, list):
        raise BadInput(f"{path} holds a JSON {type(document).__name__}; it needs a list of records (JSON objects)")
    for i, row in enumerate(document):
        if not isinstance(row, dict):
            raise BadInput(f"{path}: item {i} has type {type(row).__name__}; every record must be a JSON object")
    return document


def _first_line_is_an_object(text):
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _records_in_object(path, document, ext, field):
    """The records of a file that holds one JSON object: those under `field`, or under its only
    field that holds a list of objects (SQuAD-style {"version": ..., "data": [...]}). An object
    without such a field is one record, and so is any object in a .jsonl file. A list of chat
    turns (messages, conversations) belongs to a record, so it never counts as the records."""
    if field:
        if field not in document:
            raise BadInput(f"--data-field {field!r}: {path} has no such field (fields: {', '.join(document)})")
        return document[field]
    lists = [key for key, value in document.items() if key not in CHAT_COLUMNS and _is_records(value)]
    if ext == ".jsonl" or not lists:
        return [document]
    if len(lists) > 1:
        raise BadInput(f"{path} holds one object with several lists of records ({', '.join(lists)}); "
                       "pick one with --data-field")
    return document[lists[0]]


def _is_records(value):
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _json_lines(path, text):
    # Parsed here, line by line, because datasets' JSON loader reports a bad line without its
    # number. Split on "\n" only: str.splitlines() would also split on U+2028 and friends,
    # which JSON allows unescaped inside strings.
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} line {number}: malformed JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise BadInput(f"{path} line {number}: a JSON {type(row).__name__}, not an object; each line must be one record")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- other names: --columns, --roles


@dataclasses.dataclass(frozen=True)
class Schema:
    """How records name their parts where they differ from ours; the defaults read ours."""

    roles: dict = dataclasses.field(default_factory=lambda: dict(ROLES))  # the data's role names -> ours (--roles)
    turn_keys: dict = dataclasses.field(default_factory=lambda: dict(TURN_KEYS))  # a chat turn's keys (--columns)
    response_marker: str = ""  # text data: each response starts after this (--response-marker)
    prompt_marker: str = ""  # text data: ... and ends where this starts (--prompt-marker)


def _pairs(text, flag, example):
    """'a=b, c=d' -> [("a", "b"), ("c", "d")]; anything else is a one-line BadInput."""
    pairs = []
    for item in text.split(","):
        ours, eq, theirs = (part.strip() for part in item.partition("="))
        if not (eq and ours and theirs):
            raise BadInput(f"{flag} {text!r}: {item.strip()!r} is not OURS=THEIRS; e.g. {flag} {example}")
        pairs.append((ours, theirs))
    return pairs


def parse_columns(text):
    """--columns 'messages=conversation,role=from,content=text' -> (renames, turn_keys).

    OURS=THEIRS pairs, as LLaMA-Factory's dataset_info "columns" and axolotl's
    field_messages/message_property_mappings write them. Our column names (COLUMNS) become
    renames {theirs: ours} of the data's columns; role/content name the keys inside each
    chat turn, and replace the defaults (role or from, content or value).
    """
    renames, turn_keys = {}, dict(TURN_KEYS)
    seen = set()
    for ours, theirs in _pairs(text, "--columns", "messages=conversation,role=from,content=text"):
        if ours in seen:
            raise BadInput(f"--columns {text!r}: {ours!r} is mapped twice; map each of our names once")
        seen.add(ours)
        if ours in TURN_KEYS:
            turn_keys[ours] = (theirs,)
        elif ours in COLUMNS:
            renames[theirs] = ours
        else:
            ours_all = ", ".join(COLUMNS + tuple(TURN_KEYS))
            raise BadInput(f"--columns {text!r}: {ours!r} is none of our names ({ours_all}); "
                           "write OURS=THEIRS, e.g. messages=conversation")
    return renames, turn_keys


def parse_roles(text):
    """--roles 'user=Guest,assistant=Lex' -> ROLES plus {their role: ours}, OURS=THEIRS as in
    parse_columns; one role of ours may take several of theirs (user=Guest,user=Caller)."""
    roles = dict(ROLES)
    for ours, theirs in _pairs(text, "--roles", "user=Guest,assistant=Lex"):
        if ours not in ("system", "user", "assistant"):
            raise BadInput(f"--roles {text!r}: {ours!r} is not one of our roles (system, user, assistant); "
                           "write OURS=THEIRS, e.g. user=Guest")
        roles[theirs] = ours
    return roles


def rename_columns(records, renames, name):
    """The data's columns under our names: parse_columns' renames {theirs: ours} applied."""
    if not renames:
        return records
    missing = [theirs for theirs in renames if theirs not in records.column_names]
    if missing:
        raise BadInput(f"--columns: {name} has no column {missing[0]!r} (its columns: "
                       f"{', '.join(records.column_names)}); write OURS=THEIRS, e.g. messages=conversation")
    # A column already under our name gives way: `text=body` says "train on body", whatever
    # `text` holds (datasets would refuse the rename).
    shadowed = [ours for ours in renames.values() if ours in records.column_names and ours not in renames]
    return records.remove_columns(shadowed).rename_columns(renames)


# ----------------------------------------------------------------------------- formats


def fitting_formats(columns):
    """Every format the column names fit, in the order auto-detection prefers them.

    Structured formats come before `text`. Where a dataset has both, its `text` is usually
    a rendering of the same fields (tatsu-lab/alpaca's is Alpaca's prompt + output), and the
    fields say where the prompt ends, so the loss can fall on the response alone, as TRL's
    SFTTrainer does by default when it is given a prompt/completion split
    (completion_only_loss=None). Told dataset_text_field="text", SFTTrainer trains on the
    text, prompt included: `--format text` does that here, and prepare() says so.
    """
    cols = set(columns)
    fits = []
    if cols & set(CHAT_COLUMNS):
        fits.append("chat")
    if {"instruction", "output"} <= cols:
        fits.append("alpaca")
    if cols & set(PROMPT_COLUMNS) and cols & set(RESPONSE_COLUMNS):  # OpenOrca: question + response
        fits.append("prompt-response")
    if "text" in cols:
        fits.append("text")
    return fits


def detect_format(columns):
    """The format the column names say: the first of fitting_formats()."""
    fits = fitting_formats(columns)
    if not fits:
        raise BadInput(
            f"can't tell the data format from the columns {sorted(columns)}; expected messages or "
            "conversations (chat), instruction+output[+input] (alpaca), prompt or question + response "
            "or answer [+system_prompt] (prompt-response), or text (text); --columns maps other names"
        )
    return fits[0]


def format_notice(columns, fits):
    """The line that says which format several fitting ones won, why, and how to pick another."""
    others = "; ".join(f"--format {fmt}: {TRAINS_ON[fmt]}" for fmt in fits[1:])
    return (f"the columns {', '.join(sorted(columns))} fit {' and '.join(fits)}; training as {fits[0]} "
            f"({TRAINS_ON[fits[0]]}): structured formats come first; {others}")


def alpaca_prompt(instruction, input=""):
    """Alpaca's prompt, up to and including "### Response:\\n"; generation starts after it."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def text_segments(text, response_marker="", prompt_marker=""):
    """(piece, is_target) pieces of a text: all of it, or only its responses when a response
    marker says where they start: each runs from after the marker to the next prompt marker,
    or to the end (the masking of TRL's DataCollatorForCompletionOnlyLM with its response and
    instruction templates). Guanaco: "### Assistant:" and "### Human:"; Llama 2: "[/INST]" and
    "[INST]". Markers stay outside the responses: they are the prompt's way of asking.
    """
    if not response_marker:
        return [(text, True)]
    segments, at = [], 0
    while (start := text.find(response_marker, at)) != -1:
        start += len(response_marker)
        end = text.find(prompt_marker, start) if prompt_marker else -1
        end = len(text) if end == -1 else end
        segments += [(text[at:start], False), (text[start:end], True)]
        at = end
    return segments + [(text[at:], False)]


def _field(record, name, required=True):
    value = record.get(name)
    if value is None:
        if required:
            raise BadInput(f"field {name!r} is missing")
        return ""
    if not isinstance(value, str):
        raise BadInput(f"field {name!r} has type {type(value).__name__}, expected a string")
    return value


def _given(record, names):
    """The first of `names` the record has a value for (else the first, for the error)."""
    return next((name for name in names if record.get(name) is not None), names[0])


def to_messages(record, fmt, schema=Schema()):
    """A chat or prompt-response record as [{"role", "content"}, ...] with roles system/user/assistant.

    prompt-response is a one-turn chat ([system_prompt,] prompt, response) rendered with the
    tokenizer's chat template, so the model is trained in the format it is prompted with.
    A chat turn's role and content sit under the first of schema.turn_keys["role"] /
    ["content"] it has; schema.roles maps the data's role names to ours.
    """
    if fmt == "prompt-response":
        system = _field(record, "system_prompt", required=False)
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [
            {"role": "user", "content": _field(record, _given(record, PROMPT_COLUMNS))},
            {"role": "assistant", "content": _field(record, _given(record, RESPONSE_COLUMNS))},
        ]
    key = _given(record, CHAT_COLUMNS)
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadInput(f"field {key!r} must be a non-empty list of messages")
    turn_keys, roles = schema.turn_keys, schema.roles
    role_keys, content_keys = "/".join(turn_keys["role"]), "/".join(turn_keys["content"])
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadInput(f"{key}[{j}] has type {type(turn).__name__}; "
                           f"expected an object with {role_keys} and {content_keys}")
        # Both spellings may sit in one column (datasets merges the struct fields, None where absent).
        role = turn.get(_given(turn, turn_keys["role"]))
        content = turn.get(_given(turn, turn_keys["content"]))
        if not isinstance(role, str) or role not in roles:
            raise BadInput(f"{key}[{j}] has role {role!r}; use system/user/assistant (or ShareGPT's "
                           "system/human/gpt), or map yours with --roles (e.g. user=Guest,assistant=Lex)")
        if not isinstance(content, str):
            raise BadInput(f"{key}[{j}] has content {content!r}; every message needs a string {content_keys}")
        messages.append({"role": roles[role], "content": content})
    return messages


# ----------------------------------------------------------------------------- chat template


def ensure_chat_template(tokenizer, force_chatml=False):
    """Make `tokenizer` able to render chats; returns (notices, new_token_ids). Mutates `tokenizer`.

    Without a chat template (or with `force_chatml`, e.g. for a base model whose template
    belongs to its instruct sibling) the template becomes ChatML and its tokens are added
    (add_chatml_tokens). `new_token_ids` are rows the model does not have yet: the caller must
    resize the embeddings (and train or mean-initialise those rows). `notices` are lines to print.
    """
    if tokenizer.chat_template is not None and not force_chatml:
        return [], []
    had_template = tokenizer.chat_template is not None
    tokenizer.chat_template = CHATML_TEMPLATE
    notices = ["using ChatML instead of the tokenizer's chat template" if had_template
               else "the tokenizer has no chat template; using ChatML"]
    added, new_ids = add_chatml_tokens(tokenizer)
    return notices + added, new_ids


def add_chatml_tokens(tokenizer):
    """<|im_start|>/<|im_end|> as special tokens, those the vocabulary lacks as one token ->
    (notices, new_token_ids). One token each, so that the model learns a turn's end as one
    prediction and generate.py, which stops at <|im_end|> when the vocabulary has it, can."""
    missing = [t for t in CHATML_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if not missing:
        return [], []
    tokenizer.add_tokens(missing, special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(missing)
    return [f"added {' '.join(missing)} to the vocabulary as special tokens (ids {new_ids})"], new_ids


def holds_chatml(texts):
    """Whether any of `texts` has ChatML already rendered in it (<|im_start|> or <|im_end|>)."""
    return any(isinstance(t, str) and (CHATML_TOKENS[0] in t or CHATML_TOKENS[1] in t) for t in texts)


def ensure_chatml_text(tokenizer, force_chatml=False):
    """For text data that holds ChatML (e.g. OpenAssistant converted to ChatML) -> (notices,
    new_token_ids). Mutates `tokenizer`: its markers become single tokens, as for chat data,
    and ChatML becomes the chat template when there is none (or with `force_chatml`), so that
    the saved tokenizer prompts the model as it was trained. A template of another kind is
    kept, with a notice: the text trains the same either way, only prompting would differ.
    """
    notices = ["the text holds ChatML (<|im_start|>/<|im_end|>): they become single tokens, "
               "and generation stops at <|im_end|>"]
    if tokenizer.chat_template is None or force_chatml:
        more, new_ids = ensure_chat_template(tokenizer, force_chatml)
        return notices + more, new_ids
    more, new_ids = add_chatml_tokens(tokenizer)
    if CHATML_TOKENS[0] not in tokenizer.chat_template:
        more.append("the tokenizer's chat template is not ChatML, so chat prompts will not look like "
                    "this text; --add-chatml-tokens makes ChatML the template")
    return notices + more, new_ids


def _render(tokenizer, messages, add_generation_prompt=False):
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as e:  # templates reject e.g. non-alternating roles this way
        raise BadInput(f"the chat template rejected this conversation ({e})") from e


def _chat_segments(messages, tokenizer):
    """(text, is_target) pieces of a rendered chat: each assistant turn is a target.

    An assistant turn's text is found by rendering prefixes: render(messages[:i]) with the
    generation prompt ends where turn i's content starts, render(messages[:i+1]) ends after
    the turn. That assumes a prefix-stable template (rendering more messages only appends
    text); templates that rewrite earlier turns (e.g. dropping old reasoning) are refused.
    """
    if messages[0]["role"] == "assistant":
        raise BadInput("the conversation starts with an assistant turn; start with a system or user message")
    unstable = BadInput(
        "the chat template is not prefix-stable (rendering a longer conversation changes the "
        "earlier text), so assistant turns can't be located; use force_chatml or another template"
    )
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1])
        if not (head.startswith(done) and full.startswith(head)):
            raise unstable
        turn = full[len(head):]
        # The turn's trailing whitespace (ChatML's "\n" after <|im_end|>) is glue between
        # turns: EOS goes right after the end-of-turn token and the glue gets no loss.
        end = len(turn.rstrip())
        segments += [(head[len(done):], False), (_with_eos(turn[:end], tokenizer), True), (turn[end:], False)]
        done = full
    rest = _render(tokenizer, messages)
    if not rest.startswith(done):
        raise unstable
    segments.append((rest[len(done):], False))
    return segments


def _with_eos(text, tokenizer):
    # Templates whose end-of-turn is EOS (e.g. Qwen2 instruct, <|im_end|>) already end with it.
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


# ----------------------------------------------------------------------------- encoding


def encode(record, tokenizer, fmt, max_len, train_on_prompt=False, schema=Schema()):
    """One record -> ({"input_ids": [...], "labels": [...]}, truncated: bool).

    labels[i] == input_ids[i] where there is loss, -100 elsewhere. BOS is prepended when the
    tokenizer has one and the text does not already start with it. The whole text is
    tokenized at once (as at inference) and each token is labelled by its character offsets:
    a token that overlaps a response is a target. Truncation keeps the first `max_len` tokens.
    `schema` says where the parts are when the data does not use our names (Schema).
    """
    if tokenizer.eos_token is None:
        raise BadInput("the tokenizer has no EOS token; set tokenizer.eos_token so the model can learn to stop")
    if fmt == "text":
        text = _with_eos(_field(record, "text"), tokenizer)
        segments = text_segments(text, schema.response_marker, schema.prompt_marker)
    elif fmt == "alpaca":
        prompt = alpaca_prompt(_field(record, "instruction"), _field(record, "input", required=False))
        segments = [(prompt, False), (_with_eos(_field(record, "output"), tokenizer), True)]
    elif fmt in ("chat", "prompt-response"):
        segments = _chat_segments(to_messages(record, fmt, schema), tokenizer)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")  # prepare() checks users' input

    text = "".join(piece for piece, _ in segments)
    is_target = bytearray(len(text))  # per character
    at = 0
    for piece, target in segments:
        if target:
            is_target[at : at + len(piece)] = b"\x01" * len(piece)
        at += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if train_on_prompt or any(is_target[a:b]) else IGNORE for t, (a, b) in zip(ids, enc["offset_mapping"])]
    if with_bos(tokenizer, ids) is not ids:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    labels[0] = IGNORE  # nothing predicts the first token (see the module docstring)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}, len(ids) > max_len


def with_bos(tokenizer, ids):
    """`ids` with the tokenizer's BOS in front, where it has one and the text did not start with it:
    every training sample starts so, whether its chat template writes BOS or not."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def chat_prompt_ids(tokenizer, messages):
    """The ids a chat model is prompted with: `messages` through the chat template with the
    assistant's generation prompt, BOS first as in training (generate.py, held-out questions)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare(spec, tokenizer, fmt="auto", max_len=1024, train_on_prompt=False, eval_split=0.05, eval_data=None,
            seed=0, force_chatml=False, columns="", roles="", data_field="", response_marker="", prompt_marker=""):
    """Load, check and encode a dataset -> (train_samples, eval_samples, stats).

    The eval samples come from `eval_data` (a file or Hub name, same format) when given,
    else from a seeded random `eval_split` fraction of the records (at least one record when
    the fraction is > 0 and there are two or more). Samples with no target token left (e.g.
    the response was truncated away) are dropped and counted. The tokenizer gets what the
    format needs first (prepare_tokenizer): print stats["notices"], resize for
    stats["new_token_ids"].

    Data that does not use our names: `columns` ("messages=conversation,role=from,content=text",
    parse_columns), `roles` ("user=Guest,assistant=Lex", parse_roles), `data_field` (the field
    of a .json file's one object that holds the records, see load_records). Text data:
    `response_marker` / `prompt_marker` put the loss on the responses only (text_segments).

    stats = {"format", "notices", "new_token_ids",
             "train": {"records", "samples", "truncated", "dropped", "tokens", "target_tokens"},
             "eval": {same keys}}
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise BadInput(f"unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if max_len < 2:
        raise BadInput(f"max_len={max_len} leaves no room for a target token; use at least 2")
    if not 0 <= eval_split < 1:
        raise BadInput(f"eval_split={eval_split} must be a fraction in [0, 1)")
    if prompt_marker and not response_marker:
        raise BadInput("--prompt-marker needs --response-marker (where each response starts)")
    renames, turn_keys = parse_columns(columns) if columns else ({}, TURN_KEYS)
    schema = Schema(parse_roles(roles) if roles else ROLES, turn_keys, response_marker, prompt_marker)

    def load(name):
        return rename_columns(load_records(name, field=data_field or None), renames, name)

    records = load(spec)
    auto = fmt == "auto"
    notices = []
    if auto:
        fmt = detect_format(records.column_names)
        fits = fitting_formats(records.column_names)
        if len(fits) > 1:
            notices.append(format_notice(records.column_names, fits))
    if response_marker and fmt != "text":
        raise BadInput(f"--response-marker applies to text data; {fmt} data says where its responses are itself")
    if eval_data is not None:
        eval_records = load(eval_data)
        eval_fmt = detect_format(eval_records.column_names) if auto else fmt
        if eval_fmt != fmt:
            raise BadInput(f"eval data {eval_data} is {eval_fmt} but the training data is {fmt}; use one format")
        train_idx, eval_idx = range(len(records)), range(len(eval_records))
    else:
        eval_records = records
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = min(max(1, round(len(order) * eval_split)), len(order) - 1) if eval_split > 0 else 0
        if eval_split > 0 and n_eval == 0:
            notices.append("only one record: no eval split")
        train_idx, eval_idx = sorted(order[n_eval:]), sorted(order[:n_eval])

    tokenizer_notices, new_ids = prepare_tokenizer(tokenizer, fmt, force_chatml, records, eval_records)
    notices += tokenizer_notices
    args = (tokenizer, fmt, max_len, train_on_prompt, schema)
    train, train_stats = _encode_all(spec, records, train_idx, *args)
    evals, eval_stats = _encode_all(eval_data or spec, eval_records, eval_idx, *args)
    stats = {"format": fmt, "notices": notices, "new_token_ids": new_ids, "train": train_stats, "eval": eval_stats}
    return train, evals, stats


def prepare_tokenizer(tokenizer, fmt, force_chatml, *record_sets):
    """The chat template and tokens `fmt` needs -> (notices, new_token_ids); mutates `tokenizer`.

    Chat-like formats render with a chat template (ensure_chat_template); text that holds
    ChatML gets its markers as tokens (ensure_chatml_text). `force_chatml` anywhere else
    would change nothing the model sees, so it is refused rather than ignored.
    """
    if fmt in ("chat", "prompt-response"):
        return ensure_chat_template(tokenizer, force_chatml)
    if fmt == "text" and any("text" in r.column_names and holds_chatml(r["text"]) for r in record_sets):
        return ensure_chatml_text(tokenizer, force_chatml)
    if force_chatml:
        why = "its text holds no <|im_start|>/<|im_end|>" if fmt == "text" else "Alpaca's prompt uses no chat template"
        raise BadInput(f"--add-chatml-tokens does nothing for this {fmt} data ({why}); drop it")
    return [], []


def _encode_all(name, records, indices, tokenizer, fmt, max_len, train_on_prompt, schema):
    samples = []
    counts = dict(records=len(indices), samples=0, truncated=0, dropped=0, tokens=0, target_tokens=0)
    for i in indices:
        try:
            sample, truncated = encode(records[i], tokenizer, fmt, max_len, train_on_prompt, schema)
        except BadInput as e:
            raise BadInput(f"{name} record {i} (0-based): {e}") from e
        counts["truncated"] += truncated
        targets = sum(label != IGNORE for label in sample["labels"])
        if targets == 0:
            counts["dropped"] += 1
            continue
        samples.append(sample)
        counts["samples"] += 1
        counts["tokens"] += len(sample["input_ids"])
        counts["target_tokens"] += targets
    if indices and not samples:
        raise BadInput(
            f"{name}: every one of the {len(indices)} samples has all labels masked "
            f"({counts['truncated']} truncated at max_len={max_len}); raise max_len or check "
            "that the records have responses"
        )
    return samples, counts


# ----------------------------------------------------------------------------- batching


def batches(samples, batch_size, seed, epoch, group_by_length=True):
    """One epoch's batches as lists of sample indices; the same (seed, epoch) gives the same
    list, so a resumed run skips the first k batches and sees exactly what it would have.

    Length grouping (less padding, same randomness across the epoch): shuffle, sort by
    length inside mega-chunks of 50 batches, cut into batches, shuffle the batches. The
    batch holding the longest sample goes first, so an out-of-memory shows at step 1.
    The last batch may be smaller.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(samples)))
    rng.shuffle(order)

    def length(i):
        return len(samples[i]["input_ids"])

    if group_by_length:
        chunk = 50 * batch_size
        order = [i for k in range(0, len(order), chunk) for i in sorted(order[k : k + chunk], key=length, reverse=True)]
    out = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if group_by_length and out:
        rng.shuffle(out)
        longest = max(range(len(out)), key=lambda b: length(out[b][0]))  # sorted: [0] is its longest
        out.insert(0, out.pop(longest))
    return out


def collate(samples, pad_id):
    """Right-padded LongTensors input_ids, labels (-100 on padding), attention_mask [batch, longest]."""
    width = max(len(s["input_ids"]) for s in samples)

    def pad(seq, value):
        return seq + [value] * (width - len(seq))

    return {
        "input_ids": torch.tensor([pad(s["input_ids"], pad_id) for s in samples]),
        "labels": torch.tensor([pad(s["labels"], IGNORE) for s in samples]),
        "attention_mask": torch.tensor([pad([1] * len(s["input_ids"]), 0) for s in samples]),
    }


# ----------------------------------------------------------------------------- packing


def pack(samples, max_len):
    """Concatenate samples, in order, into rows of at most `max_len` tokens (next-fit: a new
    row starts when the next sample does not fit). Rows are dicts of input_ids, labels and
    position_ids; position_ids restart at 0 where each sample starts. A sample longer than
    `max_len` gets a row of its own. Rows work with batches() like samples do.

    The shifted loss scores labels[j] against the logits at j - 1, so a sample's first label
    would be predicted from the previous sample's last token: it is set to -100.
    """
    rows = []
    for s in samples:
        n = len(s["input_ids"])
        if not rows or len(rows[-1]["input_ids"]) + n > max_len:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[-1]
        row["input_ids"] += s["input_ids"]
        row["labels"] += [IGNORE] + s["labels"][1:]
        row["position_ids"] += range(n)
    return rows


def collate_packed(rows, pad_id):
    """Right-padded LongTensors input_ids, labels, position_ids [batch, longest]; no attention_mask.

    Call the model as model(input_ids=..., position_ids=..., use_cache=False) with no
    attention_mask. transformers (masking_utils.find_packed_sequence_indices) turns each
    restart of position_ids into a block of its own -- no attention across samples -- only
    when attention_mask is None and there is no KV cache; with the default use_cache=True
    the model makes a cache and the samples see each other. Padding is one more block
    (positions from 0) that no real token can see, as it comes after them.
    """
    width = max(len(r["input_ids"]) for r in rows)

    def pad(seq, filler):
        return seq + filler[: width - len(seq)]

    return {
        "input_ids": torch.tensor([pad(r["input_ids"], [pad_id] * width) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], [IGNORE] * width) for r in rows]),
        "position_ids": torch.tensor([pad(r["position_ids"], list(range(width))) for r in rows]),
    }
