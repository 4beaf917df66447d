"""GPTQ (quant/gptq.py, quant/gptq_checkpoint.py, quantize.py) against references that share none of its code.

- format: a dequantizer written here from the AutoGPTQ v1 description (int32 nibbles, lowest
  first; zeros stored minus one; g_idx) reads the written checkpoint back to the quantizer's Ŵ,
  bit for bit, with act-order on and off and group sizes 32/64/128;
- algorithm: GPTQ's output error below round-to-nearest's on every Linear; the same codes as a
  float64 implementation of the paper's update with an explicit inverse, downdated column by column;
- perplexity of the embedded default model (bf16 / GPTQ / RTN) on held-out text;
- load_gptq: greedy decoding equal to the same model with dense dequantized weights; the CUDA
  int4 layout checked through the kernel's CPU twin;
- bad input: one line on stderr, exit code 2; a third-party loader (gptqmodel) when installed.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

import quant
import quantize
from quant import gptq, gptq_checkpoint
from rawqlora import cli
from rawqlora.decode import generate, stop_ids

torch.set_num_threads(1)  # tiny models on a busy 2-core machine: faster single-threaded

REPO = Path(gptq.__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "default" / "model"
DEFAULT_DATA = REPO / "default" / "data" / "chat.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- a reader written from the format


def read_linear(tensors, prefix):
    """Ŵ [out, in] fp32 of one Linear, from the format description alone.

    qweight int32 [in/8, out]: input i's 4-bit code is bits 4·(i % 8) .. 4·(i % 8) + 3 of row i // 8.
    qzeros int32 [in/g, out/8]: output o's stored zero is bits 4·(o % 8) .. of column o // 8; zero = stored + 1.
    Ŵ[o, i] = scales[g_idx[i], o] · (code[i, o] − zero[g_idx[i], o]).
    """
    qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
    scales, g_idx = tensors[f"{prefix}.scales"], tensors[f"{prefix}.g_idx"].long()
    n_in, n_out = qweight.shape[0] * 8, qweight.shape[1]
    codes = torch.empty(n_in, n_out, dtype=torch.int64)
    for i in range(n_in):
        codes[i] = (qweight[i // 8].long() >> (4 * (i % 8))) & 0xF  # .long(): no sign games with bit 31
    zeros = torch.empty(qzeros.shape[0], n_out, dtype=torch.int64)
    for o in range(n_out):
        zeros[:, o] = ((qzeros[:, o // 8].long() >> (4 * (o % 8))) & 0xF) + 1
    # fp32: an fp16 scale times an integer in [-8, 8] is exact there, so this is Ŵ itself.
    return (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).T


def read_checkpoint(path):
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_pack_bit_order_by_hand():
    # Output 0 has codes 1..8 on inputs 0..7: lowest nibble first gives 0x87654321, as int32.
    codes = torch.zeros(8, 8, dtype=torch.uint8)
    codes[0] = torch.arange(1, 9)
    q = gptq.QuantizedWeight(codes, torch.ones(1, 8, dtype=torch.float16), torch.full((1, 8), 8, dtype=torch.int32),
                             torch.zeros(8, dtype=torch.int32))
    layer = gptq_checkpoint.GPTQLinear.from_quantized(q)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (1, 8)
    assert layer.qweight[0, 0].item() == 0x87654321 - 2**32
    assert layer.qzeros.tolist() == [[0x77777777]]  # zero 8, stored as 7 in every nibble (format v1)


# ----------------------------------------------------------------------------- fixtures


def facts():
    """Plain text of the kind the default model was pretrained on: biographies of its people, each
    fact in a random phrasing, in random order, written by scripts/make_default.py's own functions
    (its people come from its seed). Text the base models well, where quantization error shows as
    perplexity; text it never saw would say nothing about GPTQ."""
    spec = importlib.util.spec_from_file_location("make_default", DEFAULT_MODEL.parent.parent / "scripts" / "make_default.py")
    make_default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_default)
    people = make_default.make_people(random.Random(make_default.SEED))
    phrasing = random.Random(0)
    return [make_default.biography(person, phrasing) for person in people for _ in range(3)]


@pytest.fixture(scope="module")
def default_gptq(tmp_path_factory):
    """The default model quantized by the command's own function: (directory, results, group size, held-out)."""
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    widths = {config["hidden_size"], config["intermediate_size"]}
    group = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)
    if group is None:
        pytest.skip(f"default/model's widths {sorted(widths)} fit no GPTQ group size")
    lines, rng = facts(), random.Random(0)
    if len(lines) < 8:
        pytest.skip(f"default/data has only {len(lines)} sentence answers to build held-out text from")
    # Calibration and held-out text: 4 random biographies a row, from disjoint random draws (the
    # facts repeat, their phrasing, order and company do not).
    d = tmp_path_factory.mktemp("default-gptq")
    calib = d / "calibration.txt"
    calib.write_text("\n\n".join(" ".join(rng.sample(lines, 4)) for _ in range(300)) + "\n")
    held_out = [" ".join(rng.sample(lines, 4)) for _ in range(256)]
    results = quantize.quantize_directory(DEFAULT_MODEL, d / "out", calib, samples=32, seq_len=256, group_size=group,
                                      device="cpu")
    return d / "out", results, group, held_out


