"""Typed run configuration: frozen dataclasses, TOML files and dotted `key=value` overrides.

A run is described by one `Config`: top-level `name`, `seed`, `device`, `dtype` and the sections
`data`, `model`, `loss`, `optim`, `train`. Every field has a default and a docstring under it; the
docstrings are read back (`describe()`) so `lab config` lists every key with its meaning.

Config files are TOML (parsed with `tomllib`, never executed). Every problem a user can make is a
`ConfigError` whose message is one line: unknown keys come with the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints


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
    """steps between histograms (0: off)"""
    converge_tol: float = 1e-3
    """converged once the gap to the exact optimum stays below converge_tol * |optimal loss| (plus 1e-12)"""
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


# ---------------------------------------------------------------------------------------------
# Typing values: TOML gives int/float/str/bool/list; the command line gives strings.


def suggest(key: str, valid) -> str:
    """"; did you mean 'KEY'?" for the closest valid name, or "" (ends a one-line error message)."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(key: str, tp, value):
    """Convert `value` to the field type `tp`, or raise ConfigError naming the key."""
    origin = getattr(tp, "__origin__", None)
    args = getattr(tp, "__args__", ())
    if type(tp).__name__ == "UnionType" or origin is not None and str(origin) == "typing.Union":
        options = [a for a in args if a is not type(None)]
        if value is None:
            return None
        errors = []
        for opt in sorted(options, key=lambda t: 0 if getattr(t, "__origin__", None) is None else 1):
            try:
                return _coerce(key, opt, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, str):
            value = parse_word(value)
            if isinstance(value, str) and value.lstrip().startswith("["):
                raise ConfigError(f"{key}: expected a TOML list such as [1, 2], got {value!r}")
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value where a list is expected (e.g. tau = 0.9)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], v) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(key, a, v) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # -inf is meaningful for Barron's alpha; NaN never is, +inf nowhere.
        if math.isnan(v) or (math.isinf(v) and not (key == "loss.alpha" and v < 0)):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return v
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def parse_word(text: str):
    """Parse the value of a command-line `key=value` word: TOML syntax if it parses, else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# ---------------------------------------------------------------------------------------------
# Building configs


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{'loss': {'delta': 1}} -> {'loss.delta': 1}."""
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_flat(values: dict[str, Any], base: Config | None = None, check: bool = True) -> Config:
    """Apply dotted keys (already typed or strings) to `base` (default config) and validate.

    With check=False only the keys and the types are checked (a sweep's base: each grid point is
    validated on its own, because e.g. `loss.delta` is fine for the huber runs of a loss sweep).
    """
    valid = keys()
    top, sections = {}, {s: {} for s in SECTIONS}
    for key, raw in values.items():
        value = coerce(key, raw, valid)
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
        else:
            top[key] = value
    cfg = base or Config()
    cfg = replace(cfg, **top, **{s: replace(getattr(cfg, s), **kv) for s, kv in sections.items() if kv})
    if check:
        cfg = _one_tau(cfg)
        validate(cfg)
        cfg = _canonical_loss(cfg)
    return cfg


def coerce(key: str, raw, valid: dict | None = None):
    """The value of one dotted key, typed by its field; ConfigError for an unknown key or a wrong type."""
    valid = valid or keys()
    if key not in valid:
        if key in SECTIONS:
            raise ConfigError(f"'{key}' is a section, not a key: write [{key}] in the file or '{key}.KEY=VALUE'")
        raise ConfigError(f"unknown key '{key}'{suggest(key, valid)}")
    return _coerce(key, valid[key][0], raw)


def _canonical_loss(cfg: Config) -> Config:
    """Aliases (l2, l1, pinball) become the loss's registry name, so run names and reports agree."""
    from lab import losses

    name = losses.spec(cfg.loss.name).name
    return cfg if name == cfg.loss.name else replace(cfg, loss=replace(cfg.loss, name=name))


def _one_tau(cfg: Config) -> Config:
    """A one-element tau list becomes that tau: one model output, named like any single-tau run (slope,
    not slope_0), so n_outputs, the reference solver and the trainer agree; expectile then takes it too."""
    tau = cfg.loss.tau
    if isinstance(tau, tuple) and len(tau) == 1:
        return replace(cfg, loss=replace(cfg.loss, tau=tau[0]))
    return cfg


def parse_overrides(words: list[str]) -> dict[str, Any]:
    """['loss.delta=0.5', 'model.hidden=[64,64]'] -> {'loss.delta': 0.5, 'model.hidden': [64, 64]}."""
    out = {}
    for word in words:
        if "=" not in word:
            raise ConfigError(f"override '{word}' is not of the form key=value")
        key, text = word.split("=", 1)
        out[key.strip()] = parse_word(text.strip())
    return out


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file; missing file and syntax errors become one-line ConfigErrors."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e.__class__.__name__}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already carries "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load(path: str | Path | None, overrides: list[str] | dict | None = None,
         sweep: dict[str, list] | None = None) -> tuple[Config, dict[str, list]]:
    """Read a config file (or defaults when path is None) plus overrides.

    Returns the config and its sweep (dotted key -> list of typed values, possibly empty): the file's
    `[sweep]` table updated by `sweep`; a fixed override of a swept key takes it out of the sweep.
    Without a sweep the config is fully validated; with one, only keys and types are checked here and
    `lab.sweeps.expand` validates every grid point.
    """
    table = read_toml(path) if path else {}
    file_sweep = table.pop("sweep", {})
    if not isinstance(file_sweep, dict):
        raise ConfigError("[sweep] must be a table of key = [values]")
    flat = flatten(table)
    fixed = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    flat.update(fixed)
    swept = {k: (v if isinstance(v, list) else [v]) for k, v in flatten(file_sweep).items() if k not in fixed}
    swept.update(sweep or {})
    valid = keys()
    typed_sweep = {}
    for key, values in swept.items():
        if not values:
            raise ConfigError(f"sweep: '{key}' has no values")
        typed_sweep[key] = [coerce(key, v, valid) for v in values]
    return from_flat(flat, check=not typed_sweep), typed_sweep


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


