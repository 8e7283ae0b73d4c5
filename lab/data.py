"""Synthetic regression datasets that carry their own truth.

Every kind draws

    x ~ U(x_lo, x_hi),    y = target_scale * (f(x) + eps),

with f the noise-free signal (``slope * x + intercept``, or ``intercept + slope * sin(2x)`` for
``nonlinear``) and eps the kind's noise. Because the process is known, each :class:`Dataset` holds a
:class:`Truth` that answers in closed form what a loss should converge to: the conditional mean (MSE),
median (MAE) and tau-quantile (pinball loss). ``target_scale`` multiplies y *and* the truth: the
guide's "house prices in thousands" pitfall, where MSE values grow by target_scale**2.

Determinism: everything is drawn in float64 from one seeded CPU ``torch.Generator`` and only then cast
and moved, so a (kind, params, seed) triple gives bitwise-identical tensors on every device. The
training set uses the generator seeded ``2 * seed`` and the validation set ``2 * seed + 1``: the two
streams never overlap for different seeds, and the validation draw does not change when n changes.
Within a set the draw order is: x, then the noise, then (outliers only) which points to displace and
their signs.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.special
import torch
from torch import Tensor

from lab.atomic import write_atomic

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


# ---------------------------------------------------------------------------------------------------
# The process, in float64: signal, noise draws, noise quantiles.


def _signal(kind: str, params: dict, x: Tensor) -> Tensor:
    """f(x) before target_scale: slope*x + intercept, or intercept + slope*sin(2x) for ``nonlinear``."""
    if KINDS[kind].signal == "linear":
        return params["slope"] * x + params["intercept"]
    return params["intercept"] + params["slope"] * torch.sin(2.0 * x)


def _noise_sd(params: dict, x: Tensor) -> Tensor:
    """Heteroscedastic sd(x) = noise + noise_slope*(x - x_lo), clamped at 0 left of the range."""
    return (params["noise"] + params["noise_slope"] * (x - params["x_range"][0])).clamp(min=0.0)


def _draw(kind: str, params: dict, n: int, generator: torch.Generator, contaminate: bool):
    """One set of n points in float64 on the CPU: x [n], y [n], outlier mask [n]."""
    f64 = {"generator": generator, "dtype": torch.float64}
    lo, hi = params["x_range"]
    sigma = params["noise"]
    x = lo + (hi - lo) * torch.rand(n, **f64)
    form = _noise_form(kind, params)
    if form == "student_t":
        # Inverse CDF keeps the draw on the one generator (torch's gamma sampler takes none).
        # u = 0 would map to -inf: nudge it to the smallest positive half-step.
        u = torch.rand(n, **f64).clamp_(min=2.0**-54)
        eps = sigma * torch.from_numpy(scipy.special.stdtrit(params["df"], u.numpy()))
    elif form == "skewed":
        exponential = torch.empty(n, dtype=torch.float64).exponential_(generator=generator)
        eps = sigma * params["skew"] * (exponential - 1)
    elif form == "heteroscedastic":
        eps = _noise_sd(params, x) * torch.randn(n, **f64)
    else:  # gaussian, and the inliers of outliers
        eps = sigma * torch.randn(n, **f64)
    outlier = torch.zeros(n, dtype=torch.bool)
    if form == "outliers" and contaminate:
        count = round(params["outlier_fraction"] * n)  # exact count; Python's round: half to even
        index = torch.randperm(n, generator=generator)[:count]
        sign = torch.where(torch.rand(count, **f64) < 0.5, -1.0, 1.0)
        if params["outlier_sign"] == "positive":
            sign = torch.ones_like(sign)
        outlier[index] = True
        eps[index] += params["outlier_scale"] * sign
        if params["leverage"]:
            x[index] = hi + (hi - lo)  # one range width beyond the right end: far from every inlier
    y = params["target_scale"] * (_signal(kind, params, x) + eps)
    return x, y, outlier


def _normal_cdf(t: Tensor, sigma: float) -> Tensor:
    return torch.special.ndtr(t / sigma) if sigma > 0 else (t >= 0).to(t.dtype)


def _outlier_mixture_quantile(params: dict, tau: Tensor) -> Tensor:
    """tau-quantile of eps = sigma*Z + D, with D = 0 w.p. 1-p and +-outlier_scale w.p. p.

    F(t) = (1-p) Phi(t/sigma) + p * mean_s Phi((t - s)/sigma) over the displacements s; there is no closed
    form for its inverse, so we bisect: 200 halvings of the bracket reach float64 resolution.
    """
    sigma, p, a = params["noise"], params["outlier_fraction"], params["outlier_scale"]
    shifts = (a,) if params["outlier_sign"] == "positive" else (a, -a)

    def cdf(t):
        displaced = sum(_normal_cdf(t - s, sigma) for s in shifts) / len(shifts)
        return (1 - p) * _normal_cdf(t, sigma) + p * displaced

    reach = a + 40 * sigma + 1  # Phi(-40) underflows to 0, so F(-reach) = 0 < tau <= 1 = F(reach)
    lo, hi = torch.full_like(tau, -reach), torch.full_like(tau, reach)
    for _ in range(200):
        mid = (lo + hi) / 2
        below = cdf(mid) < tau
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi  # the smallest t with F(t) >= tau, to float64 resolution


def _noise_quantile(form: str, params: dict, x: Tensor, tau: Tensor) -> Tensor:
    """tau-quantile of eps given x (float64; x already shaped to broadcast against tau)."""
    sigma = params["noise"]
    if form == "student_t":
        # scipy's t quantile runs on the CPU; tau is a handful of numbers, so the round trip is cheap.
        quantile = np.asarray(scipy.special.stdtrit(params["df"], tau.cpu().numpy()))  # 0-d in -> scalar out
        return sigma * torch.from_numpy(quantile).to(tau.device)
    if form == "skewed":  # Exp(1) quantile is -log(1 - tau)
        return sigma * params["skew"] * (-torch.log1p(-tau) - 1)
    if form == "heteroscedastic":
        return _noise_sd(params, x) * torch.special.ndtri(tau)
    if form == "outliers" and not params["leverage"]:
        return _outlier_mixture_quantile(params, tau)
    return sigma * torch.special.ndtri(tau)  # gaussian, and the inliers of leverage outliers


def _noise_mean(form: str, params: dict) -> float:
    if form == "student_t" and params["df"] <= 1:
        raise NotImplementedError(
            f"the conditional mean does not exist for Student-t noise with df={params['df']:g} "
            "(it needs df > 1); "
            "use median() or quantile()"
        )
    if form == "skewed":
        return 0.0  # Exp(1) - 1 is centred: the skew shows in the median, not the mean
    if form == "outliers" and not params["leverage"] and params["outlier_sign"] == "positive":
        return params["outlier_fraction"] * params["outlier_scale"]
    return 0.0


# ---------------------------------------------------------------------------------------------------
# Truth and Dataset.


@dataclass
class Truth:
    """What the data-generating process says, in closed form where one exists.

    Every function takes x of shape [..., 1] (a trailing feature axis of size 1, the layout of
    ``Dataset.x`` and of a model's input) and returns shape [...] (the layout of ``Dataset.y``), on x's
    device and dtype; values are computed in float64 and then cast. ``quantile`` appends tau's shape, so
    k taus give [..., k], the layout of a k-output model's prediction.

    For ``outliers`` the mean, median and quantile are those of the contaminated process
    y | x ~ target_scale * (f(x) + sigma*Z + D), with P(D != 0) = outlier_fraction (the sample realises
    round(outlier_fraction*n)/n, within 1/(2n)). With ``leverage=True`` the outliers all sit at
    x_far = x_hi + (x_hi - x_lo), outside the range the inliers live in, so there the functions describe
    the inliers: exact for x inside x_range.
    ``params`` holds the process parameters (n, n_val and seed are accepted and dropped).
    """

    kind: str
    params: dict

    def __post_init__(self):
        process = {k: v for k, v in self.params.items() if k not in _SAMPLE_KEYS}
        resolved = _resolve(self.kind, process)
        self.params = {k: v for k, v in resolved.items() if k not in _SAMPLE_KEYS}

    @property
    def slope(self) -> float | None:
        """target_scale * slope where the signal is linear, else None."""
        if KINDS[self.kind].signal != "linear":
            return None
        return self.params["target_scale"] * self.params["slope"]

    @property
    def intercept(self) -> float | None:
        """target_scale * intercept where the signal is linear, else None."""
        if KINDS[self.kind].signal != "linear":
            return None
        return self.params["target_scale"] * self.params["intercept"]

    def _x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"{type(x).__name__} {getattr(x, 'dtype', '')}"
            raise TypeError(f"x must be a floating-point tensor; got {got}")
        if x.ndim == 0 or x.shape[-1] != 1:
            raise ValueError(
                f"x must have shape [..., 1] (a trailing feature axis, like Dataset.x); got {list(x.shape)}"
            )
        return x[..., 0].to(torch.float64)

    def signal(self, x: Tensor) -> Tensor:
        """Noise-free target_scale * f(x): the truth line; the conditional mean where the noise is centred."""
        x64 = self._x(x)
        return (self.params["target_scale"] * _signal(self.kind, self.params, x64)).to(x.dtype)

    def mean(self, x: Tensor) -> Tensor:
        """E[y | x] = target_scale * (f(x) + E[eps]): what MSE converges to.

        Raises NotImplementedError for Student-t noise with df <= 1, whose mean does not exist.
        """
        x64 = self._x(x)
        shift = _noise_mean(_noise_form(self.kind, self.params), self.params)
        return (self.params["target_scale"] * (_signal(self.kind, self.params, x64) + shift)).to(x.dtype)

    def median(self, x: Tensor) -> Tensor:
        """Conditional median of y given x: what MAE converges to. Equals ``quantile(x, 0.5)``."""
        return self.quantile(x, 0.5)

    def quantile(self, x: Tensor, tau) -> Tensor:
        """Conditional tau-quantile q with P(y <= q | x) = tau: what the pinball loss converges to.

        tau: a float or a tensor of values in (0, 1); the result has shape x.shape[:-1] + tau.shape.
        Gaussian: f + sigma*Phi^-1(tau); Student-t: f + sigma*t_df^-1(tau); skewed:
        f + sigma*skew*(-log(1-tau) - 1); heteroscedastic: f + sd(x)*Phi^-1(tau); outliers: bisection on
        the mixture CDF. All times target_scale.
        """
        x64 = self._x(x)
        tau64 = torch.as_tensor(tau, dtype=torch.float64, device=x.device)
        if not bool(((tau64 > 0) & (tau64 < 1)).all()):  # host sync on CUDA: tau is tiny and needed anyway
            raise ValueError(f"tau must lie in (0, 1); got {tau}")
        x64 = x64.reshape(*x64.shape, *([1] * tau64.ndim))
        eps = _noise_quantile(_noise_form(self.kind, self.params), self.params, x64, tau64)
        return (self.params["target_scale"] * (_signal(self.kind, self.params, x64) + eps)).to(x.dtype)


@dataclass(eq=False)
class Dataset:
    """A training and a validation set drawn from one process, plus that process's :class:`Truth`.

    x [n, 1], y [n], x_val [n_val, 1], y_val [n_val]; ``outlier`` [n] marks the displaced training points
    (all False for kinds without outliers; the validation set is never contaminated). ``params`` holds
    every resolved parameter except ``seed``, which has its own field:
    ``make(ds.kind, seed=ds.seed, **ds.params)`` rebuilds the same data.
    """

    kind: str
    params: dict
    seed: int
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    outlier: Tensor
    truth: Truth

    @property
    def n(self) -> int:
        return self.y.shape[0]

    def to(self, device=None, dtype=None) -> Dataset:
        """A copy with the float tensors moved/cast; ``outlier`` stays bool."""
        move = {"device": device, "dtype": dtype}
        return dataclasses.replace(
            self,
            x=self.x.to(**move),
            y=self.y.to(**move),
            x_val=self.x_val.to(**move),
            y_val=self.y_val.to(**move),
            outlier=self.outlier.to(device=device),
        )

    def save(self, path) -> None:
        """Write an .npz at exactly ``path``: x_train, y_train, x_val, y_val, outlier, kind, seed and params
        (a JSON string), enough for :func:`load` to rebuild the truth."""
        arrays = {"x_train": self.x, "y_train": self.y, "x_val": self.x_val, "y_val": self.y_val}
        # numpy has no bfloat16: its values are stored as float32 (exactly) and `dtype` names the original
        wide = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in arrays.items()}
        arrays = {**wide, "outlier": self.outlier}
        buffer = io.BytesIO()  # a file object also stops numpy from appending ".npz" to the name
        np.savez(
            buffer,
            **{k: v.detach().cpu().numpy() for k, v in arrays.items()},
            kind=np.array(self.kind),
            seed=np.array(self.seed),
            params=np.array(json.dumps(self.params)),
            dtype=np.array(str(self.y.dtype).removeprefix("torch.")),
        )
        write_atomic(Path(path), buffer.getvalue())


# Arrays and fields of a saved dataset (Dataset.save): the five arrays first
_SAVED = ("x_train", "y_train", "x_val", "y_val", "outlier", "kind", "seed", "params")


def load(path) -> Dataset:
    """Read a file written by :meth:`Dataset.save` (tensors on the CPU, in the saved dtype).

    Anything else (another format, a foreign .npz, arrays of the wrong shapes) is a ValueError that names
    the file and what is wrong with it.
    """
    try:
        archive = np.load(Path(path), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # an .npy file holds one bare array
            raise ValueError("one array, not an .npz archive")  # noqa: TRY004 (bad file content, not a bad argument type)
        with archive as f:
            missing = [k for k in _SAVED if k not in f.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)} in the archive")
            kind, seed, params = str(f["kind"]), f["seed"], json.loads(str(f["params"]))
            tensors = {k: torch.from_numpy(f[k]) for k in _SAVED[:5]}
            dtype = str(f["dtype"]) if "dtype" in f.files else None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such dataset file") from None
    except (OSError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{path}: not a dataset file of lab.data (not an .npz archive)") from None
    except (ValueError, TypeError, KeyError) as e:  # (numpy's "pickled data" ValueError: not an archive either)
        reason = "not an .npz archive" if "pickle" in str(e) else str(e)
        raise ValueError(f"{path}: not a dataset file of lab.data ({reason})") from None
    if seed.dtype.kind not in "iu" or seed.shape != ():
        raise ValueError(f"{path}: its seed {seed.tolist()!r} is not an integer")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: its params are not a table")  # noqa: TRY004 (file content)
    try:
        params = {k: v for k, v in _resolve(kind, {**params, "seed": int(seed)}).items() if k != "seed"}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    n, n_val = params["n"], params["n_val"]
    if not tensors["y_train"].is_floating_point():
        raise ValueError(f"{path}: y_train is {tensors['y_train'].dtype}; a dataset holds floats")
    shapes = {"x_train": (n, 1), "y_train": (n,), "x_val": (n_val, 1), "y_val": (n_val,), "outlier": (n,)}
    for k, shape in shapes.items():
        t = tensors[k]
        if tuple(t.shape) != shape or (t.dtype == torch.bool) != (k == "outlier") or \
                (k != "outlier" and t.dtype != tensors["y_train"].dtype):
            raise ValueError(f"{path}: {k} is {t.dtype} {tuple(t.shape)}; a dataset of n={n}, n_val={n_val} "
                             f"has {shape} {'bool' if k == 'outlier' else 'floats of one dtype'}")
    if dtype == "bfloat16":  # saved as float32 (numpy has no bfloat16): the exact values, cast back
        tensors = {k: t.to(torch.bfloat16) if k != "outlier" else t for k, t in tensors.items()}
    seed = int(seed)
    return Dataset(
        kind,
        params,
        seed,
        tensors["x_train"],
        tensors["y_train"],
        tensors["x_val"],
        tensors["y_val"],
        tensors["outlier"],
        Truth(kind, params),
    )


def make(kind: str, n: int = 200, seed: int = 0, dtype=torch.float32, device="cpu", **params) -> Dataset:
    """Draw a dataset of ``kind`` (see :data:`KINDS`; parameters and defaults in :func:`defaults`).

    Raises ValueError naming the parameter, its value and what is allowed, for an unknown kind or
    parameter, or a value out of range (NaN and inf included); DataRangeError (a ValueError) when a
    drawn value overflows ``dtype``; TypeError for a non-float dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")
    resolved = _resolve(kind, {"n": n, "seed": seed, **params})
    seed = resolved["seed"]
    train, val = torch.Generator().manual_seed(2 * seed), torch.Generator().manual_seed(2 * seed + 1)
    x, y, outlier = _draw(kind, resolved, resolved["n"], train, contaminate=True)
    x_val, y_val, _ = _draw(kind, resolved, resolved["n_val"], val, contaminate=False)

    # Cast on the CPU, check, then move: identical bits on every device.
    wide = {"x": x[:, None], "x_val": x_val[:, None], "y": y, "y_val": y_val}  # float64
    x, x_val, y, y_val = (t.to(dtype) for t in wide.values())
    _check_finite(dtype, wide, x=x, x_val=x_val, y=y, y_val=y_val)
    params = {k: v for k, v in resolved.items() if k != "seed"}
    return Dataset(
        kind,
        params,
        seed,
        x.to(device),
        y.to(device),
        x_val.to(device),
        y_val.to(device),
        outlier.to(device),
        Truth(kind, params),
    )


class DataRangeError(ValueError):
    """A draw whose values ``dtype`` cannot hold: the parameters ask for numbers beyond the dtype's range.

    Raised by :func:`make`. It is bad input, not a failed run: the same (kind, params, seed, dtype)
    overflows on every try, so ``lab run`` and ``lab sweep`` refuse it before anything is written.
    """


def _check_finite(dtype: torch.dtype, wide: dict[str, Tensor], **tensors: Tensor) -> None:
    """Raise DataRangeError when a draw does not fit ``dtype`` (``wide``: the same tensors in float64).

    Finite parameters can still overflow: target_scale = 1e300 or noise = 1e300 exceed float32's 3.4e38,
    and Student-t noise with df = 0.01 draws values beyond float64's range. Caught here, the error names
    the cause instead of surfacing as non-finite targets deep in training.
    """
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum())
        if not bad:
            continue
        what = "x" if name.startswith("x") else "targets"
        fix = "narrow x_range" if what == "x" else "lower target_scale / noise / outlier_scale, or raise df"
        if dtype != torch.float64 and all(bool(torch.isfinite(w).all()) for w in wide.values()):
            fix += ", or set dtype=float64"  # the float64 draw holds every value: only the cast overflowed
        raise DataRangeError(f"{what} are not finite in {str(dtype).removeprefix('torch.')} ({bad} of "
                             f"{t.numel()} values of {name} overflow): {fix}")
