"""Probe (issue 19): the LoRA term through the base GEMM's K instead of its C.

Today y_j = a_j (s B_j)ᵀ is written first and the base GEMM adds onto it (addmm_, beta = 1).
The alternative: one [N, in + G·r] input [x | a_1 .. a_G] and per member a weight
[W_j | 0 .. s B_j .. 0], so y_j = [x | a] [W_j | ..]ᵀ in one GEMM with beta = 0, at G·r more
columns of K. Timed for gate/up and q/k/v of Mistral-7B at 16k tokens, bf16: A today's way;
B with x copied into the wide input; C with x already there (what a norm writing into the wide
buffer would give)."""
import torch
import triton.testing


def us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    n, k, r = 16384, 4096, 16
    dt = torch.bfloat16
    for name, outs in (("gate/up", (14336, 14336)), ("q/k/v", (4096, 1024, 1024))):
        g = len(outs)
        x = torch.randn(n, k, device="cuda", dtype=dt)
        a = torch.randn(n, g * r, device="cuda", dtype=dt)
        ws = [torch.randn(o, k, device="cuda", dtype=dt) / 64 for o in outs]
        bs = [torch.randn(o, r, device="cuda", dtype=dt) for o in outs]
        wide = torch.empty(n, k + g * r, device="cuda", dtype=dt)
        pads = []
        for j, (w, b) in enumerate(zip(ws, bs)):
            p = torch.zeros(w.shape[0], k + g * r, device="cuda", dtype=dt)
            p[:, :k] = w
            pads.append(p)

        def today():
            return [(a[:, j * r:(j + 1) * r] @ b.t()).addmm_(x, w.t()) for j, (w, b) in enumerate(zip(ws, bs))]

        def wide_gemms(copy_x):
            if copy_x:
                wide[:, :k].copy_(x)
            wide[:, k:].copy_(a)
            out = []
            for j, (p, b) in enumerate(zip(pads, bs)):
                p[:, k + j * r:k + (j + 1) * r].copy_(b)
                out.append(wide @ p.t())
            return out

        ref = today()
        wide[:, :k].copy_(x)
        got = wide_gemms(True)
        err = max(((u.float() - v.float()).norm() / v.float().norm()).item() for u, v in zip(got, ref))
        print(f"{name}: today {us(today):.0f} us, wide with x copied {us(lambda: wide_gemms(True)):.0f} us, "
              f"wide with x in place {us(lambda: wide_gemms(False)):.0f} us (rel. difference {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
