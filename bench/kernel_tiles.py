"""Tile sweeps for fast/'s LoRA kernels (CUDA): fast/dropout_kernels.py's per member count,
fast/swiglu_down.py's and fast/b_grads_kernel.py's.

    python bench/kernel_tiles.py [--kernels dropout|swiglu|b_grads [--no-sweep]] [--tokens 16384] [--json PATH]

For 1, 2 and 3 adapters over one 4096-wide input (o; gate/up; q/k/v of Mistral-7B, r=16, bf16)
and one adapter over a 14336-wide input (down), the median time of `dropout_a_forward` and of
`dropout_a_backward` at each tile, with bf16 products (what bf16 training runs) and, at the
library's tiles, with fp32 (tf32) products (what the kernels ran before: the comparison that
chose bf16). The fastest tiles go into `kernels.FORWARD_TILE` / `BACKWARD_TILE` by hand; a
member count shares one tile whatever the width, so the sweep reports both widths for one.

`--kernels swiglu`: fast/swiglu_down.py's two kernels at Mistral-7B's MLP width (14336, r=16,
bf16), with each kernel's time against its DRAM floor (the bytes it must move at the H200's
4.8 TB/s): forward reads gate and up and writes h, backward reads gate, up and dh and writes
dgate and dup.

`--kernels b_grads`: fast/b_grads_kernel.py at every output width of a Mistral-7B layer (r=16,
bf16), against the two cuBLAS products it replaces (fast/lora_function.py `b_side_grads` with
the kernels off), one tile for all widths.
"""

import argparse
import itertools
import json

import torch
import triton.testing

from fast import b_grads_kernel, swiglu_down, state
from fast import dropout_kernels as kernels
from fast.lora_function import b_side_grads, scaled_b

CASES = [(1, 4096), (2, 4096), (3, 4096), (1, 14336)]  # (members, input width)
FORWARD = [dict(BN=bn, BK=bk, num_warps=w) for bn, bk, w in itertools.product((32, 64, 128), (64, 128, 256), (4, 8))]
BACKWARD = [dict(BN=bn, BK=bk, ROWS=1024, num_warps=w)
            for bn, bk, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]


SWIGLU_FORWARD = [dict(BN=bn, BK=bk, num_warps=w, num_stages=st)
                  for bn, bk, w, st in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 3))]
SWIGLU_BACKWARD = [dict(BN=bn, BK=bk, ROWS=rows, num_warps=w, num_stages=st)
                   for bn, bk, rows, w, st in itertools.product((16, 32, 64), (64, 128, 256), (1024, 2048), (4, 8), (2, 3))]
B_GRADS = [dict(ROWS=rows, BK=bk, num_warps=w, num_stages=st, cols=cols)
           for rows, bk, w, st, cols in itertools.product((128, 256, 512), (32, 64, 128), (4, 8), (3,), (1024,))]
B_GRADS_WIDTHS = (1024, 4096, 14336)  # k/v; q/o/down; gate/up
HBM_BYTES_PER_US = 4.8e6  # the H200's 4.8 TB/s


def median_us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def timings(x, g_a, lora_a, dx, members, forward_tile, backward_tile):
    """(forward µs, backward µs) at the given tiles."""
    kernels.FORWARD_TILE, kernels.BACKWARD_TILE[members] = forward_tile, backward_tile
    return (median_us(lambda: kernels.dropout_a_forward(x, lora_a, 7, 0.05, members)),
            median_us(lambda: kernels.dropout_a_backward(x, g_a, lora_a, dx, 7, 0.05, members)))


def timed(run):
    """µs of one `run(tile)` call at a tile: what `sweep` takes."""
    return lambda tile: median_us(lambda: run(tile))


def sweep(name, tiles, time):
    """[(µs, tile)] of `time(tile)` at every tile that compiles, the fastest three printed."""
    results = []
    for tile in tiles:
        try:
            results.append((time(tile), tile))
        except Exception as e:  # a tile that does not fit (shared memory, registers)
            print(f"  {name} {tile}: {type(e).__name__}")
    for us, tile in sorted(results, key=lambda t: t[0])[:3]:
        print(f"{name:8} {us:6.0f} us at {tile}", flush=True)
    return results


def swiglu_tiles(tokens):
    """Sweep fast/swiglu_down.py's forward and backward tiles; rows for the JSON."""
    width, r = 14336, 16
    torch.manual_seed(0)
    gate, up, dh = (torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lora_a = torch.randn(r, width, device="cuda")
    g_a = torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16)
    library = dict(forward=dict(swiglu_down.FORWARD_TILE), backward=dict(swiglu_down.BACKWARD_TILE))
    floor_us = dict(forward=3 * gate.numel() * 2 / HBM_BYTES_PER_US, backward=5 * gate.numel() * 2 / HBM_BYTES_PER_US)

    def forward(tile):
        swiglu_down.FORWARD_TILE = tile
        return swiglu_down.swiglu_a_forward(gate, up, lora_a, 7, 0.05)

    def backward(tile):  # dgate lands over dh: the values change from call to call, the traffic does not
        swiglu_down.BACKWARD_TILE = tile
        return swiglu_down.swiglu_a_backward(gate, up, dh, g_a, lora_a, 7, 0.05)

    rows = []
    for which, run, tiles in (("forward", forward, SWIGLU_FORWARD), ("backward", backward, SWIGLU_BACKWARD)):
        us = median_us(lambda: run(library[which]))
        print(f"swiglu {which}: library tile {us:.0f} us, DRAM floor {floor_us[which]:.0f} us", flush=True)
        rows.append(dict(kernel=which, tile="library", us=us, floor_us=floor_us[which]))
        rows += [dict(kernel=which, tile=tile, us=us) for us, tile in sweep(which, tiles, timed(run))]
    swiglu_down.FORWARD_TILE, swiglu_down.BACKWARD_TILE = library["forward"], library["backward"]
    return rows


