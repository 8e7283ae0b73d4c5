"""The config's schema: the frozen dataclasses (each field with a default and a docstring under it), the
dotted keys they make, and the config as a nested or flat table (`to_dict`, `to_flat`)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

NEUTRAL_KEYS = ("name", "train.figures", "device")  # keys that never change a run's numbers
# A name becomes a directory: file systems take 255 bytes, and a repeated name gets -2, -3, ... (lab.rundir)
MAX_NAME_BYTES = 200


def name_problem(name) -> str | None:
    """Why `name` cannot name a run or a sweep (a plain directory name), or None: letters, digits, '-', '_'
    and '.', not starting with '.', at most MAX_NAME_BYTES bytes of UTF-8."""
    if not isinstance(name, str) or not name or name.startswith(".") \
            or not all(c.isalnum() or c in "-_." for c in name):
        return f"use letters, digits, '-', '_' and '.' only, not starting with '.' (no '/' or '..'); got {name!r}"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"at most {MAX_NAME_BYTES} bytes (a directory name); got {len(name.encode())}: {name[:40]!r}..."
    return None


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is a single line."""


@dataclass(frozen=True)
class DataConfig:
    kind: str = "clean"
    """dataset kind: clean, outliers, heavy_tailed, skewed, heteroscedastic, nonlinear"""
    n: int = 200
    """number of training points (>= 2)"""
    n_val: int = 200
    """number of held-out validation points, drawn from the clean process"""
    slope: float = 2.0
    """true slope of the linear signal (amplitude of the sine for `nonlinear`)"""
    intercept: float = 1.0
    """true intercept of the signal"""
    noise: float = 0.5
    """noise scale (standard deviation for Gaussian noise)"""
    x_range: tuple[float, float] = (-2.0, 2.0)
    """x is uniform on this interval"""
    target_scale: float = 1.0
    """multiplies y and the truth (the guide's 'house prices in thousands' pitfall)"""
    outlier_fraction: float | None = None
    """[outliers] share of training points displaced, in [0, 1)"""
    outlier_scale: float | None = None
    """[outliers] how far outliers are displaced vertically"""
    outlier_sign: str | None = None
    """[outliers] direction of the displacement: both or positive"""
    leverage: bool | None = None
    """[outliers] also move the outliers' x far out (leverage points)"""
    df: float | None = None
    """[heavy_tailed] Student-t degrees of freedom (1 is Cauchy)"""
    skew: float | None = None
    """[skewed] strength of the asymmetric noise"""
    noise_slope: float | None = None
    """[heteroscedastic] growth of the noise scale with x"""
    noise_kind: str | None = None
    """[nonlinear] noise added to the sine: gaussian, student_t, skewed, outliers"""


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "linear"
    """model: constant (one value), linear (slope, intercept) or mlp"""
    hidden: tuple[int, ...] = (32, 32)
    """[mlp] widths of the hidden layers"""
    activation: str = "tanh"
    """[mlp] activation: tanh, relu, gelu, silu"""


@dataclass(frozen=True)
class LossConfig:
    name: str = "mse"
    """loss: mse, mae, rmse, huber, smooth_l1, log_cosh, quantile, expectile, pseudo_huber, cauchy, tukey, general"""
    delta: float | None = None
    """[huber, pseudo_huber] threshold between quadratic and linear regions (> 0)"""
    beta: float | None = None
    """[smooth_l1] threshold (>= 0; 0 is exactly L1)"""
    tau: float | tuple[float, ...] | None = None
    """[quantile, expectile] target level in (0, 1); a list gives one model output per tau"""
    alpha: float | None = None
    """[general] Barron's shape parameter (2 is L2, 1 pseudo-Huber, 0 Cauchy, -inf Welsch)"""
    scale: float | None = None
    """[cauchy, general] scale of the residuals (> 0)"""
    c: float | None = None
    """[tukey] biweight cut-off (> 0)"""

    def params(self) -> dict[str, Any]:
        """The loss parameters that were set (None means 'the loss's default')."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    """optimizer: sgd, adam, adamw"""
    lr: float = 0.05
    """peak learning rate (> 0)"""
    momentum: float = 0.0
    """[sgd] momentum in [0, 1)"""
    nesterov: bool = False
    """[sgd] Nesterov momentum (needs momentum > 0)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """[adam, adamw] decay rates of the first and second moment estimates"""
    eps: float = 1e-8
    """[adam, adamw] denominator guard"""
    weight_decay: float = 0.0
    """L2 penalty (sgd, adam) or decoupled decay (adamw), >= 0"""
    schedule: str = "constant"
    """learning-rate schedule: constant, step, exponential, cosine"""
    gamma: float = 0.1
    """[step] factor every step_size steps; [exponential] total decay factor reached at the last step"""
    step_size: int = 0
    """[step] steps between decays (0: a third of the run)"""
    min_lr_ratio: float = 0.0
    """[cosine] final learning rate as a fraction of lr"""
    warmup_steps: int = 0
    """linear warm-up from 0 to lr over this many steps"""
    clip_grad_norm: float = 0.0
    """clip each run's gradient to this global norm (0: off)"""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """optimisation steps (> 0)"""
    batch_size: int = 0
    """minibatch size (0: full batch)"""
    normalize_targets: bool = False
    """standardise y for training; every reported number stays in original units"""
    log_every: int = 10
    """steps between scalar logs (0: off; the final values are still measured for summary.json)"""
    hist_every: int = 200
    """steps between histograms (0: off), taken at the first log step on or after each multiple"""
    converge_tol: float = 1e-3
    """converged once the gap to the exact optimum stays below converge_tol * max(|optimal loss|, eps * loss of predicting 0)"""
    window: int = 50
    """sliding window (steps) of the oscillation metrics"""
    figures: bool = True
    """draw end-of-run figures (single runs; sweeps draw comparison figures once)"""


