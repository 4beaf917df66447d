"""One LoRA layer's fast forward + backward, kernels off (torch's dropout, masks kept as bits,
eager) against kernels on (the dropout Triton kernels); and the siblings (q/k/v, gate/up) one
by one against together (fast/siblings.py), kernels on.

    python bench/lora_layer.py [--tokens 16384] [--dropout 0.05]

For each of Mistral-7B's seven projection shapes (4-bit NF4 base, r=16, bf16), the median time
of forward + backward (CUDA events) through fast/lora_function.py with `fast.enable(layer,
compile=False)` and with `compile=True` (fast/dropout_kernels.py). Checks first the kernels'
products at full size (p = 0; tests/test_lora_kernels.py checks the masks, on a GPU too).
"""

import argparse

import bitsandbytes as bnb
import torch
import triton.testing

import fast
import lora
from fast import dropout_kernels as kernels, siblings

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
          "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def layer(n_in, n_out, dropout, kernels_on):
    base = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                    quant_type="nf4")
    module = lora.LoRALinear(base.cuda(), r=16, alpha=16, dropout=dropout).cuda()
    torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    fast.enable(module, compile=kernels_on)  # the state is process-wide: build, then time, one variant at a time
    return module


def step_ms(forward, x, dys):
    """Median ms of forward(x) + backward with upstream gradients dys (one per output)."""
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ys = forward(x)
        torch.autograd.backward(ys, dys)
    return triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")


def check_kernels(n, k):
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, k, device="cuda")
    g_a = torch.randn(n, 16, device="cuda", dtype=torch.bfloat16)
    dx = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    out = kernels.dropout_a_forward(x, a, 7, 0.0)  # p = 0: the mask keeps all, so plain math is the reference
    ref = x.double() @ a.double().t()
    print(f"check {n}x{k}: forward rel err {((out.double() - ref).norm() / ref.norm()).item():.1e}", end="")
    dx_ref = dx.double() + g_a.double() @ a.double()
    d_a = kernels.dropout_a_backward(x, g_a, a, dx, 7, 0.0)
    d_a_ref = g_a.double().t() @ x.double()
    print(f", dA {((d_a.double() - d_a_ref).norm() / d_a_ref.norm()).item():.1e}"
          f", dx {((dx.double() - dx_ref).norm() / dx_ref.norm()).item():.1e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dropout", type=float, default=0.05)
    args = p.parse_args()
    for k in (4096, 14336):
        check_kernels(args.tokens, k)
    print(f"{'projection':<10} {'off ms':>9} {'on ms':>9} {'saved':>7}")
    total = [0.0, 0.0]
    for name, (n_in, n_out) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(args.tokens, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(args.tokens, n_out, device="cuda", dtype=torch.bfloat16)
        times = [step_ms(layer(n_in, n_out, args.dropout, on).train(), x, [dy]) for on in (False, True)]
        total = [t + s for t, s in zip(total, times)]
        print(f"{name:<10} {times[0]:9.3f} {times[1]:9.3f} {times[0] - times[1]:7.3f}")
    print(f"{'per layer':<10} {total[0]:9.3f} {total[1]:9.3f} {total[0] - total[1]:7.3f}"
          f"   x32 layers: {32 * (total[0] - total[1]):.0f} ms saved per step")
    print(f"{'siblings':<15} {'one by one ms':>13} {'together ms':>12}")
    for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        torch.manual_seed(0)
        n_in = SHAPES[names[0]][0]
        x = torch.randn(args.tokens, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dys = [torch.randn(args.tokens, SHAPES[n][1], device="cuda", dtype=torch.bfloat16) for n in names]
        group = [layer(*SHAPES[n], args.dropout, True).train() for n in names]
        times = [step_ms(lambda t: [m(t) for m in group], x, dys),
                 step_ms(lambda t: siblings.run_together(group, t), x, dys)]
        print(f"{'/'.join(n.split('_')[0] for n in names):<15} {times[0]:13.3f} {times[1]:12.3f}")


if __name__ == "__main__":
    main()
