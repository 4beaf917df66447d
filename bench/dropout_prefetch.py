"""Diagnostic (issue 19): fast/dropout_kernels.py's and fast/swiglu_down.py's loops with the next
tile's loads issued before the current tile's arithmetic (software prefetch by hand), against
the library's kernels, at the library's tiles, 16k tokens. `--check` (CPU, Triton's interpreter):
the variants equal the library's kernels bit for bit."""
import sys

import torch
import triton
import triton.language as tl
import triton.testing

from fast import dropout_kernels as K
from fast import swiglu_down as S


@triton.jit
def fwd_pf(x_ptr, a_ptr, out_ptr, n_rows, seed, threshold, scale, K_: tl.constexpr, R: tl.constexpr,
           R_PAD: tl.constexpr, MEMBERS: tl.constexpr, F32: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    member = tl.program_id(0)
    seed += member
    a_ptr += member * R * K_
    out_ptr += member * R
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    ranks = tl.arange(0, R_PAD)
    row_ok = rows[:, None] < n_rows
    base = x_ptr + rows.to(tl.int64)[:, None] * K_
    cols = tl.arange(0, BK)
    x = tl.load(base + cols[None, :], mask=row_ok & (cols[None, :] < K_), other=0.0)
    acc = tl.zeros((BN, R_PAD), tl.float32)
    for k0 in range(0, K_, BK):
        nxt = k0 + BK + tl.arange(0, BK)
        x_next = tl.load(base + nxt[None, :], mask=row_ok & (nxt[None, :] < K_), other=0.0)
        acc = K.masked_a_product(acc, x, K.keep_block(rows, k0, seed, threshold, BN, BK), a_ptr,
                                 k0 + tl.arange(0, BK), K_, R, R_PAD, F32)
        x = x_next
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (MEMBERS * R) + ranks[None, :], out,
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < R))


@triton.jit
def bwd_pf(x_ptr, ga_ptr, a_ptr, dx_ptr, partial_ptr, n_rows, seed, threshold, scale, K_: tl.constexpr,
           R: tl.constexpr, R_PAD: tl.constexpr, MEMBERS: tl.constexpr, F32: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, ROWS: tl.constexpr):
    col0 = tl.program_id(0) * BK
    cols = col0 + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    a_block = a_ptr + ranks[:, None] * K_ + cols[None, :]
    a_mask = (ranks[:, None] < R) & (cols[None, :] < K_)
    a0 = tl.load(a_block, mask=a_mask, other=0.0)
    a1 = tl.load(a_block + R * K_, mask=a_mask & (MEMBERS > 1), other=0.0)
    a2 = tl.load(a_block + 2 * R * K_, mask=a_mask & (MEMBERS > 2), other=0.0)
    if F32:
        a0, a1, a2 = a0.to(tl.float32), a1.to(tl.float32), a2.to(tl.float32)
    d_a0 = tl.zeros((R_PAD, BK), tl.float32)
    d_a1 = tl.zeros((R_PAD, BK), tl.float32)
    d_a2 = tl.zeros((R_PAD, BK), tl.float32)
    rows = split * ROWS + tl.arange(0, BN)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < K_)
    offsets = rows.to(tl.int64)[:, None] * K_ + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    dx = tl.load(dx_ptr + offsets, mask=inside, other=0.0)
    for r0 in range(0, ROWS, BN):
        n_rows_ = split * ROWS + r0 + BN + tl.arange(0, BN)
        n_inside = (n_rows_[:, None] < n_rows) & (cols[None, :] < K_) & (r0 + BN < ROWS)
        n_offsets = n_rows_.to(tl.int64)[:, None] * K_ + cols[None, :]
        x_next = tl.load(x_ptr + n_offsets, mask=n_inside, other=0.0)
        dx_next = tl.load(dx_ptr + n_offsets, mask=n_inside, other=0.0)
        xw = x.to(tl.float32) if F32 else x
        acc = dx.to(tl.float32)
        d_a0, acc = K.member_backward(xw, acc, d_a0, a0, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 0,
                                      MEMBERS, R, R_PAD, BN, BK, True, F32)
        if MEMBERS > 1:
            d_a1, acc = K.member_backward(xw, acc, d_a1, a1, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 1,
                                          MEMBERS, R, R_PAD, BN, BK, True, F32)
        if MEMBERS > 2:
            d_a2, acc = K.member_backward(xw, acc, d_a2, a2, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 2,
                                          MEMBERS, R, R_PAD, BN, BK, True, F32)
        tl.store(dx_ptr + offsets, acc.to(dx_ptr.dtype.element_ty), mask=inside)
        rows, inside, offsets, x, dx = n_rows_, n_inside, n_offsets, x_next, dx_next
    out = partial_ptr + split * R * K_ + ranks[:, None] * K_ + cols[None, :]
    member_stride = tl.num_programs(1) * R * K_
    tl.store(out, d_a0 * scale, mask=a_mask)
    if MEMBERS > 1:
        tl.store(out + member_stride, d_a1 * scale, mask=a_mask)
    if MEMBERS > 2:
        tl.store(out + 2 * member_stride, d_a2 * scale, mask=a_mask)


