"""A sweep: the grid of configs a base config and swept values make, the runs' names, and whether the
runs fit in memory. lab.study trains them."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lab import config as config_mod
from lab import data
from lab.config import Config, ConfigError

# Run names longer than this (bytes of UTF-8) are cut: TensorBoard's run list shows far less anyway.
LONG_NAME = 120


@dataclass
class Run:
    config: Config
    name: str
    swept: dict = field(default_factory=dict)  # swept key -> value
    dir: Path | None = None
    summary: dict | None = None
    # drawn by draw_data before anything is written; execute trains on it, then lets it go
    dataset: data.Dataset | None = field(default=None, repr=False, compare=False)


def expand(base: Config | dict, sweep: dict[str, list]) -> list[tuple[Config, dict]]:
    """The grid over every swept key: [(config, {key: value})], in a stable order, each point validated.

    When `loss.name` (or `data.kind`) is swept, a fixed loss (data) parameter of the base applies to the
    runs whose loss (data kind) takes it: `loss.delta = 0.5` in a sweep over mse, mae, huber sets the
    huber runs' delta. It is still an error when no run of the grid takes it, and a swept parameter must
    be taken by every run (otherwise the grid would hold identical runs).
    """
    base_flat = config_mod.to_flat(base) if isinstance(base, Config) else dict(base)
    keys = list(sweep)
    for key in keys:
        if not sweep[key]:
            raise ConfigError(f"sweep: '{key}' has no values")
    out, dropped = [], set()
    for values in itertools.product(*(sweep[k] for k in keys)):
        swept = dict(zip(keys, values))
        flat = {**base_flat, **swept}
        for key in _not_taken(flat, swept):
            if key in swept:
                raise ConfigError(f"sweep: {key} is swept but {_taker_of(key)} = {flat[_taker_of(key)]!r} "
                                  f"does not take it; sweep it in a separate sweep")
            del flat[key]
            dropped.add(key)
        out.append((config_mod.from_flat(flat), swept))
    used = {k for k in dropped if any(k in config_mod.to_flat(c) for c, _ in out)}
    for key in sorted(dropped - used):
        selector = _taker_of(key)
        choices = ", ".join(dict.fromkeys(str(v) for v in sweep[selector]))
        raise ConfigError(f"{key} = {base_flat[key]!r} is taken by none of the swept {selector} values ({choices})")
    return out


def _taker_of(key: str) -> str:
    return "loss.name" if key.startswith("loss.") else "data.kind"


def _not_taken(flat: dict, swept: dict) -> list[str]:
    """Loss/data parameters in `flat` that this grid point's loss/data kind does not take (only where
    the loss/data kind is swept; otherwise validation reports them as errors)."""
    from lab import losses

    out = []
    if "loss.name" in swept:
        try:
            taken = set(losses.spec(flat["loss.name"]).params)
        except (ValueError, TypeError):
            taken = None  # an unknown loss: from_flat reports it
        if taken is not None:
            out += [k for k in flat if k.startswith("loss.") and k != "loss.name" and k[5:] not in taken]
    if "data.kind" in swept and flat["data.kind"] in data.available():
        taken = set(data.defaults(flat["data.kind"]))
        specific = {f for f, (_, default, _) in config_mod.keys().items() if f.startswith("data.") and default is None}
        out += [k for k in flat if k in specific and k[5:] not in taken]
    return out


def run_name(cfg: Config, swept: dict) -> str:
    """Name from what differs: <data.kind>-<loss.name>[-<key><value>...]-s<seed>; past LONG_NAME bytes the
    middle is cut and a hash of it added (-h<8 hex digits>), so a name stays a valid directory name.

    Loss and data kind always lead, so TensorBoard's run filter (regex over run names) and its colours
    group runs by loss or data; every other swept key follows as its last name part and its value.
    """
    parts = [cfg.data.kind, cfg.loss.name]
    for key, value in swept.items():
        if key in ("data.kind", "loss.name", "seed"):
            continue
        short = key.split(".")[-1]
        text = "_".join(map(_short, value)) if isinstance(value, (list, tuple)) else _short(value)
        parts.append(f"{short}{text}")
    seed = f"-s{cfg.seed}"
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in "-".join(parts))
    if len((name + seed).encode()) > LONG_NAME:
        # Cut, with a hash of the whole name, so that runs which differ only past the cut keep their own
        # names (a swept list of 100 layer widths would otherwise make a name no file system takes).
        tag = "-h" + hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name.encode()[:LONG_NAME - len(tag) - len(seed.encode())].decode(errors="ignore") + tag
    return name + seed


def _short(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def sweep_runs(base: Config | dict, sweep: dict[str, list]) -> list[Run]:
    """The runs of a sweep, named by `run_name`; names that would repeat get -2, -3, ... in grid order,
    so every run has its own directory and `--resume` finds it again by name.

    Two runs with the same config (a value listed twice, `seed=0,0`) would train the same numbers twice:
    that is refused (ValueError), naming the repeated settings."""
    grid = expand(base, sweep)
    seen: dict[str, dict] = {}
    for cfg, swept in grid:
        key = repr(cfg)
        if key in seen:
            same = ", ".join(f"{k}={v}" for k, v in swept.items()) or "the base config"
            raise ValueError(f"sweep: the same run twice ({same}); list each value once")
        seen[key] = swept
    return name_runs(grid)


def name_runs(grid: list[tuple[Config, dict]]) -> list[Run]:
    """Runs for (config, swept values) pairs, named by `run_name`, repeats suffixed -2, -3, ..."""
    runs, seen = [], {}
    for cfg, swept in grid:
        name = run_name(cfg, swept)
        seen[name] = seen.get(name, 0) + 1
        runs.append(Run(config=cfg, name=name if seen[name] == 1 else f"{name}-{seen[name]}", swept=swept))
    return runs


def estimate_bytes(cfgs: list[Config]) -> int:
    """Rough peak memory of training these runs as populations: data, per-step temporaries, parameters.

    Per run and training point about 16 tensors of the training dtype are alive at once (x, y, the
    prediction, psi, loss values, minibatch copies, metric temporaries), plus the histogram buffers.
    Per run and parameter about 16 copies (the parameters, their float64 draw, gradients, the update,
    the MLP's backward temporaries and flip-rate directions: 13-15 measured for MLPs of 1-4 million
    parameters) and the optimizer's moments; and the oscillation history, `train.window` + 2 steps of
    every parameter (of two numbers per step for models over lab.trainer's _TRACK_PARAMS parameters).
    """
    from lab.trainer import _TRACK_PARAMS

    total = 0
    for cfg in cfgs:
        item = 8 if cfg.dtype == "float64" else 4
        width = max(cfg.model.hidden) if cfg.model.kind == "mlp" else 1
        total += (cfg.data.n * (16 + 3 * width) + cfg.data.n_val * (4 + width)) * item * config_mod.n_outputs(cfg)
        params = _parameter_count(cfg.model.kind, config_mod.n_outputs(cfg), tuple(cfg.model.hidden),
                                  cfg.model.activation)
        moments = {"adam": 2, "adamw": 2}.get(cfg.optim.name, int(cfg.optim.momentum > 0))
        history = (cfg.train.window + 2) * (params + 1 if params <= _TRACK_PARAMS else 2)
        total += (params * (16 + moments) + history) * item
    return total


@functools.cache
def _parameter_count(kind: str, n_outputs: int, hidden: tuple[int, ...], activation: str) -> int:
    """Parameters of one run's model (lab.models' own shapes), once per distinct model of a study."""
    from lab import models

    shapes = models.make(kind, n_outputs=n_outputs, hidden=hidden, activation=activation).param_shapes()
    return sum(math.prod(shape) for shape in shapes.values())


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(cfgs: list[Config]) -> None:
    need, have = estimate_bytes(cfgs), available_memory()
    if need > 0.8 * have:
        raise ConfigError(f"study too large for memory: needs about {need / 2**30:.1f} GiB for {len(cfgs)} runs, "
                          f"{have / 2**30:.1f} GiB available; use fewer runs, a smaller data.n or a smaller model")

