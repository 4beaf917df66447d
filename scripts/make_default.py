"""Build the embedded default that `python train.py` fine-tunes with no arguments.

    python scripts/make_default.py            # rewrites default/model and default/data (~2 min on 2 CPU cores)

The default shows fine-tuning doing its real job: teaching a model to use, in a new format,
knowledge it already has. Facts that a model read in several phrasings during pretraining can
be extracted by instruction tuning, also for entities the tuning never mentions (Allen-Zhu &
Li, "Physics of Language Models, Part 3.1: Knowledge Storage and Extraction", 2023). Here:

  people      100 invented people, each with a birth city, a job and an instrument drawn at
              random (nothing can be guessed from the name);
  pretraining a 2.9M-parameter Llama-architecture model learns biographies of all 100, written
              afresh at every step: each fact in one of five phrasings, the sentences in random
              order, the full name in every sentence ("Clara Novak plays the harp. By trade,
              Clara Novak is a baker. ..."). Plain text only: it never sees a chat turn;
  fine-tuning default/data/chat.jsonl asks about 60 of the people, in ChatML ("Where was Clara
              Novak born?" -> "Born in Lisbon.");
  held out    default/data/heldout.jsonl asks the same kinds of question about the other 40
              people (120 questions): facts the base knows from pretraining, in a format it
              learns only from the fine-tuning, on other people.

Before fine-tuning the base answers none of the held-out questions: it carries on the chat
prompt as if it were a biography (generate.py, "Where was Felix Horvat born?" -> "Felix
Horvat's birthplace is Bogota. Felix Horvat's instrument is the harp. Felix Horvat's
profession is surgeon."). The knowledge is there (71 of its 120 replies name the right entity
among others), the answer is not. After `python train.py` (144 steps, under 20 s on 2 quiet CPU cores) it answers 114
of the 120 ("Born in Bogota."), by greedy decoding and exact match on the entity
(training/heldout.py).

Choices, and why:
  * The tokenizer has <|im_start|> and <|im_end|> from the start and a ChatML chat template,
    so the base and the tuned model share one tokenizer and train.py adds no tokens. The base
    never sees these tokens, nor the words only the chats use ("Where", "Born", "?"); their
    output rows are re-drawn after pretraining (see redraw_unseen_rows).
  * The template starts with BOS, as every pretraining document does, so that every renderer
    of it (train.py's data, generate.py, training/heldout.py) gives the model the prompt it
    was tuned on: asked without BOS, the tuned model answers 66 of the 120, not 114.
  * Answers give the fact after the words that preceded it in pretraining ("Born in",
    "Works as a", "Plays the"), without the name. In a trial where answers repeated the name
    ("Clara Novak was born in Lisbon."), the tuned model wrote the names of people it was
    tuned on, and half of its answers were about the wrong person.
  * The base must survive NF4 (train.py loads it so): the facts are checked by greedy
    completion from the saved bf16 weights and after NF4 quantization, printed at the end
    (all 300 both ways).

default/config.json (kept, written by hand) holds train.py's settings for this model: a higher
learning rate than a 7B wants, two epochs, no gradient checkpointing (nothing to save at this
size), and `"device": "cpu"`: a 2.9M-parameter model's steps are too small to pay a GPU's
kernel launches (the previous default trained at 1,551 tokens/s on an H200 against 2,988 on 2
CPU cores), so the default runs on the CPU even where there is a GPU.

Deterministic: one seed drives people, data, initialisation and training order (two builds on
the same machine gave byte-identical files).
"""

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's packages, installed or not

import quant  # noqa: E402
from rawqlora.decode import generate  # noqa: E402
from rawqlora.tiny import tiny_model, train_tokenizer  # noqa: E402
from training.data import CHATML_TEMPLATE  # noqa: E402
from training.heldout import named  # noqa: E402

ROOT = REPO / "default"
SEED = 1234
N_PEOPLE, N_HELDOUT = 100, 40  # the first N_HELDOUT people are held out
N_CHATS = 1200  # fine-tuning conversations, drawn from (train person, attribute, question phrasing)
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 1200, 16, 3e-3