@triton.jit
def swiglu_bwd_pf(g_ptr, u_ptr, dh_ptr, ga_ptr, a_ptr, du_ptr, partial_ptr, n_rows, seed, threshold, scale,
                  K_: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, F32: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, ROWS: tl.constexpr):
    col0 = tl.program_id(0) * BK
    cols = col0 + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    a_mask = (ranks[:, None] < R) & (cols[None, :] < K_)
    a = tl.load(a_ptr + ranks[:, None] * K_ + cols[None, :], mask=a_mask, other=0.0)
    if F32:
        a = a.to(tl.float32)
    d_a = tl.zeros((R_PAD, BK), tl.float32)
    rows = split * ROWS + tl.arange(0, BN)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < K_)
    offsets = rows.to(tl.int64)[:, None] * K_ + cols[None, :]
    g0 = tl.load(g_ptr + offsets, mask=inside, other=0.0)
    u0 = tl.load(u_ptr + offsets, mask=inside, other=0.0)
    dh0 = tl.load(dh_ptr + offsets, mask=inside, other=0.0)
    for r0 in range(0, ROWS, BN):
        n_rows_ = split * ROWS + r0 + BN + tl.arange(0, BN)
        n_inside = (n_rows_[:, None] < n_rows) & (cols[None, :] < K_) & (r0 + BN < ROWS)
        n_offsets = n_rows_.to(tl.int64)[:, None] * K_ + cols[None, :]
        g_next = tl.load(g_ptr + n_offsets, mask=n_inside, other=0.0)
        u_next = tl.load(u_ptr + n_offsets, mask=n_inside, other=0.0)
        dh_next = tl.load(dh_ptr + n_offsets, mask=n_inside, other=0.0)
        g, u = g0.to(tl.float32), u0.to(tl.float32)
        x = S._swiglu(g, u).to(g_ptr.dtype.element_ty)
        if F32:
            x = x.to(tl.float32)
        dh = dh0.to(tl.float32)
        d_a, dh = K.member_backward(x, dh, d_a, a, ga_ptr, rows, col0, n_rows, seed, threshold, scale, 0, 1,
                                    R, R_PAD, BN, BK, True, F32)
        sig = tl.sigmoid(g)
        tl.store(du_ptr + offsets, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=inside)
        tl.store(dh_ptr + offsets, (dh * u * sig * (1 + g * (1 - sig))).to(dh_ptr.dtype.element_ty), mask=inside)
        rows, inside, offsets, g0, u0, dh0 = n_rows_, n_inside, n_offsets, g_next, u_next, dh_next
    tl.store(partial_ptr + split * R * K_ + ranks[:, None] * K_ + cols[None, :], d_a * scale, mask=a_mask)


