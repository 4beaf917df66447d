"""Our decode loop (rawqlora/decode.py) against transformers, and generate.py end to end.

Greedy comparisons are token-exact, not tolerances: our loop and transformers' `generate` run
the same forward on the same fp32 (or NF4) weights with the same positions, so the logits
match bit for bit or to a few ulps, far below the gap between the top two logits that argmax
decides on. The filters are compared with transformers' logits warpers on random logits, where
a tie at the cut-off has probability ~0.
"""

import copy
import json
import io
import shutil
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import generate as cli
import lora
import quant
from rawqlora.cli import run
from rawqlora.decode import (
    Sampling,
    apply_repetition_penalty,
    generate,
    top_k_filter,
    top_p_filter,
)
from reference import load_hf
from training.data import chat_prompt_ids

PROMPTS = [
    "The quick brown",
    "What is the capital of France? The capital",
    "def add(a",
    "Write a haiku about autumn leaves",
]
EOS = 2
N = 16  # new tokens: enough steps for the KV cache path to matter, few enough to stay fast


def load(path, nf4=False):
    return (load_hf(path, nf4) if nf4 else AutoModelForCausalLM.from_pretrained(path)).eval()


def hf_greedy(model, prompt, n=N, **kwargs):
    """transformers' greedy output for one unpadded prompt, cut before EOS like ours."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0, **kwargs)
    out = out[0, len(prompt) :].tolist()
    return out[: out.index(EOS)] if EOS in out else out


@pytest.fixture(scope="module")
def encoded(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def llama(make_model_dir):
    return load(make_model_dir("llama"))


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("arch, nf4", [("llama", False), ("qwen2", False), ("llama", True)])
def test_greedy_matches_transformers(make_model_dir, encoded, arch, nf4):
    model = load(make_model_dir(arch), nf4=nf4)
    for prompt in encoded:
        ours = generate(model, [prompt], N, stop_ids=[EOS]).tokens[0]
        assert ours == hf_greedy(model, prompt)


def test_repetition_penalty_greedy_matches_transformers(llama, encoded):
    # One prompt at a time: transformers counts left padding as "seen", we do not.
    for prompt in encoded:
        ours = generate(llama, [prompt], N, [EOS], sampling=Sampling(repetition_penalty=1.5))
        assert ours.tokens[0] == hf_greedy(llama, prompt, repetition_penalty=1.5)
    # And the penalty does change something here, or the comparison above proves nothing.
    plain = [generate(llama, [p], N, [EOS]).tokens[0] for p in encoded]
    penalized = [
        generate(llama, [p], N, [EOS], sampling=Sampling(repetition_penalty=1.5)).tokens[0]
        for p in encoded
    ]
    assert plain != penalized


def test_batch_equals_each_prompt_alone(llama, encoded):
    # Prompts of different lengths, so all but the longest are left-padded. Exact in fp32:
    # pads are masked out of attention and positions restart at 0 on the first real token.
    alone = [generate(llama, [p], N, [EOS]).tokens[0] for p in encoded]
    assert generate(llama, encoded, N, [EOS]).tokens == alone


def test_stop_token_ends_generation(llama, encoded):
    free = [generate(llama, [p], N).tokens[0] for p in encoded[:2]]
    # Make the stop set a token the first prompt greedily emits at step k (and not before),
    # and which the second prompt never emits, so one row stops early and the other goes on.
    k, stop = next(
        (k, t) for k, t in enumerate(free[0]) if k >= 2 and t not in free[0][:k] and t not in free[1]
    )
    out = generate(llama, encoded[:2], N, stop_ids=[stop])
    assert out.tokens == [free[0][:k], free[1]]  # the stop token itself is not in the output
    assert out.stopped == [True, False]

    seen = []
    generate(llama, encoded[:2], N, stop_ids=[stop], on_step=seen.append)
    assert len(seen) == N
    assert [s[0] for s in seen] == free[0][:k] + [None] * (N - k)  # None from the stop step on
    assert [s[1] for s in seen] == free[1]


def test_all_rows_stopped_ends_the_loop(llama, encoded):
    first = generate(llama, [encoded[0]], 1).tokens[0]
    steps = []
    out = generate(llama, [encoded[0]], N, stop_ids=first, on_step=steps.append)
    assert out.tokens == [[]] and out.stopped == [True] and len(steps) == 1


# ----------------------------------------------------------------------------- sampling


def test_seed_repeats_and_seeds_differ(llama, encoded):
    def sample(seed, **kw):
        return generate(llama, encoded, N, sampling=Sampling(temperature=1.0, seed=seed, **kw)).tokens

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    # A random tiny model's next-token distribution is nearly flat: top-p 0.5 and top-k 5 still
    # leave many candidates, so these sample too; they must also repeat with a seed.
    assert sample(3, top_k=5, top_p=0.5) == sample(3, top_k=5, top_p=0.5)


def test_top_k_1_is_greedy(llama, encoded):
    greedy = generate(llama, encoded, N, [EOS]).tokens
    sampled = generate(llama, encoded, N, [EOS], sampling=Sampling(temperature=1.0, top_k=1, seed=0))
    assert sampled.tokens == greedy


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    # seen positive: 2 / 2; seen negative: -1 * 2; unseen unchanged; zero stays zero.
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 50), torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    reference = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.3), reference)


def test_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # Mass above each token: 0, 0.5, 0.8, 0.95. With p=0.7 the third is dropped (0.8 >= 0.7).
    kept = top_p_filter(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(logits, 1e-6).isfinite().tolist() == [[True, False, False, False]]


def test_filters_match_transformers():
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    for p in [0.3, 0.8, 0.95]:
        reference = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, p).isfinite(), reference.isfinite())
    for k in [1, 7, 100]:
        reference = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(top_k_filter(logits, k), reference)


# ----------------------------------------------------------------------------- CLI


def test_stream_holds_back_partial_characters(tokenizer):
    text = "café ☕ naïve"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text)  # byte-level: é, ☕, ï are split over several tokens
    out = io.StringIO()
    stream = cli.TextStream(tokenizer, out)
    writes = []
    for token in ids:
        stream([token])
        writes.append(out.getvalue())
    assert all("\ufffd" not in w for w in writes)
    assert stream.finish() == text and out.getvalue() == text + "\n"


def test_tokenizer_from_adapter_when_it_has_one(make_model_dir, tokenizer, tmp_path):
    # Training may add tokens; the adapter then carries the tokenizer that knows them.
    model_dir = make_model_dir("llama")
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<|tool|>"])
    extended.save_pretrained(tmp_path)
    assert quant.tokenizer_source(model_dir, tmp_path) == tmp_path
    assert len(quant.load_tokenizer(quant.tokenizer_source(model_dir, tmp_path))) == len(tokenizer) + 1
    assert quant.tokenizer_source(model_dir) == quant.tokenizer_source(model_dir, tmp_path / "no-tokenizer") == model_dir


def im_end(tokenizer):
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def chat_prompt(tokenizer, text):
    """The rendering training uses (test_data.py checks it against training's encode)."""
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])