FIRST = """Amara Bruno Clara Dmitri Elena Farid Greta Hugo Ingrid Jonas Kira Lorenzo Maya Nils Olga
Pablo Quinn Rosa Stefan Tara Umar Vera Wendell Ximena Yusuf Zelda Anton Beatrix Cyrus Dalia Emil
Fiona Gideon Hana Ivo Jasmin Kofi Lena Marco Nadia Oskar Priya Rafael Sofia Tobias Ursula Viktor
Wanda Xavier Yara Zane Aurora Boris Celeste Diego Esther Felix Gloria Henrik Iris Julian Katya Leon
Mirela Nico Odette Petra Ronan Selma Teodor Uma Valentin Willa Yannick Zora Ada Basil Carmen Dario
Edith Florin Gemma Hector Ilse Jorge Karin Luca Marta Noah Ophelia Pavel Rhea Silas Thea Ulrich
Vivian Walter Yvonne Zeno Agnes""".split()
LAST = """Novak Okafor Lindqvist Moreau Tanaka Castell Brennan Varga Petrov Haddad Sorensen Mbeki
Rossi Kowalski Duarte Fischer Nakamura Quiroga Larsen Abara Delgado Horvat Ivanova Jensen Keller
Laurent Mendes Nyberg Ortega Pereira Quist Rahman Santos Tiwari Ueda Vidal Weber Yilmaz Zimmer Arden
Bianchi Carver Dufresne Eklund Ferreira Gallo Hartmann Iqbal Jovanovic Kaplan Lucero Marsh Nilsen
Olsen Pinto Renner Salas Thorne Urbina Vance Wolff Asante Barros Conti Dekker Estrada Falk Grimaldi
Holt Ibarra Janssen Kaur Lange Mora Navarro Oyelaran Paredes Reyes Strand Torres Ulloa Valdez Wren
Achebe Berg Cruz Dalton Engel Fontaine Garber Hale Ilves Juarez Kimura Lowe Mancini Nash Oduya
Pike Roth Sato Tamm""".split()

# Each value one word, and no word is a value of two attributes: an answer names one entity.
ATTRIBUTES = {
    "city": """Lisbon Oslo Cairo Lima Dublin Vienna Prague Nairobi Manila Bogota Warsaw Athens
        Havana Seoul Hanoi Tunis Quito Riga Zurich Kyoto""".split(),
    "job": """baker pilot nurse carpenter lawyer chemist painter farmer librarian dentist
        architect journalist plumber surgeon tailor gardener""".split(),
    "instrument": "violin cello piano flute trumpet harp drums guitar oboe banjo clarinet accordion".split(),
}
# Pretraining: five phrasings of each fact, the full name in every sentence.
BIO = {
    "city": ["{n} was born in {v}.", "{n} was born in the city of {v}.", "{n} came into the world in {v}.",
             "{n} is a native of {v}.", "{n}'s birthplace is {v}."],
    "job": ["{n} works as {a} {v}.", "{n} earns a living as {a} {v}.", "{n} is employed as {a} {v}.",
            "{n}'s profession is {v}.", "By trade, {n} is {a} {v}."],
    "instrument": ["{n} plays the {v}.", "{n} practises the {v} every evening.", "{n}'s instrument is the {v}.",
                   "{n} learned to play the {v}.", "In the band, {n} plays the {v}."],
}
# Fine-tuning and held-out questions, and the answer the assistant gives.
QUESTIONS = {
    "city": ["Where was {n} born?", "In which city was {n} born?", "What is {n}'s birthplace?"],
    "job": ["What does {n} do for a living?", "What is {n}'s job?", "What is the profession of {n}?"],
    "instrument": ["Which instrument does {n} play?", "What instrument does {n} play?",
                   "What does {n} play in the band?"],
}
ANSWERS = {"city": "Born in {v}.", "job": "Works as {a} {v}.", "instrument": "Plays the {v}."}
# The base's knowledge, checked by completing the start of a pretraining sentence.
PROBES = {"city": "{n} was born in", "job": "{n}'s profession is", "instrument": "{n} plays the"}


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def fill(template, person=None, attr=None):
    v = person[attr] if attr else ""
    return template.format(n=person["name"] if person else "", v=v, a=article(v) if v else "")


def make_people(rng):
    names = zip(rng.sample(FIRST, N_PEOPLE), rng.sample(LAST, N_PEOPLE))
    return [{"name": f"{f} {l}", **{a: rng.choice(vs) for a, vs in ATTRIBUTES.items()}} for f, l in names]