def dense_copy(model):
    """The same model with every GPTQLinear replaced by an nn.Linear holding read_linear's Ŵ."""
    tensors = {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, gptq_checkpoint.GPTQLinear)
               for k, v in m.state_dict().items()}
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, gptq_checkpoint.GPTQLinear)]:
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        dense.weight.data = read_linear(tensors, name).to(m.dense.dtype)
        model.set_submodule(name, dense)
    return model


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("group_size, act_order", [(32, True), (64, False), (128, True)])
def test_checkpoint_reads_back_to_the_intended_weights(group_size, act_order, make_model_dir, tmp_path):
    # hidden 128, intermediate 256: every group size divides every in_features.
    model_dir = make_model_dir("llama", hidden_size=128, layers=1)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Fact {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)))
    out = tmp_path / "out"
    results = quantize.quantize_directory(model_dir, out, calib, samples=8, seq_len=64, group_size=group_size,
                                      act_order=act_order, device="cpu")
    tensors = read_checkpoint(out)
    assert len(results) == 7  # q k v o gate up down
    for name, q in results.items():
        assert torch.equal(read_linear(tensors, name), q.weight), name  # exact: no tolerance
        g_idx = tensors[f"{name}.g_idx"].long()
        assert torch.bincount(g_idx).tolist() == [group_size] * (len(g_idx) // group_size)  # g columns a group
        if len(g_idx) > group_size:  # act-order groups follow diag(H), not the column order
            assert torch.equal(g_idx, torch.arange(len(g_idx)) // group_size) != act_order
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert f"{name}.weight" not in tensors
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": act_order,
        "checkpoint_format": "gptq"}
    assert tensors["lm_head.weight"].dtype == tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the temporary directory is gone


@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_biases_and_experts_round_trip(arch, make_model_dir, tmp_path):
    # Qwen2: q/k/v biases (written fp16, as AutoGPTQ does); Mixtral: per-expert Linears under the
    # checkpoint's block_sparse_moe names, the router kept dense.
    model_dir = make_model_dir(arch)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Fact {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)))
    results = quantize.quantize_directory(model_dir, tmp_path / "out", calib, samples=8, seq_len=64, group_size=32,
                                      device="cpu")
    tensors = read_checkpoint(tmp_path / "out")
    dense = quant.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu").state_dict()
    for name, q in results.items():
        key = quant.checkpoint_key(arch, name)
        assert torch.equal(read_linear(tensors, key), q.weight), name
        if f"{name}.bias" in dense:
            assert torch.equal(tensors[f"{key}.bias"], dense[f"{name}.bias"].half())
    if arch == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.3.w2.qweight" in tensors
        assert "model.layers.0.block_sparse_moe.gate.weight" in tensors  # the router, dense
    else:
        assert "model.layers.0.self_attn.q_proj.bias" in tensors
    model = gptq_checkpoint.load_gptq(tmp_path / "out", "cpu", torch.float32)
    assert sum(isinstance(m, gptq_checkpoint.GPTQLinear) for m in model.modules()) == len(results)


# ----------------------------------------------------------------------------- algorithm


