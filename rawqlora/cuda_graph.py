"""The CUDA-only half of the decode loop: capturing its one-token step, replaying it, and
getting each step's tokens to the host without stalling the GPU. rawqlora/decode.py calls
into it only for a model on a CUDA device (the bookkeeping of kept decoders is plain Python).

    decode step t ─ replay(graph) ─▶ report [3, batch] on the GPU ─ async copy ─▶ pinned slot t % 2
    host: launch step t+1, then read step t's slot (its event), call on_step, check stop

A captured step launches its few hundred kernels with one call, so a batch-1 step costs the
GPU's time, not Python's. What makes the step capturable is in the step, not here: every
shape fixed (rawqlora/static_cache.py), every value it changes updated in place on the
device, no read back to the host (`.item()`, `.tolist()`, `torch.multinomial`'s input check,
`nonzero`), sampling from a generator registered with the graph.
"""

import warnings
import weakref

import torch

# Eager decode steps run on the capture stream before capturing. They are real steps (their
# tokens are kept) and they do the lazy set-up a capture must not: cuBLAS's workspace for this
# stream, bitsandbytes' shared-memory attribute on its 4-bit GEMM kernels (set on first launch).
WARMUP_STEPS = 2

_uncapturable = weakref.WeakSet()  # models whose capture failed once: not tried again
_kept = weakref.WeakKeyDictionary()  # model -> (key, decoder): one captured batch-1 decoder kept for the next call


def capturable(model):
    """Whether to try capturing `model`'s decode step without being asked to.

    Mixture-of-experts layers route tokens with `torch.where`/`nonzero`, which read the
    routing back to the host to size their outputs: not capturable, so not tried.
    """
    if model in _uncapturable:
        return False
    return not any("expert" in type(m).__name__.lower() for m in model.modules())


def capture(step, stream, generator=None, pool=None):
    """Record one call of `step` into a CUDA graph on `stream`; `replay()` then runs it again.

    A generator that the step samples from is registered with the graph, so each replay draws
    fresh numbers from its current state (and advances it) as an eager call would. `pool`: a
    memory pool (torch.cuda.graph_pool_handle()) shared with other graphs, else the graph's own.
    """
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        step()
    return graph


def try_capture(model, step, stream, generator=None, required=False):
    """`capture`, or None (with a one-time warning) when the model's step cannot be captured."""
    try:
        return capture(step, stream, generator)
    except Exception as e:  # noqa: BLE001 (any failure means: decode this model eagerly)
        if required:
            raise
        _uncapturable.add(model)
        failed("the one-token step", e, "decoding this model eagerly")
        return None


def failed(what, error, instead):
    """After a failed capture: wait for the device, then warn with the error's first line."""
    torch.cuda.synchronize()
    first_line = (str(error).splitlines() or [type(error).__name__])[0]
    warnings.warn(f"decode: {what} could not be captured in a CUDA graph ({first_line}); {instead}", stacklevel=4)


def fingerprint(model):
    """What a kept graph depends on: the addresses of every weight (an adapter loaded, a dtype or
    device change gives new ones), whether LoRA layers are merged (another forward), the mode."""
    pointers = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    merged = tuple(m.merged for m in model.modules() if isinstance(getattr(m, "merged", None), bool))
    return hash((pointers, merged, model.training))


def kept(model, key):
    """The decoder kept for `model` if it was built for `key`, else None (and the old one freed)."""
    entry = _kept.get(model)
    if entry is not None and entry[0] == key:
        return entry[1]
    _kept.pop(model, None)
    return None


def keep(model, key, decoder):
    _kept[model] = (key, decoder)


def release(model):
    """Free the decoder (KV cache, graph, its memory pool) kept for `model`, if any."""
    _kept.pop(model, None)


class PinnedReports:
    """Step reports copied to pinned host memory behind the GPU's back: two slots, one event each.

    push(report) queues an asynchronous copy of the device tensor on the current stream;
    pop() waits for the oldest copy only (not for work queued after it) and returns it as lists.
    """

    lag = 1  # the host reads step t while the GPU computes step t + 1

    def __init__(self, batch):
        self.slots = [torch.empty(3, batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)]
        self.queue = []
        self.pushed = 0

    def push(self, report):
        slot = self.pushed % 2
        self.slots[slot].copy_(report, non_blocking=True)
        self.events[slot].record()
        self.queue.append(slot)
        self.pushed += 1

    def pop(self):
        slot = self.queue.pop(0)
        self.events[slot].synchronize()
        return self.slots[slot].tolist()
