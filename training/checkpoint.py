"""Training checkpoints that are never half-written, and resuming from the newest one.

    OUT/checkpoints/step-N/
        adapter_config.json, adapter_model.safetensors   the LoRA weights (PEFT format)
        optimizer.pt                                     optimizer state (tensors only)
        rng.pt                                           CPU and CUDA random states
        trainer_state.json                               step, data position, loss scaler

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N` only
once every file is on disk (and fsynced), so a crash at any moment leaves either the
previous complete checkpoints or a temporary directory that is ignored and cleaned up.
Old checkpoints are deleted the same way round: renamed to a temporary name first, so
a crash in the middle of a deletion never leaves a half-deleted `step-N` that looks whole.
Optimizer and RNG states are loaded with `torch.load(weights_only=True)`: plain tensors
and numbers, never arbitrary pickled code.
"""

import json
import shutil
from pathlib import Path

import torch

from quant import TMP_PREFIX, remove_dir, swap_in
from rawqlora.errors import BadInput

STEP_PREFIX = "step-"


def save(ckpt_root, step, write_adapter, optimizer, trainer_state, keep_last=None):
    """Write checkpoint `step` atomically; `write_adapter(dir)` writes the adapter files.

    With `keep_last`, older complete checkpoints beyond the newest `keep_last` are removed
    (only after the new one is safely in place).
    """
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{STEP_PREFIX}{step}"
    tmp = ckpt_root / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write_adapter(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    except OSError as e:  # a full disk, a quota: the previous checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete(ckpt_root)
        raise BadInput(f"cannot write checkpoint {final} ({e}); the newest complete checkpoint is "
                       f"{previous[-1] if previous else 'none'}: free space, then --resume") from None
    swap_in(tmp, final, overwrite=True)  # overwrite: re-saving a step (the final one after a periodic save)
    if keep_last:
        for old in complete(ckpt_root)[:-keep_last]:
            remove_dir(old)
    return final


def complete(ckpt_root):
    """Complete checkpoints under `ckpt_root`, oldest first (temporary directories ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def remove_incomplete(ckpt_root):
    """Delete temporary directories left by a crash in the middle of a save."""
    root = Path(ckpt_root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p)


def load_states(ckpt_dir, optimizer):
    """Restore optimizer and RNG states from `ckpt_dir`; returns the trainer state dict."""
    ckpt_dir = Path(ckpt_dir)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt_dir / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt_dir / "trainer_state.json").read_text())
