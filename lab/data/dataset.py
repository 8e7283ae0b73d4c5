"""A drawn dataset and its truth: `make` draws one, `Dataset.save` and `load` keep it in a file, and
`Truth` answers in closed form what each loss should converge to."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lab.atomic import write_atomic
from lab.data.kinds import _SAMPLE_KEYS, KINDS, _noise_form, _resolve
from lab.data.process import _draw, _noise_mean, _noise_quantile, _signal

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
