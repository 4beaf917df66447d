"""Diagnostic (issue 19): where the dropout kernels' time goes. Variants of fast/dropout_kernels.py's
kernels that differ only in how the mask is made, timed at 16k tokens on the library's tiles."""
import torch
import triton
import triton.language as tl
import triton.testing

from fast import dropout_kernels as K


@triton.jit
def keep_variant(rows, col0, seed, threshold, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:
        return K.keep_block(rows, col0, seed, threshold, BN, BK)
    elif MODE == 1:  # no mask at all
        cols = col0 + tl.arange(0, BK)
        return (rows[:, None] >= 0) & (cols[None, :] >= 0)
    elif MODE == 2:  # one hash per element pair, computed per element, no join
        cols = col0 + tl.arange(0, BK)
        seed_h = K._fmix32(seed.to(tl.uint32))
        row_h = K._fmix32(rows.to(tl.uint32) ^ seed_h)
        h = K._fmix32(row_h[:, None] ^ ((cols // 2).to(tl.uint32) * 0x9E3779B1)[None, :])
        bits = (h >> ((cols & 1) * 16).to(tl.uint32)[None, :]) & 0xFFFF
        return bits >= threshold.to(tl.uint32)
    else:  # cheap: per-row and per-pair fmix, one multiply-xorshift per pair
        seed_h = K._fmix32(seed.to(tl.uint32))
        row_h = K._fmix32(rows.to(tl.uint32) ^ seed_h)
        pairs = col0 // 2 + tl.arange(0, BK // 2)
        pair_h = K._fmix32(pairs.to(tl.uint32) ^ (seed_h * 0x9E3779B1))
        h = (row_h[:, None] + pair_h[None, :]) * 0x85EBCA6B
        h ^= h >> 15
        t = threshold.to(tl.uint32)
        return tl.reshape(tl.join((h & 0xFFFF) >= t, (h >> 16) >= t), (BN, BK))


@triton.jit
def fwd(x_ptr, a_ptr, out_ptr, n_rows, seed, threshold, scale, K_: tl.constexpr, R: tl.constexpr,
        R_PAD: tl.constexpr, MEMBERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr):
    member = tl.program_id(0)
    seed += member
    a_ptr += member * R * K_
    out_ptr += member * R
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((BN, R_PAD), tl.float32)
    for k0 in range(0, K_, BK):
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < K_)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K_ + cols[None, :], mask=inside, other=0.0)
        acc = K.masked_a_product(acc, x, keep_variant(rows, k0, seed, threshold, BN, BK, MODE), a_ptr, cols, K_,
                                 R, R_PAD, False)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + ranks[None, :], out,
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < R))


@triton.jit
def member_bwd(x, dx, d_a, a, ga_ptr, rows, col0, n_rows, seed, threshold, scale, member: tl.constexpr,
               MEMBERS: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               MODE: tl.constexpr):
    ranks = tl.arange(0, R_PAD)
    keep = keep_variant(rows, col0, seed + member, threshold, BN, BK, MODE)
    g_a = tl.load(ga_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + member * R + ranks[None, :],
                  mask=(rows[:, None] < n_rows) & (ranks[None, :] < R), other=0.0)
    d_a += tl.dot(tl.trans(g_a), tl.where(keep, x, tl.zeros_like(x)))
    dx += tl.where(keep, tl.dot(g_a, a), 0.0) * scale
    return d_a, dx


