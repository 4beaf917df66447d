"""merge.py: merged models checked against the adapter on its 4-bit base, PEFT's merge_and_unload,
and transformers' own from_pretrained.

Adapters are made here as train.py makes them (quant.load_model -> lora.inject -> save_adapter,
plus train_config.json), with B drawn away from zero: a fresh adapter (B = 0) would merge to
the base and prove nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
import merge
import quant
from rawqlora.cli import run
from rawqlora.errors import BadInput
from reference import load_hf_4bit

F32 = torch.float32
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy-sized matmuls gain nothing from threads, and on a busy shared CPU the extra threads
    spin against other processes (a tiny forward measured 0.5 s with 2 threads, 7 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_adapter(base, path, targets="all-linear", quant_type="nf4", double_quant=True, b_std=0.05,
                 tokenizer=None, base_name=None, train_config=True):
    """An adapter as train.py leaves it. `tokenizer` with added tokens also saves grown embeddings."""
    torch.manual_seed(1)
    model = quant.load_model(base, quant=quant_type, double_quant=double_quant, compute_dtype=F32, device="cpu")
    modules_to_save = None
    if tokenizer is not None:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for m in (model.get_input_embeddings(), model.get_output_embeddings()):
                m.weight.normal_(0, 0.02)  # every row differs from the base's: replaced rows are visible
        modules_to_save = ["embed_tokens", "lm_head"]
    lora.inject(model, targets, r=4, alpha=8, dropout=0.1)  # dropout as trained; must be off in every comparison
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, b_std)
    lora.save_adapter(model, path, base_model=str(base if base_name is None else base_name),
                      modules_to_save=modules_to_save)
    if train_config:
        config = {"quant": quant_type or "none", "double_quant": double_quant, "dtype": "fp32", "data": ""}
        (Path(path) / "train_config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return Path(path)


def ids(seed=0, vocab=320):
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x=None):
    return model(ids() if x is None else x).logits


def adapter_on_4bit(base, adapter, quant_type="nf4", double_quant=True):
    """The trained model: the adapter on the 4-bit base, computing in fp32."""
    model = quant.load_model(base, quant=quant_type, double_quant=double_quant, compute_dtype=F32, device="cpu")
    lora.load_adapter(model, adapter)
    return model.eval()  # load_adapter's fresh LoRA layers are in training mode (dropout on)


def from_pretrained(path):
    """transformers' own load; no missing or unexpected keys allowed."""
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=F32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def assert_close_rel(actual, expected, rel):
    """max |Δ| within `rel` of the largest |expected| (logits have no natural per-element scale)."""
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max |Δ| {err:.3g}"


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "arch, quant_type, double_quant",
    [("llama", "nf4", True), ("qwen2", "fp4", False)],  # qwen2: q/k/v biases beside 4-bit weights
)
def test_dequantized_fp32_computes_what_the_adapter_on_4bit_computed(
    make_model_dir, tmp_path, arch, quant_type, double_quant
):
    base = make_model_dir(arch)
    adapter = make_adapter(base, tmp_path / "ad", quant_type=quant_type, double_quant=double_quant)
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "fp32", "--no-gap"])

    expected = logits(adapter_on_4bit(base, adapter, quant_type, double_quant))
    # Same weights up to fp32 rounding: (W + sBA)x vs Wx + s·B(Ax) differ by ~1e-7 relative.
    assert_close_rel(logits(from_pretrained(tmp_path / "m")), expected, 1e-4)
    assert_close_rel(logits(quant.load_model(tmp_path / "m", quant=None, compute_dtype=F32)), expected, 1e-4)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config


