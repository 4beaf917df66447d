"""Diagnostic (issue 19), second round: the backward dropout kernel split in two (dA alone, dx alone)
and a forward kernel with every member in one program, against the library's kernels."""
import sys

import torch
import triton
import triton.language as tl
import triton.testing

from fast import dropout_kernels as K


@triton.jit
def dx_kernel(ga_ptr, a_ptr, dx_ptr, n_rows, seed, threshold, scale, K_: tl.constexpr, R: tl.constexpr,
              R_PAD: tl.constexpr, MEMBERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr = False):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    col0 = tl.program_id(1) * BK
    cols = col0 + tl.arange(0, BK)
    ranks = tl.arange(0, R_PAD)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < K_)
    offsets = rows.to(tl.int64)[:, None] * K_ + cols[None, :]
    dx = tl.load(dx_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    for j in tl.static_range(MEMBERS):
        g = tl.load(ga_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + j * R + ranks[None, :],
                    mask=(rows[:, None] < n_rows) & (ranks[None, :] < R), other=0.0)
        a = tl.load(a_ptr + (j * R + ranks[:, None]) * K_ + cols[None, :],
                    mask=(ranks[:, None] < R) & (cols[None, :] < K_), other=0.0)
        if F32:
            g, a = g.to(tl.float32), a.to(tl.float32)
        keep = K.keep_block(rows, col0, seed + j, threshold, BN, BK)
        dx += tl.where(keep, tl.dot(g, a), 0.0) * scale
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def fwd_all(x_ptr, a_ptr, out_ptr, n_rows, seed, threshold, scale, K_: tl.constexpr, R: tl.constexpr,
            R_PAD: tl.constexpr, MEMBERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr = False):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, R_PAD)
    acc0 = tl.zeros((BN, R_PAD), tl.float32)
    acc1 = tl.zeros((BN, R_PAD), tl.float32)
    acc2 = tl.zeros((BN, R_PAD), tl.float32)
    for k0 in range(0, K_, BK):
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < K_)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K_ + cols[None, :], mask=inside, other=0.0)
        acc0 = K.masked_a_product(acc0, x, K.keep_block(rows, k0, seed, threshold, BN, BK), a_ptr, cols, K_,
                                  R, R_PAD, F32)
        if MEMBERS > 1:
            acc1 = K.masked_a_product(acc1, x, K.keep_block(rows, k0, seed + 1, threshold, BN, BK), a_ptr + R * K_,
                                      cols, K_, R, R_PAD, F32)
        if MEMBERS > 2:
            acc2 = K.masked_a_product(acc2, x, K.keep_block(rows, k0, seed + 2, threshold, BN, BK),
                                      a_ptr + 2 * R * K_, cols, K_, R, R_PAD, F32)
    out = out_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + ranks[None, :]
    inside = (rows[:, None] < n_rows) & (ranks[None, :] < R)
    tl.store(out, (acc0 * scale).to(out_ptr.dtype.element_ty), mask=inside)
    if MEMBERS > 1:
        tl.store(out + R, (acc1 * scale).to(out_ptr.dtype.element_ty), mask=inside)
    if MEMBERS > 2:
        tl.store(out + 2 * R, (acc2 * scale).to(out_ptr.dtype.element_ty), mask=inside)


def us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def best(name, fn, tiles):
    results = []
    for tile in tiles:
        try:
            results.append((us(lambda: fn(tile)), tile))
        except Exception as e:
            print(f"    {tile}: {type(e).__name__}")
    for t, tile in sorted(results, key=lambda r: r[0])[:3]:
        print(f"  {name:10} {t:5.0f} us at {tile}", flush=True)


def main(device="cuda", n=16384, cases=((1, 4096), (2, 4096), (3, 4096), (1, 14336)), check=False):
    r = 16
    args = (n, 7, K.keep_threshold(0.05), K.keep_scale(0.05))
    for members, k in cases:
        torch.manual_seed(0)
        x = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        dx = torch.randn_like(x)
        a = torch.randn(members * r, k, device=device, dtype=torch.bfloat16)
        g_a = torch.randn(n, members * r, device=device, dtype=torch.bfloat16)
        out = torch.empty(n, members * r, device=device, dtype=torch.bfloat16)

        def forward(tile):
            fwd_all[(triton.cdiv(n, tile["BN"]),)](x, a, out, *args, K_=k, R=r, R_PAD=16, MEMBERS=members, **tile)

        def dx_only(tile):
            dx_kernel[(triton.cdiv(n, tile["BN"]), triton.cdiv(k, tile["BK"]))](
                g_a, a, dx, *args, K_=k, R=r, R_PAD=16, MEMBERS=members, **tile)

        def da_only(tile):
            K.BACKWARD_TILE[members] = tile
            return K.dropout_a_backward(x, g_a, a, None, 7, 0.05, members)

        if check:  # the split kernels against the library's
            forward(dict(BN=16, BK=32, F32=True))
            torch.testing.assert_close(out, K.dropout_a_forward(x, a, 7, 0.05, members), rtol=0, atol=0)
            want = dx.clone()
            K.dropout_a_backward(x, g_a, a, want, 7, 0.05, members)
            got = dx.clone()
            dx_kernel[(triton.cdiv(n, 16), triton.cdiv(k, 32))](g_a, a, got, *args, K_=k, R=r, R_PAD=16,
                                                                 MEMBERS=members, BN=16, BK=32, F32=True)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            print("split kernels equal the library's", members, k)
            continue
        print(f"members {members} k {k}: floors forward {2 * n * k / 4.8e6:.0f}, dA {2 * n * k / 4.8e6:.0f}, "
              f"dx {4 * n * k / 4.8e6:.0f} us; library forward "
              f"{us(lambda: K.dropout_a_forward(x, a, 7, 0.05, members)):.0f}, backward "
              f"{us(lambda: K.dropout_a_backward(x, g_a, a, dx, 7, 0.05, members)):.0f}", flush=True)
        best("forward", forward, [dict(BN=bn, BK=bk, num_warps=w) for bn in (16, 32, 64) for bk in (64, 128)
                                  for w in (4, 8)])
        best("dA", da_only, [dict(BN=bn, BK=bk, ROWS=rows, num_warps=w) for bn in (32, 64, 128) for bk in (64, 128)
                             for rows in (512,) for w in (4, 8)])
        best("dx", dx_only, [dict(BN=bn, BK=bk, num_warps=w) for bn in (32, 64, 128) for bk in (64, 128)
                             for w in (4, 8)])


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        main("cpu", 64, ((1, 128), (3, 128)), check=True)
    else:
        main()
