"""Reading configs: TOML files, dotted `key=value` overrides and sweep tables, each value typed by its
field; `from_flat` builds a Config from dotted keys and validates it (lab.config.checks)."""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from lab.config.checks import validate
from lab.config.schema import SECTIONS, Config, ConfigError, flatten, keys, suggest


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
            try:
                v = float(value)
            except OverflowError:  # an integer past float's range (10**400): no number a float key can hold
                raise ConfigError(f"{key}: must be a finite number, got an integer of {len(str(abs(value)))} digits") from None
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
        if key.strip() in out:  # which of the two would win is a guess: ask for one
            raise ConfigError(f"{key.strip()} is given twice on the command line")
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

