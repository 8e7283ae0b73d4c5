"""Optimizers and learning-rate schedules for a population of runs trained in lockstep.

Parameters of all runs live in one tensor `p` of shape [runs, P]. Every hyperparameter is a tensor
of shape [runs, 1], so runs with different learning rates, momenta or betas share one update.
The updates follow `torch.optim.SGD`, `Adam` and `AdamW` operation for operation (a population of
one reproduces their trajectories in float64; see tests/test_optim.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lr_at(step: int, steps: int, lr: float, schedule: str, gamma: float = 0.1, step_size: int = 0,
          min_lr_ratio: float = 0.0, warmup_steps: int = 0) -> float:
    """Learning rate used at optimisation step `step` (0-based) of `steps`.

    constant:     lr
    step:         lr * gamma^floor(step / step_size)          (step_size 0 means steps // 3)
    exponential:  lr * gamma^(step / (steps - 1))             (gamma is the total decay at the last step)
    cosine:       lr * (r + (1 - r) * (1 + cos(pi * step / (steps - 1))) / 2),  r = min_lr_ratio
    warm-up:      multiplied by (step + 1) / warmup_steps for step < warmup_steps
    """
    span = max(steps - 1, 1)
    if schedule == "constant":
        rate = lr
    elif schedule == "step":
        size = step_size or max(steps // 3, 1)
        rate = lr * gamma ** (step // size)
    elif schedule == "exponential":
        rate = lr * gamma ** (step / span)
    elif schedule == "cosine":
        rate = lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * step / span)) / 2)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose constant, step, exponential, cosine")
    if step < warmup_steps:
        rate *= (step + 1) / warmup_steps
    return rate


def lr_table(steps: int, schedules: list[dict]) -> torch.Tensor:
    """[steps, len(schedules)] float64 table of learning rates, one column per distinct schedule.

    Precomputed once so the training loop reads its rates with one gather, with no Python per step.
    """
    return torch.tensor([[lr_at(s, steps, **sched) for sched in schedules] for s in range(steps)], dtype=torch.float64)


@dataclass
class Hyper:
    """Per-run optimizer hyperparameters, each [runs, 1] on the training device."""

    momentum: torch.Tensor
    nesterov: torch.Tensor  # bool
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor
    clip_grad_norm: torch.Tensor  # 0 means off


class Optimizer:
    """Elementwise SGD / Adam / AdamW over stacked parameters [runs, P] with per-run hyperparameters.

    sgd:    d = g + wd * p;  buf = momentum * buf + d;  d = d + momentum * buf (nesterov) or buf;  p -= lr * d
    adam:   g = g + wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
            p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    adamw:  p *= 1 - lr * wd, then the Adam step without the L2 term.
    """

    def __init__(self, name: str, params: torch.Tensor, hyper: Hyper):
        if name not in ("sgd", "adam", "adamw"):
            raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam, adamw")
        self.name, self.h = name, hyper
        zeros = torch.zeros_like(params)
        if name == "sgd":
            # torch initialises the momentum buffer with the first gradient; with buf = 0 the
            # recurrence buf = m*buf + d gives exactly that, so no first-step special case.
            self.buf = zeros
        else:
            self.m, self.v = zeros, zeros.clone()
        self.t = 0

    def step(self, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Return the updated parameters; lr is [runs, 1]. Does not modify p in place."""
        h = self.h
        self.t += 1
        if self.name == "sgd":
            d = g + h.weight_decay * p
            self.buf = h.momentum * self.buf + d
            d = torch.where(h.nesterov, d + h.momentum * self.buf, self.buf)
            return p - lr * d
        if self.name == "adamw":
            p = p * (1 - lr * h.weight_decay)
        else:
            g = g + h.weight_decay * p
        # lerp, not b1*m + (1-b1)*g: it is what torch.optim.Adam computes, so trajectories match bit for bit
        self.m = torch.lerp(self.m, g, 1 - h.beta1)
        self.v = h.beta2 * self.v + (1 - h.beta2) * g * g
        bias1 = 1 - h.beta1 ** self.t
        bias2 = 1 - h.beta2 ** self.t
        denom = self.v.sqrt() / bias2.sqrt() + h.eps
        return p - (lr / bias1) * self.m / denom

    def keep(self, active: torch.Tensor, old_state: dict) -> None:
        """Restore the state of runs that are no longer active (diverged): active is [runs, 1] bool."""
        for name, old in old_state.items():
            setattr(self, name, torch.where(active, getattr(self, name), old))

    def state(self) -> dict:
        return {"buf": self.buf} if self.name == "sgd" else {"m": self.m, "v": self.v}


def clip_by_norm(g: torch.Tensor, max_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-run global-norm clipping as torch.nn.utils.clip_grad_norm_: g * min(1, max / (norm + 1e-6)).

    g is [runs, P], max_norm [runs, 1] (0 = off). Returns (clipped g, pre-clip norm [runs]).
    """
    norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))
    return g * coef, norm.squeeze(1)
