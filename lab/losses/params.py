"""Each loss's parameters: defaults, allowed ranges, and the check every entry point runs (the modules'
constructors, lab.config, lab.losses.build). Keyed by canonical loss name; aliases are resolved by
lab.losses.registry."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ParamSpec:
    """A loss parameter: its default, the allowed range in words, and an elementwise check on a tensor."""

    default: Any
    allowed: str
    ok: Callable[[Tensor], Tensor]
    many: bool = False  # a list of values is accepted (the quantile loss's k levels)



def _positive(default: float) -> ParamSpec:
    # finite: a residual scale of inf makes the formulas inf / inf = NaN (its limit is a different loss)
    return ParamSpec(default, "> 0 and finite", lambda v: (v > 0) & (v < math.inf))


def _level(default: float, many: bool = False) -> ParamSpec:
    return ParamSpec(default, "in (0, 1)", lambda v: (v > 0) & (v < 1), many)


PARAMS: dict[str, dict[str, ParamSpec]] = {
    "mse": {}, "mae": {}, "rmse": {},
    "huber": {"delta": _positive(1.0)},
    "smooth_l1": {"beta": ParamSpec(1.0, ">= 0 and finite", lambda v: (v >= 0) & (v < math.inf))},
    "log_cosh": {},
    "quantile": {"tau": _level(0.5, many=True)},
    "expectile": {"tau": _level(0.5)},
    "pseudo_huber": {"delta": _positive(1.0)},
    "cauchy": {"scale": _positive(1.0)},
    "tukey": {"c": _positive(4.685)},
    "general": {"alpha": ParamSpec(1.0, "real or -inf", lambda v: v < math.inf), "scale": _positive(1.0)},
}


def _check_value(loss: str, pname: str, p: ParamSpec, value):
    """One parameter value as a float (or tuple of floats, or the tensor itself), checked elementwise.
    Checking a tensor syncs with its device: this runs once at setup, not in the training loop."""
    many = p.many and isinstance(value, (list, tuple))
    if isinstance(value, Tensor):
        t = value.detach().double()
    else:
        try:
            if isinstance(value, bool) or (many and any(isinstance(v, bool) for v in value)):
                raise TypeError
            t = torch.tensor([float(v) for v in value] if many else float(value), dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{loss}: {pname} must be a number{' or a list of numbers' if p.many else ''}, "
                             f"got {value!r}") from None
    if many and t.numel() == 0:
        raise ValueError(f"{loss}: {pname} must be a non-empty list, got {value!r}")
    bad = ~p.ok(t)
    if bad.any():
        shown = t.item() if t.dim() == 0 and not isinstance(value, Tensor) else t[bad].tolist()
        raise ValueError(f"{loss}: {pname} must be {p.allowed}, got {shown}")
    if isinstance(value, Tensor):
        return value
    return tuple(t.tolist()) if many else t.item()


def check(loss: str, params: dict) -> dict:
    """Fill in defaults and validate the parameters of the loss with canonical name `loss`; returns
    {parameter: float, tuple of floats, or the given tensor}.

    An unknown parameter or an out-of-range value raises ValueError naming the loss, the parameter, the
    value and the allowed range, e.g. "huber: delta must be > 0 and finite, got -1.0". Tensors are checked elementwise.
    """
    specs = PARAMS[loss]
    unknown = sorted(set(params) - set(specs))
    if unknown:
        allowed = ", ".join(specs) or "none"
        raise ValueError(f"{loss}: unknown parameter {unknown[0]!r} (given {params[unknown[0]]!r}); "
                         f"parameters: {allowed}")
    return {k: _check_value(loss, k, p, params.get(k, p.default)) for k, p in specs.items()}
