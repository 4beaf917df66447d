"""Gradient (activation) checkpointing, one decoder layer at a time, optionally offloaded.

During training only each decoder layer's *input* is kept; its internals (attention
scores, MLP activations, dequantized weights) are recomputed in backward. For QLoRA this
is what makes long sequences fit: activations, not the 4-bit weights, dominate memory.

Two ways, the same gradients:
  * on the GPU (default): PyTorch's non-reentrant checkpoint. Unlike the reentrant one it
    works when the layer's inputs do not require grad (frozen embeddings feed layer 0)
    and supports keyword arguments.
  * offloaded (`offload=True`): the kept inputs, 2 bytes x hidden size per token per layer
    (4 GiB for a 7B model at 16k tokens), wait in pinned host memory instead. The copies
    run on a side stream so that they overlap the layers' compute: down while the next
    layer runs forward; up for layer i-1 while layer i runs backward (backward visits the
    layers in reverse, so the next input needed is always known). Written as a small
    autograd function because PyTorch's checkpoint keeps its inputs by reference, where no
    saved-tensor hook can move them.

Three refinements: at long sequences a layer's MLP can also be recomputed token chunk by token
chunk (`ChunkedMLP`, `mlp_chunk`), so its wide intermediates never exist for the whole
sequence; a recompute runs inside `recomputing()`, which lets a layer skip work whose
only use is the (never read) layer output; and a *lean* kept layer runs inside `lean()`,
which lets it keep a cheap recipe instead of a wide result (fast/patch.py: the SwiGLU output,
rebuilt from the gate and up it already keeps: 28 of the ~131 KB per token a 7B layer keeps).

Not every layer need be checkpointed: `enable(..., checkpointed=...)` and `set_checkpointed`
choose which; the others run plainly and keep their activations (--grad-ckpt auto picks them
under a memory budget: training/memory_plan.py).
"""

import contextlib
import types

import torch
from torch.utils.checkpoint import checkpoint


class _Mark:
    """A process-wide mark, on for the duration of a `with mark():` block (nested blocks restore it)."""

    def __init__(self):
        self.on = False

    @contextlib.contextmanager
    def __call__(self):
        previous, self.on = self.on, True
        try:
            yield
        finally:
            self.on = previous


# Marks a checkpoint's recompute: outputs are rebuilt only for what backward saves.
recomputing = _Mark()
# Marks the forward of a kept layer that should save less and rebuild more in backward (`set_lean`).
lean = _Mark()
lean.asked = False  # set by `is_lean`: some forward has a lean form (cleared by memory_plan.apply)


def is_recomputing():
    """True inside a layer's recompute. There the layer's output is never read (backward
    needs only the saved tensors), so a layer may skip work whose only use is that output:
    fast/patch.py skips the MLP's last projection."""
    return recomputing.on


def is_lean():
    """True inside a lean kept layer's forward (`set_lean`). Never inside a checkpoint: there
    PyTorch's own saved-tensor hooks must see every tensor the recompute saves. Asking sets
    `lean.asked`: only forwards that have a lean form ask (fast/patch.py's MLP, when it does not
    run fast/swiglu_down.py, which keeps no SwiGLU output anyway)."""
    lean.asked = True
    return lean.on


