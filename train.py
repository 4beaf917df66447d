"""QLoRA fine-tuning of a Hugging Face causal LM, written out in raw PyTorch.

    python train.py                                   # the embedded default: a tiny model, about a minute on a CPU
    python train.py --model ~/models/Mistral-7B-v0.1 --data chats.jsonl --out runs/mistral-chat

Reads top to bottom: the config, the setup (checks, data, model, optimizer, resume), one
optimizer step, the loop. The parts worth reading on their own live in modules: lora/ (the
adapters), quant/ (4-bit loading, model directories), training/ (data, loss, optimizer,
checkpoints, data-parallel helpers, activation checkpointing), fast/ (the speed layer).

Data-parallel on N GPUs (or CPU processes): torchrun --nproc_per_node N train.py ... ;
--batch-size is then per rank, so each optimizer step sees N x batch-size x grad-accum samples.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rawqlora import cli
from rawqlora.errors import BadInput
from training import config as config_file

REPO = Path(__file__).resolve().parent
EMBEDDED_CONFIG = REPO / "default" / "config.json"


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
    columns: str = ""  # the data's names for ours, OURS=THEIRS: "messages=conversation,role=from,content=text"
    roles: str = ""  # the data's chat roles as ours, OURS=THEIRS: "user=Guest,assistant=Lex" (adds to human/gpt)
    heldout: str = ""  # JSON lines {"question", "answer"} asked before and after training, greedy, exact match on the answer
    data_field: str = ""  # a .json file holding one object: the field with the records (default: its only list of records)
    response_marker: str = ""  # text data: loss only on what follows this, e.g. "### Assistant:" or "[/INST]"
    prompt_marker: str = ""  # text data with --response-marker: where each response ends, e.g. "### Human:" or "[INST]"

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
    # adamw (training/optim.py, written out: multi-tensor, a few kernels a step)|paged_adamw|paged_adamw_8bit
    # (bitsandbytes, CUDA: state in unified memory; 0.3 GiB saved on a 7B model, 1-3% slower there).
    # TrainingArguments' names are accepted: paged_adamw_32bit, paged_adamw_8bit, adamw_torch.
    optim: str = "adamw"
    lr: float = 2e-4  # peak learning rate: QLoRA's value for 7B-13B models
    weight_decay: float = 0.0  # LoRA's low rank already regularises; QLoRA uses 0
    schedule: str = "constant"  # constant|linear|cosine: QLoRA found constant as good as cosine
    warmup_steps: int = 10  # linear warmup: Adam's early moment estimates are noisy
    warmup_ratio: float = 0.0  # > 0: warm up for this fraction of all steps instead (TrainingArguments' warmup_ratio)
    max_grad_norm: float = 0.3  # clip the LoRA gradients' global norm (QLoRA's value; stabilises 4-bit training)
    batch_size: int = 4  # micro-batch size (samples, or packed rows, per forward)
    grad_accum: int = 4  # micro-batches per optimizer step: effective batch = batch_size * grad_accum
    epochs: float = 1.0  # passes over the training data (fractions allowed)
    max_steps: int = -1  # optimizer steps; overrides epochs when > 0
    # auto|on|off. on: recompute every decoder layer in backward (activations, not the 4-bit weights,
    # dominate QLoRA memory; the recompute is about a quarter of the step's arithmetic). auto: on CUDA,
    # recompute only as many layers as --memory-budget needs, measured in one probe step before training
    # (training/memory_plan.py); on the CPU it means on: no free-memory figure to plan against (host
    # memory is shared, and running out of it swaps or kills rather than raising).
    grad_ckpt: str = "auto"
    memory_budget: float = 0.0  # GiB of GPU memory --grad-ckpt auto plans for; 0: all that is free once the model is loaded
    offload_activations: bool = False  # park checkpointed layer inputs in host memory (7B, 16k tokens: -3.5 GiB GPU; copies overlap compute, ~0.3% slower)
    mlp_chunk: int = 0  # >0: run each MLP this many tokens at a time, recomputed per chunk (very long sequences; costs one more MLP forward)
    attention: str = "sdpa"  # sdpa|flex_attention|eager; flex (CUDA) never builds a seq x seq mask, which sdpa needs past a sliding window (Mistral: 4096)
    # The speed layer (fast/, fast.enable): the same math with the backward written out. Each LoRA
    # layer is one autograd function (q/k/v and gate/up one per group), Llama/Mistral/Qwen2/Mixtral's
    # RMSNorm, SwiGLU and rotary are too, and on CUDA Triton kernels and torch.compile fuse them
    # (LoRA dropout then draws hash masks, not torch's). Off (--no-fast): exactly lora/layer.py's
    # formula and the model's own modules through plain autograd, the reference. That costs memory:
    # 2.3x the saved activations per layer (bf16, dropout 0.05; measured on the CPU), about +3 GiB
    # of peak for a 7B model at 16k tokens with grad_ckpt, and speed (bench/RESULTS.md).
    fast: bool = True
    auto_batch: bool = False  # CUDA: lower --batch-size to the largest that fits, raising --grad-accum to keep the effective batch
    seed: int = 42

    # bookkeeping
    eval_every: str = "50"  # optimizer steps between eval-loss measurements, or "epoch" (0: only at the end)
    save_every: str = "100"  # optimizer steps between checkpoints, or "epoch" (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk (0: all)
    resume: bool = False  # continue from the newest complete checkpoint in --out
    overwrite: bool = False  # replace an existing --out directory
    device: str = "auto"  # cpu|cuda; auto: cuda when available
    trust_remote_code: bool = False  # run Python code shipped with the model/tokenizer: only for repositories you trust
    debug: bool = False  # full tracebacks instead of one-line errors

    # Resolved at start-up and saved in train_config.json, not meant to be passed.
    resolved: dict = field(default_factory=dict)


# TrainingArguments' spellings of our choices (tutorials' settings work as written).
ALIASES = {"optim": {"paged_adamw_32bit": "paged_adamw", "adamw_torch": "adamw"},
           # grad_ckpt was a bool: configs and train_config.json files written then (YAML reads on/off as booleans too)
           "grad_ckpt": {"True": "on", "False": "off"},
           "schedule": {"constant_with_warmup": "constant"}}
CHOICES = {
    "format": ["auto", "chat", "alpaca", "prompt-response", "text"],
    "quant": ["nf4", "fp4", "none"],
    "dtype": ["auto", "bf16", "fp16", "fp32"],
    "optim": ["adamw", "paged_adamw", "paged_adamw_8bit", *ALIASES["optim"]],
    "schedule": ["constant", "linear", "cosine", *ALIASES["schedule"]],
    "device": ["auto", "cpu", "cuda"],
    "attention": ["sdpa", "flex_attention", "eager"],
    "grad_ckpt": ["auto", "on", "off", *ALIASES["grad_ckpt"]],
}


def parse_config(argv):
    """Flags > --config file > (resumed run's train_config.json | embedded default's settings) > defaults."""
    def base(given):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        saved = Path(given.get("out", "")) / "train_config.json"
        if given.get("resume") and given.get("out") and saved.is_file():
            # Resuming continues the run as it was configured; flags given now still win.
            values = config_file.read_file(saved, known)
            return {k: v for k, v in values.items() if k not in ("resolved", "resume", "overwrite", "config")}
        if not given.get("model") and not given.get("config"):
            # The embedded default is a tiny model: it wants a higher learning rate and fewer
            # steps than the real-model defaults above. Its settings are in this file.
            print(f"note: no --model: fine-tuning the embedded default with the settings in {EMBEDDED_CONFIG}",
                  file=sys.stderr)
            return config_file.read_file(EMBEDDED_CONFIG, known)
        return {}

    cfg = config_file.parse(TrainConfig, argv, CHOICES, __doc__.split("\n")[0], base)
    for name, aliases in ALIASES.items():
        setattr(cfg, name, aliases.get(getattr(cfg, name), getattr(cfg, name)))
    if not cfg.model:
        cfg.model, cfg.data = str(REPO / "default" / "model"), cfg.data or str(REPO / "default" / "data" / "chat.jsonl")
        cfg.heldout = cfg.heldout or str(REPO / "default" / "data" / "heldout.jsonl")
    if not cfg.data:
        raise BadInput("--data is required with --model (a json/jsonl/csv/parquet/txt file or a dataset name)")
    validate(cfg)
    return cfg


def validate(cfg):
    for name in ["lora_r", "batch_size", "grad_accum", "max_len"]:
        if getattr(cfg, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not (0 < cfg.lr < math.inf and 0 < cfg.epochs < math.inf):  # written so that NaN fails too
        raise BadInput(f"--lr and --epochs must be > 0 and finite, got {cfg.lr} and {cfg.epochs}")
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.eval_split < 1 or not 0 <= cfg.warmup_ratio < 1:
        raise BadInput("--lora-dropout, --eval-split and --warmup-ratio must be in [0, 1)")
    for name in ("eval_every", "save_every"):
        value = getattr(cfg, name)
        if value != "epoch" and not (value.isdigit()):
            raise BadInput(f"--{name.replace('_', '-')} takes a number of steps (0: only at the end) or 'epoch', "
                           f"got {value!r}")
    if cfg.mlp_chunk < 0 or (cfg.mlp_chunk and cfg.grad_ckpt == "off"):
        raise BadInput(f"--mlp-chunk must be >= 0 and goes with --grad-ckpt (it chunks the checkpointed MLPs), got {cfg.mlp_chunk}")
    if not 0 <= cfg.memory_budget < math.inf or (cfg.memory_budget and cfg.grad_ckpt != "auto"):
        raise BadInput(f"--memory-budget is GiB for --grad-ckpt auto (0: the free GPU memory), got {cfg.memory_budget} "
                       f"with --grad-ckpt {cfg.grad_ckpt}")
    if cfg.resume and cfg.overwrite:
        raise BadInput("--resume and --overwrite contradict each other: pick one")


if __name__ == "__main__":
    # --help and a bad flag answer here, in a fraction of a second: torch, transformers and
    # bitsandbytes (seconds of imports) load below, once the command line is known to be good.
    CONFIG = cli.run(parse_config)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lora  # noqa: E402
import quant  # noqa: E402
from training import checkpoint, data, distributed, heldout  # noqa: E402
from training.distributed import say  # noqa: E402
from training.inputs import check_model, check_out_dir, check_runtime, resume_point  # noqa: E402
from training.loss import IGNORE_INDEX, causal_lm_loss  # noqa: E402
from training.metrics import MetricsLog  # noqa: E402
from training.optim import LossScaler, lr_factor, make_optimizer  # noqa: E402
from training.report import finish, oom_message, stop_message  # noqa: E402
from training.setup import build_model, fit_memory, setup_data  # noqa: E402


# ----------------------------------------------------------------------------------------
# Setup: data, model and memory in training/setup.py; the optimizer here.
# ----------------------------------------------------------------------------------------
def setup_optimizer(cfg, model):
    # No weight decay on embedding rows: decay would shrink the frozen rows' neighbours' scale.
    lora_params = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    groups = [{"params": lora_params}] + ([{"params": other, "weight_decay": 0.0}] if other else [])
    return make_optimizer(cfg.optim, groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    """Accumulate gradients over `micro_batches`; returns the mean loss per target token as a 0-dim
    float64 tensor on the model's device, not yet read: reading it (float()) waits for the GPU,
    so the trainer reads it after queueing the optimizer step (Trainer.update).

    Each micro-batch's summed loss is divided by the number of target tokens in the whole
    window, not by its own count or by the number of micro-batches: then N micro-batches
    of uneven lengths give exactly the gradient of one big batch whose loss is the mean
    over all its target tokens.

    Under torchrun each rank holds its slice of every micro-batch; the window is all of
    them: the target count and the summed loss are summed over ranks, and so are the
    gradients at the end. Then every rank holds exactly the single-process gradient.
    """
    device = next(model.parameters()).device
    window_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    window_targets = distributed.all_reduce_sum(window_targets, device)  # before backward: it scales the loss
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        loss_sum, _ = forward_loss(model, batch, autocast)
        (loss_sum * (loss_scale / window_targets)).backward()
        total_loss += loss_sum.detach()
    distributed.all_reduce_grads(p for p in model.parameters() if p.requires_grad)
    return distributed.all_reduce_sum(total_loss, device) / window_targets


def evaluate(model, batches, autocast):
    """Mean loss per target token over the eval set."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches[distributed.rank() :: distributed.world_size()]:  # each rank its share
            loss_sum, count = forward_loss(model, batch, autocast)
            total, n = total + loss_sum.item(), n + int(count)
    model.train(was_training)
    total, n = distributed.all_reduce_sum(total, device), distributed.all_reduce_sum(n, device)
    return total / max(n, 1)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def every(spec, steps_per_epoch):
    """--eval-every / --save-every as a number of optimizer steps (0: only at the end)."""
    return steps_per_epoch if spec == "epoch" else int(spec)


