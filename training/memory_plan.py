"""--grad-ckpt auto: checkpoint only as many decoder layers as a memory budget needs.

A checkpointed decoder layer keeps only its input (none of it on the GPU when offloaded) and
runs its forward again in backward; at full checkpointing that recompute is about a quarter
of the step's arithmetic (bench/RESULTS.md). A *kept* layer, one not checkpointed, holds its
activations until its backward instead. With the first L - n layers checkpointed and the
last n kept (why those: `checkpointed_layers`), a step's peak is

    peak(n) = P1 + (n - 1) c + unseen          for n >= 1; full checkpointing (n = 0) peaks at P1 too

    P1      measured: torch.cuda.max_memory_allocated over one forward and backward of the
            longest micro-batch with only the top layer kept (`measure`, a probe step)
    c       measured in that same step: what the kept top layer holds beyond what a
            checkpointed layer holds, read two ways (its saved tensors; the allocator)
    unseen  what training holds and the probe does not: the optimizer's state (`unseen_bytes`)

and `plan` keeps the largest n whose peak fits in (1 - FRAGMENTATION) x the budget. The budget
defaults to all the GPU memory this process could have once the model is loaded
(`default_budget`). When not every layer fits, a second probe measures c with the kept layers
lean (training/grad_ckpt.py `set_lean`: c smaller by the SwiGLU output) and that plan is taken
if it keeps more layers. Where no layer has a lean form there is no second probe: MLPs on
fast/swiglu_down.py keep no SwiGLU output, lean or not. Room still left after the kept layers
goes first to the loss's log-probabilities (training/loss.py `keep_log_probs`: backward skips
the lm_head's second forward), then to dequantized copies of the 4-bit weights
(fast/dense_weights.py), layer by layer. That order is speed per byte on a 7B model at 16k
tokens (bench/RESULTS.md): a kept layer saves ~11 ms of recompute for 1.6 GiB, the kept loss
~9 ms for 2 GiB (predicted from its FLOPs; measured, the ratio to the usual stack rose 2.4%,
across two machine starts), a layer's dense weights ~0.7 ms for 0.4 GiB.

Measured, not derived from a formula: what a layer saves depends on the model, the speed
layer (fast/ saves 2.3x less than the reference), dropout, the attention kernel and the
sequence length, and the probe reads it at the real shape in one step.
"""

import contextlib
import dataclasses

import torch

from fast import dense_weights
from training import grad_ckpt, loss

# The plan counts allocated bytes (what max_memory_allocated reports); the GPU must hold what
# the caching allocator *reserves*, which is more: requests are rounded up (to 2 MiB blocks
# above 1 MiB) and split blocks leave free pieces too small for the next request. This
# repository's one step measured near a cap (bench/RESULTS.md, run E: 196,608 tokens) had an
# allocated peak that extrapolates to 21.6 GiB and did not fit in 24 GiB: 10% lost there, to
# the allocator or to a peak the extrapolation missed. The bench records max_memory_reserved
# beside every peak, which is how this figure gets checked (and lowered, if it can be).
FRAGMENTATION = 0.10


@dataclasses.dataclass
class Measurement:
    """What one probe step measured, in bytes."""

    peak: int  # P1; 0 on the CPU, which has no allocator statistics
    per_layer: int  # c: the larger of the two readings below
    saved: int  # c from the kept layer's saved tensors (SavedBytes)
    allocated: int  # c from the CUDA allocator's growth across the kept layer's forward; 0 on the CPU
    layer_input: int  # one layer's input: the micro-batch's hidden states


