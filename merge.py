"""Merge a LoRA adapter into its base model and write a plain Hugging Face model directory.

    python merge.py --adapter runs/chat --out merged              # base: the adapter's base_model_name_or_path
    python merge.py --adapter runs/chat --model base/ --out merged --dtype fp16 --max-shard-size 2GB
    python merge.py --adapter runs/chat --out merged --quantize nf4   # also merged-nf4/, pre-quantized 4-bit
    python merge.py --adapter runs/chat --out merged --quantize gptq  # also merged-gptq/, GPTQ 4-bit (quant/gptq.py)

Each weight W of a LoRA target becomes, in fp32 and then rounded once to --dtype,

    W' = W + scaling · B A          (lora.merged_weight, scaling = alpha / r, or alpha / √r for rsLoRA)

and the question is which W:

    --base dequantized (default)   W = dequant(quant(W16)), the 4-bit weights the adapter was trained
                                   against: every Linear that quant.load_model made 4-bit is quantized
                                   and dequantized here by its own code, so the merged model computes
                                   what the trained model computed (gap at rounding level with fp32).
    --base original                W = W16, the checkpoint's own weights: PEFT's usual merge_and_unload
                                   recipe. The adapter learned to correct the 4-bit weights, not these,
                                   so the merged model differs from the trained one by the NF4 error.

Measured on the embedded default (default/model, a 4-layer Llama; adapter from `train.py --max-steps 40`,
NF4 + double quant, fp32 compute): the gap to the adapter on its 4-bit base on 4 training prompts
(139 tokens, logits up to 17), and the mean loss on the data's last 50 records (trained model: 5.306).

                          max |Δlogit|   mean KL     loss
    dequantized, fp32       7.9e-5        6e-10      5.306    rounding only (tests assert < 1e-4 relative)
    dequantized, bf16       0.062         1.1e-5     5.306    + the one rounding of the weights to bf16
    original,    fp32       5.27          0.077      5.357    the NF4 error the adapter was trained on top of
    original,    bf16       5.28          0.076      5.356

How the base was quantized comes from the adapter's train_config.json (train.py writes it), else
QLoRA's defaults: NF4, double quant, bf16 compute. After writing, the merge gap is printed as in the
table above (--no-gap skips it: it loads the model twice), on the first records of the training data
when train_config.json names a file that exists here, else on built-in prompts.

The base is read one tensor at a time and the output written a shard at a time, so host memory
stays near one output shard plus one layer: a 7B model merges on a 16 GB machine. Nothing is
written on error: the model is assembled in a hidden directory beside --out and renamed at the end.
"""

import json
import math
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rawqlora.cli import ArgumentParser, run
from rawqlora.errors import BadInput

GAP_PROMPTS = 4  # prompts the merge gap is measured on: enough to see a difference, quick to run twice
GAP_MAX_TOKENS = 256  # per prompt
BUILTIN_PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 17 + 25? Answer:",
]


# ----------------------------------------------------------------------------- arguments