@triton.jit
def bwd(x_ptr, ga_ptr, a_ptr, dx_ptr, partial_ptr, n_rows, seed, threshold, scale, K_: tl.constexpr,
        R: tl.constexpr, R_PAD: tl.constexpr, MEMBERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        ROWS: tl.constexpr, MODE: tl.constexpr):
    col0 = tl.program_id(0) * BK
    cols = col0 + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    a_block = a_ptr + ranks[:, None] * K_ + cols[None, :]
    a_mask = (ranks[:, None] < R) & (cols[None, :] < K_)
    a0 = tl.load(a_block, mask=a_mask, other=0.0)
    a1 = tl.load(a_block + R * K_, mask=a_mask & (MEMBERS > 1), other=0.0)
    a2 = tl.load(a_block + 2 * R * K_, mask=a_mask & (MEMBERS > 2), other=0.0)
    d_a0 = tl.zeros((R_PAD, BK), tl.float32)
    d_a1 = tl.zeros((R_PAD, BK), tl.float32)
    d_a2 = tl.zeros((R_PAD, BK), tl.float32)
    for r0 in range(0, ROWS, BN):
        rows = split * ROWS + r0 + tl.arange(0, BN)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < K_)
        offsets = rows.to(tl.int64)[:, None] * K_ + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        dx = tl.load(dx_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        d_a0, dx = member_bwd(x, dx, d_a0, a0, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 0,
                              MEMBERS, R, R_PAD, BN, BK, MODE)
        if MEMBERS > 1:
            d_a1, dx = member_bwd(x, dx, d_a1, a1, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 1,
                                  MEMBERS, R, R_PAD, BN, BK, MODE)
        if MEMBERS > 2:
            d_a2, dx = member_bwd(x, dx, d_a2, a2, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 2,
                                  MEMBERS, R, R_PAD, BN, BK, MODE)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    out = partial_ptr + split * R * K_ + ranks[:, None] * K_ + cols[None, :]
    member_stride = tl.num_programs(1) * R * K_
    tl.store(out, d_a0 * scale, mask=a_mask)
    if MEMBERS > 1:
        tl.store(out + member_stride, d_a1 * scale, mask=a_mask)
    if MEMBERS > 2:
        tl.store(out + 2 * member_stride, d_a2 * scale, mask=a_mask)


def us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    n, r = 16384, 16
    for members, k in [(1, 4096), (3, 4096), (1, 14336)]:
        torch.manual_seed(0)
        x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        dx = torch.randn_like(x)
        a = torch.randn(members * r, k, device="cuda", dtype=torch.bfloat16)
        g_a = torch.randn(n, members * r, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(n, members * r, device="cuda", dtype=torch.bfloat16)
        floor_f, floor_b = 2 * n * k / 4.8e6, 6 * n * k / 4.8e6
        print(f"members {members} k {k}: DRAM floor forward {floor_f:.0f} us, backward {floor_b:.0f} us")
        print(f"  library: forward {us(lambda: K.dropout_a_forward(x, a, 7, 0.05, members)):.0f}"
              f" backward {us(lambda: K.dropout_a_backward(x, g_a, a, dx, 7, 0.05, members)):.0f}"
              f" backward without dx {us(lambda: K.dropout_a_backward(x, g_a, a, None, 7, 0.05, members)):.0f}")
        ft, bt = K.FORWARD_TILE, K.BACKWARD_TILE[members]
        splits = triton.cdiv(n, bt["ROWS"])
        partial = torch.empty(members, splits, r, k, device="cuda", dtype=torch.float32)
        args = (n, 7, K.keep_threshold(0.05), K.keep_scale(0.05))
        for mode, name in enumerate(["fmix pair+join", "no mask", "per-element hash", "cheap hash"]):
            f = us(lambda: fwd[(members, triton.cdiv(n, ft["BN"]))](x, a, out, *args, K_=k, R=r, R_PAD=16,
                                                                     MEMBERS=members, MODE=mode, **ft))
            times = []
            for stages in (None, 1, 2, 4):
                extra = {} if stages is None else dict(num_stages=stages)
                try:
                    times.append(us(lambda: bwd[(triton.cdiv(k, bt["BK"]), splits)](
                        x, g_a, a, dx, partial, *args, K_=k, R=r, R_PAD=16, MEMBERS=members, MODE=mode,
                        **bt, **extra)))
                except Exception as e:
                    times.append(float("nan"))
            print(f"  {name:18}: forward {f:5.0f}  backward {times[0]:5.0f} (stages 1/2/4: "
                  f"{times[1]:.0f}/{times[2]:.0f}/{times[3]:.0f})", flush=True)
        for bn, bk, w, rows in [(32, 128, 8, 1024), (16, 128, 8, 1024), (32, 64, 4, 1024), (16, 128, 4, 512),
                                (16, 128, 4, 2048), (64, 64, 8, 1024)]:
            tile = dict(BN=bn, BK=bk, ROWS=rows, num_warps=w)
            sp = triton.cdiv(n, rows)
            part = torch.empty(members, sp, r, k, device="cuda", dtype=torch.float32)
            for mode in (0, 1):
                t = us(lambda: bwd[(triton.cdiv(k, bk), sp)](x, g_a, a, dx, part, *args, K_=k, R=r, R_PAD=16,
                                                             MEMBERS=members, MODE=mode, **tile))
                print(f"  backward mode {mode} at {tile}: {t:.0f}", flush=True)


if __name__ == "__main__":
    main()
