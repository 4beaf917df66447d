"""GPTQ of a 16-bit Hugging Face model directory, calibrated on a data file train.py reads.

    python quantize.py --model merged --out merged-gptq --calibration data.jsonl

(merge.py --quantize gptq runs the same after merging.) The algorithm is quant/gptq.py, the
checkpoint it writes quant/gptq_checkpoint.py; here are the calibration rows, every check of
the inputs before the model is loaded, and the command.
"""

import random
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from quant.experts import unfuse_experts
from quant.gptq import BITS, GROUP_SIZES, decoder_layers, quantize_model
from quant.gptq_checkpoint import save_gptq
from quant.load import load_model, read_config
from rawqlora.cli import ArgumentParser, run
from rawqlora.errors import BadInput
from training import data


def calibration_batches(spec, tokenizer, samples, seq_len, batch_size=8, seed=0):
    """Rows of seq_len token ids from a data file, rendered as train.py renders it, for calibration.

    Records are shuffled (seeded), encoded by training.data (chat template, BOS, EOS after each
    response) and concatenated, as the paper cuts 2048-token segments from a text stream; the
    stream is cut into at most `samples` rows of exactly seq_len tokens (one shorter row when the
    data has fewer). Equal rows need no padding, so every token in H is a real one.
    """
    records = data.load_records(spec)  # BadInput for a missing, empty or malformed file
    fmt = data.detect_format(records.column_names)
    if fmt in ("chat", "prompt-response"):
        _, new_ids = data.ensure_chat_template(tokenizer)
        if new_ids:
            raise BadInput(f"calibration data {spec} is {fmt} but the model's tokenizer lacks the ChatML tokens; "
                           "calibrate on the merged model (it has them) or on text data")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    stream = []
    for i in order:
        if len(stream) >= samples * seq_len:
            break
        try:
            stream += data.encode(records[i], tokenizer, fmt, seq_len)[0]["input_ids"]
        except BadInput as e:
            raise BadInput(f"calibration data {spec} record {i} (0-based): {e}") from None
    rows = [stream[k : k + seq_len] for k in range(0, len(stream) - seq_len + 1, seq_len)][:samples] or [stream]
    ids = torch.tensor(rows)
    return list(ids.split(batch_size))


def quantize_directory(model_dir, out_dir, calibration, samples=128, seq_len=2048, group_size=128, act_order=False,
                       device="auto", tokenizer_dir=None, batch_size=8, trust_remote_code=False):
    """GPTQ of the 16-bit model directory `model_dir` into the new directory `out_dir` (merge.py --quantize gptq).

    Every bad input is refused before the model is loaded. Returns quantize_model's results.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # write_model's own rule, checked early
        raise BadInput(f"{out_dir} already exists: choose a new --out")
    if group_size not in GROUP_SIZES:
        raise BadInput(f"group size {group_size} is not supported: use one of {', '.join(map(str, GROUP_SIZES))}")
    config = read_config(model_dir, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise BadInput(f"{model_dir} is already quantized (config.json has a quantization_config): "
                       "give the 16-bit model")
    if not calibration:
        raise BadInput("no calibration data: pass --calibration PATH (any data file train.py reads)")
    with torch.device("meta"):  # the module tree only, to check the group size before any real work
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        unfuse_experts(skeleton)
    for name, m in decoder_layers(skeleton)[1].named_modules():
        if type(m) is nn.Linear and m.in_features % group_size:
            fits = ", ".join(str(g) for g in GROUP_SIZES if m.in_features % g == 0) or "none of 32/64/128"
            raise BadInput(f"group size {group_size} does not divide in_features {m.in_features} of layers.{name}; "
                           f"use --group-size {fits}")
        if type(m) is nn.Linear and m.out_features % 8:
            raise BadInput(f"layers.{name} has {m.out_features} outputs, not a multiple of 8: the GPTQ format "
                           "packs 8 zero points an int32")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise BadInput(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda, but this PyTorch sees no CUDA GPU: use --device cpu (slow) or auto")
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load a tokenizer from {tokenizer_dir}: {str(e).splitlines()[0]}") from e
    batches = calibration_batches(calibration, tokenizer, samples, seq_len, batch_size)
    dtype = getattr(config, "dtype", None) or torch.bfloat16  # the checkpoint's own, for the host copy
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = load_model(model_dir, quant=None, compute_dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    tokens = sum(b.numel() for b in batches)
    print(f"GPTQ {model_dir}: {tokens:,} calibration tokens ({sum(len(b) for b in batches)} rows) from {calibration}, "
          f"group size {group_size}{', act-order' if act_order else ''}, on {device}", file=sys.stderr)
    results = quantize_model(model, batches, BITS, group_size, act_order, device)
    gain = sum(q.error for q in results.values()) / max(sum(q.rtn_error for q in results.values()), 1e-30)
    save_gptq(model, results, out_dir, group_size, act_order, tokenizer_source=tokenizer_dir)
    print(f"wrote {out_dir}: {len(results)} Linears in 4 bits; output error {gain:.3f} of round-to-nearest's",
          file=sys.stderr)
    return results


def main(argv=None):
    p = ArgumentParser(prog="python quantize.py", description="Quantize a Hugging Face model directory with GPTQ.")
    p.add_argument("--model", required=True, help="16-bit model directory (e.g. merge.py's --out)")
    p.add_argument("--out", required=True, help="new directory for the GPTQ checkpoint")
    p.add_argument("--calibration", help="calibration data: any file train.py reads (.jsonl/.json/.csv/.parquet/.txt)")
    p.add_argument("--samples", type=int, default=128, help="calibration rows (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens a row (default 2048)")
    p.add_argument("--group-size", type=int, default=128, help="input columns sharing a scale: 32, 64 or 128")
    p.add_argument("--act-order", action="store_true", help="quantize columns by descending activation (desc_act)")
    p.add_argument("--device", default="auto", help="where each layer is quantized: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    if args.samples < 1 or args.seq_len < 2:
        raise BadInput("--samples must be >= 1 and --seq-len >= 2")
    quantize_directory(args.model, args.out, args.calibration, args.samples, args.seq_len, args.group_size,
                       args.act_order, args.device, trust_remote_code=args.trust_remote_code)


if __name__ == "__main__":
    run(main)
