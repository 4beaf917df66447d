"""The optimizer side of training: AdamW written out, learning-rate schedules, fp16 loss scaling.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019), per parameter p
with gradient g at step t:

    p  <- p * (1 - lr * weight_decay)            # decoupled: decay is not part of the gradient
    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g^2
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

Each line runs once over *all* parameters (`torch._foreach_*`: a few multi-tensor kernels
per step instead of five launches per LoRA matrix, of which a 7B model has 448), in the
order of `torch.optim.AdamW`'s multi-tensor path, so the two agree bit for bit
(tests/test_optim.py); the state lives in fp32 like the LoRA weights.
"""

import math

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    # The step count is a tensor so that state_dict() round-trips through
                    # torch.load(weights_only=True) like torch's own optimizers.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
            states = [self.state[p] for p in params]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            g = [p.grad.float() for p in params]
            t = [s["step"].item() for s in states]

            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2**ti) for ti in t])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1**ti) for ti in t])


def make_optimizer(name, params, lr, weight_decay):
    """`adamw` is ours; the paged ones are bitsandbytes' (optimizer state in CUDA unified
    memory, paged to the host when the GPU runs short: the QLoRA paper's answer to
    memory spikes from long sequences)."""
    if name == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay)
    from quant.linear4bit import bnb

    if name == "paged_adamw":
        return bnb.optim.PagedAdamW32bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step, total_steps, warmup_steps, schedule):
    """Multiplier on the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr, then constant, linear decay to 0, or cosine decay
    to 0 over the remaining steps. A pure function of the step, so resuming needs only the
    step number.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}")


class LossScaler:
    """Dynamic loss scaling for fp16 training (Micikevicius et al., "Mixed Precision Training").

    fp16 gradients of small losses underflow to zero, so the loss is multiplied by `scale`
    before backward and the gradients divided by it after. An overflow (non-finite
    gradient) skips the step and halves the scale; `growth_interval` clean steps in a row
    double it. With bf16 or fp32 the scaler is disabled (scale 1, nothing skipped).
    """

    def __init__(self, enabled, scale=2.0**16, growth_interval=2000):
        self.enabled = enabled
        self.scale = scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def update(self, grads_finite):
        """Record one step's outcome; returns True when the optimizer step should run."""
        if not self.enabled:
            return grads_finite
        if not grads_finite:
            self.scale /= 2
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True

    def state_dict(self):
        return dict(scale=self.scale, good_steps=self.good_steps, skipped=self.skipped)

    def load_state_dict(self, state):
        self.scale, self.good_steps, self.skipped = state["scale"], state["good_steps"], state["skipped"]