@dataclass(frozen=True)
class Config:
    name: str = "run"
    """name of the run (or of the sweep): letters, digits, '-', '_', '.'"""
    seed: int = 0
    """seed of the data draw and the initialisation"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    dtype: str = "float32"
    """float32 or float64"""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "train": TrainConfig}


def _field_docs(cls) -> dict[str, str]:
    """Read the docstring written under each dataclass field (as tyro does for CleanRL's Args)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def keys() -> dict[str, tuple[Any, Any, str]]:
    """Every dotted key -> (type, default, help)."""
    return dict(_keys())


@functools.cache
def _keys() -> dict[str, tuple[Any, Any, str]]:
    # Cached: reading the docstrings parses the source, which every from_flat would otherwise repeat.
    out = {}
    for cls, prefix in [(Config, "")] + [(c, s + ".") for s, c in SECTIONS.items()]:
        hints, docs = get_type_hints(cls), _field_docs(cls)
        for f in fields(cls):
            if f.name in SECTIONS and cls is Config:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[prefix + f.name] = (hints[f.name], default, docs.get(f.name, ""))
    return out


def describe() -> str:
    """Text listing of every key, its default and its meaning (for `lab config`)."""
    lines = []
    for key, (_, default, doc) in keys().items():
        shown = "-" if default is None else _toml_value(default)
        lines.append(f"  {key:<24} {shown:<14} {doc}")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def suggest(key: str, valid) -> str:
    """"; did you mean 'KEY'?" for the closest valid name, or "" (ends a one-line error message)."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'delta': 1}} -> {'loss.delta': 1}.

    A key given twice, as a dotted name and in its table (`"loss.name" = "mae"` beside `[loss] name = "huber"`,
    which TOML allows: the quoted key is one name), is a ConfigError: one of them was silently lost.
    """
    out = {}
    for k, v in table.items():
        parts = flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        for key, value in parts.items():
            if key in out:
                raise ConfigError(f"{key} is set twice (once as a dotted key, once in its table); keep one")
            out[key] = value
    return out


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (tuples as lists, None dropped) — the resolved config saved with every run."""

    def clean(v):
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        return v

    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = {g.name: clean(getattr(v, g.name)) for g in fields(v) if getattr(v, g.name) is not None}
        else:
            out[f.name] = clean(v)
    return out


def to_flat(cfg: Config) -> dict[str, Any]:
    return flatten(to_dict(cfg))


def _loss_params(loss: LossConfig) -> dict:
    params = loss.params()
    if isinstance(params.get("tau"), tuple):
        params["tau"] = list(params["tau"])
    return params


def loss_params(cfg: Config) -> dict:
    """The loss parameters with the loss's defaults filled in."""
    from lab import losses

    return losses.check_params(cfg.loss.name, _loss_params(cfg.loss))


def data_params(d: DataConfig) -> dict:
    """Dataset parameters as `lab.data.make` takes them: the common ones plus those that were set."""
    out = {f.name: getattr(d, f.name) for f in fields(d) if f.name != "kind" and getattr(d, f.name) is not None}
    out["x_range"] = tuple(out["x_range"])
    return out


def n_outputs(cfg: Config) -> int:
    tau = cfg.loss.tau
    return len(tau) if isinstance(tau, tuple) else 1
