"""--auto-batch: the largest micro-batch whose forward and backward fit in GPU memory."""

import gc

import torch

from rawqlora.errors import BadInput


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


def longest_rows_probe(run_step, model, rows, make_batch, device):
    """`probe(n)`: forward and backward (`run_step(batch)`) of the n longest rows, the most memory
    a micro-batch of n needs (optimizer states come on top, but for LoRA they are small)."""
    def probe(n):
        longest = sorted(rows, key=lambda r: len(r["input_ids"]), reverse=True)[:n]
        # Dropout draws random numbers: fork the RNG so the run is the same with or without probing.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                run_step(make_batch(longest))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            finally:
                model.zero_grad(set_to_none=True)

    return probe
