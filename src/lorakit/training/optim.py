"""Optimizers and LR schedules by kohya's names."""
from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): update = sign(β1·m + (1-β1)·g); m ← β2·m + (1-β2)·g; decoupled weight decay.
    Use about 1/3-1/10 of AdamW's learning rate."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def make_optimizer(name: str, param_groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=1e-2)
    if key == "lion":
        return Lion(param_groups, lr=lr, weight_decay=1e-2)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy(param_groups, lr=lr, weight_decay=1e-2)
    if key == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("optimizer_type AdamW8bit needs a CUDA GPU (bitsandbytes); use AdamW on this device")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer_type AdamW8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=1e-2)
    raise ValueError(f"unknown optimizer_type {name!r}")


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"  # warmup is never silently ignored
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
