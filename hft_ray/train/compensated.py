"""AdamW whose bf16 weights keep the updates bf16 rounds away (Kahan summation).

In pure bf16 a weight near 0.02 moves in steps of 1.2e-4 (bf16's spacing there), and an update of
1e-5 x (Adam's normalised step, about 1) rounds to no change at all: at lr 1e-5 most entries never
move (README "Large models"). Here each bf16 parameter carries a bf16 buffer with what rounding
took from it; the next step adds it back before rounding again, so small updates accumulate into
the weight instead of vanishing (as torch-optimi's Kahan summation does; torchao's bf16 AdamW uses
stochastic rounding instead, and neither is in this project's pins). The moments are kept in the
parameter's dtype, the arithmetic in float32. float32 parameters take the plain AdamW update.

Frozen entries stay bitwise unchanged: the plan's restore hook (hft_ray/core/freezing.py) runs
after every step and writes them back, buffer or not.
"""

from __future__ import annotations

import torch


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments), compensated in bf16."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    if param.dtype == torch.bfloat16:
                        state["compensation"] = torch.zeros_like(param)
                state["step"] += 1
                step = int(state["step"].item())
                grad = param.grad.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                update = exp_avg.div_(denominator).mul_(-group["lr"] / (1 - beta1 ** step))
                weight = param.float()
                if group["weight_decay"]:
                    update.add_(weight, alpha=-group["lr"] * group["weight_decay"])
                if "compensation" not in state:
                    param.add_(update.to(param.dtype))
                    continue
                update.add_(state["compensation"].float())
                moved = (weight + update).to(param.dtype)
                state["compensation"].copy_(update - (moved.float() - weight))  # what rounding took
                param.copy_(moved)
        return loss

