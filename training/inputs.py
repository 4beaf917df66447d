"""Checks of a run's inputs that happen before anything is written: a bad input must cost
seconds, and never the old --out."""

import json
import time
from pathlib import Path

import torch

import quant
from lora.inject import resolve_targets
from rawqlora.errors import BadInput
from training import checkpoint, distributed


def parse_targets(spec):
    """`all-linear`, a regex (any regex metacharacter other than '.'), or a comma list of name suffixes."""
    if spec == "all-linear" or any(c in spec for c in "*+?[](){}|^$\\"):
        return spec
    return [t.strip() for t in spec.split(",") if t.strip()]


def check_runtime(cfg):
    """Make cfg's "auto" settings concrete (train_config.json records what actually ran), refuse
    settings this machine cannot run, join torchrun's process group; returns this rank's device."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    device = distributed.setup(torch.device(cfg.device))  # under torchrun: cuda:LOCAL_RANK
    if cfg.dtype == "auto":
        cfg.dtype = "bf16" if device.type == "cuda" else "fp32"
    cuda_only = {"--attention flex_attention": cfg.attention == "flex_attention",
                 f"--optim {cfg.optim}": cfg.optim.startswith("paged"), "--dtype fp16": cfg.dtype == "fp16",
                 "--auto-batch": cfg.auto_batch}
    for setting, chosen in cuda_only.items():
        if chosen and device.type != "cuda":
            raise BadInput(f"{setting} needs a CUDA GPU; on the CPU use the defaults "
                           "(--attention sdpa, --optim adamw, --dtype fp32, your own --batch-size)")
    if cfg.auto_batch and distributed.world_size() > 1:  # each rank would probe its GPU and could pick another size
        raise BadInput("--auto-batch runs in one process only: under torchrun set the per-rank --batch-size yourself")
    return device


def check_out_dir(cfg, repo):
    """The output directory, after refusing one we must not write into. Touches nothing."""
    out = Path(cfg.out or repo / "runs" / f"{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}")
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


def resume_point(ckpt_root, world):
    """The newest complete checkpoint, if it was written by as many processes as this run has."""
    newest = checkpoint.complete(ckpt_root)[-1]
    saved_world = json.loads((newest / "trainer_state.json").read_text()).get("world_size", 1)
    if saved_world != world:  # rank slices of each global batch, and the global batch itself, depend on it
        raise BadInput(f"--resume: {newest} was written by {saved_world} process(es), this run has {world}; "
                       f"resume with torchrun --nproc_per_node {saved_world}")
    return newest


def check_model(cfg):
    """The cheap checks of --model (config.json, architecture, safetensors headers, LoRA targets),
    so that a bad model fails in seconds, before the data is tokenized and the weights loaded."""
    path = Path(cfg.model)
    config = quant.read_config(path, cfg.trust_remote_code)
    for file in quant.checkpoint_files(path):
        quant.checkpoint_shapes(file)  # parses the header, which must cover the file exactly: catches truncation
    if not cfg.resume:  # resuming takes the targets from the checkpoint's adapter
        skeleton = quant.empty_model(config, trust_remote_code=cfg.trust_remote_code)  # meta: no memory, no init
        resolve_targets(skeleton, parse_targets(cfg.targets))
