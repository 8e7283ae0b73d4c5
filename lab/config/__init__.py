"""Typed run configuration: frozen dataclasses, TOML files and dotted `key=value` overrides.

A run is described by one `Config`: top-level `name`, `seed`, `device`, `dtype` and the sections
`data`, `model`, `loss`, `optim`, `train`. Every field has a default and a docstring under it; the
docstrings are read back (`describe()`) so `lab config` lists every key with its meaning.

Config files are TOML (parsed with `tomllib`, never executed). Every problem a user can make is a
`ConfigError` whose message is one line: unknown keys come with the closest valid key.

One concept per module, in the order they depend on each other: `lab.config.schema` (the dataclasses,
their keys and tables), `lab.config.checks` (validation) and `lab.config.parse` (files, overrides and
typed values); everything is importable from `lab.config` itself.
"""

from lab.config.checks import (  # noqa: F401 (re-exported)
    MAX_SEED,
    MAX_STEPS,
    MIN_LOSS_SCALE,
    validate,
)
from lab.config.parse import (  # noqa: F401 (re-exported)
    coerce,
    from_flat,
    load,
    parse_overrides,
    parse_word,
    read_toml,
)
from lab.config.schema import (  # noqa: F401 (re-exported)
    MAX_NAME_BYTES,
    NEUTRAL_KEYS,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    data_params,
    describe,
    flatten,
    keys,
    loss_params,
    n_outputs,
    name_problem,
    suggest,
    to_dict,
    to_flat,
)
