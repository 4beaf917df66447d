"""References the tests compare against (never used at run time): transformers' own loading."""

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def load_hf(path, nf4=False):
    """The model as transformers loads it: fp32, or NF4 through its bitsandbytes integration (fp32 compute)."""
    if not nf4:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")