def test_dequantized_base_is_bit_equal_to_the_loaders(make_model_dir, tmp_path):
    """as_trained() reproduces quant.load_model + quant.dequantize exactly, Linear by Linear."""
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad")
    plan = merge.plan_merge(merge.parse_args(["--adapter", str(adapter), "--out", str(tmp_path / "m")]))
    model = quant.load_model(base, quant="nf4", compute_dtype=F32, device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(layers) == plan.quantized and "lm_head" not in layers
    weights = load_file(base / "model.safetensors")
    for name, m in layers.items():
        ours = merge.as_trained(weights[f"{name}.weight"], plan, name, torch.device("cpu"))
        assert torch.equal(ours, quant.dequantize(m)), name


def test_without_train_config_the_base_was_qlora_default(make_model_dir, tmp_path):
    """An adapter trained elsewhere (PEFT) has no train_config.json: its base is taken as QLoRA's
    recipe loaded it, NF4 with double quantization and bf16 compute, lm_head dense."""
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad", train_config=False)
    plan = merge.plan_merge(merge.parse_args(["--adapter", str(adapter), "--out", str(tmp_path / "m")]))
    assert plan.trained == merge.Trained(quant="nf4", double_quant=True, dtype=torch.bfloat16)
    model = quant.load_model(base, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    name = "model.layers.1.mlp.down_proj"
    weight = load_file(base / "model.safetensors")[f"{name}.weight"]
    assert torch.equal(merge.as_trained(weight, plan, name, torch.device("cpu")),
                       quant.dequantize(model.get_submodule(name)))


def test_original_equals_peft_merge_and_unload(make_model_dir, tmp_path):
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad", targets=["q_proj", "v_proj", "down_proj"])
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--base", "original",
                "--dtype", "fp32", "--no-gap"])

    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=F32), adapter)
    theirs = theirs.merge_and_unload().state_dict()
    ours = load_file(tmp_path / "m" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    # Both compute W + (B @ A) · scaling in fp32 from the same operands in the same order (PEFT's
    # get_delta_weight, then W += delta), so the weights agree to the bit; a different matmul
    # kernel would be the only reason for even one ulp of difference.
    for key, t in theirs.items():
        assert torch.equal(ours[key], t), key
    changed = [k for k in ours if not torch.equal(ours[k], load_file(base / "model.safetensors")[k])]
    assert len(changed) == 3 * 2  # the three targets of both layers, nothing else


def test_bf16_default_and_the_gap_is_printed(make_model_dir, tmp_path, capsys):
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad")
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "merge gap on 4 built-in prompts" in out
    gap = float(out.split("max |Δlogit| ")[1].split()[0])
    assert 0 < gap < 0.1  # bf16 rounding of the merged weights, not the 4-bit error (~1e-1 and up)
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


def test_gap_prompts_come_from_the_training_data(make_model_dir, tmp_path, capsys, monkeypatch):
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = json.loads((adapter / "train_config.json").read_text())
    (adapter / "train_config.json").write_text(json.dumps({**config, "data": "train.jsonl"}))
    monkeypatch.chdir(tmp_path)  # train.py's relative paths are relative to where it ran
    merge.main(["--adapter", "ad", "--out", "m", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "merge gap on the first 4 records of train.jsonl" in out
    assert float(out.split("max |Δlogit| ")[1].split()[0]) < 1e-4  # fp32 + dequantized: rounding only


# ----------------------------------------------------------------------------- layout


def test_shards_and_mixtral_experts_round_trip(make_model_dir, tmp_path):
    base = make_model_dir("mixtral")
    adapter = make_adapter(base, tmp_path / "ad", targets=["q_proj", "w1", "w2", "w3"])
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "fp32",
                "--max-shard-size", "40KB", "--no-gap"])

    out = tmp_path / "m"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("*.safetensors"))
    per_file = {f: list(index["weight_map"].values()).count(f) for f in files}
    # A file stays under the limit (plus its JSON header) unless it holds one tensor larger than it.
    assert all(n == 1 or os.path.getsize(out / f) <= 40_000 + 4096 for f, n in per_file.items())
    base_keys = set(load_file(base / "model.safetensors"))
    assert set(index["weight_map"]) == base_keys  # on-disk names: block_sparse_moe.experts.E.w1...
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in base_keys

    expected = logits(adapter_on_4bit(base, adapter))
    # transformers fuses the experts back on load; same numbers as our per-expert Linears.
    assert_close_rel(logits(from_pretrained(out)), expected, 1e-4)
    assert_close_rel(logits(quant.load_model(out, quant=None, compute_dtype=F32)), expected, 1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_added_tokens_grow_the_vocabulary(make_model_dir, tokenizer, tmp_path, tied):
    base = make_model_dir("llama", tie_word_embeddings=tied)
    grown = AutoTokenizer.from_pretrained(base)
    grown.add_tokens(["<|tool|>", "<|/tool|>"], special_tokens=True)
    adapter = make_adapter(base, tmp_path / "ad", tokenizer=grown)
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "fp32", "--no-gap"])

    out = tmp_path / "m"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tokenizer) + 2
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer) + 2  # the adapter's tokenizer
    saved = load_file(adapter / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    for key in ("model.embed_tokens.weight",) if tied else ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[key], saved[f"base_model.model.{key}"])
    assert ("lm_head.weight" in merged) is not tied  # a tied head is the embedding, stored once
    x = ids(vocab=len(tokenizer) + 2)
    x[0, 3], x[1, 7] = len(tokenizer), len(tokenizer) + 1  # the new tokens, in the input
    assert_close_rel(logits(from_pretrained(out), x), logits(adapter_on_4bit(base, adapter), x), 1e-4)


