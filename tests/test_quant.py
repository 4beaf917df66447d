"""quant/: 4-bit loading and saving, checked against bitsandbytes and transformers themselves.

References: `bitsandbytes.functional.quantize_4bit` for the stored numbers, transformers'
`from_pretrained` (dense, and with its own bnb 4-bit quantizer) for the logits.
"""

import copy
import ctypes
import gc
import json
import multiprocessing
import os
import shutil
import sys

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from conftest import ARCHS
import quant
from quant import LinearExperts, checkpoint_key, dequantize, load_model, save_quantized
from rawqlora.errors import BadInput
from rawqlora.tiny import tiny_model
from reference import load_hf_4bit

F32 = torch.float32


def tokens(seed=0):
    return torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids=None):
    return model(tokens() if ids is None else ids).logits


def hf_bnb(path, quant_type="nf4"):
    """transformers' own 4-bit load of `path`: the reference our NF4 load must reproduce."""
    return load_hf_4bit(path, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=F32)


def linear4bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


# ---------------------------------------------------------------- what is stored


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_weights_are_bitsandbytes_own(make_model_dir, quant):
    """Packed codes and (double-quantized) block scales equal quantize_4bit of the checkpoint tensor, bit for bit.

    Mixtral, so the per-expert Linears are covered as well as attention.
    """
    path = make_model_dir("mixtral")
    model = load_model(path, quant=quant, compute_dtype=F32)
    layers = linear4bit(model)
    # 2 layers x (4 attention + 4 experts x 3) Linears; router and lm_head stay dense.
    assert len(layers) == 2 * (4 + 4 * 3)
    assert type(model.lm_head) is torch.nn.Linear
    with safe_open(path / "model.safetensors", "pt") as f:
        for name, module in layers.items():
            source = f.get_tensor(checkpoint_key("mixtral", name + ".weight"))
            packed, state = bnb.functional.quantize_4bit(
                source, blocksize=64, compress_statistics=True, quant_type=quant
            )
            ours = module.weight.quant_state
            assert torch.equal(module.weight.data, packed), name
            assert torch.equal(ours.absmax, state.absmax), name  # uint8 codes of the scales
            assert torch.equal(ours.state2.absmax, state.state2.absmax), name
            assert torch.equal(ours.offset, state.offset), name
            assert (ours.quant_type, ours.blocksize, ours.shape) == (quant, 64, source.shape)
            expected = bnb.functional.dequantize_4bit(packed, state)
            assert torch.equal(dequantize(module), expected), name


def test_dtypes_stay_in_compute_dtype(make_model_dir):
    """bf16 compute: nothing is upcast to fp32 except the rotary frequencies, which transformers keeps fp32 too."""
    model = load_model(make_model_dir("mixtral"), quant="nf4")  # compute_dtype bf16 by default
    for name, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            assert param.dtype == torch.uint8 and param.quant_state.dtype == torch.bfloat16, name
            assert not param.requires_grad, name
        else:
            assert param.dtype == torch.bfloat16, name
    for module in linear4bit(model).values():
        assert module.compute_dtype == torch.bfloat16
    assert {n: b.dtype for n, b in model.named_buffers()} == {
        "model.rotary_emb.inv_freq": F32,
        "model.rotary_emb.original_inv_freq": F32,
    }
    assert torch.isfinite(logits(model)).all()


def test_dequantize_dense_linear_is_a_copy():
    linear = torch.nn.Linear(4, 3)
    before = linear.weight.detach().clone()
    weight = dequantize(linear)
    assert torch.equal(weight, before)
    weight += 1  # must not write through to the layer
    assert torch.equal(linear.weight.detach(), before)
    with pytest.raises(TypeError):
        dequantize(torch.nn.Embedding(3, 4))


# ---------------------------------------------------------------- logits against transformers

