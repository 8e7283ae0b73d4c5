"""Every loss by name: its formula, psi, module, parameters and aliases, for the config, the trainer and
`lab losses`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lab.losses import functional as F
from lab.losses import modules as M
from lab.losses.params import PARAMS, ParamSpec, check


@dataclass(frozen=True)
class LossSpec:
    name: str  # canonical registry name
    module: type[nn.Module]
    fn: Callable  # fn(input, target, **params) -> per-element values
    psi: Callable | None  # psi(input, target, **params) -> d fn / d input per element
    params: dict[str, ParamSpec]
    formula: str  # one line, for `lab losses`
    aliases: tuple[str, ...] = ()
    root: bool = False  # True for rmse: the reduced value is sqrt(mean of fn)


_SPECS = (
    LossSpec("mse", M.MSELoss, F.mse, F.mse_psi, PARAMS["mse"], "e^2", ("l2",)),
    LossSpec("mae", M.MAELoss, F.mae, F.mae_psi, PARAMS["mae"], "|e|  (subgradient 0 at e = 0)", ("l1",)),
    LossSpec("rmse", M.RMSELoss, F.rmse, F.rmse_psi, PARAMS["rmse"],
             "sqrt(mean e^2)  (elementwise e^2, root after reduction)", root=True),
    LossSpec("huber", M.HuberLoss, F.huber, F.huber_psi, PARAMS["huber"],
             "0.5 e^2 if |e| <= delta else delta (|e| - delta/2)"),
    LossSpec("smooth_l1", M.SmoothL1Loss, F.smooth_l1, F.smooth_l1_psi, PARAMS["smooth_l1"],
             "0.5 e^2 / beta if |e| < beta else |e| - beta/2  (beta = 0: |e|)"),
    LossSpec("log_cosh", M.LogCoshLoss, F.log_cosh, F.log_cosh_psi, PARAMS["log_cosh"], "log(cosh(e))"),
    LossSpec("quantile", M.QuantileLoss, F.quantile, F.quantile_psi, PARAMS["quantile"],
             "max(tau u, (tau - 1) u), u = target - input  (tau = 0.5: MAE / 2; tau may be a list)",
             ("pinball",)),
    LossSpec("expectile", M.ExpectileLoss, F.expectile, F.expectile_psi, PARAMS["expectile"],
             "|tau - 1[u < 0]| u^2, u = target - input  (tau = 0.5: MSE / 2)"),
    LossSpec("pseudo_huber", M.PseudoHuberLoss, F.pseudo_huber, F.pseudo_huber_psi, PARAMS["pseudo_huber"],
             "delta^2 (sqrt(1 + (e/delta)^2) - 1)"),
    LossSpec("cauchy", M.CauchyLoss, F.cauchy, F.cauchy_psi, PARAMS["cauchy"],
             "(scale^2 / 2) log(1 + (e/scale)^2)"),
    LossSpec("tukey", M.TukeyLoss, F.tukey, F.tukey_psi, PARAMS["tukey"],
             "c^2/6 (1 - (1 - (e/c)^2)^3) if |e| <= c else c^2/6"),
    LossSpec("general", M.GeneralRobustLoss, F.general, F.general_psi, PARAMS["general"],
             "|a-2|/a (((e/c)^2/|a-2| + 1)^(a/2) - 1), a = alpha, c = scale  (Barron 2019)"),
)
_REGISTRY = {s.name: s for s in _SPECS}
_ALIASES = {alias: s.name for s in _SPECS for alias in s.aliases}


def available() -> list[str]:
    """Canonical loss names, in table order."""
    return [s.name for s in _SPECS]


def spec(name: str) -> LossSpec:
    """The LossSpec for a canonical name or an alias; unknown names raise ValueError listing the choices."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available())} "
                         f"(aliases: {', '.join(f'{a}={n}' for a, n in _ALIASES.items())})")
    return _REGISTRY[key]


def check_params(name: str, params: dict) -> dict:
    """Fill in defaults and validate the parameters of loss `name` (or an alias): lab.losses.params.check."""
    return check(spec(name).name, params)


def build(name: str, reduction: str = "mean", **params) -> nn.Module:
    """The loss module for ``name`` (or an alias) with validated parameters.

    ``general`` also takes its module options learnable, alpha_lo, alpha_hi, scale_lo.
    """
    s = spec(name)
    options = {k: params.pop(k) for k in ("learnable", "alpha_lo", "alpha_hi", "scale_lo")
               if s.module is M.GeneralRobustLoss and k in params}
    return s.module(**check_params(s.name, params), reduction=reduction, **options)


def describe() -> str:
    """A text table of every loss: name, aliases, formula, parameters with defaults and ranges."""
    rows = [("name", "aliases", "parameters", "per-element formula")]
    for s in _SPECS:
        ps = "; ".join(f"{k}={p.default} ({p.allowed}{', or a list' if p.many else ''})" for k, p in s.params.items())
        rows.append((s.name, ",".join(s.aliases) or "-", ps or "-", s.formula))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [
        "",
        "e = input - target; u = target - input. Reductions: mean | sum | none; weighted mean = sum(w l) / sum(w).",
        "rmse reduces to sqrt(mean e^2) ('sum': sqrt(sum e^2)).",
        "general also takes learnable=True (alpha in (alpha_lo, alpha_hi), scale > scale_lo).",
    ]
    return "\n".join(lines + notes)
