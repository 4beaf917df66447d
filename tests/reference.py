"""References the tests compare against (never used at run time): transformers' own loading."""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from quant.linear4bit import Linear4bit, keep_standard_layout


def load_hf(path, nf4=False):
    """The model as transformers loads it: fp32, or NF4 through its bitsandbytes integration (fp32 compute)."""
    if not nf4:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return load_hf_4bit(path, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_hf_4bit(path, **bnb_config):
    """transformers' own 4-bit load (fp32 for the dense rest); `bnb_config` as BitsAndBytesConfig's
    keywords, or none for a pre-quantized directory.

    Its Linear4bit layers then run the arithmetic ours run on every CPU: bitsandbytes' repacking
    for AVX512-BF16 CPUs is switched off as in quant/linear4bit.py. Left on, the reference would
    compute in bf16 after its first eval forward on such CPUs, and compare as a different model.
    """
    # A pre-quantized directory is read as its config says (a dtype here would cast its packed weights).
    fresh = dict(dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_4bit=True, **bnb_config))
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **(fresh if bnb_config else {}))
    for module in model.modules():
        if isinstance(module, Linear4bit):
            keep_standard_layout(module)
    return model