def test_quantize_nf4_writes_a_loadable_4bit_sibling(make_model_dir, tmp_path):
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad")
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--quantize", "nf4", "--dtype", "fp32",
                "--no-gap"])
    nf4 = tmp_path / "m-nf4"
    assert json.loads((nf4 / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ours = logits(quant.load_model(nf4, quant="nf4", compute_dtype=F32, device="cpu"))
    theirs = logits(load_hf_4bit(nf4))
    assert torch.equal(ours, theirs)
    # Re-quantizing the merged weights costs NF4 error again: close to the merged model, not equal.
    dense = logits(from_pretrained(tmp_path / "m"))
    assert not torch.equal(ours, dense)
    assert_close_rel(ours, dense, 0.5)
    assert AutoTokenizer.from_pretrained(nf4).get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()


def test_overwrite_replaces_the_output(make_model_dir, tmp_path):
    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "ad")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old")
    merge.main(["--adapter", str(adapter), "--out", str(tmp_path / "m"), "--overwrite", "--no-gap"])
    assert not (tmp_path / "m" / "stale.txt").exists() and (tmp_path / "m" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "m"]  # no staging directory left


# ----------------------------------------------------------------------------- errors


def error_cases(make_model_dir, tmp_path):
    """name -> (argv, words the one-line message must hold). Built lazily: each case costs an adapter."""
    llama = make_model_dir("llama")
    small = make_model_dir("llama", hidden_size=32)
    mixtral = make_model_dir("mixtral")
    added = AutoTokenizer.from_pretrained(llama)
    added.add_tokens(["<|tool|>"], special_tokens=True)

    def adapter(name, base, **kw):
        return str(make_adapter(base, tmp_path / "in" / name, **kw))

    out = str(tmp_path / "out" / "m")
    return {
        "shapes": (["--adapter", adapter("a", llama, targets=["q_proj"]), "--model", str(small), "--out", out],
                   ["model.layers.0.self_attn.q_proj", "[32, 32]", "[4, 64]"]),
        "targets": (["--adapter", adapter("b", mixtral, targets=["w1"]), "--model", str(llama), "--out", out],
                    ["['w1'] match no module"]),
        "vocab": (["--adapter", adapter("c", llama, targets=["q_proj"]), "--out", out],
                  ["vocabulary size mismatch", "321 tokens"]),
        "exists": (["--adapter", adapter("d", llama, targets=["q_proj"]), "--out", str(tmp_path / "out")],
                   ["already exists", "--overwrite"]),
        "fp16 overflow": (["--adapter", adapter("e", llama, targets=["v_proj"], b_std=1e5), "--out", out,
                           "--dtype", "fp16"], ["not finite in fp16", "--dtype bf16"]),
        "no base": (["--adapter", adapter("f", llama, targets=["q_proj"], base_name="no/such/base"), "--out", out],
                    ["'no/such/base'", "pass --model"]),
        "shard size": (["--adapter", adapter("g", llama, targets=["q_proj"]), "--out", out,
                        "--max-shard-size", "lots"], ["--max-shard-size"]),
    }, added


@pytest.fixture(scope="module")
def cases(make_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    found, added = error_cases(make_model_dir, tmp)
    added.save_pretrained(tmp / "in" / "c")  # a tokenizer with a new token, but no embeddings saved for it
    (tmp / "out").mkdir()
    return found, tmp


@pytest.mark.parametrize("case", ["shapes", "targets", "vocab", "exists", "fp16 overflow", "no base", "shard size"])
def test_errors_are_one_line_exit_2_and_write_nothing(cases, case, capsys):
    found, tmp = cases
    argv, words = found[case]
    with pytest.raises(SystemExit) as e:
        run(merge.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert list((tmp / "out").iterdir()) == []  # no model, no staging directory
    with pytest.raises(BadInput):  # and in-process, the exception itself
        merge.main(argv)


def test_command_line(make_model_dir, tmp_path):
    """The real command: relative base path (as train.py records it) resolved from the cwd."""
    os.symlink(make_model_dir("llama"), tmp_path / "base")
    make_adapter(tmp_path / "base", tmp_path / "ad", targets=["q_proj", "o_proj"], base_name="base")
    cmd = [sys.executable, str(REPO / "merge.py"), "--adapter", "ad", "--out", "merged", "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread fixture, for the child
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "merge gap" in done.stdout and (tmp_path / "merged" / "model.safetensors").is_file()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "already exists" in done.stderr
