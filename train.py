"""QLoRA fine-tuning of a Hugging Face causal LM, written out in raw PyTorch.

    python train.py                                   # the embedded default: a tiny model, a few minutes on a CPU
    python train.py --model ~/models/Mistral-7B-v0.1 --data chats.jsonl --out runs/mistral-chat

Reads top to bottom: config, input checks (all of them before --out is touched), data, model,
optimizer, loop, checkpoints. The pieces that are worth reading on their own live in small
modules: lora/ (the adapters), quant/ (4-bit loading), rawqlora/data.py (formats and masking),
rawqlora/optim.py (AdamW, schedules), rawqlora/loss.py (chunked cross-entropy),
rawqlora/checkpoint.py (atomic checkpoints), rawqlora/distributed.py (data-parallel helpers).

Data-parallel on N GPUs (or CPU processes): torchrun --nproc_per_node N train.py ... ;
--batch-size is then per rank, so each optimizer step sees N x batch-size x grad-accum samples.
"""

import argparse
import collections
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora
import quant
from lora.inject import resolve_targets
from quant.experts import unfuse_experts
from quant.load import checkpoint_files, checkpoint_keys, read_config
from fast import fused
from rawqlora import cli, data
from training import checkpoint, distributed, grad_ckpt
from rawqlora.errors import BadInput
from training.loss import causal_lm_loss
from training.optim import LossScaler, lr_factor, make_optimizer

REPO = Path(__file__).resolve().parent
EMBEDDED_CONFIG = REPO / "default" / "config.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------
# Config: every field is a command-line flag (--max-steps for max_steps). Defaults are the
# QLoRA recipe (Dettmers et al. 2023, artidoro/qlora) unless a comment says otherwise.
# ----------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    model: str = ""  # HF model directory (config.json + *.safetensors + tokenizer); empty: the embedded default
    data: str = ""  # json/jsonl/csv/parquet/txt file, or a hub dataset name; required with --model
    out: str = ""  # output directory; empty: runs/<model name>-<date-time>
    config: str = ""  # json or yaml file of these fields; flags given on the command line win

    # data
    format: str = "auto"  # auto|chat|alpaca|prompt-response|text (auto: from the columns)
    max_len: int = 1024  # tokens per sample; longer samples are truncated (and counted)
    train_on_prompt: bool = False  # also take loss on prompts/user turns (default: completions only)
    packing: bool = False  # concatenate samples into max_len rows; attention never crosses samples
    eval_split: float = 0.05  # fraction of the data held out for eval loss (ignored with eval_data)
    eval_data: str = ""  # a separate eval file instead of a split
    add_chatml_tokens: bool = False  # add <|im_start|>/<|im_end|> even if the chat template has its own
    train_embeddings: bool = False  # train all of embed_tokens/lm_head, not only rows of added tokens

    # LoRA
    lora_r: int = 16  # rank; 8-64 all work for instruction tuning, cost grows linearly
    lora_alpha: float = 16.0  # scale = alpha / r; alpha = r keeps the update's scale independent of r
    lora_dropout: float = 0.05  # the QLoRA paper's value for 7-13B models
    rslora: bool = False  # scale = alpha / sqrt(r) (rank-stabilised LoRA, Kalajdzievski 2023)
    targets: str = "all-linear"  # comma list of module-name suffixes, a regex, or all-linear (QLoRA: every linear layer)

    # quantization
    quant: str = "nf4"  # nf4|fp4|none; NF4 is information-theoretically optimal for normal weights
    double_quant: bool = True  # quantize the quantization constants too: ~0.37 bit/param saved
    dtype: str = "auto"  # compute dtype: bf16|fp16|fp32; auto: bf16 on CUDA, fp32 on CPUs (most lack bf16 matmul units: 30x slower here)

    # optimization
    # adamw (rawqlora/optim.py: multi-tensor, a few kernels a step)|paged_adamw|paged_adamw_8bit
    # (bitsandbytes, CUDA: state in unified memory; 0.3 GiB saved on a 7B model, 1-3% slower there)
    optim: str = "adamw"
    lr: float = 2e-4  # peak learning rate: QLoRA's value for 7B-13B models
    weight_decay: float = 0.0  # LoRA's low rank already regularises; QLoRA uses 0
    schedule: str = "constant"  # constant|linear|cosine: QLoRA found constant as good as cosine
    warmup_steps: int = 10  # linear warmup: Adam's early moment estimates are noisy
    max_grad_norm: float = 0.3  # clip the LoRA gradients' global norm (QLoRA's value; stabilises 4-bit training)
    batch_size: int = 4  # micro-batch size (samples, or packed rows, per forward)
    grad_accum: int = 4  # micro-batches per optimizer step: effective batch = batch_size * grad_accum
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int = -1  # optimizer steps; overrides epochs when > 0
    grad_ckpt: bool = True  # recompute each decoder layer in backward: activations dominate QLoRA memory
    offload_activations: bool = False  # park checkpointed layer inputs in host memory (7B, 16k tokens: -3.5 GiB GPU; copies overlap compute, ~0.3% slower)
    mlp_chunk: int = 0  # >0: run each MLP this many tokens at a time, recomputed per chunk (very long sequences; costs one more MLP forward)
    attention: str = "sdpa"  # sdpa|flex_attention|eager; flex (CUDA) never builds a seq x seq mask, which sdpa needs past a sliding window (Mistral: 4096)
    # RMSNorm, SwiGLU, rotary with their backward written out (rawqlora/fused.py), compiled on CUDA,
    # on CUDA LoRA dropout inside Triton kernels (lora/kernels.py), and q/k/v and gate/up adapters
    # as one function each where their dropout allows (lora/siblings.py); off: the plain PyTorch paths
    fused_kernels: bool = True
    auto_batch: bool = False  # CUDA: lower --batch-size to the largest that fits, raising --grad-accum to keep the effective batch
    seed: int = 42

    # bookkeeping
    eval_every: int = 50  # optimizer steps between eval-loss measurements (0: only at the end)
    save_every: int = 100  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk (0: all)
    resume: bool = False  # continue from the newest complete checkpoint in --out
    overwrite: bool = False  # replace an existing --out directory
    device: str = "auto"  # cpu|cuda; auto: cuda when available
    trust_remote_code: bool = False  # run Python code shipped with the model/tokenizer: only for repositories you trust
    debug: bool = False  # full tracebacks instead of one-line errors

    # Resolved at start-up and saved in train_config.json, not meant to be passed.
    resolved: dict = field(default_factory=dict)


