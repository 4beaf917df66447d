"""Merge a LoRA adapter into its base model and write a plain Hugging Face model directory.

    python merge.py --adapter runs/chat --out merged              # base: the adapter's base_model_name_or_path
    python merge.py --adapter runs/chat --model base/ --out merged --dtype fp16 --max-shard-size 2GB
    python merge.py --adapter runs/chat --out merged --quantize nf4   # also merged-nf4/, pre-quantized 4-bit

Each weight W of a LoRA target becomes, in fp32 and then rounded once to --dtype,

    W' = W + scaling · B A          (LoRALinear.merge(), scaling = alpha / r, or alpha / √r for rsLoRA)

and the question is which W:

    --base dequantized (default)   W = dequant(quant(W16)), the 4-bit weights the adapter was trained
                                   against: every Linear that quant.load_model made 4-bit is quantized
                                   and dequantized here exactly as it did, so the merged model computes
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
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
import quant
from lora.adapter import PREFIX
from lora.adapter import read_adapter_files  # config + tensors, with PEFT-format checks
from lora.inject import resolve_targets
from quant.experts import checkpoint_key, module_key, unfuse_experts
from quant.linear4bit import bnb
from quant.load import BLOCKSIZE, INDEX, checkpoint_files, open_checkpoint, read_config, read_tensor, skipped, to_4bit
from quant.save import copy_tokenizer, replace_dir
from rawqlora import data
from rawqlora.cli import ArgumentParser, run
from rawqlora.errors import BadInput

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SKIP = ("lm_head",)  # what quant.load_model keeps dense by default, so what the trainer's 4-bit model kept dense
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
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
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the written weights (default bf16)")
    p.add_argument("--quantize", choices=["nf4"], help="also write the merged model pre-quantized into OUT-nf4")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--no-gap", action="store_true", help="skip measuring the merge gap (loads the model twice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and OUT-nf4)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the base model (custom architectures): only for models you trust")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    args.max_shard_bytes = parse_size(args.max_shard_size)
    return args


def parse_size(text):
    """"5GB" -> 5·10⁹ bytes, "2GiB" -> 2·2³⁰, as transformers' save_pretrained reads --max-shard-size."""
    units = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b)?\s*", text, re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise BadInput(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    return int(float(m[1]) * units[(m[2] or "").lower()])


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
    r: int
    alpha: float
    rslora: bool
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
        dtype=DTYPES.get(cfg.get("dtype"), torch.bfloat16),  # "auto" is resolved by train.py before saving
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


