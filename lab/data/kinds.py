"""Dataset kinds and their parameters: each parameter knows its default and its allowed values, so a bad
value names itself; `check` and `defaults` answer for a kind, `_resolve` fills in a run's parameters."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------------
# Parameters: each knows its default and its allowed values, so a bad value names itself.


@dataclass(frozen=True)
class Param:
    """One generator parameter.

    ``check`` returns the normalised value (e.g. a TOML list -> tuple, an int -> float), or None when the
    value is not allowed; ``allowed`` says in words what is (it goes into the ValueError).
    """

    default: object
    allowed: str
    check: Callable[[object], object]


def _real(value) -> float | None:
    """``value`` as a finite float, or None for bools, strings, NaN and inf."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _number(default: float, lo: float = -math.inf, hi: float = math.inf, *, lo_open=False, hi_open=False):
    def check(value):
        v = _real(value)
        if v is None or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            return None
        return v

    if math.isinf(lo) and math.isinf(hi):
        allowed = "a finite number"
    elif math.isinf(hi):
        allowed = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Param(default, allowed, check)


def _integer(default: int, lo: int, hi: int | None = None):
    def check(value):
        if isinstance(value, bool | np.bool_):
            return None
        if isinstance(value, float | np.floating):  # n = 1e6 written as a float is still a count
            value = int(value) if math.isfinite(value) and float(value).is_integer() else None
        if not isinstance(value, int | np.integer) or value < lo or (hi is not None and value >= hi):
            return None
        return int(value)

    return Param(default, f"an integer >= {lo}" + (f" and < {hi}" if hi is not None else ""), check)


def _choice(default: str, *options: str):
    return Param(default, "one of " + ", ".join(map(repr, options)), lambda v: v if v in options else None)


def _flag(default: bool):
    return Param(default, "true or false", lambda v: bool(v) if isinstance(v, bool | np.bool_) else None)


def _interval(default: tuple[float, float]):
    def check(value):
        if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2:
            return None
        lo, hi = _real(value[0]), _real(value[1])
        return (lo, hi) if lo is not None and hi is not None and lo < hi else None

    return Param(default, "two finite numbers [lo, hi] with lo < hi", check)


_COMMON = {
    "n": _integer(200, 2, 2**31 - 1),  # (a tensor's size; memory ends far sooner, lab.sweeps.check_fits)
    "n_val": _integer(200, 1, 2**31 - 1),
    "seed": _integer(0, 0, 2**62),  # 2 * seed + 1 must still fit a generator seed
    "slope": _number(2.0),
    "intercept": _number(1.0),
    "noise": _number(0.5, 0.0),
    "x_range": _interval((-2.0, 2.0)),
    "target_scale": _number(1.0, 0.0, lo_open=True),
}
# Parameters of each noise form (the noise of the kind with the same meaning); `nonlinear` takes them all.
_NOISE_PARAMS = {
    "gaussian": {},
    "student_t": {"df": _number(2.0, 0.0, lo_open=True)},
    "skewed": {"skew": _number(1.0, 0.0, lo_open=True)},
    "heteroscedastic": {"noise_slope": _number(0.5, 0.0)},
    "outliers": {
        "outlier_fraction": _number(0.1, 0.0, 1.0, hi_open=True),
        "outlier_scale": _number(10.0, 0.0, lo_open=True),
        "outlier_sign": _choice("both", "both", "positive"),
        "leverage": _flag(False),
    },
}
_SAMPLE_KEYS = ("n", "n_val", "seed")  # shape the sample, not the process: the truth ignores them


@dataclass(frozen=True)
class Kind:
    """A registry entry: the signal form, the noise form (None: chosen by ``noise_kind``), all parameters."""

    summary: str
    signal: str
    noise: str | None
    params: dict[str, Param]


def _kind(summary, signal, noise, **extra) -> Kind:
    return Kind(summary, signal, noise, {**_COMMON, **(_NOISE_PARAMS[noise] if noise else {}), **extra})


_NONLINEAR_EXTRA = {"noise_kind": _choice("gaussian", "gaussian", "student_t", "skewed", "outliers")}
for _form in ("student_t", "skewed", "outliers"):
    _NONLINEAR_EXTRA.update(_NOISE_PARAMS[_form])

KINDS: dict[str, Kind] = {
    "clean": _kind("y = slope*x + intercept + noise*N(0,1)", "linear", "gaussian"),
    "outliers": _kind(
        "clean data with exactly round(outlier_fraction*n) points moved by +-outlier_scale",
        "linear",
        "outliers",
    ),
    "heavy_tailed": _kind("Student-t noise: noise*t_df (df=1 is Cauchy)", "linear", "student_t"),
    "skewed": _kind("right-skewed noise noise*skew*(Exp(1)-1): mean != median", "linear", "skewed"),
    "heteroscedastic": _kind(
        "noise sd grows with x: noise + noise_slope*(x - x_lo)", "linear", "heteroscedastic"
    ),
    "nonlinear": _kind(
        "y = intercept + slope*sin(2x) + noise of noise_kind", "sine", None, **_NONLINEAR_EXTRA
    ),
}


def available() -> list[str]:
    """Names of the dataset kinds, in registry order."""
    return list(KINDS)


def defaults(kind: str) -> dict:
    """Every parameter ``kind`` takes (including n, n_val and seed) with its default.

    ``make(kind, **defaults(kind))`` builds the default dataset.
    """
    return {name: p.default for name, p in _spec(kind).params.items()}


def check(kind: str, **params) -> dict:
    """Validate parameters for ``kind`` without drawing anything (the config layer's check).

    Returns every parameter resolved, defaults filled in; raises the same ValueError as :func:`make`.
    """
    return _resolve(kind, params)


def _spec(kind: str) -> Kind:
    if kind not in KINDS:
        hint = difflib.get_close_matches(str(kind), KINDS, n=1)
        raise ValueError(
            f"unknown dataset kind {kind!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; available kinds: {', '.join(KINDS)}"
        )
    return KINDS[kind]


def _resolve(kind: str, given: dict) -> dict:
    """Validate ``given`` against the kind's parameters and fill in defaults."""
    spec = _spec(kind)
    for name in given:
        if name not in spec.params:
            hint = difflib.get_close_matches(name, spec.params, n=1)
            raise ValueError(
                f"unknown parameter {name!r} for dataset kind {kind!r}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; it takes: {', '.join(spec.params)}"
            )
    resolved = {}
    for name, param in spec.params.items():
        value = given.get(name, param.default)
        checked = param.check(value)
        if checked is None:
            raise ValueError(
                f"{name}={value!r} is not allowed for dataset kind {kind!r}: expected {param.allowed}"
            )
        resolved[name] = checked
    if spec.noise is None:
        # A non-default value that the chosen noise ignores is almost surely a config mistake.
        used = _NOISE_PARAMS[resolved["noise_kind"]]
        for name, value in given.items():
            ignored = name in _NONLINEAR_EXTRA and name != "noise_kind" and name not in used
            if ignored and resolved[name] != spec.params[name].default:
                raise ValueError(
                    f"{name}={value!r} has no effect with noise_kind={resolved['noise_kind']!r}; "
                    f"that noise takes: {', '.join(used) or 'only the common parameters'}"
                )
    return resolved


def _noise_form(kind: str, params: dict) -> str:
    return KINDS[kind].noise or params["noise_kind"]