CHOICES = {
    "format": ["auto", "chat", "alpaca", "prompt-response", "text"],
    "quant": ["nf4", "fp4", "none"],
    "dtype": ["auto", *DTYPES],
    "optim": ["adamw", "paged_adamw", "paged_adamw_8bit"],
    "schedule": ["constant", "linear", "cosine"],
    "device": ["auto", "cpu", "cuda"],
    "attention": ["sdpa", "flex_attention", "eager"],
}


def parse_config(argv):
    """Flags > --config file > dataclass defaults. Unknown flags and unknown file keys are errors."""
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0], argument_default=None)
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "resolved"]
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, type=f.type, choices=CHOICES.get(f.name))
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}

    known = {f.name for f in fields}
    field_types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    values = {}
    if given.get("resume") and given.get("out") and (Path(given["out"]) / "train_config.json").is_file():
        # Resuming continues the run as it was configured; flags given now still win.
        values = read_config_file(Path(given["out"]) / "train_config.json", known | {"resolved"})
        values = {k: v for k, v in values.items() if k not in ("resolved", "resume", "overwrite", "config")}
    elif not given.get("model") and not given.get("config"):
        # The embedded default is a 3M-parameter model: it wants a higher learning rate and
        # fewer steps than the real-model defaults above. Its settings are in this file.
        say(f"note: no --model: fine-tuning the embedded default with the settings in {EMBEDDED_CONFIG}",
            file=sys.stderr)
        values = read_config_file(EMBEDDED_CONFIG, known)
    if given.get("config"):
        values.update(read_config_file(given["config"], known))
    values.update(given)
    cfg = TrainConfig(**{k: typed(k, v, field_types[k]) for k, v in values.items()})
    if not cfg.model:
        cfg.model, cfg.data = str(REPO / "default" / "model"), cfg.data or str(REPO / "default" / "data" / "chat.jsonl")
    if not cfg.data:
        raise BadInput("--data is required with --model (a json/jsonl/csv/parquet/txt file or a dataset name)")
    validate(cfg)
    return cfg