def us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main(device="cuda", n=16384, cases=((1, 4096), (2, 4096), (3, 4096), (1, 14336)), check=False, tiles=None):
    r, f32 = 16, device != "cuda"
    args = (n, 7, K.keep_threshold(0.05), K.keep_scale(0.05))
    for members, k in cases:
        torch.manual_seed(0)
        x = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        dx = torch.randn_like(x)
        a = torch.randn(members * r, k, device=device, dtype=torch.bfloat16)
        g_a = torch.randn(n, members * r, device=device, dtype=torch.bfloat16)
        out = torch.empty(n, members * r, device=device, dtype=torch.bfloat16)
        ft = tiles["forward"] if tiles else K.FORWARD_TILE
        bt = tiles["backward"] if tiles else K.BACKWARD_TILE[members]
        splits = triton.cdiv(n, bt["ROWS"])
        partial = torch.empty(members, splits, r, k, device=device, dtype=torch.float32)

        def forward():
            fwd_pf[(members, triton.cdiv(n, ft["BN"]))](x, a, out, *args, K_=k, R=r, R_PAD=16, MEMBERS=members,
                                                        F32=f32, **ft)
            return out

        def backward(d):
            bwd_pf[(triton.cdiv(k, bt["BK"]), splits)](x, g_a, a, d, partial, *args, K_=k, R=r, R_PAD=16,
                                                      MEMBERS=members, F32=f32, **bt)
            return partial.sum(1).reshape(members * r, k)

        if check:
            saved = dict(K.FORWARD_TILE), dict(K.BACKWARD_TILE)
            K.FORWARD_TILE, K.BACKWARD_TILE[members] = ft, bt
            assert torch.equal(forward(), K.dropout_a_forward(x, a, 7, 0.05, members))
            want, got = dx.clone(), dx.clone()
            want_da = K.dropout_a_backward(x, g_a, a, want, 7, 0.05, members)
            assert torch.equal(backward(got), want_da) and torch.equal(got, want)
            K.FORWARD_TILE, K.BACKWARD_TILE = saved
            print("prefetching dropout kernels equal the library's:", members, k)
        else:
            print(f"members {members} k {k}: forward library {us(lambda: K.dropout_a_forward(x, a, 7, 0.05, members)):.0f}"
                  f" prefetch {us(forward):.0f} us; backward library "
                  f"{us(lambda: K.dropout_a_backward(x, g_a, a, dx, 7, 0.05, members)):.0f} prefetch "
                  f"{us(lambda: backward(dx)):.0f} us", flush=True)
    # SwiGLU-down backward at Mistral's width
    k = 14336 if not check else 256
    gate, up = (torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(2))
    dh = torch.randn_like(gate)
    a = torch.randn(r, k, device=device, dtype=torch.bfloat16)
    g_a = torch.randn(n, r, device=device, dtype=torch.bfloat16)
    bt = tiles["backward"] if tiles else S.BACKWARD_TILE
    splits = triton.cdiv(n, bt["ROWS"])
    partial = torch.empty(splits, r, k, device=device, dtype=torch.float32)
    d_up = torch.empty_like(up)

    def swiglu_backward(d):
        swiglu_bwd_pf[(triton.cdiv(k, bt["BK"]), splits)](gate, up, d, g_a, a, d_up, partial, *args, K_=k, R=r,
                                                           R_PAD=16, F32=f32, **bt)
        return partial.sum(0), d, d_up

    if check:
        saved = dict(S.BACKWARD_TILE)
        S.BACKWARD_TILE = bt
        want = S.swiglu_a_backward(gate, up, dh.clone(), g_a, a, 7, 0.05)
        got = swiglu_backward(dh.clone())
        assert all(torch.equal(p, q) for p, q in zip(got, want))
        S.BACKWARD_TILE = saved
        print("prefetching SwiGLU backward equals the library's")
    else:
        print(f"swiglu-down backward: library {us(lambda: S.swiglu_a_backward(gate, up, dh, g_a, a, 7, 0.05)):.0f}"
              f" prefetch {us(lambda: swiglu_backward(dh)):.0f} us", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        main("cpu", 64, ((1, 256), (3, 256)), check=True,
             tiles=dict(forward=dict(BN=16, BK=64), backward=dict(BN=16, BK=64, ROWS=32)))
    else:
        main()