@dataclasses.dataclass
class Plan:
    layers: int  # decoder layers
    kept: int  # layers that keep their activations
    checkpointed: frozenset  # the indices of the others
    budget: int  # bytes
    unseen: int  # bytes training holds that the probe did not (optimizer state)
    predicted_peak: int  # bytes allocated at the step's peak, by the formula above
    measurement: Measurement
    lean: bool = False  # kept layers rebuild their SwiGLU output in backward (grad_ckpt.set_lean)
    loss_bytes: int = 0  # the loss's kept log-probabilities (training/loss.py), in predicted_peak; 0: recomputed
    dense: int = 0  # layers whose 4-bit weights are kept dequantized (fast/dense_weights.py)
    dense_bytes: int = 0  # what those copies hold, included in predicted_peak

    def summary(self):
        m, gib, first = self.measurement, 2**30, self.layers - self.kept
        which = ("none checkpointed" if not self.checkpointed else "all checkpointed" if not self.kept else
                 f"layers 0-{first - 1} checkpointed" if self.checkpointed == set(range(first)) else
                 f"layers {', '.join(map(str, sorted(self.checkpointed)))} checkpointed")
        return (f"--grad-ckpt auto: {self.kept} of {self.layers} layers keep their activations ({which}); "
                f"measured {m.peak / gib:.2f} GiB peak with one kept, {m.per_layer / gib:.3f} GiB per kept layer; "
                f"predicted peak {self.predicted_peak / gib:.2f} GiB of a {self.budget / gib:.2f} GiB budget "
                f"({FRAGMENTATION:.0%} of it left to the allocator)"
                + ("; kept layers lean (SwiGLU output rebuilt in backward)" if self.lean else "")
                + (f"; the loss keeps its log-probabilities ({self.loss_bytes / gib:.2f} GiB)" if self.loss_bytes else "")
                + (f"; the 4-bit weights of {self.dense} layers kept dequantized ({self.dense_bytes / gib:.2f} GiB)"
                   if self.dense else ""))

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["checkpointed"] = sorted(self.checkpointed)
        return d


