"""Tile sweep for fast/dropout_kernels.py's fused-dropout kernels, per member count (CUDA).

    python bench/kernel_tiles.py [--tokens 16384] [--json PATH]

For 1, 2 and 3 adapters over one 4096-wide input (o; gate/up; q/k/v of Mistral-7B, r=16, bf16)
and one adapter over a 14336-wide input (down), the median time of `dropout_a_forward` and of
`dropout_a_backward` at each tile, with bf16 products (what bf16 training runs) and, at the
library's tiles, with fp32 (tf32) products (what the kernels ran before: the comparison that
chose bf16). The fastest tiles go into `kernels.FORWARD_TILE` / `BACKWARD_TILE` by hand; a
member count shares one tile whatever the width, so the sweep reports both widths for one.
"""

import argparse
import itertools
import json

import torch
import triton.testing

from fast import dropout_kernels as kernels

CASES = [(1, 4096), (2, 4096), (3, 4096), (1, 14336)]  # (members, input width)
FORWARD = [dict(BN=bn, BK=bk, num_warps=w) for bn, bk, w in itertools.product((32, 64, 128), (64, 128, 256), (4, 8))]
BACKWARD = [dict(BN=bn, BK=bk, ROWS=1024, num_warps=w)
            for bn, bk, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]


def median_us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def timings(x, g_a, lora_a, dx, members, forward_tile, backward_tile):
    """(forward µs, backward µs) at the given tiles."""
    kernels.FORWARD_TILE, kernels.BACKWARD_TILE[members] = forward_tile, backward_tile
    return (median_us(lambda: kernels.dropout_a_forward(x, lora_a, 7, 0.05, members)),
            median_us(lambda: kernels.dropout_a_backward(x, g_a, lora_a, dx, 7, 0.05, members)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    library_forward, library_backward = dict(kernels.FORWARD_TILE), dict(kernels.BACKWARD_TILE)
    library_choice = kernels.fp32_products  # fp32 operands for fp32 x only: bf16 products here
    rows = []
    for members, k in CASES:
        torch.manual_seed(0)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        dx = torch.randn_like(x)
        lora_a = torch.randn(members * 16, k, device="cuda")
        g_a = torch.randn(args.tokens, members * 16, device="cuda", dtype=torch.bfloat16)
        case = f"members {members} k {k:5}"
        for products, switch in (("tf32", lambda x: True), ("bf16", library_choice)):
            kernels.fp32_products = switch
            f, b = timings(x, g_a, lora_a, dx, members, library_forward, library_backward[members])
            print(f"{case} {products} products, library tiles: forward {f:6.0f} us, backward {b:6.0f} us", flush=True)
            rows.append(dict(members=members, k=k, products=products, tiles="library", forward_us=f, backward_us=b))
        swept = {"forward": [], "backward": []}
        for tile in FORWARD:
            try:
                f, _ = timings(x, g_a, lora_a, dx, members, tile, library_backward[members])
                swept["forward"].append((f, tile))
            except Exception as e:  # a tile that does not fit (shared memory, registers)
                print(f"  forward {tile}: {type(e).__name__}")
        for tile in BACKWARD:
            try:
                kernels.BACKWARD_TILE[members] = tile
                b = median_us(lambda: kernels.dropout_a_backward(x, g_a, lora_a, dx, 7, 0.05, members))
                swept["backward"].append((b, tile))
            except Exception as e:
                print(f"  backward {tile}: {type(e).__name__}")
        for which, results in swept.items():
            for us, tile in sorted(results, key=lambda t: t[0])[:3]:
                print(f"{case} bf16 {which:8} {us:6.0f} us at {tile}", flush=True)
            rows += [dict(members=members, k=k, products="bf16", kernel=which, tile=tile, us=us) for us, tile in results]
        kernels.FORWARD_TILE, kernels.BACKWARD_TILE = dict(library_forward), dict(library_backward)
    kernels.fp32_products = library_choice
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