def random_state(device):
    """The generators a recompute must replay: the CPU's, and the device's on CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_random_state(state, device):
    """Run the block with the random state `state`, then put the current one back."""
    cpu_rng, cuda_rng = state
    with torch.random.fork_rng(devices=[device] if cuda_rng is not None else []):
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        yield


class ParkedInput:
    """One layer's input in host memory, and the way back up.

    `previous` is the input of the layer just below it from the same forward pass: backward
    reaches that layer next, so when this input is fetched the previous one starts coming up.
    Copies run on `stream` (None on the CPU, where there is nothing to overlap).
    """

    def __init__(self, x, previous, stream):
        self.device, self.stream, self.previous = x.device, stream, previous
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=stream is not None)
        self.on_gpu = None
        if stream is None:
            self.host.copy_(x)
            return
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x has been computed
        with torch.cuda.stream(stream):
            self.host.copy_(x, non_blocking=True)
        x.record_stream(stream)  # the allocator must not reuse x's memory before the copy ends

    def start_upload(self):
        if self.on_gpu is not None or self.host is None:
            return
        if self.stream is None:
            self.on_gpu = self.host.clone()
        else:
            with torch.cuda.stream(self.stream):
                self.on_gpu = self.host.to(self.device, non_blocking=True)

    def fetch(self):
        """This input on the GPU (once: the host copy is dropped), the previous one on its way."""
        self.start_upload()
        x, self.on_gpu, self.host = self.on_gpu, None, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            x.record_stream(compute)
        if self.previous is not None:
            self.previous.start_upload()
            self.previous = None
        return x


class HostParking:
    """Parks layer inputs on the host; links each to the one parked just before it (layer i-1)."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last = None  # (layer index, ParkedInput) most recently parked

    def __deepcopy__(self, memo):
        return HostParking(self.device)  # a copied model parks its own inputs, on its own stream

    def park(self, index, x):
        previous = self.last[1] if self.last is not None and self.last[0] == index - 1 else None
        parked = ParkedInput(x, previous, self.stream)
        self.last = (index, parked)
        return parked


class OffloadedCheckpoint(torch.autograd.Function):
    """y = layer(x) with x parked on the host and the layer recomputed in backward.

    The layer's trainable (LoRA) parameters are passed in only so that autograd calls
    backward even when x needs no gradient (layer 0's input comes from frozen embeddings);
    they are leaves of the recomputed graph, so the inner backward accumulates their
    gradients directly and this function returns None for them. The random state is
    saved and restored so LoRA dropout draws the same masks twice.
    """

    @staticmethod
    def forward(ctx, x, run_layer, parking, index, *params):
        ctx.run_layer, ctx.device = run_layer, x.device
        ctx.rng = random_state(x.device)
        ctx.parked = parking.park(index, x)
        with torch.no_grad():
            return run_layer(x)

    @staticmethod
    def backward(ctx, dy):
        x = ctx.parked.fetch().requires_grad_(ctx.needs_input_grad[0])
        with replayed_random_state(ctx.rng, ctx.device):
            with torch.enable_grad(), recomputing():
                y = ctx.run_layer(x)
            torch.autograd.backward(y, dy)
        return (x.grad, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


class ChunkedMLP(torch.autograd.Function):
    """y = mlp(x), run `chunk` tokens at a time, and recomputed chunk by chunk in backward.

    The MLP works on each token alone, so it can be split along the tokens exactly. At long
    sequences its intermediates dominate a layer's memory (a 7B model's gate and up
    outputs are 14336 wide, 3.5x the hidden size, so 56 KB per token in bf16); chunked,
    only one chunk's exist at a time, and only x is kept for backward. The price is one
    more forward of the MLP per step. Each chunk's random state is kept, so its LoRA
    dropout draws the same masks when it is recomputed.
    """

    @staticmethod
    def forward(ctx, x, mlp_forward, chunk, *params):
        ctx.mlp_forward, ctx.chunk = mlp_forward, chunk
        flat = x.reshape(-1, x.shape[-1])
        out, ctx.rng = None, []
        for start in range(0, flat.shape[0], chunk):
            ctx.rng.append(random_state(x.device))
            y = mlp_forward(flat[start : start + chunk])
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[-1])
            out[start : start + chunk] = y
        ctx.save_for_backward(x)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        flat, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        for i, start in enumerate(range(0, flat.shape[0], ctx.chunk)):
            part = flat[start : start + ctx.chunk].detach().requires_grad_(dx is not None)
            with replayed_random_state(ctx.rng[i], x.device), torch.enable_grad(), recomputing():
                y = ctx.mlp_forward(part)
            torch.autograd.backward(y, dy[start : start + ctx.chunk])
            if dx is not None:
                dx[start : start + ctx.chunk] = part.grad
        dx = None if dx is None else dx.reshape(x.shape)
        return (dx, None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def chunk_mlp(mlp, chunk):
    """Route `mlp`'s training forward through ChunkedMLP when a batch holds more than `chunk`
    tokens and `mlp._chunks_on` (True here; enable keeps it equal to "my layer is checkpointed").
    The forward is bound to `mlp` as a method, as `enable`'s is to its layer (see there)."""
    mlp._chunk, mlp._chunks_on = chunk, True
    mlp._forward_before_chunks = mlp.forward
    mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)