def parse_args(argv):
    p = ArgumentParser(prog="merge.py", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format, e.g. train.py's --out)")
    p.add_argument("--model", help="base model directory; default: the adapter's base_model_name_or_path")
    p.add_argument("--out", required=True, help="new directory for the merged model")
    p.add_argument("--base", choices=["dequantized", "original"], default="dequantized",
                   help="merge into the 4-bit weights the adapter was trained on (default) or the 16-bit ones")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="dtype of the written weights (default bf16)")
    p.add_argument("--quantize", choices=["nf4", "gptq"],
                   help="also write the merged model quantized, into OUT-NAME (nf4: bitsandbytes' pre-quantized "
                        "4-bit; gptq: GPTQ 4-bit for fast inference, quant/gptq.py)")
    p.add_argument("--calibration", help="gptq: calibration data, any format train.py reads (default: the "
                   "adapter's training data, from its train_config.json)")
    p.add_argument("--calibration-samples", type=int, default=128, help="gptq: samples (default 128)")
    p.add_argument("--calibration-len", type=int, default=2048, help="gptq: tokens per sample (default 2048)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="gptq: group size (default 128)")
    p.add_argument("--act-order", action="store_true", help="gptq: columns in order of decreasing Hessian diagonal")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--no-gap", action="store_true", help="skip measuring the merge gap (loads the model twice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and OUT-NAME of --quantize)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the base model (custom architectures): only for models you trust")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    if args.quantize != "gptq" and (args.calibration or args.act_order):
        raise BadInput("--calibration and --act-order are GPTQ settings: add --quantize gptq")
    if args.calibration and not os.path.isfile(args.calibration):
        raise BadInput(f"--calibration {args.calibration}: no such file")
    return args


if __name__ == "__main__":
    # --help and a bad flag answer here, in a fraction of a second: torch, transformers and
    # bitsandbytes (seconds of imports) load below, once the command line is known to be good.
    ARGS = run(parse_args)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lora  # noqa: E402
import quant  # noqa: E402
from lora.adapter import read_adapter  # noqa: E402  (config + tensors, with PEFT-format checks)
from lora.inject import resolve_targets  # noqa: E402
import quantize  # noqa: E402
from training import data  # noqa: E402


# ----------------------------------------------------------------------------- the plan


@dataclass
class Trained:
    """How the adapter's base was loaded for training: train.py's train_config.json, else QLoRA's defaults."""

    quant: str | None = "nf4"  # "nf4" | "fp4" | None (trained on the 16-bit model)
    double_quant: bool = True
    dtype: torch.dtype = torch.bfloat16  # compute dtype: load_model casts each weight to it before quantizing
    data: str | None = None  # the training data file, for the gap prompts


@dataclass
class Plan:
    """Everything the merge needs, checked before a byte is written."""

    adapter: Path
    base: Path
    config: object  # the base's transformers config
    files: list  # base checkpoint shards
    trained: Trained
    lora: dict  # module name -> (A, B)
    scaling: float  # alpha / r, or alpha / √r for rsLoRA: LoRALinear's
    whole: dict  # checkpoint key -> tensor written instead of the base's (modules_to_save)
    drop: set  # checkpoint keys not written
    quantized: set  # module names load_model made 4-bit for training
    vocab: int  # rows of the merged embedding
    tokenizer_dir: Path
    trust_remote_code: bool = False  # --trust-remote-code: off unless the user asks


def read_train_config(adapter):
    path = adapter / "train_config.json"
    if not path.is_file():
        return Trained()
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise BadInput(f"{path} is not valid JSON ({e}); fix or delete it") from None
    q = cfg.get("quant", "nf4")
    return Trained(
        quant=None if q in (None, "none") else q,
        double_quant=bool(cfg.get("double_quant", True)),
        dtype=quant.DTYPES.get(cfg.get("dtype"), torch.bfloat16),  # "auto" is resolved by train.py before saving
        data=cfg.get("data") or None,
    )


def resolve_base(model_arg, adapter_config, adapter):
    if model_arg is not None:
        return Path(model_arg)
    name = adapter_config.get("base_model_name_or_path")
    if not name:
        raise BadInput(f"adapter {adapter} names no base model (base_model_name_or_path); pass --model")
    base = Path(name).expanduser()  # relative: to the current directory, where train.py was run
    if not (base / "config.json").is_file():
        raise BadInput(f"the adapter's base model {name!r} is not a model directory here "
                       f"(resolved to {base.resolve()}); pass --model BASE_DIR")
    return base


def plan_merge(args):
    adapter = Path(args.adapter)
    adapter_config, tensors = read_adapter(adapter)
    trained = read_train_config(adapter)
    base = resolve_base(args.model, adapter_config, adapter)
    config = quant.read_config(base, trust_remote_code=args.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise BadInput(f"{base} is a pre-quantized checkpoint; merge needs the 16-bit base: pass --model")
    files = quant.checkpoint_files(base)
    shapes = {k: shape for file in files for k, shape in quant.checkpoint_shapes(file).items()}
    mt = config.model_type
    unfit = f"adapter {adapter} does not fit base {base}"

    # The model's module tree (meta: no memory): the names LoRA targets resolve to, and which
    # Linears quant.load_model made 4-bit for training, decided by its own code.
    skeleton = quant.empty_model(config, trust_remote_code=args.trust_remote_code)
    try:
        targets = resolve_targets(skeleton, adapter_config["target_modules"])
    except BadInput as e:
        raise BadInput(f"{unfit}: {e}") from None
    embed = next(n for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings())
    head = next(n for n, m in skeleton.named_modules() if m is skeleton.get_output_embeddings())
    quantized = quant.quantized_modules(skeleton) if trained.quant is not None else set()

    # Adapter tensors: <module>.lora_A/B.weight, or whole modules (modules_to_save).
    pairs, whole = {}, {}
    for name, t in tensors.items():
        module, sep, ab = name.rpartition(".lora_")
        if sep and ab in ("A.weight", "B.weight"):
            pairs.setdefault(module, {})[ab[0]] = t
        else:  # `<module>.base_layer.weight`: a LoRA target's own weight, saved because it trained
            whole[name.replace(".base_layer.", ".")] = t
    if missing := sorted(set(targets) - pairs.keys()):
        raise BadInput(f"adapter {adapter} has no LoRA weights for {missing[0]}, though its target_modules select it")
    if extra := sorted(pairs.keys() - set(targets)):
        raise BadInput(f"{unfit}: it has LoRA weights for {extra[0]}, which its target_modules do not select here")

    tied = bool(getattr(config, "tie_word_embeddings", False))
    replace, vocab = whole_modules(whole, shapes, mt, embed, head, tied, unfit)
    r = adapter_config["r"]
    for name in targets:
        A, B = pairs[name].get("A"), pairs[name].get("B")
        if A is None or B is None:
            raise BadInput(f"adapter {adapter} has only lora_{'A' if B is None else 'B'} for {name}")
        key = quant.checkpoint_key(mt, name) + ".weight"
        out_f, in_f = tuple(replace[key].shape) if key in replace else shapes.get(key, (None, None))
        if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            raise BadInput(f"{unfit}: {name}.weight is [{out_f}, {in_f}] in the base but the adapter's lora_A is "
                           f"{list(A.shape)} and lora_B {list(B.shape)} (r={r}); it was trained on another model")

    drop = {k for k in shapes if k.endswith("rotary_emb.inv_freq")}  # legacy buffers; load_model skips them too

    tokenizer_dir = quant.tokenizer_source(base, adapter)
    if tokenizer_dir == adapter:
        n = len(quant.load_tokenizer(adapter, args.trust_remote_code))
        if n > vocab:
            raise BadInput(f"vocabulary size mismatch: the adapter's tokenizer has {n} tokens but the merged model "
                           f"only {vocab} embedding rows; the adapter lacks the trained rows of its added tokens "
                           "(modules_to_save: embed_tokens, lm_head)")

    alpha = adapter_config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r  # as LoRALinear.scaling
    return Plan(adapter, base, config, files, trained, {n: (pairs[n]["A"], pairs[n]["B"]) for n in targets},
                scaling, replace, drop, quantized, vocab, tokenizer_dir, args.trust_remote_code)


def whole_modules(whole, shapes, mt, embed, head, tied, unfit):
    """Checkpoint key -> tensor for the adapter's whole modules, and the merged vocabulary size.

    The embedding and head may have grown (tokens added in training); every other module
    must match the base's shape exactly.
    """
    replace = {}
    for name, t in whole.items():
        if tied and name == f"{head}.weight":
            # One matrix in a tied model; PEFT and train.py save it under both names.
            if f"{embed}.weight" in whole and torch.equal(whole[f"{embed}.weight"], t):
                continue
            raise BadInput(f"{unfit}: the base ties {head} to {embed}, but the adapter's differ")
        key = quant.checkpoint_key(mt, name)
        if key not in shapes:
            raise BadInput(f"{unfit}: it has a tensor for {name}, which the base lacks")
        grows = name in (f"{embed}.weight", f"{head}.weight")
        if grows and (t.shape[1:] != shapes[key][1:] or t.shape[0] < shapes[key][0]):
            raise BadInput(f"vocabulary size mismatch: the adapter's {name} is {list(t.shape)}, the base's "
                           f"{list(shapes[key])}; an adapter can only add rows (tokens) to its own base")
        if not grows and tuple(t.shape) != shapes[key]:
            raise BadInput(f"{unfit}: {name} is {list(t.shape)} in the adapter but {list(shapes[key])} in the base")
        replace[key] = t
    embed_key, head_key = quant.checkpoint_key(mt, f"{embed}.weight"), quant.checkpoint_key(mt, f"{head}.weight")
    vocab = replace[embed_key].shape[0] if embed_key in replace else shapes[embed_key][0]
    if not tied and head_key in shapes:
        head_rows = replace[head_key].shape[0] if head_key in replace else shapes[head_key][0]
        if head_rows != vocab:
            raise BadInput(f"vocabulary size mismatch: the merged {embed} would have {vocab} rows but {head} "
                           f"{head_rows}; the adapter must save both (modules_to_save) when it adds tokens")
    return replace, vocab


# ----------------------------------------------------------------------------- merging one tensor


def as_trained(tensor, plan, module, device):
    """The fp32 value of a base tensor as the trained model held it (--base dequantized).

    quant.load_model's own steps: cast to the compute dtype first, then (for its 4-bit
    Linears) its blockwise quantization with the same settings, and dequantization back to
    the compute dtype, which is what the 4-bit matmul multiplied with.
    """
    t = tensor.to(device=device, dtype=plan.trained.dtype)
    if module in plan.quantized:
        return quant.dequantize(quant.quantize_weight(t, plan.trained.quant, plan.trained.double_quant))
    return t.float()


def merged_tensor(key, tensor, plan, args, device):
    """The tensor written under checkpoint key `key`: merged, replaced or passed through, in --dtype."""
    if key in plan.whole:
        tensor = plan.whole[key]
    if not tensor.is_floating_point():
        return tensor
    name = quant.module_key(plan.config.model_type, key)
    module = name.removesuffix(".weight") if name.endswith(".weight") else None
    if args.base == "dequantized" and key not in plan.whole:
        t = as_trained(tensor, plan, module, device)
    else:
        t = tensor.to(device=device, dtype=torch.float32)
    if module in plan.lora:
        A, B = plan.lora[module]
        # fp32 W + fp32 delta: the one rounding happens in the cast to --dtype below.
        t = lora.merged_weight(t, A.to(device), B.to(device), plan.scaling)
    out = t.to(quant.DTYPES[args.dtype]).cpu()
    if not torch.isfinite(out).all():  # PEFT's safe_merge idea: never write NaN/inf weights
        why = ("its values exceed fp16's range (±65504): use --dtype bf16" if args.dtype == "fp16" and
               torch.isfinite(t).all() else "the adapter or base holds NaN/inf (did training diverge?)")
        raise BadInput(f"merged weight {key} is not finite in {args.dtype}: {why}")
    return out


# ----------------------------------------------------------------------------- writing


def write_merged(plan, args, out, device):
    """The merged model into the (new, empty) directory `out`; returns the number of weight files."""
    writer = quant.ShardWriter(out, args.max_shard_bytes)
    with torch.no_grad():
        for i, file in enumerate(plan.files, 1):
            with quant.open_checkpoint(file) as f:
                keys = [k for k in f.keys() if k not in plan.drop]
                for key in tqdm(keys, desc=f"merge shard {i}/{len(plan.files)}", unit="tensor", disable=None):
                    writer.add(key, merged_tensor(key, quant.read_tensor(f, file, key), plan, args, device))
    shards = writer.close()

    config = plan.config
    config.dtype = quant.DTYPES[args.dtype]
    config.vocab_size = plan.vocab
    config.save_pretrained(out)  # config.json as transformers writes it (no quantization_config: refused above)
    quant.copy_tokenizer(plan.tokenizer_dir, out)
    if (plan.base / "generation_config.json").is_file():  # the base's, also when the tokenizer is the adapter's
        shutil.copy2(plan.base / "generation_config.json", out / "generation_config.json")
    return shards


def write_nf4(merged, out, plan, args):
    """The merged model `merged` as a pre-quantized bitsandbytes NF4 checkpoint in `out`."""
    model = quant.load_model(merged, quant="nf4", double_quant=plan.trained.double_quant,
                             compute_dtype=quant.DTYPES[args.dtype], trust_remote_code=args.trust_remote_code)
    quant.save_quantized(model, out, tokenizer_source=merged, max_shard_bytes=args.max_shard_bytes)


def write_gptq(merged, out, plan, args):
    """The merged model `merged` as a GPTQ checkpoint in `out`, calibrated on --calibration (else the
    adapter's training data)."""
    quantize.quantize_directory(merged, out, args.calibration or plan.trained.data, samples=args.calibration_samples,
                                seq_len=args.calibration_len, group_size=args.group_size, act_order=args.act_order,
                                tokenizer_dir=merged, trust_remote_code=args.trust_remote_code)


# --quantize NAME: writer(merged_dir, out_dir, plan, args), written into OUT-NAME.
QUANTIZERS = {"nf4": write_nf4, "gptq": write_gptq}


# ----------------------------------------------------------------------------- the merge gap


def gap_prompts(tokenizer, trained):
    """Token ids of a few prompts: the first training records when the data file is here, else built-ins."""
    path = trained.data
    if path and os.path.isfile(path):
        try:
            records = data.load_records(path)
            fmt = data.detect_format(records.column_names)
            _, new_ids = data.ensure_chat_template(tokenizer)
            if new_ids:  # the template needs tokens the model has no rows for
                raise BadInput("its chat template needs tokens the merged model lacks")
            n = min(GAP_PROMPTS, len(records))
            ids = [data.encode(records[i], tokenizer, fmt, GAP_MAX_TOKENS)[0]["input_ids"] for i in range(n)]
            return ids, f"the first {n} records of {path}"
        except BadInput as e:
            print(f"note: no gap prompts from {path} ({e}); using built-in prompts", file=sys.stderr)
    ids = [tokenizer(p)["input_ids"][:GAP_MAX_TOKENS] for p in BUILTIN_PROMPTS]
    return ids, f"{len(ids)} built-in prompts"


def all_logits(model, prompts):
    """fp32 logits [T, V] of each prompt, run one at a time (no padding to get wrong)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in prompts]


def merge_gap(plan, merged_dir, prompts):
    """(max |Δlogit|, mean KL(adapter ‖ merged) per token, max |logit|) between the adapter on its 4-bit
    base, as trained, and the merged model, both computing in fp32. One model in memory at a time."""
    reference = quant.load_model(plan.base, quant=plan.trained.quant, double_quant=plan.trained.double_quant,
                                 compute_dtype=torch.float32, trust_remote_code=plan.trust_remote_code)
    lora.load_adapter(reference, plan.adapter)
    reference.eval()  # the LoRA layers load_adapter adds start in training mode: their dropout would be on
    expected = all_logits(reference, prompts)
    del reference
    merged = quant.load_model(merged_dir, quant=None, compute_dtype=torch.float32,
                              trust_remote_code=plan.trust_remote_code)
    got = all_logits(merged, prompts)
    del merged
    p, q = torch.cat(expected), torch.cat(got)
    kl = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    # KL >= 0; a mean of ~-1e-9 is fp32 rounding of two equal distributions.
    return (p - q).abs().max().item(), max(kl.mean().item(), 0.0), p.abs().max().item()


# ----------------------------------------------------------------------------- main


def main(argv=None, args=None):
    args = args or parse_args(sys.argv[1:] if argv is None else argv)
    args.max_shard_bytes = quant.parse_size(args.max_shard_size)
    out = Path(args.out)
    quantized_out = out.with_name(f"{out.name}-{args.quantize}") if args.quantize else None
    outs = [path for path in (out, quantized_out) if path is not None]
    for path in outs:
        if path.exists() and not (args.overwrite and path.is_dir()):
            raise BadInput(f"{path} already exists: choose a new --out or pass --overwrite" if path.is_dir()
                           else f"{path} exists and is not a directory: choose another --out")
    plan = plan_merge(args)  # every check on the inputs, before anything is written
    if args.quantize == "gptq" and not (args.calibration or (plan.trained.data and os.path.isfile(plan.trained.data))):
        raise BadInput("--quantize gptq needs calibration data: pass --calibration FILE (the adapter's "
                       f"training data {plan.trained.data or '(none recorded)'} is not a file here)")
    for path in outs:
        if path.resolve() in (plan.base.resolve(), plan.adapter.resolve()):
            raise BadInput(f"--out {path} is the base or the adapter directory: write the merged model elsewhere")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Both outputs are assembled in hidden directories beside them and renamed into place only
    # once everything (the gap included) has succeeded: on any error, nothing is written.
    with (quant.staged_dir(out, args.overwrite) as stage,
          quant.staged_dir(quantized_out, args.overwrite) if quantized_out else nullcontext() as quantized_stage):
        shards = write_merged(plan, args, stage, device)
        what = f"{len(plan.lora)} LoRA modules" + (f" and {len(plan.whole)} saved modules" if plan.whole else "")
        print(f"merged {what} into the {args.base} weights of {plan.base} "
              f"({plan.trained.quant or 'unquantized'} as trained), {args.dtype}, {shards} weight file(s)")
        if args.quantize:
            QUANTIZERS[args.quantize](stage, quantized_stage, plan, args)
        if not args.no_gap:
            prompts, source = gap_prompts(quant.load_tokenizer(stage, args.trust_remote_code), plan.trained)
            max_diff, kl, scale = merge_gap(plan, stage, prompts)
            print(f"merge gap on {source} ({sum(map(len, prompts))} tokens), adapter on the "
                  f"{plan.trained.quant or 'unquantized'} base vs merged: max |Δlogit| {max_diff:.3g} "
                  f"(logits up to {scale:.3g}), mean KL {kl:.3g}")
    print(f"wrote {out}" + (f" and {quantized_out}" if quantized_out else ""))


if __name__ == "__main__":
    run(lambda argv: main(args=ARGS))