# Dense fp32 loads run the very same modules on the very same numbers, so they should agree
# exactly; 1e-5 relative only leaves room for a different matmul blocking (Mixtral's experts
# are two Linears here, a fused gate_up matmul there).


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_load_matches_from_pretrained(make_model_dir, arch):
    path = make_model_dir(arch)
    ours = load_model(path, quant=None, compute_dtype=F32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=F32)
    assert all(p.dtype == F32 for p in ours.parameters())
    expected = logits(reference)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_tied_embeddings(make_model_dir, tmp_path):
    path = make_model_dir("llama", tie_word_embeddings=True)
    dense = load_model(path, quant=None, compute_dtype=F32)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    torch.testing.assert_close(logits(dense), logits(AutoModelForCausalLM.from_pretrained(path, dtype=F32)))
    # Even when asked to quantize everything, the tied head stays the (dense) embedding.
    quantized = load_model(path, compute_dtype=F32, skip=())
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    save_quantized(quantized, tmp_path / "q")
    reloaded = load_model(tmp_path / "q", compute_dtype=F32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(logits(reloaded), logits(quantized))


# Both sides quantize the same fp32 numbers with the same bitsandbytes call and run the
# same Linear4bit forward, so the logits are equal bit for bit; we assert exactly that.


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_nf4_load_matches_transformers_bnb(make_model_dir, arch):
    path = make_model_dir(arch)
    ours = load_model(path, compute_dtype=F32)
    reference = hf_bnb(path)
    assert linear4bit(ours).keys() == linear4bit(reference).keys()
    assert torch.equal(logits(ours), logits(reference))


def test_nf4_mixtral_matches_dequantized_reference(make_model_dir):
    """transformers keeps Mixtral's fused experts dense under bnb, so its 4-bit load is no reference.

    Instead: transformers' dense Mixtral with every weight we quantized replaced by its
    dequantized value (experts fused back as gate_up = [w1; w3], down = w2). bitsandbytes'
    CPU forward dequantizes and runs the same fp32 matmul, so only matmul blocking differs.
    """
    path = make_model_dir("mixtral")
    ours = load_model(path, compute_dtype=F32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=F32)
    with torch.no_grad():
        for name, module in linear4bit(ours).items():
            if ".experts." in name:
                layer, expert, proj = name.split(".experts.")[0], int(name.split(".")[-2]), name[-2:]
                experts = reference.get_submodule(layer + ".experts")
                half = experts.gate_up_proj.shape[1] // 2
                target = {
                    "w1": experts.gate_up_proj[expert, :half],
                    "w3": experts.gate_up_proj[expert, half:],
                    "w2": experts.down_proj[expert],
                }[proj]
            else:
                target = reference.get_submodule(name).weight
            target.copy_(dequantize(module))
    expected = logits(reference)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_linear_experts_match_fused_experts():
    """LinearExperts holding the same weights computes what transformers' MixtralExperts does."""
    model = tiny_model("mixtral", 320)
    fused = model.model.layers[0].mlp.experts
    ours = LinearExperts(model.config)
    half = fused.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        for e, expert in enumerate(ours):
            expert.w1.weight.copy_(fused.gate_up_proj[e, :half])
            expert.w3.weight.copy_(fused.gate_up_proj[e, half:])
            expert.w2.weight.copy_(fused.down_proj[e])
    torch.manual_seed(0)
    hidden = torch.randn(10, model.config.hidden_size)
    top_k_index = torch.stack([torch.randperm(4)[:2] for _ in range(10)])  # expert 3 may go unused
    top_k_weights = torch.rand(10, 2).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden, top_k_index, top_k_weights), fused(hidden, top_k_index, top_k_weights))


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases next to 4-bit weights
def test_save_quantized_round_trips(make_model_dir, tmp_path, arch):
    source = make_model_dir(arch)
    model = load_model(source, compute_dtype=F32)
    expected = logits(model)
    out = tmp_path / "saved"
    save_quantized(model, out, tokenizer_source=source)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    theirs = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=F32,
        llm_int8_skip_modules=["lm_head"],
    ).to_dict()
    assert config == theirs
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    q = "model.layers.0.self_attn.q_proj.weight"
    stats = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"]
    assert {q, *(f"{q}.{s}" for s in stats)} <= keys
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()

    assert torch.equal(logits(load_hf_4bit(out)), expected)
    assert torch.equal(logits(load_model(out, compute_dtype=F32)), expected)