def _chunked_mlp_forward(mlp, x):
    plain = mlp._forward_before_chunks
    if not mlp.training or x[..., 0].numel() <= mlp._chunk or not mlp._chunks_on:
        return plain(x)
    return ChunkedMLP.apply(x, plain, mlp._chunk, *[p for p in mlp.parameters() if p.requires_grad])


def _checkpoint_layer(layer, on):
    layer._checkpointed = on
    mlp = getattr(layer, "mlp", None)  # chunked by enable(mlp_chunk=...), if at all
    if hasattr(mlp, "_chunks_on"):  # MLP chunks are a recompute: checkpointed layers only
        mlp._chunks_on = on


def enable(layers, offload=False, mlp_chunk=0, checkpointed=None):
    """Wrap each layer's forward in a checkpoint while the layer is in training mode.

    The module itself is untouched (same names, same state dict): only its bound
    `forward` is replaced, so adapters and checkpoints are unaffected. `checkpointed` is the
    set of layer indices to checkpoint (None: all); the other layers run plainly and keep their
    activations for backward, and `set_checkpointed` changes the set later. `offload` parks
    checkpointed layers' inputs in host memory; `mlp_chunk` > 0 runs checkpointed layers'
    `mlp` through ChunkedMLP, `mlp_chunk` tokens at a time. Both apply to checkpointed layers
    only: offloading moves a checkpointed layer's one kept tensor, its input, where a layer
    that keeps its activations holds dozens on the GPU; and a chunked MLP is a recompute, the
    very cost such a layer is kept to avoid.
    """
    parking = None
    if offload:
        parking = HostParking(next(layers[0].parameters()).device)
    for index, layer in enumerate(layers):
        if getattr(layer, "_plain_forward", None) is not None:
            continue  # already enabled
        if mlp_chunk > 0:
            chunk_mlp(layer.mlp, mlp_chunk)
        _checkpoint_layer(layer, checkpointed is None or index in checkpointed)
        layer._lean = False
        layer._parking, layer._index = parking, index
        layer._plain_forward = layer.forward
        # Bound to the layer as a method, not a closure over it: copy.deepcopy of the model then
        # binds the copy's forward to the copied layer instead of the original's weights.
        layer.forward = types.MethodType(_layer_forward, layer)


def _layer_forward(layer, hidden_states, *args, **kwargs):
    """A decoder layer's forward under `enable`: checkpointed (offloaded when it has a parking) or kept."""
    if not layer.training or not layer._checkpointed:
        with lean() if layer._lean and layer.training else contextlib.nullcontext():
            return layer._plain_forward(hidden_states, *args, **kwargs)
    if layer._parking is not None:
        params = [p for p in layer.parameters() if p.requires_grad]
        return OffloadedCheckpoint.apply(hidden_states, lambda x: layer._plain_forward(x, *args, **kwargs),
                                         layer._parking, layer._index, *params)
    return checkpoint(layer._plain_forward, hidden_states, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), recomputing()), **kwargs)


def set_checkpointed(layers, checkpointed):
    """Checkpoint the layers whose indices are in `checkpointed` (None: all) from the next
    forward on; the others keep their activations. The layers must have been through `enable`.
    Call it between steps: a chunked MLP reads the setting again in its backward."""
    for index, layer in enumerate(layers):
        if getattr(layer, "_plain_forward", None) is None:
            raise ValueError(f"layer {index} was never passed to grad_ckpt.enable")
        _checkpoint_layer(layer, checkpointed is None or index in checkpointed)


def set_lean(layers, on):
    """Make the layers that keep their activations lean (see `is_lean`) or not, from the next
    forward on: less memory per kept layer for one elementwise pass more in its backward. The
    gradients are the same bit for bit (the rebuild is the forward's own kernel on the same inputs)."""
    for layer in layers:
        layer._lean = bool(on)


def checkpointed_indices(layers):
    """The indices of the layers that are checkpointed now."""
    return {i for i, layer in enumerate(layers) if getattr(layer, "_checkpointed", False)}