def checkpoint_shapes(files):
    """Checkpoint key -> shape, from the safetensors headers only."""
    shapes = {}
    for file in files:
        with open_checkpoint(file) as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def plan_merge(args):
    adapter = Path(args.adapter)
    adapter_config, tensors = read_adapter_files(adapter)
    trained = read_train_config(adapter)
    base = resolve_base(args.model, adapter_config, adapter)
    config = read_config(base, trust_remote_code=args.trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise BadInput(f"{base} is a pre-quantized checkpoint; merge needs the 16-bit base: pass --model")
    files = checkpoint_files(base)
    shapes = checkpoint_shapes(files)
    mt = config.model_type
    unfit = f"adapter {adapter} does not fit base {base}"

    # The model's module tree on the meta device (no memory): the names LoRA targets resolve to,
    # and which Linears quant.load_model turns 4-bit, decided by its own code.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
        unfuse_experts(skeleton)
        try:
            targets = resolve_targets(skeleton, adapter_config["target_modules"])
        except BadInput as e:
            raise BadInput(f"{unfit}: {e}") from None
        embed = next(n for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings())
        head = next(n for n, m in skeleton.named_modules() if m is skeleton.get_output_embeddings())
        quantized = set()
        if trained.quant is not None:
            to_4bit(skeleton, lambda n: not skipped(n, SKIP), trained.quant, trained.double_quant, trained.dtype)
            quantized = {n for n, m in skeleton.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    # Adapter tensors: <module>.lora_A/B.weight, or whole modules (modules_to_save).
    pairs, whole = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise BadInput(f"adapter {adapter} has a tensor {key} not named {PREFIX}...; is it a PEFT adapter?")
        name = key.removeprefix(PREFIX)
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
        key = checkpoint_key(mt, name) + ".weight"
        out_f, in_f = tuple(replace[key].shape) if key in replace else shapes.get(key, (None, None))
        if tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            raise BadInput(f"{unfit}: {name}.weight is [{out_f}, {in_f}] in the base but the adapter's lora_A is "
                           f"{list(A.shape)} and lora_B {list(B.shape)} (r={r}); it was trained on another model")

    drop = {k for k in shapes if k.endswith("rotary_emb.inv_freq")}  # legacy buffers; load_model skips them too

    # Tokenizer: the adapter's when training added tokens (train.py saves it then), else the base's.
    tokenizer_dir = adapter if any((adapter / f).is_file() for f in TOKENIZER_FILES) else base
    if tokenizer_dir == adapter:
        n = len(load_tokenizer(adapter, args.trust_remote_code))
        if n > vocab:
            raise BadInput(f"vocabulary size mismatch: the adapter's tokenizer has {n} tokens but the merged model "
                           f"only {vocab} embedding rows; the adapter lacks the trained rows of its added tokens "
                           "(modules_to_save: embed_tokens, lm_head)")

    lora_pairs = {n: (pairs[n]["A"], pairs[n]["B"]) for n in targets}
    return Plan(adapter, base, config, files, trained, lora_pairs, r, adapter_config["lora_alpha"],
                bool(adapter_config.get("use_rslora")), replace, drop, quantized, vocab, tokenizer_dir,
                args.trust_remote_code)


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
        key = checkpoint_key(mt, name)
        if key not in shapes:
            raise BadInput(f"{unfit}: it has a tensor for {name}, which the base lacks")
        grows = name in (f"{embed}.weight", f"{head}.weight")
        if grows and (t.shape[1:] != shapes[key][1:] or t.shape[0] < shapes[key][0]):
            raise BadInput(f"vocabulary size mismatch: the adapter's {name} is {list(t.shape)}, the base's "
                           f"{list(shapes[key])}; an adapter can only add rows (tokens) to its own base")
        if not grows and tuple(t.shape) != shapes[key]:
            raise BadInput(f"{unfit}: {name} is {list(t.shape)} in the adapter but {list(shapes[key])} in the base")
        replace[key] = t
    embed_key, head_key = checkpoint_key(mt, f"{embed}.weight"), checkpoint_key(mt, f"{head}.weight")
    vocab = replace[embed_key].shape[0] if embed_key in replace else shapes[embed_key][0]
    if not tied and head_key in shapes:
        head_rows = replace[head_key].shape[0] if head_key in replace else shapes[head_key][0]
        if head_rows != vocab:
            raise BadInput(f"vocabulary size mismatch: the merged {embed} would have {vocab} rows but {head} "
                           f"{head_rows}; the adapter must save both (modules_to_save) when it adds tokens")
    return replace, vocab


def load_tokenizer(path, trust_remote_code=False):
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e


# ----------------------------------------------------------------------------- merging one tensor


def as_trained(tensor, plan, module, device):
    """The fp32 value of a base tensor as the trained model held it (--base dequantized).

    Exactly quant.load_model's steps: cast to the compute dtype first, then (for its 4-bit
    Linears) bitsandbytes' blockwise quantization with the same settings, and dequantization
    back to the compute dtype, which is what the 4-bit matmul multiplied with.
    """
    t = tensor.to(device=device, dtype=plan.trained.dtype)
    if module in plan.quantized:
        packed, state = bnb.functional.quantize_4bit(
            t.contiguous(), blocksize=BLOCKSIZE, compress_statistics=plan.trained.double_quant,
            quant_type=plan.trained.quant, quant_storage=torch.uint8,
        )
        t = bnb.functional.dequantize_4bit(packed, state)
    return t.float()


def add_lora(weight, A, B, plan):
    """weight + scaling · B A in fp32, by LoRALinear.merge() itself (the formula lives in one place)."""
    with torch.device("meta"):  # the layer's own Linears: shells, no memory, no random init
        layer = lora.LoRALinear(nn.Linear(weight.shape[1], weight.shape[0], bias=False), plan.r, plan.alpha,
                                rslora=plan.rslora)
    layer.base_layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.lora_A.weight = nn.Parameter(A.to(weight.device), requires_grad=False)
    layer.lora_B.weight = nn.Parameter(B.to(weight.device), requires_grad=False)
    layer.merge()  # fp32 W + fp32 delta: the one rounding happens when the caller casts to --dtype
    return layer.base_layer.weight.detach()


def merged_tensor(key, tensor, plan, args, device):
    """The tensor written under checkpoint key `key`: merged, replaced or passed through, in --dtype."""
    if key in plan.whole:
        tensor = plan.whole[key]
    if not tensor.is_floating_point():
        return tensor
    name = module_key(plan.config.model_type, key)
    module = name.removesuffix(".weight") if name.endswith(".weight") else None
    if args.base == "dequantized" and key not in plan.whole:
        t = as_trained(tensor, plan, module, device)
    else:
        t = tensor.to(device=device, dtype=torch.float32)
    if module in plan.lora:
        t = add_lora(t, *plan.lora[module], plan)
    out = t.to(DTYPES[args.dtype]).cpu()
    if not torch.isfinite(out).all():  # PEFT's safe_merge idea: never write NaN/inf weights
        why = ("its values exceed fp16's range (±65504): use --dtype bf16" if args.dtype == "fp16" and
               torch.isfinite(t).all() else "the adapter or base holds NaN/inf (did training diverge?)")
        raise BadInput(f"merged weight {key} is not finite in {args.dtype}: {why}")
    return out


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Collects tensors and writes a file whenever the next one would overflow max_bytes.

    Files are written as model-00001.safetensors, ... and renamed to HF's -of-NNNNN names at the
    end, once the count is known (or to model.safetensors, without an index, when one is enough).
    """

    def __init__(self, out, max_bytes):
        self.out, self.max_bytes = out, max_bytes
        self.tensors, self.size, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, key, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.tensors and self.size + nbytes > self.max_bytes:
            self.flush()
        self.tensors[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self):
        file = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.tensors, self.out / file, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.tensors, len(self.files)))
        self.files.append(file)
        self.tensors, self.size = {}, 0

    def close(self):
        if self.tensors:
            self.flush()
        n = len(self.files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for old, new in zip(self.files, names):
            os.replace(self.out / old, self.out / new)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return n


def write_merged(plan, args, out, device):
    """The merged model as a Hugging Face directory `out`; returns the number of weight files."""
    out.mkdir()
    writer = ShardWriter(out, args.max_shard_bytes)
    with torch.no_grad():
        for i, file in enumerate(plan.files, 1):
            with open_checkpoint(file) as f:
                keys = [k for k in f.keys() if k not in plan.drop]
                for key in tqdm(keys, desc=f"merge shard {i}/{len(plan.files)}", unit="tensor", disable=None):
                    writer.add(key, merged_tensor(key, read_tensor(f, file, key), plan, args, device))
    shards = writer.close()

    config = plan.config
    config.dtype = DTYPES[args.dtype]
    config.vocab_size = plan.vocab
    config.save_pretrained(out)  # config.json as transformers writes it (no quantization_config: refused above)
    copy_tokenizer(plan.tokenizer_dir, out)
    if (plan.base / "generation_config.json").is_file():
        shutil.copy2(plan.base / "generation_config.json", out / "generation_config.json")
    return shards


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


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    nf4_out = out.with_name(out.name + "-nf4") if args.quantize else None
    for path in filter(None, (out, nf4_out)):
        if path.exists() and not (args.overwrite and path.is_dir()):
            raise BadInput(f"{path} already exists: choose a new --out or pass --overwrite" if path.is_dir()
                           else f"{path} exists and is not a directory: choose another --out")
    plan = plan_merge(args)  # every check on the inputs, before anything is written
    for path in filter(None, (out, nf4_out)):
        if path.resolve() in (plan.base.resolve(), plan.adapter.resolve()):
            raise BadInput(f"--out {path} is the base or the adapter directory: write the merged model elsewhere")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = write_merged(plan, args, stage / "model", device)
        what = f"{len(plan.lora)} LoRA modules" + (f" and {len(plan.whole)} saved modules" if plan.whole else "")
        print(f"merged {what} into the {args.base} weights of {plan.base} "
              f"({plan.trained.quant or 'unquantized'} as trained), {args.dtype}, {shards} weight file(s)")
        if args.quantize:
            model = quant.load_model(stage / "model", quant=args.quantize, double_quant=plan.trained.double_quant,
                                     compute_dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code)
            quant.save_quantized(model, stage / "nf4", tokenizer_source=stage / "model",
                                 max_shard_bytes=args.max_shard_bytes)
            del model
        if not args.no_gap:
            prompts, source = gap_prompts(load_tokenizer(stage / "model", args.trust_remote_code), plan.trained)
            max_diff, kl, scale = merge_gap(plan, stage / "model", prompts)
            print(f"merge gap on {source} ({sum(map(len, prompts))} tokens), adapter on the "
                  f"{plan.trained.quant or 'unquantized'} base vs merged: max |Δlogit| {max_diff:.3g} "
                  f"(logits up to {scale:.3g}), mean KL {kl:.3g}")
        replace_dir(stage / "model", out)
        if nf4_out is not None:
            replace_dir(stage / "nf4", nf4_out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"wrote {out}" + (f" and {nf4_out}" if nf4_out else ""))


if __name__ == "__main__":
    run(main)
