"""LoRA for rawqlora: the layer, injecting it into a model, and PEFT-format adapter files.

The data path, and where LoRA sits in it (litgpt's lora.py opens with the same picture):

    model dir (Hugging Face: config.json, *.safetensors)
        │  quant.load_model: linear layers to NF4 Linear4bit                      quant/
        ▼
    base model ─► lora.inject: LoRALinear around each target, only A and B train   lora/
        │         fast.enable (optional): faster forwards of the same math          fast/
        ▼
    train.py loop: loss, optimizer, checkpoints, gradient checkpointing            training/
        │  lora.save_adapter
        ▼
    adapter dir (PEFT format) ─┬─► merge.py: merged_weight into the dequantized base ─► model dir
                               └─► generate.py: base + lora.load_adapter, or a merged model dir

    from lora import inject, save_adapter, load_adapter
    inject(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32)
"""

from lora.adapter import load_adapter, save_adapter
from lora.inject import inject, lora_modules
from lora.layer import LoRALinear, merged_weight

__all__ = ["LoRALinear", "inject", "lora_modules", "save_adapter", "load_adapter", "merged_weight"]