# ---------------------------------------------------------------------------------------------
# Validation: ranges, and parameters that the chosen loss or dataset does not take.

MAX_SEED = 2**62  # lab.data seeds its validation generator with 2 * seed + 1, which must fit an int64
MAX_STEPS = 100_000_000  # the trainer's tables (learning rate per step, log steps) grow with the steps
MIN_LOSS_SCALE = 1e-30  # loss.delta, beta, scale, c below this make the loss underflow (float32 tiny ~1e-38)
_SCALE_PARAMS = ("delta", "beta", "scale", "c")  # residual scales; beta = 0 (exactly L1) stays allowed
NEUTRAL_KEYS = ("name", "train.figures", "device")  # keys that never change a run's numbers

_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "float64"),
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("constant", "step", "exponential", "cosine"),
}


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line) for any value out of range."""
    from lab import data, losses, models  # imported here: `lab config` stays cheap

    flat = to_flat(cfg)
    for key, choices in _CHOICES.items():
        v = flat[key]
        if v not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {v!r}")
    if not all(c.isalnum() or c in "-_." for c in cfg.name) or cfg.name in ("", ".", ".."):
        raise ConfigError(f"name: use letters, digits, '-', '_' and '.' only (no '/' or '..'); got {cfg.name!r}")
    o, t = cfg.optim, cfg.train
    checks = [
        ("optim.lr", o.lr > 0, "must be > 0"),
        ("optim.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
        ("optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
        ("optim.betas", all(0 <= b < 1 for b in o.betas), "must be in [0, 1)"),
        ("optim.eps", o.eps > 0, "must be > 0"),
        ("optim.gamma", o.gamma > 0, "must be > 0"),
        ("optim.step_size", o.step_size >= 0, "must be >= 0"),
        ("optim.min_lr_ratio", 0 <= o.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("optim.warmup_steps", o.warmup_steps >= 0, "must be >= 0"),
        ("optim.clip_grad_norm", o.clip_grad_norm >= 0, "must be >= 0 (0: off)"),
        ("optim.nesterov", not o.nesterov or (o.name == "sgd" and o.momentum > 0), "needs optim.name='sgd' and momentum > 0"),
        ("train.steps", t.steps > 0, "must be > 0"),
        ("train.steps", t.steps <= MAX_STEPS, f"must be <= {MAX_STEPS:_} (run setup grows with the steps)"),
        ("train.batch_size", 0 <= t.batch_size, "must be >= 0 (0: full batch)"),
        ("train.log_every", t.log_every >= 0, "must be >= 0 (0: logging off)"),
        ("train.hist_every", t.hist_every >= 0, "must be >= 0 (0: off)"),
        ("train.converge_tol", t.converge_tol > 0, "must be > 0"),
        ("train.window", t.window >= 2, "must be >= 2"),
        ("data.n_val", cfg.data.n_val >= 1, "must be >= 1"),
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("seed", cfg.seed < MAX_SEED, "must be < 2**62 (the data draw seeds a generator with 2 * seed + 1)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why}; got {flat[key]!r}")
    if t.batch_size > cfg.data.n:
        raise ConfigError(f"train.batch_size ({t.batch_size}) is larger than data.n ({cfg.data.n})")
    # Loss and data: every parameter that was set must be one the loss (data kind) takes, and in range.
    try:
        taken = losses.spec(cfg.loss.name).params
    except ValueError:
        raise ConfigError(f"loss.name = {cfg.loss.name!r} is not a loss{suggest(cfg.loss.name, losses.available())} "
                          f"(available: {', '.join(losses.available())})") from None
    for pname, value in _loss_params(cfg.loss).items():
        if pname not in taken:
            takers = [n for n in losses.available() if pname in losses.spec(n).params]
            raise ConfigError(f"loss.{pname} = {_toml_value(value)} is not a parameter of loss '{cfg.loss.name}' "
                              f"(it takes {', '.join(taken) or 'no parameters'}; {pname} is taken by "
                              f"{', '.join(takers)})")
    try:
        losses.check_params(cfg.loss.name, _loss_params(cfg.loss))
    except ValueError as e:
        raise ConfigError(f"loss: {_one_line(e)}") from None
    for pname in _SCALE_PARAMS:
        value = getattr(cfg.loss, pname)
        if value is not None and 0 < value < MIN_LOSS_SCALE:
            raise ConfigError(f"loss.{pname} = {value!r} is below {MIN_LOSS_SCALE:g}: at that scale the loss "
                              f"underflows to 0 and a run reports instant convergence; use a larger loss.{pname}")
    if cfg.data.kind in data.available():
        taken = data.defaults(cfg.data.kind)
        for pname, value in data_params(cfg.data).items():
            if pname not in taken:
                takers = [k for k in data.available() if pname in data.defaults(k)]
                raise ConfigError(f"data.{pname} = {_toml_value(value)} is not a parameter of data kind "
                                  f"'{cfg.data.kind}' (it is taken by {', '.join(takers)})")
    try:
        data.check(cfg.data.kind, **data_params(cfg.data))
    except ValueError as e:
        raise ConfigError(f"data: {_one_line(e)}") from None
    try:
        models.make(cfg.model.kind, hidden=cfg.model.hidden, activation=cfg.model.activation)
    except ValueError as e:
        raise ConfigError(f"model: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


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