def typed(name, value, kind):
    """A config-file value as its field's type ("2e-4" -> 2e-4); argparse already typed the flags."""
    flag = "--" + name.replace("_", "-")
    if kind is bool and not isinstance(value, bool):
        raise BadInput(f"{flag}: expected true or false, got {value!r}")
    if kind not in (bool, dict):
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise BadInput(f"{flag}: expected {kind.__name__}, got {value!r}") from None
    if name in CHOICES and value not in CHOICES[name]:
        raise BadInput(f"{flag}: {value!r} is not one of {', '.join(CHOICES[name])}")
    return value


def read_config_file(path, known):
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:  # json.JSONDecodeError or yaml.YAMLError: both mean a malformed file
        raise BadInput(f"--config {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise BadInput(f"--config {path}: expected a mapping of option names to values")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return values


def validate(cfg):
    positive = ["lora_r", "batch_size", "grad_accum", "max_len"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not (0 < cfg.lr < math.inf and 0 < cfg.epochs < math.inf):  # written so that NaN fails too
        raise BadInput(f"--lr and --epochs must be > 0 and finite, got {cfg.lr} and {cfg.epochs}")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.eval_split < 1:
        raise BadInput("--lora-dropout and --eval-split must be in [0, 1)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if cfg.mlp_chunk < 0 or (cfg.mlp_chunk and not cfg.grad_ckpt):
        raise BadInput(f"--mlp-chunk must be >= 0 and goes with --grad-ckpt (it chunks the checkpointed MLPs), got {cfg.mlp_chunk}")
    if cfg.resume and cfg.overwrite:
        raise BadInput("--resume and --overwrite contradict each other: pick one")


# ----------------------------------------------------------------------------------------
# Model: 4-bit base, LoRA on the targets, new chat tokens if the data needs them.
# ----------------------------------------------------------------------------------------
def build_model(cfg, tokenizer, added_tokens, device, resume_from=None):
    model = quant.load_model(
        cfg.model,
        quant=None if cfg.quant == "none" else cfg.quant,
        double_quant=cfg.double_quant,
        compute_dtype=DTYPES[cfg.dtype],
        device=device,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False  # no KV cache while training: it only costs memory
    model.set_attn_implementation(cfg.attention)
    # Before LoRA goes on: transformers resizes the plain embedding and head modules only.
    grow_vocabulary(model, len(tokenizer))
    if resume_from:  # the checkpoint's adapter config says where LoRA goes; its weights replace the fresh init
        wrapped = lora.load_adapter(model, resume_from)
    else:
        wrapped = lora.inject(model, parse_targets(cfg.targets), r=cfg.lora_r, alpha=cfg.lora_alpha,
                              dropout=cfg.lora_dropout, rslora=cfg.rslora)
    modules_to_save = train_embedding_rows(model, len(tokenizer) - len(added_tokens), bool(added_tokens),
                                           cfg.train_embeddings)
    if cfg.fused_kernels:
        fused.enable(model)
    if cfg.grad_ckpt:
        grad_ckpt.enable(model.get_decoder().layers, offload=cfg.offload_activations, mlp_chunk=cfg.mlp_chunk)
    return model, wrapped, modules_to_save


def parse_targets(spec):
    """`all-linear`, a regex (any regex metacharacter other than '.'), or a comma list of name suffixes."""
    if spec == "all-linear" or any(c in spec for c in "*+?[](){}|^$\\"):
        return spec
    return [t.strip() for t in spec.split(",") if t.strip()]


def grow_vocabulary(model, vocab):
    """Give added tokens embedding and head rows, each new row the mean of the old ones.

    A new row initialised to the mean embedding starts as an "average token" instead of
    noise, so the first steps do not spike the loss (Hewitt, "Initializing New Word
    Embeddings for Pretrained Language Models", 2021).
    """
    if vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=True)


def train_embedding_rows(model, old_vocab, tokens_added, train_all):
    """Make the embedding rows of added tokens trainable (all rows with --train-embeddings).

    Only the new rows learn, unless --train-embeddings: a gradient hook zeroes the others, and
    weight decay is off for them. An output head that is itself a LoRA target trains its new
    rows in its base weight, which lora.save_adapter then saves beside the head's LoRA weights
    (as PEFT saves a targeted embedding layer). Returns the module names to save whole with the
    adapter (PEFT's modules_to_save).
    """
    if not tokens_added and not train_all:
        return []
    names = []
    head = model.get_output_embeddings()
    for module in (model.get_input_embeddings(), getattr(head, "base_layer", head)):
        # fp32 master weights: Adam updates of ~1e-4 vanish when added to bf16 values.
        module.weight.data = module.weight.data.float()
        module.weight.requires_grad_(True)
        if not train_all:
            frozen = torch.zeros(module.weight.shape[0], 1, dtype=torch.bool, device=module.weight.device)
            frozen[: min(old_vocab, module.weight.shape[0])] = True
            module.weight.register_hook(lambda g, frozen=frozen: g.masked_fill(frozen, 0))
        if module is not getattr(head, "base_layer", None):  # a LoRA head is saved with its adapter
            names.append(next(n for n, m in model.named_modules() if m is module).split(".")[-1])
    return names


# ----------------------------------------------------------------------------------------
# One optimizer step: micro-batches, loss normalised by the window's target tokens.
# ----------------------------------------------------------------------------------------
def forward_loss(model, batch, autocast):
    """Summed token loss of one micro-batch and its number of target tokens."""
    with autocast:
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        return causal_lm_loss(hidden, model.get_output_embeddings(), batch["labels"])


def optimizer_step_grads(model, micro_batches, autocast, loss_scale):
    """Accumulate gradients over `micro_batches`; returns the mean loss per target token.

    Each micro-batch's summed loss is divided by the number of target tokens in the whole
    window, not by its own count or by the number of micro-batches: then N micro-batches
    of uneven lengths give exactly the gradient of one big batch whose loss is the mean
    over all its target tokens.

    Under torchrun each rank holds its slice of every micro-batch; the window is all of
    them: the target count and the summed loss are summed over ranks, and so are the
    gradients at the end. Then every rank holds exactly the single-process gradient.
    """
    device = next(model.parameters()).device
    window_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    window_targets = distributed.all_reduce_sum(window_targets, device)  # before backward: it scales the loss
    total_loss = 0.0
    for batch in micro_batches:
        loss_sum, _ = forward_loss(model, batch, autocast)
        (loss_sum * (loss_scale / window_targets)).backward()
        total_loss += loss_sum.item()
    distributed.all_reduce_grads(p for p in model.parameters() if p.requires_grad)
    return distributed.all_reduce_sum(total_loss, device) / window_targets


@torch.no_grad()
def evaluate(model, batches, autocast):
    """Mean loss per target token over the eval set."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for batch in batches[distributed.rank() :: distributed.world_size()]:  # each rank its share of the batches
        loss_sum, count = forward_loss(model, batch, autocast)
        total, n = total + loss_sum.item(), n + int(count)
    model.train(was_training)
    total, n = distributed.all_reduce_sum(total, device), distributed.all_reduce_sum(n, device)
    return total / max(n, 1)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


# ----------------------------------------------------------------------------------------
# Checks that run before anything is written: a bad input must not cost the old --out.
# ----------------------------------------------------------------------------------------
def check_out_dir(cfg):
    """The output directory, after refusing one we must not write into. Touches nothing."""
    out = Path(cfg.out or REPO / "runs" / f"{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a directory: choose another --out")
    if cfg.resume:
        if not checkpoint.complete(out / "checkpoints"):
            raise BadInput(f"--resume: {out} has no complete checkpoint to resume from (checkpoints/step-N)")
        return out
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise BadInput(f"--out {out} exists and is not empty: pass --resume to continue it, "
                           "--overwrite to replace it, or choose another --out")
        for given in (cfg.model, cfg.data, cfg.eval_data):  # --overwrite deletes --out: never an input with it
            if given and Path(given).exists() and Path(given).resolve().is_relative_to(out.resolve()):
                raise BadInput(f"--overwrite would delete {given}, which is inside --out {out}: choose another --out")
    return out


def check_model(cfg):
    """The cheap checks of --model (config.json, architecture, safetensors headers, LoRA targets),
    so that a bad model fails in seconds, before the data is tokenized and the weights loaded."""
    path = Path(cfg.model)
    config = read_config(path, cfg.trust_remote_code)
    for file in checkpoint_files(path):
        checkpoint_keys(file)  # parses the header, which must cover the file exactly: catches truncation
    if not cfg.resume:  # resuming takes the targets from the checkpoint's adapter
        with torch.device("meta"):  # the module tree only: no memory, no init
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
            unfuse_experts(skeleton)
        resolve_targets(skeleton, parse_targets(cfg.targets))


def load_tokenizer(cfg):
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot load a tokenizer from --model {cfg.model} ({str(e).strip().splitlines()[0]}): it needs "
                       "the model's tokenizer files (tokenizer.json or tokenizer.model) beside config.json") from None
    if tokenizer.pad_token is None:  # Llama/Mistral ship none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------
# --auto-batch: the largest micro-batch whose forward and backward fit in GPU memory.
# ----------------------------------------------------------------------------------------
def auto_batch_size(probe, batch_size, grad_accum):
    """(micro-batch, grad_accum, largest that fits), probing sizes <= batch_size with `probe(n)`.

    `probe(n)` runs one micro-batch of n and raises torch.cuda.OutOfMemoryError if it does not
    fit. Sizes halve until one fits, then bisect up to the smallest that failed. The micro-batch
    used is the largest divisor of the effective batch (batch_size * grad_accum) that fits, so
    grad_accum rises to keep the effective batch exactly: the same samples per optimizer step.
    """
    def fits(n):
        try:
            probe(n)
            return True
        except torch.cuda.OutOfMemoryError:
            pass
        # Outside the except block: the traceback (and the activations its frames hold) is gone.
        if torch.cuda.is_available():
            gc.collect()  # reference cycles can still hold tensors
            torch.cuda.empty_cache()
        return False

    n, failed = batch_size, None
    while not fits(n):
        if n == 1:
            raise BadInput("--auto-batch: even one sample of the longest length runs out of CUDA memory; "
                           "lower --max-len, keep --grad-ckpt on, or use a GPU with more memory")
        failed, n = n, n // 2
    while failed is not None and failed - n > 1:
        mid = (n + failed) // 2
        n, failed = (mid, failed) if fits(mid) else (n, mid)
    effective = batch_size * grad_accum
    micro = max(d for d in range(1, n + 1) if effective % d == 0)
    return micro, effective // micro, n


def probe_batch(model, rows, collate, pad_id, device, autocast, n):
    """Forward and backward of the n longest rows: the most memory a micro-batch of n needs
    (optimizer states come on top, but for LoRA they are small)."""
    longest = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)[:n]
    # Dropout draws random numbers: fork the RNG so the run is the same with or without probing.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            optimizer_step_grads(model, [to_device(collate(longest, pad_id), device)], autocast, 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------
def train(cfg):
    """Run the whole fine-tuning described by `cfg`; returns the summary dict."""
    # "auto" settings become concrete here, so train_config.json records what actually ran.
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    # Under torchrun: join the process group; each rank on its own GPU (cuda:LOCAL_RANK).
    device = distributed.setup(torch.device(cfg.device))
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if cfg.dtype == "auto":
        cfg.dtype = "bf16" if device.type == "cuda" else "fp32"
    if cfg.attention == "flex_attention" and device.type != "cuda":
        raise BadInput("--attention flex_attention needs a CUDA GPU (it is compiled to Triton); use sdpa on the CPU")
    if cfg.optim.startswith("paged") and device.type != "cuda":
        raise BadInput(f"--optim {cfg.optim} needs a CUDA GPU (paged memory); use --optim adamw on the CPU")
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise BadInput("--dtype fp16 is for CUDA GPUs; use bf16 or fp32 on the CPU")
    if cfg.auto_batch and device.type != "cuda":
        raise BadInput("--auto-batch needs CUDA (it measures GPU memory); on the CPU set --batch-size yourself")
    if cfg.auto_batch and world > 1:  # each rank would probe its own GPU and could pick a different size
        raise BadInput("--auto-batch runs in one process only: under torchrun set the per-rank --batch-size yourself")
    # Every input is checked before --out is created or (--overwrite) deleted: model, data,
    # weights, targets. Only then is anything written.
    out = check_out_dir(cfg)
    ckpt_root = out / "checkpoints"
    resume_from = checkpoint.complete(ckpt_root)[-1] if cfg.resume else None  # the newest complete one
    saved_world = json.loads((resume_from / "trainer_state.json").read_text()).get("world_size", 1) if resume_from else world
    if saved_world != world:  # rank slices of each global batch, and the global batch itself, depend on it
        raise BadInput(f"--resume: {resume_from} was written by {saved_world} process(es), this run has {world}; "
                       f"resume with torchrun --nproc_per_node {saved_world}")
    check_model(cfg)
    # The same seed on every rank: the LoRA weights start equal everywhere (and stay equal: every
    # rank applies the same summed gradient). With --lora-dropout > 0 each rank then draws the
    # same dropout masks for its slice, so the masks differ from a single process's run; with
    # dropout 0 N ranks compute the single-process step up to fp32 summation order.
    torch.manual_seed(cfg.seed)

    # --- data ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg)
    train_samples, eval_rows, data_stats = data.prepare(
        cfg.data, tokenizer, fmt=cfg.format, max_len=cfg.max_len, train_on_prompt=cfg.train_on_prompt,
        eval_split=cfg.eval_split, eval_data=cfg.eval_data or None, seed=cfg.seed, force_chatml=cfg.add_chatml_tokens)
    for notice in data_stats["notices"]:
        say(f"note: {notice}", file=sys.stderr)
    t = data_stats["train"]
    say(f"data {cfg.data} ({data_stats['format']}): {t['samples']:,} train samples, {len(eval_rows):,} eval, "
        f"{t['tokens']:,} tokens ({t['target_tokens']:,} with loss); {t['truncated']} truncated to "
        f"--max-len {cfg.max_len}, {t['dropped']} dropped for having no target left")
    added_tokens = data_stats["new_token_ids"]
    rows = data.pack(train_samples, cfg.max_len) if cfg.packing else train_samples
    collate = data.collate_packed if cfg.packing else data.collate

    # --- model --------------------------------------------------------------------------
    t0 = time.time()
    model, wrapped, modules_to_save = build_model(cfg, tokenizer, added_tokens, device, resume_from)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    say(f"model {cfg.model} ({cfg.quant}, {cfg.dtype}) loaded in {time.time() - t0:.1f}s on {device}; "
        f"LoRA r={cfg.lora_r} on {len(wrapped)} modules: {n_trainable:,} trainable parameters "
        f"({100 * n_trainable / n_total:.2f}% of {n_total:,} stored)")
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.dtype]) if cfg.dtype != "fp32" else nullcontext()
    model.train()
    if cfg.auto_batch and not resume_from:  # a resumed run keeps the sizes its train_config.json recorded
        probe = functools.partial(probe_batch, model, rows, collate, tokenizer.pad_token_id, device, autocast)
        cfg.batch_size, cfg.grad_accum, largest = auto_batch_size(probe, cfg.batch_size, cfg.grad_accum)
        say(f"--auto-batch: a micro-batch of {largest} of the longest samples fits; using --batch-size "
            f"{cfg.batch_size} --grad-accum {cfg.grad_accum} (effective batch {cfg.batch_size * cfg.grad_accum})")

    # Global micro-batches of world x batch_size: the very list a single process with that
    # batch size would build, so N ranks see the same samples per step as one process does.
    # Rank r trains on the slice [r*batch_size, (r+1)*batch_size) of each.
    @functools.lru_cache(maxsize=1)
    def epoch_batches(epoch):
        order = data.batches(rows, world * cfg.batch_size, seed=cfg.seed, epoch=epoch, group_by_length=not cfg.packing)
        return [[rows[i] for i in idx] for idx in order]

    batches_per_epoch = len(epoch_batches(0))
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # --- output directory: every input has passed its checks ---------------------------
    # Only rank 0 writes to --out, and only once every rank has checked it (the barrier): a
    # slower rank must not find rank 0's fresh files and call --out "not empty".
    distributed.barrier()
    if main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_incomplete(ckpt_root)  # a save that a crash cut short

    # --- optimizer ----------------------------------------------------------------------
    # No weight decay on embedding rows: decay would shrink the frozen rows' neighbours' scale.
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    groups = [{"params": lora_params}] + ([{"params": other, "weight_decay": 0.0}] if other else [])
    optimizer = make_optimizer(cfg.optim, groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = LossScaler(enabled=cfg.dtype == "fp16")

    def save_adapter(path, overwrite=False):
        lora.save_adapter(model, path, base_model=str(cfg.model), modules_to_save=modules_to_save or None,
                          overwrite=overwrite)

    def check_weights(step, last_ckpt):
        """NaN/inf never reaches a checkpoint or the adapter: a step with finite gradients can still
        overflow the weights (a huge --lr)."""
        bad = next((n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
        if bad is not None:
            raise BadInput(stop_message(step, f"weights ({bad})", last_ckpt))

    # --- resume -------------------------------------------------------------------------
    step, tokens_seen, metrics_mode = 0, 0, "w"
    if resume_from:
        state = checkpoint.load_states(resume_from, optimizer)
        step, tokens_seen = state["step"], state["tokens"]
        scaler.load_state_dict(state["loss_scaler"])
        if main:
            truncate_metrics(out / "metrics.jsonl", step)
        metrics_mode = "a"
        say(f"resumed from {resume_from} (step {step} of {total_steps})")

    cfg.resolved = dict(total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch, lora_modules=wrapped, modules_to_save=modules_to_save,
                        data=data_stats)
    if main:
        write_atomic(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))  # --resume reads it
        if added_tokens:
            tokenizer.save_pretrained(out)  # merge.py and generate.py need the added tokens

    # Eval rows stay one sample each, packing or not: the loss per sample, never across them.
    eval_batches = [to_device(data.collate(eval_rows[i : i + cfg.batch_size], tokenizer.pad_token_id), device)
                    for i in range(0, len(eval_rows), cfg.batch_size)]

    # --- loop ---------------------------------------------------------------------------
    model.train()
    metrics = open(out / "metrics.jsonl" if main else os.devnull, metrics_mode)  # rank 0 logs; the others agree
    first_eval = evaluate(model, eval_batches, autocast) if eval_batches and step == 0 else None
    if first_eval is not None:
        log(metrics, dict(step=0, eval_loss=first_eval, eval_ppl=math.exp(first_eval)))
    last_eval, last_ckpt = first_eval, resume_from
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, disable=None if main else True)
    run_start, run_tokens = time.time(), 0
    # Length-grouped batches hold samples of similar length, often of one kind, so single-step
    # losses jump; the bar and the summary show the mean of the recent steps.
    recent_losses = collections.deque(maxlen=50)
    while step < total_steps:
        # The data position is a pure function of the step: epoch and batch offset.
        epoch, offset = divmod(step * cfg.grad_accum, steps_per_epoch * cfg.grad_accum)
        micro = epoch_batches(epoch)[offset : offset + cfg.grad_accum]
        tokens = sum(len(sample["input_ids"]) for b in micro for sample in b)  # real tokens of all ranks, no padding
        micro = [b[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] for b in micro]  # this rank's slice
        # An epoch's last batch may be smaller: a rank can get nothing of it (it still all-reduces).
        micro = [to_device(collate(b, tokenizer.pad_token_id), device) for b in micro if b]

        # The loss and gradients are summed over ranks inside: every check below agrees on all ranks.
        loss = optimizer_step_grads(model, micro, autocast, scaler.scale)
        if not math.isfinite(loss) and not scaler.enabled:
            raise BadInput(stop_message(step + 1, "loss", last_ckpt))
        if scaler.enabled:
            for p in trainable:
                if p.grad is not None:
                    p.grad.div_(scaler.scale)
        # Clip to max_grad_norm (inf: only measure). The norm is also the non-finite check.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        finite = bool(torch.isfinite(grad_norm))
        if not finite and not scaler.enabled:
            raise BadInput(stop_message(step + 1, "gradients", last_ckpt))
        lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if scaler.update(finite):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens
        run_tokens += tokens

        elapsed = time.time() - run_start
        recent_losses.append(loss)
        record = dict(step=step, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens=tokens_seen,
                      tok_s=run_tokens / elapsed, mem_gib=memory_gib(device))
        if scaler.enabled:
            record.update(loss_scale=scaler.scale, skipped_steps=scaler.skipped)
        if eval_batches and (cfg.eval_every and step % cfg.eval_every == 0 or step == total_steps):
            last_eval = evaluate(model, eval_batches, autocast)
            record.update(eval_loss=last_eval, eval_ppl=math.exp(last_eval))
        log(metrics, record)
        bar.set_postfix(loss=f"{statistics.fmean(recent_losses):.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tok_s']:.0f}",
                        **({"mem": f"{record['mem_gib']:.1f}G"} if device.type == "cuda" else {}),
                        **({"eval": f"{last_eval:.3f}"} if last_eval is not None else {}))
        bar.update(1)

        if cfg.save_every and step % cfg.save_every == 0 or step == total_steps:
            check_weights(step, last_ckpt)
            state = dict(step=step, tokens=tokens_seen, world_size=world, loss_scaler=scaler.state_dict(), epoch=epoch,
                         batch_offset=offset + cfg.grad_accum)
            # The weights and optimizer states are the same on every rank: rank 0 saves them.
            if main:
                checkpoint.save(ckpt_root, step, save_adapter, optimizer, state, keep_last=cfg.keep_last or None)
            last_ckpt = ckpt_root / f"{checkpoint.STEP_PREFIX}{step}"
            distributed.barrier()  # no rank runs ahead of a checkpoint that is not yet on disk
    bar.close()
    metrics.close()

    # --- final adapter ------------------------------------------------------------------
    check_weights(step, last_ckpt)
    if main:
        final_adapter_dir = out / ".adapter-tmp"
        save_adapter(final_adapter_dir, overwrite=True)
        # Weights first, config last: an adapter_config.json in --out always has its weights beside it.
        for f in sorted(final_adapter_dir.iterdir(), key=lambda f: f.name == lora.adapter.CONFIG_NAME):
            os.replace(f, out / f.name)
        final_adapter_dir.rmdir()
    distributed.barrier()  # every rank returns only once the adapter is in --out

    elapsed = time.time() - run_start
    train_loss = statistics.fmean(recent_losses) if recent_losses else float("nan")  # nan: resumed at the end
    summary = dict(steps=step, tokens=tokens_seen, seconds=elapsed, tok_s=run_tokens / max(elapsed, 1e-9),
                   peak_mem_gib=memory_gib(device), train_loss=train_loss, eval_loss=last_eval,
                   first_eval_loss=first_eval, out=str(out))
    if main:
        print_summary(summary, out, cfg)
    return summary


def truncate_metrics(path, step):
    """Drop log lines past the checkpoint we resume from: they are about to be redone.

    A line a kill cut short does not parse; it is past the checkpoint too, so it goes as well.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    write_atomic(path, "".join(line + "\n" for line in kept))


def write_atomic(path, text):
    """Replace `path` with `text` whole: a kill leaves the old file or the new, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def say(*args, **kwargs):
    """print, on rank 0 only: N ranks would print the same lines N times."""
    if distributed.is_main():
        print(*args, **kwargs)


def log(metrics, record):
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


def stop_message(step, what, last_ckpt):
    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    return (f"non-finite {what} at step {step}: training stopped; {where}. Lower --lr, check the data, "
            "or use --dtype bf16/fp32")


def print_summary(s, out, cfg):
    evals = ""
    if s["eval_loss"] is not None and s["first_eval_loss"] is not None:
        evals = f"; eval loss {s['first_eval_loss']:.3f} -> {s['eval_loss']:.3f}"
    peak = f", peak memory {s['peak_mem_gib']:.2f} GiB" if s["peak_mem_gib"] else ""
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.0f}s ({s['tok_s']:.0f} tokens/s{peak}); "
          f"train loss {s['train_loss']:.3f} (mean of the last {min(50, s['steps'])} steps){evals}")
    print(f"adapter: {out}")
    print("next:")
    print(f"  python merge.py --adapter {out} --out {out}-merged")
    print(f"  python generate.py --model {out}-merged \"What is the capital of France?\"")


def main(argv):
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except torch.cuda.OutOfMemoryError:
        raise BadInput(oom_message(cfg)) from None
    finally:
        distributed.shutdown()


def oom_message(cfg):
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    ckpt = ("; gradient checkpointing is already on" if cfg.grad_ckpt
            else ", or turn on gradient checkpointing (--grad-ckpt: recomputes activations instead of storing them)")
    return (f"CUDA out of memory (peak {peak:.1f} GiB allocated of {total:.1f} GiB): lower --batch-size "
            f"(now {cfg.batch_size}; --auto-batch finds the largest that fits, keeping the effective batch) "
            f"or --max-len (now {cfg.max_len}){ckpt}")


if __name__ == "__main__":
    cli.run(main)
