"""Time and peak GPU memory of GPTQ (quant/gptq.py) on a Mistral-7B-shaped model, on one CUDA GPU.

    python bench/gptq_cost.py                 # 32 layers, 128 calibration rows x 2048 tokens, group 128
    python bench/gptq_cost.py --layers 2      # a quick smoke run
    python bench/gptq_cost.py --act-order --group-size 64

The model is random (bf16, normal(0, 0.02) weights, as the configs' initializer_range), built in
host memory as quantize_model expects it: decoder layers wait on the CPU and go to the GPU one at a
time. Calibration is random token ids. The time covers quantize_model alone (capturing layer 0's
inputs, Hessians, GPTQ, the quantized layers' outputs, the host<->GPU copies), not building the
model or writing a checkpoint. Prints one JSON line; bench/RESULTS.md gets it by hand.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MistralConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from quant.gptq import quantize_model  # noqa: E402


def random_model(layers, seed=0, **shape):
    """A Mistral-7B-shaped bf16 model on the CPU, filled tensor by tensor (random numbers drawn on the GPU)."""
    shape = dict(dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                      vocab_size=32000), **shape)
    config = MistralConfig(num_hidden_layers=layers, **shape)
    draw = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for trying this file at toy sizes
    with torch.device("meta"):  # no memory, no slow default init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    g = torch.Generator(device=draw).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1)
            else:
                p.copy_(torch.randn(p.shape, device=draw, dtype=torch.bfloat16, generator=g) * 0.02)
    for name, module in list(model.named_modules()):  # to_empty left the rotary inv_freq uninitialised
        if hasattr(module, "original_inv_freq"):
            model.set_submodule(name, type(module)(config=config))
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Mistral-7B)")
    p.add_argument("--samples", type=int, default=128, help="calibration rows")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens a row")
    p.add_argument("--batch-size", type=int, default=8, help="rows a forward pass")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gptq_cost.py measures GPU time and memory: it needs CUDA")

    t0 = time.time()
    model = random_model(args.layers)
    build = time.time() - t0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=g)
    batches = list(ids.split(args.batch_size))

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    results = quantize_model(model, batches, group_size=args.group_size, act_order=args.act_order, device="cuda")
    torch.cuda.synchronize()
    seconds = time.time() - t0
    error = sum(q.error for q in results.values()) / sum(q.rtn_error for q in results.values())
    print(json.dumps({
        "what": "quant.gptq.quantize_model, Mistral-7B shape, random bf16 weights and tokens",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "group_size": args.group_size, "act_order": args.act_order, "linears": len(results),
        "seconds": round(seconds, 1), "seconds_per_layer": round(seconds / args.layers, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "build_model_seconds": round(build, 1), "gptq_error_vs_rtn": round(error, 4),
    }))


if __name__ == "__main__":
    main()