def test_cli_prompt_from_stdin_streams_greedy_output(make_model_dir, tokenizer, llama, monkeypatch, capsys):
    prompt = "What is the capital of France?"
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))
    cli.main(["--model", str(make_model_dir("llama")), "--max-new-tokens", str(N)])
    out, err = capsys.readouterr()
    expected = generate(llama, [chat_prompt(tokenizer, prompt)], N, [EOS, im_end(tokenizer)]).tokens[0]
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err


def test_cli_batch_prints_each_output(make_model_dir, tokenizer, llama, capsys):
    cli.main(["--model", str(make_model_dir("llama")), "--raw", "--max-new-tokens", "8", *PROMPTS[:2]])
    out, _ = capsys.readouterr()
    for text in PROMPTS[:2]:
        ids = generate(llama, [tokenizer(text)["input_ids"]], 8, [EOS, im_end(tokenizer)]).tokens[0]
        assert f">>> {text}\n{tokenizer.decode(ids, skip_special_tokens=True)}\n" in out


def test_cli_falls_back_to_chatml_without_a_chat_template(make_model_dir, tokenizer, tmp_path, capsys):
    path = shutil.copytree(make_model_dir("llama"), tmp_path / "m")
    for f in path.glob("chat_template.*"):
        f.unlink()
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    plain.save_pretrained(path)
    cli.main(["--model", str(path), "--max-new-tokens", "8", PROMPTS[1]])
    out, err = capsys.readouterr()
    assert "no chat template; using ChatML" in err
    cli.main(["--model", str(make_model_dir("llama")), "--max-new-tokens", "8", PROMPTS[1]])  # ChatML its own
    assert capsys.readouterr().out == out


def test_cli_quant_flags_reach_the_loader(make_model_dir, tokenizer, capsys):
    path = make_model_dir("llama")
    cli.main(["--model", str(path), "--quant", "nf4", "--raw", "--max-new-tokens", "8", PROMPTS[0]])
    out, _ = capsys.readouterr()
    model = quant.load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ids = generate(model, [tokenizer(PROMPTS[0])["input_ids"]], 8, [EOS, im_end(tokenizer)]).tokens[0]
    assert out == tokenizer.decode(ids, skip_special_tokens=True) + "\n"


