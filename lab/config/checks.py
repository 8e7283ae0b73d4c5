"""Validation: every value in range, and no loss or data parameter the chosen loss or data kind does not
take. One ConfigError, one line, per problem."""

from __future__ import annotations

import math

from lab.config.schema import (
    Config,
    ConfigError,
    _loss_params,
    _toml_value,
    data_params,
    name_problem,
    suggest,
    to_flat,
)

MAX_SEED = 2**62  # lab.data seeds its validation generator with 2 * seed + 1, which must fit an int64
MAX_STEPS = 100_000_000  # the trainer's tables (learning rate per step, log steps) grow with the steps
MIN_LOSS_SCALE = 1e-30  # loss.delta, beta, scale, c below this make the loss underflow (float32 tiny ~1e-38)
_SCALE_PARAMS = ("delta", "beta", "scale", "c")  # residual scales; beta = 0 (exactly L1) stays allowed

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
    problem = name_problem(cfg.name)
    if problem:
        raise ConfigError(f"name: {problem}")
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
        ("train.window", t.window <= MAX_STEPS, f"must be <= {MAX_STEPS:_} (its history is window + 2 steps)"),
        ("data.n_val", cfg.data.n_val >= 1, "must be >= 1"),
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("seed", cfg.seed < MAX_SEED, "must be < 2**62 (the data draw seeds a generator with 2 * seed + 1)"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key} {why}; got {flat[key]!r}")
    _check_fits_dtype(cfg)
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
    if t.batch_size > cfg.data.n:  # (after data.n itself is checked)
        raise ConfigError(f"train.batch_size ({t.batch_size}) is larger than data.n ({cfg.data.n})")
    try:
        models.make(cfg.model.kind, hidden=cfg.model.hidden, activation=cfg.model.activation)
    except ValueError as e:
        raise ConfigError(f"model: {_one_line(e)}") from None


def _check_fits_dtype(cfg: Config) -> None:
    """Loss parameters and learning rates the run's dtype can hold. Past its range a float32 run would
    turn a loss parameter into inf (a population silently, a run alone with an error) and a learning
    rate into inf (a run that diverges at once); a schedule can overflow even float64 (gamma^k)."""
    import torch

    from lab.optim import lr_at

    largest = torch.finfo(getattr(torch, cfg.dtype)).max
    fix = " or dtype = \"float64\"" if cfg.dtype == "float32" else ""
    for pname, value in _loss_params(cfg.loss).items():
        for v in value if isinstance(value, list) else [value]:
            if math.isfinite(v) and abs(v) > largest:
                raise ConfigError(f"loss.{pname} = {v!r} does not fit {cfg.dtype} (largest {largest:.4g}); "
                                  f"use a smaller value{fix}")
    o, steps = cfg.optim, cfg.train.steps
    schedule = {"lr": o.lr, "schedule": o.schedule, "gamma": o.gamma, "step_size": o.step_size,
                "min_lr_ratio": o.min_lr_ratio, "warmup_steps": o.warmup_steps}
    # Every schedule is monotone apart from its warm-up: its largest rate is at one of these steps.
    at = {0, steps, min(max(o.warmup_steps - 1, 0), steps), min(o.warmup_steps, steps)}
    try:
        peak = max(lr_at(s, steps + 1, **schedule) for s in at)
    except OverflowError:
        peak = math.inf
    if not peak <= largest:
        if o.lr > largest:
            raise ConfigError(f"optim.lr = {o.lr!r} does not fit {cfg.dtype} (largest {largest:.4g}); "
                              f"use a smaller value{fix}")
        raise ConfigError(f"optim.gamma = {o.gamma!r}: the learning rate of schedule '{o.schedule}' grows past "
                          f"{cfg.dtype}'s range within {steps} steps; use a smaller gamma or lr{fix}")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())

