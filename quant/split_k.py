"""Split-K for the GPTQ kernels (quant/gptq_gemv.py, gptq_matmul.py): partial sums added in a fixed order.

    ws = workspace(device, partials, counters)    the device's shared buffers, at least this large
    store_sum(acc, ...)                           in a kernel: y = acc, or this program's part of it
    total, last = tile_sum(acc, ...)              in a kernel: the tile's sum, valid where last

A product with few rows has few output tiles: too few programs to keep HBM busy. Splitting K into
SPLIT parts multiplies the programs; each part's sums must then be added. Atomic adds into y would
do it in whatever order the programs finish, so y would change from run to run, and decode's greedy
tokens part at near-ties between the eager loop and its CUDA graph. Here each program stores its
partial sums; the last program of a tile to finish (a counter, atomically incremented) adds the
SPLIT parts in split order and writes y, then sets the counter back to 0 for the next call (or graph
replay). The result is the same on every run.

Partials of tile t, part p: partials[(t · SPLIT + p) · TILE + local] with TILE the tile's element
count. The buffers are shared by every layer on a device: the kernels run one at a time on a
stream, and every call leaves the counters at 0. (Two streams calling these kernels at once would
race on them; decode runs one.) A layer keeps the buffers it was given, so a later, larger
reservation never frees memory a captured graph still writes.
"""

from typing import NamedTuple

import torch

from fast.triton_support import tl, triton


class Workspace(NamedTuple):
    partials: torch.Tensor  # fp32, flat
    counters: torch.Tensor  # int32, flat: programs finished per tile; 0 between calls


_shared = {}  # device -> Workspace, grown by workspace()


def workspace(device, partials, counters):
    """The device's shared Workspace with room for `partials` floats and `counters` counters.

    Call it when a layer is prepared, before any CUDA graph is captured: growing allocates."""
    device = torch.device(device)
    ws = _shared.get(device)
    if ws is None or ws.partials.numel() < partials or ws.counters.numel() < counters:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the split-K workspace would grow inside a CUDA graph capture, and the graph's "
                               "memory would then be shared: run the step once before capturing it")
        have = (0, 0) if ws is None else (ws.partials.numel(), ws.counters.numel())
        ws = Workspace(torch.empty(max(partials, have[0]), device=device, dtype=torch.float32),
                       torch.zeros(max(counters, have[1]), device=device, dtype=torch.int32))
        _shared[device] = ws
    return ws


if triton is not None:

    @triton.jit
    def tile_sum(acc, part_ptr, count_ptr, tile, part, local, SPLIT: tl.constexpr, TILE: tl.constexpr):
        """(the sum over K of a tile whose part `part` (of SPLIT) this program summed into acc, whether
        this program holds it): the sum is valid only in the last program of the tile to finish.

        local: each acc element's offset in the tile (0 .. TILE − 1), acc's shape."""
        total = acc
        last = SPLIT == 1
        if SPLIT > 1:
            parts = part_ptr + tile * (SPLIT * TILE) + local
            tl.store(parts + part * TILE, acc)
            tl.debug_barrier()  # every lane's partials stored before the counter moves (released below)
            done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = done == SPLIT - 1
            if last:  # every part is stored: add them in split order, and set the counter back to 0
                total = tl.zeros_like(acc)
                for i in range(SPLIT):
                    total += tl.load(parts + i * TILE, cache_modifier=".cg")  # from L2, not a stale L1
                tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
        return total, last

    @triton.jit
    def store_sum(acc, y_ptrs, y_mask, part_ptr, count_ptr, tile, part, local,
                  SPLIT: tl.constexpr, TILE: tl.constexpr):
        """Write y = the sum over K of a tile whose part `part` (of SPLIT) this program summed into acc."""
        total, last = tile_sum(acc, part_ptr, count_ptr, tile, part, local, SPLIT, TILE)
        if last:
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=y_mask)