def test_cli_chat_keeps_history(make_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand then?\n/exit\nnever read\n"))
    cli.main(["--model", str(make_model_dir("llama")), "--chat", "--max-new-tokens", "4"])
    _, err = capsys.readouterr()
    assert err.count("tokens/s") == 2  # two turns answered, /exit stopped before the third
    # The second turn was prefilled with the whole history, so it had more prompt tokens.
    prefills = [int(line.split("prefill of ")[1].split()[0]) for line in err.splitlines() if "prefill" in line]
    assert prefills[1] > prefills[0]


def test_cli_adapter_matches_peft(make_model_dir, tokenizer, tmp_path, capsys):
    base = make_model_dir("llama")
    torch.manual_seed(0)
    # init_lora_weights=False: B random, not zero, so the adapter changes the output.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    reference = get_peft_model(load(base), config).eval()
    reference.save_pretrained(tmp_path)
    prompt = PROMPTS[1]
    cli.main(["--model", str(base), "--adapter", str(tmp_path), "--raw", "--max-new-tokens", str(N), prompt])
    out, _ = capsys.readouterr()
    ids = tokenizer(prompt)["input_ids"]
    expected = hf_greedy(reference, ids)
    assert expected != hf_greedy(load(base), ids)  # the adapter matters for this prompt
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["--temperature", "warm", "hi"],
        ["--temperature", "-1", "hi"],
        ["--top-p", "0.9", "hi"],  # sampling flag with greedy decoding
        ["--quant", "int8", "hi"],
        ["--raw", "--chat"],
        ["--device", "cpu", "--compile", "hi"],
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(make_model_dir, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(cli.main, ["--model", str(make_model_dir("llama")), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_missing_model_dir_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(cli.main, ["--model", str(tmp_path / "nope"), "hi"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


# ----------------------------------------------------------------------------- tutorial inputs (issue 20)


def test_cli_builds_the_4bit_base_the_adapter_trained_on(make_model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    """With train.py's train_config.json beside the adapter, the base is loaded as trained (here fp4
    without double quantization), on the CPU too, not with generate.py's own defaults."""
    path = make_model_dir("llama")
    model = quant.load_model(path, quant="fp4", double_quant=False, compute_dtype=torch.float32, device="cpu")
    lora.inject(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(0)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    lora.save_adapter(model, tmp_path / "ad", base_model=str(path))
    (tmp_path / "ad" / "train_config.json").write_text(json.dumps({"quant": "fp4", "double_quant": False}))
    loads = []
    real = quant.load_model
    monkeypatch.setattr(quant, "load_model", lambda *a, **k: loads.append(k) or real(*a, **k))
    cli.main(["--model", str(path), "--adapter", str(tmp_path / "ad"), "--raw", "--max-new-tokens", "8", PROMPTS[0]])
    assert (loads[0]["quant"], loads[0]["double_quant"]) == ("fp4", False)
    model.eval()
    ids = generate(model, [tokenizer(PROMPTS[0])["input_ids"]], 8, [EOS, im_end(tokenizer)]).tokens[0]
    assert capsys.readouterr().out == tokenizer.decode(ids, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("name, text, expected", [
    ("lines.txt", "first prompt\nsecond prompt\n", ["first prompt", "second prompt"]),
    ("blocks.txt", "Summarise:\nthe text\n\nTranslate:\nbonjour\n", ["Summarise:\nthe text", "Translate:\nbonjour"]),
    ("p.jsonl", '"one"\n{"prompt": "two\\nlines"}\n', ["one", "two\nlines"]),
])
def test_prompt_file_shapes(tmp_path, name, text, expected):
    (tmp_path / name).write_text(text)
    args = cli.parse_args(["--model", "m", "--prompt-file", str(tmp_path / name)])
    assert cli.read_prompts(args) == expected


def test_raw_prompt_keeps_one_bos_and_long_runs_warn(make_model_dir, tokenizer, capsys):
    from tokenizers.processors import TemplateProcessing

    adds_bos = copy.deepcopy(tokenizer)  # as Llama's and Mistral's tokenizers do
    adds_bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    once = cli.encode(adds_bos, "<s>The quick brown", raw=True)
    assert once == cli.encode(adds_bos, "The quick brown", raw=True) and once.count(adds_bos.bos_token_id) == 1
    cli.main(["--model", str(make_model_dir("llama", max_position_embeddings=16)), "--raw", "--max-new-tokens", "12",
              PROMPTS[1]])
    assert "past the model's max_position_embeddings (16)" in capsys.readouterr().err