# ------------------------------------------------------------------------------------------
# Which layers, how many.
# ------------------------------------------------------------------------------------------
def checkpointed_layers(num_layers, kept, placement="first"):
    """The indices of the layers to checkpoint so that `kept` layers keep their activations.

    "first" (the plan's): checkpoint the first L - kept, keep the last `kept`. Why: backward
    visits the layers top down. When it reaches layer j, every kept layer below j still holds
    its activations, and if j is checkpointed its recompute builds one layer's activations on
    top of them (c more than the input it held). So the peak is where the most kept layers lie
    below: at the top of backward. Full checkpointing peaks there, at the top layer's
    recompute; keeping the top layer costs nothing (it holds what that recompute would build,
    only for longer), and every other kept layer adds c: peak(n) = P1 + (n - 1) c. Keep the
    first n instead ("last" checkpointed) and the top layer's recompute runs while all n hold
    their activations: n c, one layer's worth more for the same recompute saved. Spreading
    them ("spread", layer 0 checkpointed, then evenly) keeps the top layer for the same peak
    in this model, but reaches that level again at every kept-to-checkpointed step on the way
    down, where a recompute's passing buffers sit on top, and it breaks the chain of
    consecutive layers along which offloaded inputs are fetched ahead (grad_ckpt.HostParking).
    With the first layers checkpointed, every recompute runs after the kept layers' activations
    are gone. bench/bench.py's `:place=` measures the three.
    """
    recomputed = num_layers - kept
    if placement == "first":
        return frozenset(range(recomputed))
    if placement == "last":
        return frozenset(range(kept, num_layers))
    if placement == "spread":
        return frozenset((i * num_layers) // recomputed for i in range(recomputed))
    raise ValueError(f"unknown placement {placement!r}: first, last or spread")


def predicted_peak(measurement, num_layers, checkpointed, unseen=0):
    """peak = P1 + c x (the kept layers below the top one; all of them when the top is checkpointed)."""
    kept = num_layers - len(checkpointed)
    below_top = kept - (num_layers - 1 not in checkpointed)
    return measurement.peak + measurement.per_layer * max(below_top, 0) + unseen


def plan(measurement, num_layers, budget, unseen=0, placement="first", kept=None):
    """The most layers that can keep their activations within `budget` bytes, and which.
    `kept` forces the count instead (bench/bench.py's `:keep=`, to measure the formula)."""
    room = int(budget * (1 - FRAGMENTATION)) - unseen - measurement.peak
    if kept is not None:
        kept = max(0, min(num_layers, kept))
    elif room < 0:
        kept = 0  # even full checkpointing peaks above the budget: recompute everything
    elif measurement.per_layer <= 0:
        kept = num_layers
    else:
        kept = min(num_layers, 1 + room // measurement.per_layer)  # the top layer comes free
    checkpointed = checkpointed_layers(num_layers, kept, placement)
    return Plan(num_layers, kept, checkpointed, int(budget), unseen,
                predicted_peak(measurement, num_layers, checkpointed, unseen), measurement)


def default_budget(device):
    """All the GPU memory this process could have now: what the driver reports free plus what
    our allocator already holds. Call it after the model is loaded; the margin is FRAGMENTATION."""
    if device.type != "cuda":
        raise ValueError("a default memory budget needs a CUDA device; give one in bytes")
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def unseen_bytes(params, optim, grad_accum=1):
    """Bytes training holds at its peak that the probe step did not: our AdamW's two fp32
    moments per trainable parameter (created at the first optimizer step), and with
    grad_accum > 1 the earlier micro-batches' gradients (the probe's appear only during its
    backward). The paged optimizers' state lives in managed memory, which the allocator does
    not count and the driver pages out to the host under pressure: nothing to add."""
    params = list(params)
    state = 8 * sum(p.numel() for p in params) if optim == "adamw" else 0
    grads = sum(p.numel() * p.element_size() for p in params) if grad_accum > 1 else 0
    return state + grads


# ------------------------------------------------------------------------------------------
# Measuring.
# ------------------------------------------------------------------------------------------
def _storage_key(t):
    return t.device, t.untyped_storage().data_ptr()


def _tensors(obj):
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward inside `with`,
    leaving out the storages of `exclude` (parameters, and tensors that outlive the block anyway).

    Views share a storage and are counted once. Blind spot: a custom autograd Function that keeps
    a tensor as a ctx attribute instead of through save_for_backward is never seen (bitsandbytes'
    MatMul4Bit keeps its input that way: the reference path, --no-fast), hence the allocator's
    reading beside this one in `measure`.
    """

    def __init__(self, exclude=()):
        self.excluded = {_storage_key(t) for t in exclude}
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        key = _storage_key(t)
        if key not in self.excluded:
            self.storages[key] = t.untyped_storage().nbytes()
        return t  # saved as it is: this only looks

    def forget(self, tensors):
        for t in tensors:
            self.storages.pop(_storage_key(t), None)

    @property
    def bytes(self):
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def measure(layers, run_step, offload=False):
    """P1 and c from one probe step: `run_step()` runs one forward and backward of the longest
    micro-batch and leaves no gradients and the random state as it was (training/auto_batch.py's
    longest_rows_probe). During it every layer is checkpointed but the top one (n = 1 above), and
    the forwards of the top layer and the one below it are watched:

      saved      the top layer's saved tensors, less the parameters, the other arguments (the
                 rotary tables, the mask: shared by all layers) and its output (the next
                 module's input, kept either way), less the input a checkpointed layer keeps
                 (none when offloaded). Its input counts if saved: a kept layer holds it then.
      allocated  (CUDA) how much more the allocator holds after the top layer's forward than
                 after the checkpointed one's below it, plus the input when offloaded (a
                 checkpointed layer's input is freed once the next layer has it; the reading is
                 taken before that). Counts every tensor kept, seen by hooks or not; counts the
                 input as kept even where the kept layer would have let it go (conservative).

    Afterwards the layers are checkpointed as they were before."""
    device = next(layers[0].parameters()).device
    cuda = device.type == "cuda"
    before_probe = grad_ckpt.checkpointed_indices(layers)
    grad_ckpt.set_checkpointed(layers, set(range(len(layers) - 1)))
    readings = {}

    def watch(layer, name, count_saved):
        forward = layer.forward  # grad_ckpt's wrapper (an instance attribute), put back below

        def watched(hidden_states, *args, **kwargs):
            if name in readings:  # only the probe's forward, once
                return forward(hidden_states, *args, **kwargs)
            exclude = _tensors((args, kwargs)) + list(layer.parameters()) + list(layer.buffers())
            saved = SavedBytes(exclude)
            start = torch.cuda.memory_allocated(device) if cuda else 0
            with saved if count_saved else contextlib.nullcontext():
                out = forward(hidden_states, *args, **kwargs)
            grown = torch.cuda.memory_allocated(device) - start if cuda else 0
            saved.forget(_tensors(out))
            readings[name] = dict(saved=saved.bytes, grown=grown,
                                  input=hidden_states.numel() * hidden_states.element_size())
            return out

        layer.forward = watched
        return forward

    watched = [(layers[-1], watch(layers[-1], "kept", True))]
    if len(layers) > 1:
        watched.append((layers[-2], watch(layers[-2], "checkpointed", False)))
    try:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        run_step()
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    finally:
        for layer, forward in watched:
            layer.forward = forward
        grad_ckpt.set_checkpointed(layers, before_probe)
    kept = readings["kept"]
    input_bytes = kept["input"]
    saved = kept["saved"] - (0 if offload else input_bytes)
    allocated = 0
    if cuda and "checkpointed" in readings:
        allocated = kept["grown"] - readings["checkpointed"]["grown"] + (input_bytes if offload else 0)
    return Measurement(peak=peak, per_layer=max(saved, allocated), saved=saved, allocated=allocated,
                       layer_input=input_bytes)


def room_left(result):
    """Bytes the plan leaves unspent within its budget, the allocator's share set aside."""
    return int(result.budget * (1 - FRAGMENTATION)) - result.predicted_peak


def with_kept_loss(result, lm_head, nbytes):
    """`result` with the loss keeping its log-probabilities (training/loss.py) where the room its
    kept layers leave holds `nbytes` of them; recomputed otherwise."""
    keep = 0 < nbytes <= room_left(result)
    loss.keep_log_probs(lm_head, keep)
    if not keep:
        return result
    return dataclasses.replace(result, loss_bytes=nbytes, predicted_peak=result.predicted_peak + nbytes)


def with_dense_weights(result, layers, dtype):
    """`result` with as many layers' 4-bit weights kept dequantized in `dtype` as the room its
    kept layers leave holds (fast/dense_weights.py: activations first, these with the rest)."""
    room = room_left(result)
    n = used = 0
    for layer in layers:  # in order, each layer's own size (layers need not be alike)
        need = dense_weights.nbytes(layer, dtype)
        if need == 0 or used + need > room:
            break
        n, used = n + 1, used + need
    if n == 0:
        return result
    dense_weights.keep(layers[:n], dtype)
    return dataclasses.replace(result, dense=n, dense_bytes=used, predicted_peak=result.predicted_peak + used)


def apply(layers, run_step, budget=0, unseen=0, offload=False, placement="first", kept=None, dense_dtype=None,
          loss_head=None, loss_bytes=0):
    """Measure, plan, and checkpoint the plan's layers from the next step on; returns the Plan.
    `budget` in bytes; on CUDA 0 means default_budget (read before the probe), and a larger one
    is cut to it. `loss_head` (the lm_head) and `loss_bytes` (training/loss.py `kept_bytes` of
    the largest micro-batch): let the loss keep its log-probabilities if the room left holds
    them (`with_kept_loss`). `dense_dtype` (the compute dtype): spend what room is left then on
    dequantized 4-bit weights (`with_dense_weights`); None keeps none."""
    device = next(layers[0].parameters()).device
    if device.type == "cuda":
        available = default_budget(device)
        budget = min(budget, available) if budget else available
    elif not budget:
        raise ValueError("a memory budget is needed off CUDA (no free-memory figure to default to)")
    grad_ckpt.set_lean(layers, False)
    dense_weights.drop(layers)  # the probe measures without them; the plan then spends the room anew
    if loss_head is not None:
        loss.keep_log_probs(loss_head, False)  # likewise
    grad_ckpt.lean.asked = False
    result = plan(measure(layers, run_step, offload), len(layers), budget, unseen, placement, kept)
    if result.kept < len(layers) and kept is None and grad_ckpt.lean.asked:
        # Memory binds: make the kept layers lean (grad_ckpt.set_lean), which costs each of them
        # one elementwise pass in backward and lets more of them fit, each saving a layer's
        # recompute (a forward, ~20x that pass), and plan again from a second probe.
        grad_ckpt.set_lean(layers, True)
        leaner = plan(measure(layers, run_step, offload), len(layers), budget, unseen, placement, kept)
        if leaner.kept > result.kept:
            result = dataclasses.replace(leaner, lean=True)
        else:
            grad_ckpt.set_lean(layers, False)
    grad_ckpt.set_checkpointed(layers, result.checkpointed)
    if loss_head is not None:
        result = with_kept_loss(result, loss_head, loss_bytes)
    if dense_dtype is not None:
        result = with_dense_weights(result, layers, dense_dtype)
    return result