def biography(person, rng):
    """One pretraining document: every fact once, each in a random phrasing, in random order."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    return " ".join(fill(rng.choice(BIO[a]), person, a) for a in attrs)


def question(person, attr, rng):
    return fill(rng.choice(QUESTIONS[attr]), person)


def chat(person, attr, rng):
    return {"messages": [{"role": "user", "content": question(person, attr, rng)},
                         {"role": "assistant", "content": fill(ANSWERS[attr], person, attr)}]}


def pretrain(model, tokenizer, persons, rng):
    """Full-parameter next-token training on freshly written biographies (the base's 'pretraining').

    Returns the ids of every token that was a target: the output rows pretraining trained.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine to 0: the facts settle
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / PRETRAIN_STEPS)))
    model.train()
    start, targets = time.time(), set()
    for step in range(PRETRAIN_STEPS):
        texts = [tokenizer.bos_token + biography(rng.choice(persons), rng) + tokenizer.eos_token
                 for _ in range(PRETRAIN_BATCH)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        targets.update(labels[:, 1:].flatten().tolist())
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        if step % 100 == 0 or step == PRETRAIN_STEPS - 1:
            print(f"pretrain step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    return targets - {-100}


def redraw_unseen_rows(model, seen_ids, generator):
    """Output rows of tokens pretraining never had as targets, drawn afresh like the trained rows.

    Pretraining pushes such a row far down (every step lowers the probability of a token that
    never comes), so a fine-tune spends most of its steps lifting <|im_end|> and the answers'
    first words. Drawn from the trained rows' per-dimension mean and spread, each row starts as
    an ordinary token. Measured with default/config.json: 114 of the 120 held-out questions
    answered after fine-tuning, against 76 with the rows as pretraining left them (eval loss
    0.003 against 0.75). The mean alone, train.py's init for tokens it adds, does not do here:
    train.py then trains those rows, this fine-tune does not, and hundreds of equal rows tie.
    """
    head = model.get_output_embeddings().weight
    seen = torch.zeros(head.shape[0], dtype=torch.bool)
    seen[sorted(seen_ids)] = True
    with torch.no_grad():
        trained = head[seen]
        noise = torch.randn(int((~seen).sum()), head.shape[1], generator=generator)
        head[~seen] = trained.mean(dim=0) + trained.std(dim=0) * noise
    return int((~seen).sum())


@torch.no_grad()
def probe(model, tokenizer, persons):
    """Facts known: '<s>Clara Novak was born in' completed greedily names the right city and no other."""
    model.eval()
    correct = total = 0
    for attr, values in ATTRIBUTES.items():
        prompts = [tokenizer(tokenizer.bos_token + fill(PROBES[attr], p), add_special_tokens=False)["input_ids"]
                   for p in persons]
        out = generate(model, prompts, 4, stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
        correct += sum(named(tokenizer.decode(t), values) == {p[attr]} for p, t in zip(persons, out.tokens))
        total += len(persons)
    return f"{correct}/{total}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT), help="where to write model/ and data/ (default: default/)")
    root = Path(parser.parse_args().out)
    start = time.time()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    persons = make_people(rng)
    held, tuned = persons[:N_HELDOUT], persons[N_HELDOUT:]
    chats = [chat(rng.choice(tuned), rng.choice(list(ATTRIBUTES)), rng) for _ in range(N_CHATS)]
    heldout = [{"question": question(p, a, rng), "answer": p[a]} for p in held for a in ATTRIBUTES]

    bios = [biography(p, rng) for p in persons for _ in range(10)]
    chat_texts = [m["content"] for c in chats for m in c["messages"]] + [q["question"] for q in heldout]
    tokenizer = train_tokenizer(bios + chat_texts, vocab_size=1024)
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    model = tiny_model("llama", len(tokenizer), seed=SEED, hidden_size=256, layers=4, heads=8, kv_heads=4,
                       intermediate_size=512)
    seen = pretrain(model, tokenizer, persons, rng)
    unseen = redraw_unseen_rows(model, seen, torch.Generator().manual_seed(SEED))

    for part in ("model", "data"):  # default/config.json (train.py's settings for this model) is kept
        shutil.rmtree(root / part, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, records in (("chat.jsonl", chats), ("heldout.jsonl", heldout)):
        with open(root / "data" / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    print(f"wrote {root}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary "
          f"{len(tokenizer)} ({unseen} output rows that pretraining never trained re-drawn), {len(chats)} chats, "
          f"{len(heldout)} held-out questions, {time.time() - start:.0f}s")
    for kind in (None, "nf4"):  # the saved bf16 weights, as train.py loads them
        m = quant.load_model(root / "model", quant=kind, compute_dtype=torch.float32, device="cpu")
        print(f"facts completed, {kind or 'bf16'}: tuned people {probe(m, tokenizer, tuned)}, "
              f"held-out people {probe(m, tokenizer, held)}")


if __name__ == "__main__":
    main()