def paper_gptq(W, H, group_size, act_order, damp=0.01):
    """The paper's update as written (OBS, eq. 2-3), float64, one column at a time, explicit H⁻¹:

    δ = −(w_q − quant(w_q)) / [H⁻¹]_qq · H⁻¹[q, :],   H⁻¹ ← H⁻¹ − H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq.
    The downdate zeroes row and column q, so later updates leave the columns already done alone.
    Same grid: per group of columns, scale 2·max|w|/15 of the current weights, rounded to fp16; zero 8.
    """
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    d = H.diagonal()
    d[d == 0] = 1
    perm = torch.argsort(d, descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype))
    codes = torch.zeros_like(W)
    for q in range(n):
        if q % group_size == 0:
            scale = (2 * W[:, q : q + group_size].abs().amax(1) / 15).half().double()
        codes[:, q] = torch.clamp(torch.round(W[:, q] / scale) + 8, 0, 15)
        err = (W[:, q] - scale * (codes[:, q] - 8)) / Hinv[q, q]
        W -= err[:, None] * Hinv[q][None, :]
        Hinv -= Hinv[:, q : q + 1] @ Hinv[q : q + 1, :] / Hinv[q, q]
    return codes[:, torch.argsort(perm)]


def correlated_inputs(n_in, tokens, seed):
    """Inputs with correlated features and very different scales, like real activations; one dead feature."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in // 4, generator=g, dtype=torch.float64) @ torch.randn(n_in // 4, n_in, generator=g,
                                                                                     dtype=torch.float64)
    X = X * torch.rand(n_in, generator=g, dtype=torch.float64) * 3 + 0.1 * torch.randn(tokens, n_in, generator=g,
                                                                                      dtype=torch.float64)
    X[:, 5] = 0
    return X


@pytest.mark.parametrize("act_order", [False, True])
def test_same_codes_as_the_papers_update_in_float64(act_order):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 128, generator=g, dtype=torch.float64) * 0.05
    X = correlated_inputs(128, 512, seed=2)
    H = 2 / len(X) * X.T @ X
    expected = paper_gptq(W, H, 32, act_order)
    for block in (128, 32):  # lazy batches change the order of the additions, not the result
        q = gptq.gptq_quantize_layer(W, H, group_size=32, act_order=act_order, block_size=block)
        # Exactly equal codes: both run in float64, where the two paths differ by ~1e-13, far
        # from the half-integer a code flips at (seeded, so never by chance on this input).
        assert torch.equal(q.codes.double(), expected)
    rtn = gptq.rtn_quantize(W.float(), group_size=32).weight.double()
    assert gptq.output_error(W, q.weight.double(), H) < 0.5 * gptq.output_error(W, rtn, H)


def test_output_error_is_the_mean_squared_output_difference():
    X = correlated_inputs(64, 300, seed=3)
    W = torch.randn(16, 64, dtype=torch.float64)
    What = gptq.rtn_quantize(W.float(), group_size=32).weight.double()
    direct = ((W - What) @ X.T).pow(2).sum().item() / len(X)  # ‖WX − ŴX‖² / n
    assert gptq.output_error(W, What, 2 / len(X) * X.T @ X) == pytest.approx(direct, rel=1e-10)


def test_gptq_beats_round_to_nearest_on_every_linear(default_gptq):
    # The errors are ‖WX − ŴX‖²/n on the calibration inputs each Linear saw inside the partly
    # quantized model (quantize_model's H), for GPTQ's Ŵ and RTN's on the same grid.
    _, results, _, _ = default_gptq
    assert len(results) == 7 * 4
    for name, q in results.items():
        assert q.error < q.rtn_error, (name, q.error, q.rtn_error)


def perplexity(model, tokenizer, texts):
    ids = [tokenizer(t + tokenizer.eos_token)["input_ids"] for t in texts]
    loss, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            logits = model(input_ids=x).logits.float()
            loss += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += len(row) - 1
    return torch.tensor(loss / count).exp().item()


def test_perplexity_bf16_gptq_rtn(default_gptq):
    out, _, group, held_out = default_gptq
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    reference = quant.load_model(DEFAULT_MODEL, quant=None, compute_dtype=torch.float32, device="cpu")  # bf16 weights
    ppl_bf16 = perplexity(reference, tokenizer, held_out)
    for _, m in reference.model.layers.named_modules():
        if type(m) is nn.Linear:
            m.weight.data = gptq.rtn_quantize(m.weight.data, group_size=group).weight
    ppl_rtn = perplexity(reference, tokenizer, held_out)
    ppl_gptq = perplexity(gptq_checkpoint.load_gptq(out, "cpu", torch.float32), tokenizer, held_out)
    closed = (ppl_rtn - ppl_gptq) / (ppl_rtn - ppl_bf16)
    print(f"perplexity bf16 {ppl_bf16:.5f}  GPTQ {ppl_gptq:.5f}  RTN {ppl_rtn:.5f}  (GPTQ closes {closed:.0%} of the gap)")
    assert ppl_bf16 < ppl_rtn and ppl_gptq < ppl_rtn
    # GPTQ lands within the evaluation noise of bf16 on this model: over 3 calibration/held-out
    # draws of 256 to 4096 rows it sat within 1e-4 (relative) of bf16, as often below as above,
    # while RTN sat 0.07-0.14% above. So the test asks for most of RTN's gap closed (measured:
    # 92-103%), not for a strict bf16 < GPTQ that a different draw would flip.
    assert closed > 0.75


# ----------------------------------------------------------------------------- loading and running


def test_load_gptq_greedy_equals_dense_dequantized(default_gptq):
    out, _, _, _ = default_gptq
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [tokenizer(p)["input_ids"] for p in ["The capital of France is", "A cow says", "The opposite of hot"]]
    for dtype in (torch.float32, torch.bfloat16):
        model = gptq_checkpoint.load_gptq(out, "cpu", dtype)
        assert sum(isinstance(m, gptq_checkpoint.GPTQLinear) for m in model.modules()) == 28
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompts[0]])).logits
        got = generate(model, prompts, max_new_tokens=12, stop_ids=[tokenizer.eos_token_id]).tokens
        dense = dense_copy(model)
        assert not any(isinstance(m, gptq_checkpoint.GPTQLinear) for m in dense.modules())
        with torch.no_grad():
            assert torch.equal(dense(input_ids=torch.tensor([prompts[0]])).logits, logits)
        assert generate(dense, prompts, max_new_tokens=12, stop_ids=[tokenizer.eos_token_id]).tokens == got
    assert any(len(t) > 3 for t in got)


def test_int4_layout_through_the_kernels_cpu_twin():
    # The CUDA path repacks tinygemm_layout()'s codes for _weight_int4pack_mm; its CPU twin takes
    # the same codes (unpacked), groups and scales_and_zeros, so it checks the layout, the zero
    # conversion and the act-order input permutation here. fp32 in and out: rounding only.
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 256, generator=g) * 0.05
    X = correlated_inputs(256, 400, seed=5).float()
    q = gptq.gptq_quantize_layer(W, 2 / len(X) * X.T @ X, group_size=64, act_order=True)
    layer = gptq_checkpoint.GPTQLinear.from_quantized(q)
    codes, perm, scales_and_zeros = layer.tinygemm_layout()
    assert perm is not None  # act-order: the columns are regrouped
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    x = torch.randn(5, 256, generator=g)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:, perm], packed, 64, scales_and_zeros)
    torch.testing.assert_close(y, F.linear(x, q.weight), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, make_model_dir):
    d = tmp_path_factory.mktemp("gptq-bad")
    (d / "empty.jsonl").write_text("")
    (d / "data.txt").write_text("The capital of France is Paris.\n")
    return d, make_model_dir("llama")  # hidden 64: group size 128 does not divide it


BAD = [
    # id, argv, phrase on the one stderr line
    ("group-not-dividing", "--model {narrow} --out {d}/o --calibration {d}/data.txt --group-size 128",
     "does not divide in_features 64"),
    ("group-not-supported", "--model {narrow} --out {d}/o --calibration {d}/data.txt --group-size 48",
     "group size 48 is not supported"),
    ("no-calibration", "--model {narrow} --out {d}/o --group-size 32", "no calibration data"),
    ("empty-calibration", "--model {narrow} --out {d}/o --calibration {d}/empty.jsonl --group-size 32", "is empty"),
]


@pytest.mark.parametrize("row_id, template, phrase", BAD, ids=[r[0] for r in BAD])
def test_bad_input_is_one_line(row_id, template, phrase, bad_inputs, capsys):
    d, narrow = bad_inputs
    with pytest.raises(SystemExit) as exit_info:
        cli.run(quantize.main, template.format(d=d, narrow=narrow).split())
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert not (d / "o").exists()


@pytest.fixture(scope="module", autouse=True)
def already_quantized_run(tmp_path_factory):
    """`python quantize.py` on a directory whose config.json says it is quantized, started as a real
    subprocess before the module's first test so that its imports (~8 s) overlap the other tests."""
    d = tmp_path_factory.mktemp("quantized")
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    config["quantization_config"] = gptq_checkpoint.quantization_config(128, False)
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "quantize.py", "--model", str(d / "model"), "--out", str(d / "o"),
           "--calibration", str(DEFAULT_DATA)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    yield proc, d
    if proc.poll() is None:
        proc.kill()


