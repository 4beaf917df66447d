"""LoRA for rawqlora: the layer, injecting it into a model, and PEFT-format adapter files.

    from lora import inject, save_adapter, load_adapter
    inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32)
"""

from lora.adapter import load_adapter, save_adapter
from lora.inject import inject, lora_modules
from lora.layer import LoRALinear

__all__ = ["LoRALinear", "inject", "lora_modules", "save_adapter", "load_adapter"]
