"""Tile sweep for fast/dropout_kernels.py's fused-dropout backward kernel, per member count (CUDA).

    python bench/kernel_tiles.py [--tokens 16384]

For 1, 2 and 3 adapters over one 4096-wide input (o; gate/up; q/k/v of Mistral-7B, r=16, bf16),
the median time of `dropout_a_backward` at each tile, and
for the groups the time of one launch per member at the single-member tile (what the group
replaces). The fastest tile per member count goes into `kernels.BACKWARD_TILE` by hand.
"""

import argparse
import itertools

import torch
import triton.testing

from fast import dropout_kernels as kernels

CASES = [(1, 4096), (2, 4096), (3, 4096)]  # (members, input width)


def backward_us(x, g_a, lora_a, dx, members):
    return 1e3 * triton.testing.do_bench(lambda: kernels.dropout_a_backward(x, g_a, lora_a, dx, 7, 0.05, members),
                                         warmup=20, rep=200, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    single = dict(kernels.BACKWARD_TILE[1])
    for members, k in CASES:
        torch.manual_seed(0)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        dx = torch.randn_like(x)
        lora_a = torch.randn(members * 16, k, device="cuda")
        g_a = torch.randn(args.tokens, members * 16, device="cuda", dtype=torch.bfloat16)
        if members > 1:
            kernels.BACKWARD_TILE[1] = single
            one_by_one = sum(backward_us(x, g_a[:, 16 * j:16 * (j + 1)], lora_a[16 * j:16 * (j + 1)], dx, 1)
                             for j in range(members))
            print(f"members {members} k {k}: one launch per member {one_by_one:.0f} us")
        results = []
        for bn, bk, warps in itertools.product((16, 32), (64, 128, 256), (4, 8)):
            kernels.BACKWARD_TILE[members] = dict(BN=bn, BK=bk, ROWS=1024, num_warps=warps)
            try:
                results.append((backward_us(x, g_a, lora_a, dx, members), bn, bk, warps))
            except Exception as e:  # a tile that does not fit (shared memory, registers)
                print(f"  BN {bn} BK {bk} warps {warps}: {type(e).__name__}")
        for us, bn, bk, warps in sorted(results)[:4]:
            print(f"members {members} k {k}: BN {bn:3} BK {bk:3} warps {warps}: {us:.0f} us")
    kernels.BACKWARD_TILE[1] = single


if __name__ == "__main__":
    main()