def test_already_quantized_model_through_the_real_command(already_quantized_run):
    proc, d = already_quantized_run
    _, err = proc.communicate(timeout=120)
    lines = err.splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already quantized" in lines[0], lines
    assert not (d / "o").exists()


# ----------------------------------------------------------------------------- a third-party loader


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
                    reason="gptqmodel/optimum not installed (gptqmodel needs torch >= 2.14.1; not a dependency)")
@pytest.mark.parametrize("act_order", [False, True])
def test_transformers_with_gptqmodel_loads_the_checkpoint(act_order, make_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    model_dir = make_model_dir("llama", hidden_size=128, layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Fact {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)))
    out = tmp_path / "out"
    quantize.quantize_directory(model_dir, out, calib, samples=8, seq_len=64, group_size=32, act_order=act_order,
                            device="cpu")
    # backend="torch": gptqmodel's plain PyTorch kernel, whose dequantize_weight() we can read.
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float16,
                                                  quantization_config=GPTQConfig(bits=4, backend="torch"))
    ours = gptq_checkpoint.load_gptq(out, "cpu", torch.float32)
    layers = [(n, m) for n, m in theirs.named_modules() if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")]
    assert len(layers) == 14
    for name, m in layers:
        w, expected = m.dequantize_weight().float().T, ours.get_submodule(name).dense  # theirs is [in, out]
        # Theirs multiplies scale · (q − zero) in fp16: one rounding, at most half an fp16 ulp (2^-11 relative).
        assert ((w - expected).abs() <= expected.abs() * 2**-11).all(), name
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("The capital of France is Paris. A cow")["input_ids"]])
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, theirs(input_ids=ids).logits.float()
    # Their forward runs in fp16, ours in fp32 from the same Ŵ: fp16 rounding over 2 layers.
    torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * expected.abs().max().item())


