"""Data-parallel training under `torchrun --nproc_per_node N train.py ...`: the few helpers train.py needs.

Every rank holds the whole (quantized) model and its own copy of the LoRA weights; the
copies start equal (same seed) and stay equal because every rank applies the same summed
gradient. Outside torchrun (no WORLD_SIZE > 1) every helper is a no-op, so train.py reads
the same with one process or many.

No DistributedDataParallel wrapper: LoRA gradients are a few MB, so one all-reduce of a
flattened buffer per optimizer step costs next to nothing, and it keeps gradient
accumulation plain (no `no_sync()` context to remember on all but the last micro-batch).
"""

import os

import torch
import torch.distributed as dist


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK


def rank():
    return int(os.environ.get("RANK", 0))


def is_main():
    """Rank 0 writes checkpoints, metrics and the adapter, and prints; the others stay quiet."""
    return rank() == 0


def setup(device):
    """Join the process group when started by torchrun; returns this rank's device."""
    if world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":  # device_id binds the rank to its GPU (barriers and collectives use it)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return device


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value, device):
    """The sum over ranks of a Python number (a loss, a token count), or of a tensor on `device`
    (summed in place on the device's stream: nothing waits for it)."""
    if not dist.is_initialized():
        return value
    if torch.is_tensor(value):
        dist.all_reduce(value)
        return value
    # float64: counts stay exact and summed losses lose nothing before the division.
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return type(value)(t.item())


def all_reduce_grads(params):
    """Sum the gradients of `params` over ranks, in place: one collective per dtype.

    A parameter without a gradient gets zeros first (a rank whose share of the last,
    smaller batch of an epoch is empty runs no backward), so every rank sends buffers of
    the same layout.
    """
    if not dist.is_initialized():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def say(*args, **kwargs):
    """print, on rank 0 only: N ranks would print the same lines N times."""
    if is_main():
        print(*args, **kwargs)