# ----------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------
def train(cfg):
    """Run the whole fine-tuning described by `cfg`; returns the summary dict."""
    device = check_runtime(cfg)  # "auto" settings made concrete; joins torchrun's process group
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    # Every input is checked before --out is created or (--overwrite) deleted: model, data,
    # weights, targets. Only then is anything written.
    out = check_out_dir(cfg, REPO)
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(ckpt_root, world) if cfg.resume else None
    check_model(cfg)
    # The same seed on every rank: the LoRA weights start equal everywhere (and stay equal: every
    # rank applies the same summed gradient). With --lora-dropout > 0 each rank then draws the
    # same dropout masks for its slice, so the masks differ from a single process's run; with
    # dropout 0 N ranks compute the single-process step up to fp32 summation order.
    torch.manual_seed(cfg.seed)

    tokenizer = quant.load_tokenizer(cfg.model, cfg.trust_remote_code)
    rows, eval_rows, collate, added_tokens, data_stats = setup_data(cfg, tokenizer)
    t0 = time.time()
    model, wrapped, modules_to_save = build_model(cfg, tokenizer, added_tokens, device, resume_from)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    say(f"model {cfg.model} ({cfg.quant}, {cfg.dtype}) loaded in {time.time() - t0:.1f}s on {device}; "
        f"LoRA r={cfg.lora_r} on {len(wrapped)} modules: {n_trainable:,} trainable parameters "
        f"({100 * n_trainable / n_total:.2f}% of {n_total:,} stored)")
    autocast = torch.autocast(device.type, dtype=quant.DTYPES[cfg.dtype], enabled=cfg.dtype != "fp32")
    model.train()

    def batch_of(samples):
        return to_device(collate(samples, tokenizer.pad_token_id), device)

    plan = fit_memory(cfg, model, rows, batch_of, lambda b: optimizer_step_grads(model, [b], autocast, 1.0), device,
                      resumed=resume_from is not None)
    questions = heldout.load_questions(cfg.heldout) if cfg.heldout else []
    # Before any step: B = 0, so this is the base model answering (with the data's chat tokens).
    before = heldout.score(model, tokenizer, questions) if questions and not resume_from else None

    # Global micro-batches of world x batch_size: the very list a single process with that batch
    # size would build, so N ranks see the same samples per step as one process does. Rank r
    # trains on the slice [r*batch_size, (r+1)*batch_size) of each.
    @functools.lru_cache(maxsize=1)  # one epoch's order held at a time
    def epoch_batches(epoch):
        order = data.batches(rows, world * cfg.batch_size, seed=cfg.seed, epoch=epoch, group_by_length=not cfg.packing)
        return [[rows[i] for i in idx] for idx in order]

    steps_per_epoch = max(1, len(epoch_batches(0)) // cfg.grad_accum)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio > 0 else cfg.warmup_steps

    # --- output directory: every input has passed its checks ---------------------------
    # Only rank 0 writes to --out, and only once every rank has checked it (the barrier): a
    # slower rank must not find rank 0's fresh files and call --out "not empty".
    distributed.barrier()
    if main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_incomplete(ckpt_root)  # a save that a crash cut short

    optimizer = setup_optimizer(cfg, model)
    scaler = LossScaler(enabled=cfg.dtype == "fp16")
    step, tokens_seen = 0, 0
    if resume_from:
        state = checkpoint.load_states(resume_from, optimizer)
        step, tokens_seen = state["step"], state["tokens"]
        scaler.load_state_dict(state["loss_scaler"])
        say(f"resumed from {resume_from} (step {step} of {total_steps})")
    cfg.resolved = dict(total_steps=total_steps, warmup_steps=warmup, steps_per_epoch=steps_per_epoch,
                        lora_modules=wrapped, modules_to_save=modules_to_save, data=data_stats,
                        memory_plan=plan and plan.as_dict())
    if main:
        quant.write_text_atomic(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        if added_tokens:
            tokenizer.save_pretrained(out)  # merge.py and generate.py need the added tokens

    def save_adapter(path, overwrite=False):
        lora.save_adapter(model, path, base_model=str(cfg.model), modules_to_save=modules_to_save or None,
                          overwrite=overwrite)

    # Eval rows stay one sample each, packing or not: the loss per sample, never across them.
    eval_batches = [to_device(data.collate(eval_rows[i : i + cfg.batch_size], tokenizer.pad_token_id), device)
                    for i in range(0, len(eval_rows), cfg.batch_size)]

    def window(step):
        """The step's micro-batches (this rank's slice of each) and the real tokens of all ranks."""
        epoch, offset = divmod(step, steps_per_epoch)
        micro = epoch_batches(epoch)[offset * cfg.grad_accum : (offset + 1) * cfg.grad_accum]
        tokens = sum(len(sample["input_ids"]) for b in micro for sample in b)  # no padding
        mine = [b[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] for b in micro]
        # An epoch's last batch may be smaller: a rank can get nothing of it (it still all-reduces).
        return [batch_of(b) for b in mine if b], tokens

    run = Run(cfg, model, optimizer, scaler, autocast, device, out, save_adapter, eval_batches, window,
              total_steps, warmup, steps_per_epoch)
    summary = run.loop(step, tokens_seen, resume_from)
    if questions:
        summary.update(heldout.before_and_after(model, tokenizer, questions, before))
    if main:
        finish(out, summary, cfg.model, cfg.data, cfg.device, questions)
    return summary


@dataclass
class Run:
    """What the loop needs, set up by train()."""

    cfg: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    autocast: torch.autocast
    device: torch.device
    out: Path
    save_adapter: callable  # save_adapter(path, overwrite=False)
    eval_batches: list
    window: callable  # window(step) -> (this rank's micro-batches, tokens of all ranks)
    total_steps: int
    warmup: int
    steps_per_epoch: int

    def loop(self, step, tokens_seen, last_ckpt):
        cfg, model, main = self.cfg, self.model, distributed.is_main()
        trainable = [p for p in model.parameters() if p.requires_grad]
        eval_every, save_every = every(cfg.eval_every, self.steps_per_epoch), every(cfg.save_every, self.steps_per_epoch)
        metrics = MetricsLog(self.out / "metrics.jsonl", resumed_at=step, enabled=main)  # rank 0 logs
        first_eval = evaluate(model, self.eval_batches, self.autocast) if self.eval_batches and step == 0 else None
        if first_eval is not None:
            metrics.write(dict(step=0, eval_loss=first_eval, eval_ppl=math.exp(first_eval)))
        last_eval = first_eval
        bar = tqdm(total=self.total_steps, initial=step, desc="train", dynamic_ncols=True, disable=None if main else True)
        run_start, run_tokens = time.time(), 0
        # Length-grouped batches hold samples of similar length, often of one kind, so single-step
        # losses jump; the bar and the summary show the mean of the recent steps.
        recent_losses = collections.deque(maxlen=50)
        while step < self.total_steps:
            micro, tokens = self.window(step)
            # The loss and gradients are summed over ranks inside: every check below agrees on all ranks.
            loss = optimizer_step_grads(model, micro, self.autocast, self.scaler.scale)
            loss, grad_norm, lr = self.update(step, trainable, loss, last_ckpt)
            step, tokens_seen, run_tokens = step + 1, tokens_seen + tokens, run_tokens + tokens
            recent_losses.append(loss)
            record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens_seen,
                          tok_s=run_tokens / (time.time() - run_start), mem_gib=memory_gib(self.device))
            if self.scaler.enabled:
                record.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped)
            last = step == self.total_steps
            if self.eval_batches and (eval_every and step % eval_every == 0 or last):
                last_eval = evaluate(model, self.eval_batches, self.autocast)
                record.update(eval_loss=last_eval, eval_ppl=math.exp(last_eval))
            metrics.write(record)
            bar.set_postfix(loss=f"{statistics.fmean(recent_losses):.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tok_s']:.0f}",
                            **({"mem": f"{record['mem_gib']:.1f}G"} if self.device.type == "cuda" else {}),
                            **({"eval": f"{last_eval:.3f}"} if last_eval is not None else {}))
            bar.update(1)
            if save_every and step % save_every == 0 or last:
                last_ckpt = self.save_checkpoint(step, tokens_seen, last_ckpt)
        bar.close()
        metrics.close()
        self.save_final(step, last_ckpt)
        elapsed = time.time() - run_start
        return dict(steps=step, tokens=tokens_seen, seconds=elapsed, tok_s=run_tokens / max(elapsed, 1e-9),
                    peak_mem_gib=memory_gib(self.device), eval_loss=last_eval, first_eval_loss=first_eval,
                    train_loss=statistics.fmean(recent_losses) if recent_losses else float("nan"),  # nan: resumed at the end
                    out=str(self.out))

    def update(self, step, trainable, loss, last_ckpt):
        """Unscale, clip, set the learning rate and step (or skip, on an fp16 overflow), then stop on a
        non-finite loss or gradient: (loss, grad norm, lr) as numbers.

        Without loss scaling nothing waits for the GPU until the optimizer step is queued: the
        loss and the norm are read after it. Read before it, the CPU would wait for backward to
        end and the GPU would then idle while the CPU launched the clip and the step: 16 ms of
        a 7B step's 26.7 ms idle time (bench/RESULTS.md, session 9). A step taken on a
        non-finite gradient stays in this process's memory: training stops right after it, and
        check_weights keeps such weights out of every file. fp16 needs the check before the
        step, to skip it.
        """
        cfg, scaler = self.cfg, self.scaler
        if scaler.enabled:
            for p in trainable:
                if p.grad is not None:
                    p.grad.div_(scaler.scale)
        # Clip to max_grad_norm (inf: only measure). The norm is also the non-finite check.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        lr = cfg.lr * lr_factor(step, self.total_steps, self.warmup, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not scaler.enabled or scaler.update(bool(torch.isfinite(grad_norm))):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, grad_norm = float(loss), float(grad_norm)
        for name, value in (("loss", loss), ("gradients", grad_norm)):
            if not math.isfinite(value) and not scaler.enabled:
                raise BadInput(stop_message(step + 1, name, last_ckpt))
        return loss, grad_norm, lr

    def check_weights(self, step, last_ckpt):
        """NaN/inf never reaches a checkpoint or the adapter: a step with finite gradients can still
        overflow the weights (a huge --lr)."""
        bad = next((n for n, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
        if bad is not None:
            raise BadInput(stop_message(step, f"weights ({bad})", last_ckpt))

    def save_checkpoint(self, step, tokens_seen, last_ckpt):
        self.check_weights(step, last_ckpt)
        ckpt_root = self.out / "checkpoints"
        state = dict(step=step, tokens=tokens_seen, world_size=distributed.world_size(),
                     loss_scaler=self.scaler.state_dict())
        if distributed.is_main():  # the weights and optimizer states are the same on every rank
            checkpoint.save(ckpt_root, step, self.save_adapter, self.optimizer, state,
                            keep_last=self.cfg.keep_last or None)
        distributed.barrier()  # no rank runs ahead of a checkpoint that is not yet on disk
        return ckpt_root / f"{checkpoint.STEP_PREFIX}{step}"

    def save_final(self, step, last_ckpt):
        """The adapter into --out itself, atomically (a crash leaves the old files or the new)."""
        self.check_weights(step, last_ckpt)
        if distributed.is_main():
            staging = self.out / ".adapter-tmp"
            self.save_adapter(staging, overwrite=True)
            # Weights first, config last: an adapter_config.json in --out always has its weights beside it.
            for f in sorted(staging.iterdir(), key=lambda f: f.name == lora.adapter.CONFIG_NAME):
                os.replace(f, self.out / f.name)
            staging.rmdir()
        distributed.barrier()  # every rank returns only once the adapter is in --out


def run(cfg):
    try:
        return train(cfg)
    except torch.cuda.OutOfMemoryError:
        raise BadInput(oom_message(cfg)) from None
    finally:
        distributed.shutdown()


def main(argv):
    return run(parse_config(argv))


if __name__ == "__main__":
    cli.run(lambda argv: run(CONFIG))
