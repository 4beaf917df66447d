"""Build the embedded default that `python train.py` fine-tunes with no arguments.

    python scripts/make_default.py            # rewrites default/ (a few minutes on 2 CPU cores)

It makes, from nothing but this file:
  default/model/  a tiny Llama-architecture base model (about 4M parameters, bf16) with a
                  byte-level BPE tokenizer and a ChatML chat template. The base is
                  *pretrained* here on plain-text facts, so it knows "The capital of France
                  is Paris." as prose but has never seen a chat turn;
  default/data/chat.jsonl
                  chat conversations asking for those facts (and a few tasks) in ChatML.
default/config.json, the settings train.py uses for this model, is written by hand.
Fine-tuning then teaches the base to answer questions as an assistant: a real, small
instance of what QLoRA is used for, fast enough for CI.
"""

import json
import random
import shutil
from pathlib import Path

import torch

from rawqlora.tiny import tiny_model, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent / "default"
SEED = 1234

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Greece": "Athens", "Austria": "Vienna", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo",
    "China": "Beijing", "India": "Delhi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Russia": "Moscow",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Hungary": "Budapest",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "up": "down", "early": "late", "full": "empty", "strong": "weak",
    "old": "young", "rich": "poor", "hard": "soft", "loud": "quiet", "wet": "dry",
}
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
    "lion": "roar", "owl": "hoot", "frog": "croak", "horse": "neigh", "bee": "buzz",
}
WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper",
         "tiger", "bread", "night", "water", "house", "glass", "storm", "chair", "ocean"]


def facts():
    """Plain-text statements the base model is pretrained on."""
    lines = [f"The capital of {c} is {cap}." for c, cap in CAPITALS.items()]
    lines += [f"The opposite of {a} is {b}." for a, b in OPPOSITES.items()]
    lines += [f"The opposite of {b} is {a}." for a, b in OPPOSITES.items()]
    lines += [f"A {animal} says {sound}." for animal, sound in SOUNDS.items()]
    return lines


def conversation(rng):
    """One chat sample: a question about a known fact, or a small word task."""
    kind = rng.choice(["capital", "opposite", "sound", "reverse", "count"])
    if kind == "capital":
        c = rng.choice(list(CAPITALS))
        q = rng.choice(["What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?"]).format(c)
        a = f"The capital of {c} is {CAPITALS[c]}."
    elif kind == "opposite":
        w, o = rng.choice(list(OPPOSITES.items()) + [(b, a) for a, b in OPPOSITES.items()])
        q = rng.choice(["What is the opposite of {}?", "Give me the opposite of {}."]).format(w)
        a = f"The opposite of {w} is {o}."
    elif kind == "sound":
        animal = rng.choice(list(SOUNDS))
        q = rng.choice(["What sound does a {} make?", "What does a {} say?"]).format(animal)
        a = f"A {animal} says {SOUNDS[animal]}."
    elif kind == "reverse":
        words = rng.sample(WORDS, rng.randint(2, 4))
        q = "Reverse these words: " + " ".join(words)
        a = " ".join(reversed(words))
    else:
        words = rng.sample(WORDS, rng.randint(1, 6))
        q = "How many words are in: " + " ".join(words)
        a = f"There are {len(words)} words."
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant. Answer briefly."})
    return {"messages": messages}


def pretrain(model, tokenizer, lines, steps, rng):
    """Full-parameter next-token training on shuffled batches of facts (the base model's 'pretraining')."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # decay to 0: the facts settle
    model.train()
    for step in range(steps):
        batch = [" ".join(rng.sample(lines, 4)) + tokenizer.eos_token for _ in range(16)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step:4d}  loss {loss.item():.3f}")


def main():
    rng = random.Random(SEED)
    lines = facts()
    chats = [conversation(rng) for _ in range(2000)]
    corpus = lines + [m["content"] for c in chats for m in c["messages"]] + WORDS
    tokenizer = train_tokenizer(corpus * 4, vocab_size=1024)

    torch.manual_seed(SEED)
    model = tiny_model("llama", len(tokenizer), seed=SEED, hidden_size=256, layers=4, heads=8, kv_heads=4,
                       intermediate_size=512)
    pretrain(model, tokenizer, lines, steps=1500, rng=rng)

    for part in ("model", "data"):  # default/config.json (the training settings) is kept
        shutil.rmtree(ROOT / part, ignore_errors=True)
    (ROOT / "data").mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(ROOT / "model")
    tokenizer.save_pretrained(ROOT / "model")
    with open(ROOT / "data" / "chat.jsonl", "w") as f:
        for c in chats:
            f.write(json.dumps(c) + "\n")
    print(f"wrote {ROOT}: model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(chats)} chats")


if __name__ == "__main__":
    main()