def b_grads_tiles(tokens, tiles=B_GRADS):
    """Time fast/b_grads_kernel.py at its library tile and at each of `tiles` (one tile for all
    widths: the sum over a layer's seven adapters' shapes is what it is chosen by); rows for the JSON."""
    r = 16
    torch.manual_seed(0)
    cases = {out: (torch.randn(tokens, out, device="cuda", dtype=torch.bfloat16),
                   torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16),
                   torch.randn(out, r, device="cuda")) for out in B_GRADS_WIDTHS}
    per_layer = {1024: 2, 4096: 3, 14336: 2}  # adapters of each width in a layer: k/v; q/o/down; gate/up

    def layer_us(run):
        return sum(per_layer[out] * median_us(lambda: run(*cases[out])) for out in B_GRADS_WIDTHS)

    def apart(dy, a, lora_b):
        return b_side_grads(dy, a, scaled_b(lora_b, 2.0, dy.dtype), 2.0, lora_b.dtype)

    def together(dy, a, lora_b):
        return b_grads_kernel.b_grads(dy, a, scaled_b(lora_b, 2.0, dy.dtype))

    def at(tile):
        tile = dict(tile)
        b_grads_kernel.COLS = tile.pop("cols")
        b_grads_kernel.TILE = tile
        return layer_us(together)

    state.use_kernels(False)
    cublas = layer_us(apart)
    floor = sum(per_layer[out] * tokens * out * 2 / HBM_BYTES_PER_US for out in B_GRADS_WIDTHS)
    print(f"b_grads, a layer's seven adapters: two cuBLAS products {cublas:.0f} us, DRAM floor (dy once) "
          f"{floor:.0f} us", flush=True)
    library = dict(b_grads_kernel.TILE), b_grads_kernel.COLS
    us = layer_us(together)
    print(f"b_grads  {us:6.0f} us a layer at the library's tile", flush=True)
    swept = sweep("b_grads", tiles, at)
    b_grads_kernel.TILE, b_grads_kernel.COLS = library
    return [dict(kernel="cublas", us=cublas, floor_us=floor), dict(kernel="b_grads", tile="library", us=us)] + \
        [dict(kernel="b_grads", tile=tile, us=us) for us, tile in swept]


def dropout_tiles(tokens):
    """Sweep fast/dropout_kernels.py's tiles per member count; rows for the JSON."""
    library_forward, library_backward = dict(kernels.FORWARD_TILE), dict(kernels.BACKWARD_TILE)
    library_choice = kernels.fp32_products  # fp32 operands for fp32 x only: bf16 products here
    rows = []
    for members, k in CASES:
        torch.manual_seed(0)
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        dx = torch.randn_like(x)
        lora_a = torch.randn(members * 16, k, device="cuda")
        g_a = torch.randn(tokens, members * 16, device="cuda", dtype=torch.bfloat16)
        case = f"members {members} k {k:5}"
        for products, switch in (("tf32", lambda x: True), ("bf16", library_choice)):
            kernels.fp32_products = switch
            f, b = timings(x, g_a, lora_a, dx, members, library_forward, library_backward[members])
            print(f"{case} {products} products, library tiles: forward {f:6.0f} us, backward {b:6.0f} us", flush=True)
            rows.append(dict(members=members, k=k, products=products, tiles="library", forward_us=f, backward_us=b))

        def forward(tile):
            kernels.FORWARD_TILE = tile
            return kernels.dropout_a_forward(x, lora_a, 7, 0.05, members)

        def backward(tile):
            kernels.BACKWARD_TILE[members] = tile
            return kernels.dropout_a_backward(x, g_a, lora_a, dx, 7, 0.05, members)

        for which, run, tiles in (("forward", forward, FORWARD), ("backward", backward, BACKWARD)):
            print(case, flush=True)
            rows += [dict(members=members, k=k, products="bf16", kernel=which, tile=tile, us=us)
                     for us, tile in sweep(which, tiles, timed(run))]
        kernels.FORWARD_TILE, kernels.BACKWARD_TILE = dict(library_forward), dict(library_backward)
    kernels.fp32_products = library_choice
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernels", choices=["dropout", "swiglu", "b_grads"], default="dropout")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--json", default=None)
    p.add_argument("--no-sweep", action="store_true", help="b_grads: time the library's tile only")
    args = p.parse_args()
    if args.kernels == "b_grads":
        rows = b_grads_tiles(args.tokens, tiles=() if args.no_sweep else B_GRADS)
    else:
        rows = dict(dropout=dropout_tiles, swiglu=swiglu_tiles)[args.kernels](args.tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(kernels=args.kernels, tokens=args.tokens, device=torch.cuda.get_device_name(), rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