def test_save_quantized_mixtral_uses_checkpoint_names(make_model_dir, tmp_path):
    """Experts are written back as block_sparse_moe.experts.E.w1/w2/w3, and read back by load_model.

    (transformers 5 cannot read this file: it fuses experts into 3-D tensors, which its
    bnb quantizer never quantizes, so 4-bit experts have nowhere to go there.)
    """
    model = load_model(make_model_dir("mixtral"), compute_dtype=F32)
    save_quantized(model, tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight.absmax" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    assert torch.equal(logits(load_model(tmp_path / "saved", compute_dtype=F32)), logits(model))
    with pytest.raises(BadInput, match="already holds nf4 weights"):
        load_model(tmp_path / "saved", quant="fp4")


def test_save_quantized_shards_and_refuses_to_overwrite(make_model_dir, tmp_path):
    model = load_model(make_model_dir("llama"), compute_dtype=F32)
    out = tmp_path / "saved"
    save_quantized(model, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(logits(load_model(out, compute_dtype=F32)), logits(model))

    with pytest.raises(BadInput, match="not empty"):
        save_quantized(model, out)
    save_quantized(model, out, overwrite=True)  # now one file: the old shards must be gone
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary directory left behind

    with pytest.raises(BadInput, match="no 4-bit layers"):
        save_quantized(load_model(make_model_dir("llama"), quant=None), tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


# ---------------------------------------------------------------- checkpoints on disk


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("sharded")
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(path, max_shard_size="40KB")
    return path


def test_sharded_checkpoint_loads(sharded_dir):
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 2
    ours = load_model(sharded_dir, quant=None, compute_dtype=F32)
    assert torch.equal(logits(ours), logits(AutoModelForCausalLM.from_pretrained(sharded_dir, dtype=F32)))


def copy_of(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def write_config(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_missing_shard(sharded_dir, tmp_path):
    path = copy_of(sharded_dir, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(BadInput, match=f"lacks shard {shard.name}"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_file(make_model_dir, tmp_path, damage):
    path = copy_of(make_model_dir("llama"), tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(BadInput, match="model.safetensors is truncated or corrupted"):
        load_model(path)


def test_bad_paths(tmp_path, make_model_dir):
    with pytest.raises(BadInput, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="is not a directory"):
        load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no config.json"):
        load_model(tmp_path / "empty")
    only_bin = copy_of(make_model_dir("llama"), tmp_path)
    (only_bin / "model.safetensors").rename(only_bin / "pytorch_model.bin")
    with pytest.raises(BadInput, match="only PyTorch pickle weights"):
        load_model(only_bin)
    (only_bin / "pytorch_model.bin").rename(only_bin / "consolidated.safetensors")  # Mistral's own format
    with pytest.raises(BadInput, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(only_bin)
    with pytest.raises(BadInput, match="unknown quant 'int3'"):
        load_model(make_model_dir("llama"), quant="int3")


def test_unsupported_architectures(tmp_path):
    with pytest.raises(BadInput, match="model_type 'no_such_model' is not an architecture"):
        load_model(write_config(tmp_path / "unknown", model_type="no_such_model"))
    with pytest.raises(BadInput, match="model_type 'vit' has no causal-LM class"):
        load_model(write_config(tmp_path / "vit", model_type="vit"))
    for d in ("unknown", "vit"):
        assert not list((tmp_path / d).glob("*.safetensors"))  # config is checked, not weights


def test_legacy_rotary_buffers_in_the_checkpoint_are_skipped(make_model_dir, tmp_path):
    """Early Llama conversions store each layer's rotary `inv_freq`, which transformers now computes."""
    path = copy_of(make_model_dir("llama"), tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # wrong values: must not be read
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(logits(load_model(path, quant=None, compute_dtype=F32)),
                       logits(load_model(make_model_dir("llama"), quant=None, compute_dtype=F32)))


def test_prequantized_statistics_without_packed_data(make_model_dir, tmp_path):
    save_quantized(load_model(make_model_dir("llama"), compute_dtype=F32), tmp_path / "saved")
    tensors = load_file(tmp_path / "saved" / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]  # its absmax, quant_map, ... stay
    save_file(tensors, tmp_path / "saved" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match="no weights for 1 parameters .*q_proj.weight.*does not match"):
        load_model(tmp_path / "saved", compute_dtype=F32)


def test_checkpoint_not_matching_config(make_model_dir, tmp_path):
    path = copy_of(make_model_dir("llama"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(BadInput, match="config.json implies"):
        load_model(path)


# ---------------------------------------------------------------- writing model directories (quant/model_dir.py)


def test_shard_writer_layout_is_transformers_own(sharded_dir, tokenizer, tmp_path):
    """What the ShardWriter writes, transformers loads with nothing missing; the index lists the
    same tensors and the same total size as transformers' own save_pretrained of the same model."""
    model = tiny_model("llama", len(tokenizer), seed=1)
    out = tmp_path / "m"
    quant.write_model(model, out, model.config, max_shard_bytes=40_000)
    ours = json.loads((out / quant.INDEX).read_text())
    theirs = json.loads((sharded_dir / quant.INDEX).read_text())
    assert ours["weight_map"].keys() == theirs["weight_map"].keys()
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    files = sorted(set(ours["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=F32, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(logits(loaded), logits(model))


def snapshot(path):
    """A directory's files and contents, or None when it does not exist."""
    return {f.name: f.read_text() for f in path.iterdir()} if path.exists() else None


def test_staged_dir_is_the_old_directory_or_the_new_one_never_a_mix(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "stale.txt").write_text("old only")
    old = snapshot(out)

    with pytest.raises(BadInput, match="already exists and is not empty.*overwrite=True"):
        with quant.staged_dir(out):
            pass
    with pytest.raises(RuntimeError):  # a failure while writing: the old directory stays as it was
        with quant.staged_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new a")
            raise RuntimeError("killed mid-write")
    assert snapshot(out) == old and os.listdir(tmp_path) == ["out"]

    seen = []  # what a reader finds at `out` around every rename of the swap
    real_replace = os.replace

    def watched_replace(src, dst):
        seen.append(snapshot(out))
        real_replace(src, dst)
        seen.append(snapshot(out))

    monkeypatch.setattr(os, "replace", watched_replace)
    with quant.staged_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new a")
        (tmp / "b.txt").write_text("new b")
    new = {"a.txt": "new a", "b.txt": "new b"}
    assert snapshot(out) == new and os.listdir(tmp_path) == ["out"]
    assert seen and all(s in (old, None, new) for s in seen), seen


def test_write_text_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    quant.write_text_atomic(path, "old\n")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        quant.write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == [path.name]


def test_load_tokenizer_pads_with_eos_and_fails_in_one_line(tokenizer, tmp_path):
    unpadded = copy.deepcopy(tokenizer)
    unpadded.pad_token = None
    unpadded.save_pretrained(tmp_path / "tok")
    assert quant.load_tokenizer(tmp_path / "tok").pad_token == tokenizer.eos_token
    (tmp_path / "none").mkdir()
    with pytest.raises(BadInput, match="cannot load a tokenizer from .*none") as e:
        quant.load_tokenizer(tmp_path / "none")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- memory


LIBC = ctypes.CDLL("libc.so.6")


def anonymous_bytes():
    """Resident memory that is not file-backed: what the process itself allocated."""
    with open("/proc/self/statm") as f:
        _, resident, shared = f.read().split()[:3]
    return (int(resident) - int(shared)) * 4096


def peak_growth(fn):
    """Run fn(); return its result and the peak growth of anonymous memory during the call.

    Memory is sampled after every C-level call (every torch op), so the sampling points are
    the same on every run. Anonymous memory, because safetensors maps the checkpoint file:
    those pages are page cache the kernel can drop, not memory the loader holds.
    """
    gc.collect()
    gc.disable()  # a collection in mid-load would free earlier tests' garbage and hide the peak
    # Hand memory that is free but still held by glibc back to the kernel: the loader would
    # otherwise reuse it without resident memory growing, and the peak would read too low.
    LIBC.malloc_trim(0)
    base = peak = anonymous_bytes()

    def sample(frame, event, arg):
        nonlocal peak
        if event == "c_return":
            peak = max(peak, anonymous_bytes())

    sys.setprofile(sample)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
        gc.enable()
    return result, peak - base


def measure_loads(model_dir, warmup_dir):
    """In a fresh process: peak growth of an NF4 load and of a dense fp32 load, and the NF4 size.

    glibc's adaptive threshold would serve freed blocks from a heap it keeps, so resident
    memory would show what was once allocated rather than what is live. With a fixed 16 KB
    threshold every tensor but the tiniest gets its own mapping, returned when freed.
    """
    LIBC.mallopt(-3, 16 * 1024)  # -3 = M_MMAP_THRESHOLD
    load_model(warmup_dir)  # the first load imports and initialises lazily: not ours to count
    peaks = []
    for _ in range(3):  # the allocator only ever adds to the loader's own peak: keep the smallest
        quantized, peak = peak_growth(lambda: load_model(model_dir, compute_dtype=torch.bfloat16))
        final = sum(t.numel() * t.element_size() for t in quantized.state_dict().values())
        del quantized
        peaks.append(peak)
    peak = min(peaks)
    _, dense_peak = peak_growth(lambda: load_model(model_dir, quant=None, compute_dtype=F32))
    return final, peak, dense_peak


def test_peak_memory_is_one_tensor_not_the_model(tokenizer, tmp_path, make_model_dir):
    """12 layers of <= 0.5 MB (fp32) tensors: 29 MB dense, 4 MB in NF4.

    A loader holding the model dense would grow by ~29 MB. Ours streams: at any time it
    holds the 4-bit model built so far plus one tensor in flight. On CPU, host and device
    are the same memory, and bitsandbytes' CPU quantize_4bit is plain torch code that keeps
    several fp32 temporaries of its input alive at once (float(), abs, scaled, bucketize's
    int32 codes), where the CUDA kernel needs none: we measure ~5 fp32 copies of the
    largest tensor above the final size. The bound allows 8 (4 MB), independent of depth:
    final + 4 MB, under a third of the dense model.

    Measured in a fresh (spawned) process: after the rest of the suite, heap fragmentation
    and allocator arenas left by earlier tests add a few MB that are not the loader's.
    """
    model = tiny_model("llama", len(tokenizer), hidden_size=256, layers=12, heads=4, kv_heads=2)
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(tmp_path)
    del model
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        final, peak, dense_peak = pool.apply(measure_loads, (str(tmp_path), str(make_model_dir("llama"))))
    print(f"dense {dense_bytes / 1e6:.1f} MB, nf4 {final / 1e6:.1f} MB, peak growth {peak / 1e6:.1f} MB, "
          f"dense load peak growth {dense_peak / 1e6:.1f} MB")
    assert final < dense_bytes / 6
    assert peak < final + 8 * largest < dense_bytes / 3
    # The same measurement does see what a loader keeps: a dense fp32 load shows in full.
    assert dense_peak > 0.95 * dense_bytes