def test_merge_quantize_gptq_then_generate(make_model_dir, tmp_path, capsys):
    """The recipe's last step through the real commands: merge.py --quantize gptq writes OUT-gptq next to
    the merged model, and generate.py runs it, greedy output equal to our decode loop on load_gptq's model."""
    import generate as generate_cli
    import merge
    from test_merge import make_adapter

    base = make_model_dir("llama")
    adapter = make_adapter(base, tmp_path / "adapter")
    calibration = tmp_path / "calib.jsonl"
    calibration.write_text("".join(json.dumps({"text": " ".join(facts()[i:i + 6])}) + "\n" for i in range(0, 60, 6)))
    out = tmp_path / "merged"
    merge.main(["--adapter", str(adapter), "--out", str(out), "--dtype", "fp32", "--no-gap", "--quantize", "gptq",
                "--calibration", str(calibration), "--calibration-samples", "8", "--calibration-len", "32",
                "--group-size", "32"])
    assert gptq_checkpoint.is_gptq(out.with_name("merged-gptq")) and not gptq_checkpoint.is_gptq(out)
    config = json.loads((out.with_name("merged-gptq") / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("bits", "group_size", "sym", "desc_act")} == dict(bits=4, group_size=32, sym=True,
                                                                                  desc_act=False)
    capsys.readouterr()
    prompt = "The capital of France is"
    generate_cli.main(["--model", str(out.with_name("merged-gptq")), "--raw", "--max-new-tokens", "8", prompt])
    printed = capsys.readouterr().out
    model = gptq_checkpoint.load_gptq(out.with_name("merged-gptq"), device="cpu", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out.with_name("merged-gptq"))
    ids = generate(model, [tokenizer(prompt)["input_ids"]], 8, stop_ids(tokenizer, model)).tokens[0]
    assert printed == tokenizer.decode(ids, skip_special_tokens=True) + "\n"
