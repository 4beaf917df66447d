"""Adapter files: ours load in PEFT, PEFT's load in ours, bad directories fail clearly.

Logit comparisons use 1e-5 relative error: both sides run the same fp32 LoRA math on the
same weights, so any difference is rounding order (far below 1e-5), while a lost tensor,
a wrong scaling or a misnamed module moves logits by ~1e-2 (checked against the base).
"""

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import inject, load_adapter, save_adapter
from rawqlora.errors import BadInput
from reference import load_hf

TARGETS = ["q_proj", "v_proj", "down_proj"]
WHOLE = ["embed_tokens", "lm_head"]
FILES = ["adapter_config.json", "adapter_model.safetensors"]
TOL = 1e-5  # see the module docstring


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def logits(model, vocab=256):
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (2, 9))
    with torch.no_grad():
        return model(ids).logits


def perturb(params, seed=0):
    """Move trained tensors (LoRA B included) well away from their init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)


def ours_trained(base_dir, rslora=False, modules_to_save=()):
    model = load_hf(base_dir)
    inject(model, TARGETS, r=4, alpha=8, rslora=rslora)
    whole = [p for n, p in model.named_parameters() if n.split(".")[-2] in modules_to_save]
    perturb([p for n, p in model.named_parameters() if p.requires_grad] + whole)
    return model


def peft_trained(base_dir, tmp_path, rslora=False, modules_to_save=None):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=rslora,
        modules_to_save=modules_to_save, task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(load_hf(base_dir), config)
    perturb([p for p in model.parameters() if p.requires_grad])
    model.save_pretrained(tmp_path / "peft")
    return model


def read_config(path):
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_ours_loads_in_peft(make_model_dir, tmp_path, rslora):
    base_dir = make_model_dir("llama")
    ours = ours_trained(base_dir, rslora)
    save_adapter(ours, tmp_path / "ad", base_model=str(base_dir))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "ad")
    assert [str(w.message) for w in caught if "/peft/" in w.filename] == []
    assert rel_err(logits(theirs), logits(ours)) <= TOL
    assert rel_err(logits(ours), logits(load_hf(base_dir))) > 1e-3

    # Same file layout as PEFT's own save of the same adapter: names, shapes, fp32.
    peft_trained(base_dir, tmp_path, rslora)
    mine, ref = (load_file(tmp_path / d / FILES[1]) for d in ("ad", "peft"))
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {
        k: (v.shape, v.dtype) for k, v in ref.items()
    }
    config, ref_config = read_config(tmp_path / "ad"), read_config(tmp_path / "peft")
    for key in config.keys() - {"base_model_name_or_path", "target_modules"}:
        assert config[key] == ref_config[key], key
    assert config["target_modules"] == sorted(ref_config["target_modules"]) == sorted(TARGETS)
    assert config["base_model_name_or_path"] == str(base_dir)


@pytest.mark.parametrize("rslora,nf4", [(False, False), (True, True)], ids=["lora", "rslora-nf4"])
def test_peft_loads_in_ours(make_model_dir, tmp_path, rslora, nf4):
    base_dir = make_model_dir("qwen2")
    peft_trained(base_dir, tmp_path, rslora)
    theirs = peft.PeftModel.from_pretrained(load_hf(base_dir, nf4), tmp_path / "peft")
    ours = load_hf(base_dir, nf4)
    names = load_adapter(ours, tmp_path / "peft")
    layers = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    assert names == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in layers)
    assert rel_err(logits(ours), logits(theirs)) <= TOL
    assert rel_err(logits(ours), logits(load_hf(base_dir, nf4))) > 1e-3


def test_modules_to_save_both_ways(make_model_dir, tmp_path):
    base_dir = make_model_dir("mistral")
    ours = ours_trained(base_dir, modules_to_save=WHOLE)
    save_adapter(ours, tmp_path / "ad", modules_to_save=WHOLE)
    assert "base_model.model.model.embed_tokens.weight" in load_file(tmp_path / "ad" / FILES[1])
    theirs = peft.PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "ad")
    assert rel_err(logits(theirs), logits(ours)) <= TOL

    theirs = peft_trained(base_dir, tmp_path, modules_to_save=WHOLE)
    ours = load_hf(base_dir)
    load_adapter(ours, tmp_path / "peft")
    assert rel_err(logits(ours), logits(theirs)) <= TOL
    assert rel_err(logits(ours), logits(load_hf(base_dir))) > 1e-3


def test_grown_vocabulary_is_restored(make_model_dir, tmp_path):
    base_dir = make_model_dir("llama")
    ours = load_hf(base_dir)
    vocab = ours.get_input_embeddings().weight.shape[0]
    ours.resize_token_embeddings(vocab + 3, mean_resizing=False)  # e.g. added chat tokens
    inject(ours, TARGETS, r=4, alpha=8)
    perturb([ours.get_input_embeddings().weight, ours.lm_head.weight])
    save_adapter(ours, tmp_path / "ad", modules_to_save=WHOLE)

    fresh = load_hf(base_dir)
    load_adapter(fresh, tmp_path / "ad")
    assert fresh.get_input_embeddings().weight.shape[0] == fresh.config.vocab_size == vocab + 3
    assert rel_err(logits(fresh, vocab + 3), logits(ours, vocab + 3)) <= TOL


def test_save_is_contiguous_fp32_and_refuses_to_clobber(make_model_dir, tmp_path):
    ours = ours_trained(make_model_dir("llama"))
    save_adapter(ours, tmp_path / "ad")
    for t in load_file(tmp_path / "ad" / FILES[1]).values():
        assert t.dtype == torch.float32 and t.is_contiguous()
    with pytest.raises(BadInput, match="already exists and is not empty.*overwrite=True"):
        save_adapter(ours, tmp_path / "ad")
    save_adapter(ours, tmp_path / "ad", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp dirs left behind
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == FILES


def test_bad_adapters(make_model_dir, tmp_path):
    base_dir = make_model_dir("llama")
    adapter = tmp_path / "ad"
    save_adapter(ours_trained(base_dir), adapter)
    config = read_config(adapter)

    with pytest.raises(BadInput, match="adapter directory .*nowhere does not exist"):
        load_adapter(load_hf(base_dir), tmp_path / "nowhere")

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / FILES[0]).write_text(json.dumps(config))
    with pytest.raises(BadInput, match="has no adapter_model.safetensors; not a complete"):
        load_adapter(load_hf(base_dir), tmp_path / "half")

    # Same architecture, other widths: the first mismatching tensor, with both shapes.
    narrow = load_hf(make_model_dir("llama", intermediate_size=64))
    with pytest.raises(BadInput, match=r"mlp.down_proj.lora_A.weight has shape \[4, 128\] "
                                       r"but this model's is \[4, 64\]"):
        load_adapter(narrow, adapter)

    (adapter / FILES[0]).write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(BadInput, match=r"not fit this model: target module\(s\) \['c_attn'\] match"):
        load_adapter(load_hf(base_dir), adapter)
    (adapter / FILES[0]).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(BadInput, match="uses use_dora=True, which rawqlora does not support"):
        load_adapter(load_hf(base_dir), adapter)
    (adapter / FILES[0]).write_text(json.dumps(config))

    tensors = load_file(adapter / FILES[1])
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / FILES[1])
    with pytest.raises(BadInput, match=f"NaN/inf in {key}"):
        load_adapter(load_hf(base_dir), adapter)
