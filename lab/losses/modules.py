"""The losses as ``torch.nn.Module``s: each holds its hyperparameters and ``reduction``, validates its
inputs (shape mismatch -> ValueError, non-floating dtype -> TypeError, bad parameter -> ValueError), and
computes half precision in float32; its ``forward`` is one call of its formula (lab.losses.functional)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lab.losses.functional import (
    _HALF,
    REDUCTIONS,
    cauchy,
    expectile,
    general,
    huber,
    log_cosh,
    mae,
    mse,
    pseudo_huber,
    quantile,
    reduce_loss,
    rmse,
    smooth_l1,
    tukey,
)
from lab.losses.params import PARAMS, check


def _check_dtypes(name: str, input: Tensor, target: Tensor) -> None:
    for what, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {what} must have a floating dtype, got {t.dtype}")


class _Loss(nn.Module):
    """Holds hyperparameters and ``reduction``; validates inputs; computes half precision in float32."""

    name: str = ""
    root = False

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def _check_shapes(self, input: Tensor, target: Tensor, weight: Tensor | None) -> Tensor | None:
        # PyTorch's own losses only warn and broadcast [n] against [n, 1] into [n, n].
        if input.shape != target.shape:
            raise ValueError(
                f"{self.name}: input shape {tuple(input.shape)} != target shape {tuple(target.shape)}"
            )
        return weight

    def _loss(self, fn: Callable, input: Tensor, target: Tensor, weight: Tensor | None, **params) -> Tensor:
        _check_dtypes(self.name, input, target)
        if weight is not None and (not isinstance(weight, Tensor) or weight.is_complex()):
            raise TypeError(f"{self.name}: weight must be a real tensor, got "
                            f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__}")
        weight = self._check_shapes(input, target, weight)
        for pname, value in params.items():  # a tensor parameter may not enlarge the loss, as a weight may not
            if isinstance(value, Tensor):
                try:
                    ok = torch.broadcast_shapes(value.shape, input.shape) == input.shape
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(f"{self.name}: {pname} of shape {tuple(value.shape)} does not broadcast to "
                                     f"input shape {tuple(input.shape)} without enlarging it")
        # float32 for half inputs also for the reduction: a float16 sum overflows at 65504.
        x = input.float() if input.dtype in _HALF else input
        loss = reduce_loss(fn(x, target.to(x.dtype), **params), weight, self.reduction, self.root)
        return loss.to(input.dtype)

    def extra_repr(self) -> str:
        params = [f"{k}={getattr(self, k)!r}" for k in PARAMS[self.name]]
        return ", ".join([*params, f"reduction={self.reduction!r}"])


class MSELoss(_Loss):
    name = "mse"

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(mse, input, target, weight)


class MAELoss(_Loss):
    name = "mae"

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(mae, input, target, weight)


class RMSELoss(_Loss):
    """sqrt of the reduced squared error: 'mean' -> sqrt(mean e^2), 'sum' -> sqrt(sum e^2) (the L2 norm),
    'none' -> e^2 unrooted. At zero error the value is 0 with gradient 0 (see ``safe_sqrt``)."""

    name = "rmse"
    root = True

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(rmse, input, target, weight)


class HuberLoss(_Loss):
    name = "huber"

    def __init__(self, delta: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.delta = check(self.name, {"delta": delta})["delta"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(huber, input, target, weight, delta=self.delta)


class SmoothL1Loss(_Loss):
    name = "smooth_l1"

    def __init__(self, beta: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.beta = check(self.name, {"beta": beta})["beta"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(smooth_l1, input, target, weight, beta=self.beta)


class LogCoshLoss(_Loss):
    name = "log_cosh"

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(log_cosh, input, target, weight)


class QuantileLoss(_Loss):
    """One level tau (input and target of equal shape) or k levels (input [..., k], target [...] or
    [..., 1]; a weight shaped like [...] is applied per sample). k levels live in a float64 buffer, so
    they follow ``.to(device)`` without a copy per call."""

    name = "quantile"

    def __init__(self, tau: float | list[float] = 0.5, reduction: str = "mean"):
        super().__init__(reduction)
        tau = check(self.name, {"tau": tau})["tau"]
        if isinstance(tau, Tensor) and tau.dim() > 1:
            raise ValueError(f"{self.name}: tau must be a float, a list of levels or a 1-D tensor of levels; "
                             f"got a tensor of shape {tuple(tau.shape)}")
        if isinstance(tau, Tensor):  # a module holds floats: a tensor would not follow .to(device)
            tau = tuple(tau.tolist()) if tau.dim() > 0 else tau.item()
        self.k = len(tau) if isinstance(tau, tuple) else None
        if self.k is None:
            self.tau = tau
        else:
            self.register_buffer("tau", torch.tensor(tau, dtype=torch.float64), persistent=False)

    def _check_shapes(self, input: Tensor, target: Tensor, weight: Tensor | None) -> Tensor | None:
        if self.k is None:
            return super()._check_shapes(input, target, weight)
        batch = input.shape[:-1]
        if input.dim() == 0 or input.shape[-1] != self.k or target.shape not in (batch, (*batch, 1)):
            raise ValueError(
                f"{self.name}: with {self.k} levels input must be [..., {self.k}] and target [...] or "
                f"[..., 1]; got input {tuple(input.shape)}, target {tuple(target.shape)}"
            )
        return weight.unsqueeze(-1) if weight is not None and weight.shape == batch else weight

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(quantile, input, target, weight, tau=self.tau)


class ExpectileLoss(_Loss):
    name = "expectile"

    def __init__(self, tau: float = 0.5, reduction: str = "mean"):
        super().__init__(reduction)
        self.tau = check(self.name, {"tau": tau})["tau"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(expectile, input, target, weight, tau=self.tau)


class PseudoHuberLoss(_Loss):
    name = "pseudo_huber"

    def __init__(self, delta: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.delta = check(self.name, {"delta": delta})["delta"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(pseudo_huber, input, target, weight, delta=self.delta)


class CauchyLoss(_Loss):
    name = "cauchy"

    def __init__(self, scale: float = 1.0, reduction: str = "mean"):
        super().__init__(reduction)
        self.scale = check(self.name, {"scale": scale})["scale"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(cauchy, input, target, weight, scale=self.scale)


class TukeyLoss(_Loss):
    name = "tukey"

    def __init__(self, c: float = 4.685, reduction: str = "mean"):
        super().__init__(reduction)
        self.c = check(self.name, {"c": c})["c"]

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(tukey, input, target, weight, c=self.c)


class GeneralRobustLoss(_Loss):
    """Barron's general loss with fixed floats, or with ``learnable=True`` scalar alpha and scale fitted
    by the optimiser, as in Barron's AdaptiveLossFunction:
    ``alpha = alpha_lo + (alpha_hi - alpha_lo) sigmoid(alpha_latent)``, ``scale = scale_lo +
    softplus(scale_latent)``; the latents are the nn.Parameters, initialised so that alpha and scale
    start at the given values (which must lie strictly inside the bounds)."""

    name = "general"

    def __init__(
        self,
        alpha: float = 1.0,
        scale: float = 1.0,
        reduction: str = "mean",
        learnable: bool = False,
        alpha_lo: float = 0.001,
        alpha_hi: float = 1.999,
        scale_lo: float = 1e-5,
    ):
        super().__init__(reduction)
        p = check(self.name, {"alpha": alpha, "scale": scale})
        if not isinstance(learnable, bool):  # bool("no") is True
            raise TypeError(f"general: learnable must be True or False, got {learnable!r}")
        self.learnable = learnable
        if not self.learnable:
            self._alpha, self._scale = p["alpha"], p["scale"]
            return
        alpha, scale = float(p["alpha"]), float(p["scale"])
        for bname, bound in (("alpha_lo", alpha_lo), ("alpha_hi", alpha_hi), ("scale_lo", scale_lo)):
            if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
                raise TypeError(f"general: {bname} must be a number, got {bound!r}")
        if not (-math.inf < alpha_lo < alpha < alpha_hi < math.inf):
            raise ValueError(f"general: learnable alpha needs alpha_lo < alpha < alpha_hi, all finite; "
                             f"got alpha_lo={alpha_lo}, alpha={alpha}, alpha_hi={alpha_hi}")
        if not (0 < scale_lo < scale):
            raise ValueError(f"general: learnable scale needs 0 < scale_lo < scale; got scale_lo={scale_lo}, "
                             f"scale={scale}")
        self.alpha_lo, self.alpha_hi, self.scale_lo = float(alpha_lo), float(alpha_hi), float(scale_lo)
        q, v = (alpha - alpha_lo) / (alpha_hi - alpha_lo), scale - scale_lo
        self.alpha_latent = nn.Parameter(torch.tensor(math.log(q / (1 - q))))  # inverse sigmoid
        self.scale_latent = nn.Parameter(torch.tensor(v + math.log(-math.expm1(-v))))  # inverse softplus

    @property
    def alpha(self):
        if not self.learnable:
            return self._alpha
        return self.alpha_lo + (self.alpha_hi - self.alpha_lo) * torch.sigmoid(self.alpha_latent)

    @property
    def scale(self):
        if not self.learnable:
            return self._scale
        return self.scale_lo + nn.functional.softplus(self.scale_latent)

    def forward(self, input: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        return self._loss(general, input, target, weight, alpha=self.alpha, scale=self.scale)

