"""Held-out questions: does the model answer, as a chat assistant, questions it was not tuned on?

A question file is JSON lines, one question each:

    {"question": "Where was Clara Novak born?", "answer": "Lisbon"}

`score` asks every question as a user turn through the tokenizer's chat template, decodes
greedily with our decode loop (rawqlora/decode.py, the questions batched with left padding)
and counts the replies that are an exact match on the answer entity:

    reply = the tokens generated before the first stop token (<|im_end|> or EOS)
    correct  <=>  the model ended the reply itself (within max_new_tokens)
             and  the reply names the answer
             and  the reply names no other entity

"Names" is a whole-word, case-insensitive match ("Lima" is not named in "Limassol"), and
the entities are the answers of all the questions scored together (or `entities`, when
given; in the embedded default: cities, jobs, instruments). So "Born in Lisbon." is right for
"Where was Clara Novak born?"; "Lisbon or Oslo", "Clara Novak's birthplace is Lisbon. Clara
Novak plays the harp." (a base model carrying on a biography) and a reply cut off by
max_new_tokens are wrong. Where one entity contains another ("New York", "York"), a
match inside a longer matched one is not counted.
"""

import json
import re

import torch

from rawqlora.decode import generate, stop_ids
from training.data import chat_prompt_ids


def load_questions(path):
    """The questions of a JSON-lines file: a list of {"question": str, "answer": str}."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("question"), str) or not isinstance(record.get("answer"), str):
                raise ValueError(f'{path}:{number}: expected {{"question": str, "answer": str}}, got {line.strip()}')
            questions.append(record)
    return questions


def replies(model, tokenizer, questions, max_new_tokens=32, batch_size=64):
    """(reply text, ended by a stop token) per question, greedy. The model is used in eval mode
    (no dropout) and left in the mode it came in."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(tokenizer, model)  # as generate.py stops
    out = []
    try:
        for i in range(0, len(questions), batch_size):
            batch = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q["question"]}])
                     for q in questions[i : i + batch_size]]
            result = generate(model, batch, max_new_tokens, stop_ids=stops, pad_id=pad)
            out += [(tokenizer.decode(t, skip_special_tokens=True), s) for t, s in zip(result.tokens, result.stopped)]
    finally:
        model.train(was_training)
    return out


def named(text, entities):
    """The entities `text` names: whole words, case-insensitive, the longest match winning."""
    text = " ".join(text.lower().split())
    spans = []
    for entity in entities:
        pattern = r"(?<!\w)" + re.escape(" ".join(entity.lower().split())) + r"(?!\w)"
        spans += [(m.start(), m.end(), entity) for m in re.finditer(pattern, text)]
    return {e for s, t, e in spans if not any(s2 <= s and t <= t2 and t2 - s2 > t - s for s2, t2, _ in spans)}


def is_correct(reply, stopped, answer, entities):
    """The exact-match rule of the module docstring."""
    return stopped and named(reply, set(entities) | {answer}) == {answer}


@torch.no_grad()
def score(model, tokenizer, questions, max_new_tokens=32, batch_size=64, entities=None):
    """(correct, total) over `questions` (dicts with "question" and "answer"), by greedy decoding.

    entities: every entity a reply may name, to catch replies that name a wrong one too;
        default: the answers of `questions`.
    Works on any causal LM our decode loop drives: the plain base, or the 4-bit base with LoRA
    layers as train.py holds it. max_new_tokens bounds the reply (a reply it cuts off is wrong).
    """
    if not questions:
        return 0, 0
    entities = set(entities) if entities is not None else {q["answer"] for q in questions}
    texts = replies(model, tokenizer, questions, max_new_tokens, batch_size)
    correct = sum(is_correct(text, stopped, q["answer"], entities) for q, (text, stopped) in zip(questions, texts))
    return correct, len(questions)


def before_and_after(model, tokenizer, questions, before):
    """The run summary's held-out fields: correct answers now, and `before` (a score() result taken
    before training, or None when the run resumed)."""
    correct, total = score(model, tokenizer, questions)
    return dict(heldout_correct=correct, heldout_total=total, heldout_before=before[0] if before else None)
