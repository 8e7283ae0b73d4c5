"""Configs: every key documented, TOML and overrides typed by field, one-line errors, sweep tables."""

import math
from dataclasses import fields

import pytest
import tomli_w

from lab import config
from lab.config import ConfigError


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Documentation: every key has a default and a one-line docstring, and `describe` lists them all.


def test_every_key_has_a_default_and_a_one_line_docstring():
    keys = config.keys()
    # 4 top-level fields plus every field of the 5 sections, counted from the dataclasses themselves.
    expected = 4 + sum(len(fields(cls)) for cls in config.SECTIONS.values())
    assert len(keys) == expected
    for key, (_, _, doc) in keys.items():
        assert doc and "\n" not in doc, key


def test_describe_lists_every_key_with_its_default():
    text = config.describe().splitlines()
    assert len(text) == len(config.keys())
    line = next(t for t in text if t.split()[0] == "train.steps")
    assert line.split()[1] == "1000"  # TrainConfig.steps default
    line = next(t for t in text if t.split()[0] == "loss.delta")
    assert line.split()[1] == "-"  # None: the loss's own default


# ---------------------------------------------------------------------------------------------
# Typing: TOML values and command-line words are typed by the field.


def test_overrides_are_typed_by_the_field():
    cfg, sweep = config.load(None, ["loss.name=huber", "loss.delta=0.5", "train.steps=500", "model.hidden=[64,64]",
                                    "data.kind=outliers", "data.leverage=true", "optim.lr=1", "train.log_every=1e1"])
    assert sweep == {}
    assert cfg.loss.delta == 0.5 and isinstance(cfg.loss.delta, float)
    assert cfg.train.steps == 500 and isinstance(cfg.train.steps, int)
    assert cfg.model.hidden == (64, 64)
    assert cfg.data.leverage is True
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.log_every == 10  # 1e1 is a whole number, so a valid count


def test_tau_takes_a_number_or_a_list():
    assert config.from_flat({"loss.name": "quantile", "loss.tau": "0.9"}).loss.tau == 0.9
    cfg = config.from_flat({"loss.name": "quantile", "loss.tau": "[0.1, 0.5, 0.9]"})
    assert cfg.loss.tau == (0.1, 0.5, 0.9)
    assert config.n_outputs(cfg) == 3


def test_a_one_element_tau_list_is_that_tau():
    # One tau gives one model output, named like any single-tau run (slope, not slope_0): the config holds
    # the float, so n_outputs, run names, the reference solver and the trainer all see the same thing.
    cfg = config.from_flat({"loss.name": "quantile", "loss.tau": "[0.5]"})
    assert cfg.loss.tau == 0.5 and isinstance(cfg.loss.tau, float) and config.n_outputs(cfg) == 1
    assert config.to_flat(cfg)["loss.tau"] == 0.5
    assert config.from_flat({"loss.name": "expectile", "loss.tau": [0.3]}).loss.tau == 0.3


def test_limits_at_their_edges_are_accepted():
    assert config.from_flat({"train.steps": 100_000_000}).train.steps == 100_000_000
    assert config.from_flat({"seed": 2**62 - 1}).seed == 2**62 - 1
    assert config.from_flat({"loss.name": "huber", "loss.delta": 1e-30}).loss.delta == 1e-30
    assert config.from_flat({"loss.name": "smooth_l1", "loss.beta": 0.0}).loss.beta == 0.0  # exactly L1


def test_neutral_keys_are_config_keys():
    assert set(config.NEUTRAL_KEYS) <= set(config.keys())


def test_suggest_names_the_closest_key():
    assert config.suggest("loss.detla", config.keys()) == "; did you mean 'loss.delta'?"
    assert config.suggest("zzzz", ["mse", "mae"]) == ""


def test_a_toml_file_round_trips_through_the_saved_config(tmp_path):
    cfg, _ = config.load(write(tmp_path, '[loss]\nname = "quantile"\ntau = [0.2, 0.8]\n[model]\nhidden = [8]\n'))
    saved = write(tmp_path, tomli_w.dumps(config.to_dict(cfg)), "saved.toml")
    again, _ = config.load(saved)
    assert again == cfg


def test_aliases_become_the_registry_name():
    assert config.from_flat({"loss.name": "l1"}).loss.name == "mae"
    assert config.from_flat({"loss.name": "pinball", "loss.tau": 0.3}).loss.name == "quantile"


def test_minus_infinity_is_allowed_only_for_barrons_alpha():
    assert config.from_flat({"loss.name": "general", "loss.alpha": "-inf"}).loss.alpha == -math.inf
    with pytest.raises(ConfigError, match="must be a finite number"):
        config.from_flat({"loss.name": "general", "loss.scale": "-inf"})


# ---------------------------------------------------------------------------------------------
# Errors: one line each, naming the key and the problem.

BAD = [
    ({"loss.detla": 0.5}, "unknown key 'loss.detla'; did you mean 'loss.delta'?"),
    ({"trian.steps": 5}, "did you mean 'train.steps'?"),
    ({"train.steps": "abc"}, "train.steps: expected an integer, got 'abc'"),
    ({"train.steps": 1.5}, "train.steps: expected an integer"),
    ({"loss.name": 3}, "loss.name: expected a string"),
    ({"data.leverage": "yes"}, "expected true or false"),
    ({"optim.lr": "nan"}, "optim.lr: must be a finite number"),
    ({"optim.lr": "inf"}, "optim.lr: must be a finite number"),
    ({"optim.lr": -1}, "optim.lr must be > 0"),
    ({"loss.name": "huber", "loss.delta": 0}, "huber: delta must be > 0"),
    ({"loss.name": "huber", "loss.delta": -1}, "huber: delta must be > 0"),
    ({"loss.name": "quantile", "loss.tau": 1.5}, "tau must be in (0, 1)"),
    ({"loss.name": "quantile", "loss.tau": [0.1, 1.0]}, "tau must be in (0, 1)"),
    ({"data.kind": "outliers", "data.outlier_fraction": 1.0}, "outlier_fraction=1.0 is not allowed"),
    ({"data.kind": "outliers", "data.outlier_fraction": -0.1}, "outlier_fraction=-0.1 is not allowed"),
    ({"train.steps": 0}, "train.steps must be > 0"),
    ({"train.steps": -3}, "train.steps must be > 0"),
    ({"data.n": 1}, "n=1 is not allowed"),
    ({"loss.delta": 0.5}, "loss.delta = 0.5 is not a parameter of loss 'mse'"),
    ({"loss.name": "mae", "loss.tau": 0.5}, "is taken by quantile, expectile"),
    ({"data.outlier_fraction": 0.2}, "data.outlier_fraction = 0.2 is not a parameter of data kind 'clean'"),
    ({"loss.name": "maee"}, "not a loss; did you mean 'mae'?"),
    ({"data.kind": "outlier"}, "did you mean 'outliers'?"),
    ({"model.hidden": "[64,x]"}, "model.hidden: expected a TOML list"),
    ({"optim.momentum": 1.0}, "optim.momentum must be in [0, 1)"),
    ({"name": "a/b"}, "name: use letters"),
    ({"name": ".."}, "name: use letters"),
    ({"dtype": "float16"}, "dtype: must be one of float32, float64"),
    ({"data": 3}, "'data' is a section"),
    ({"train.batch_size": 500}, "larger than data.n"),
    # Setup costs grow with the steps; data draws seed a generator with 2 * seed + 1, which must fit int64.
    ({"train.steps": 100_000_001}, "train.steps must be <= 100_000_000"),
    ({"train.window": 10**23}, "train.window must be <= 100_000_000"),  # (its ring of window + 2 steps)
    ({"optim.lr": 10**400}, "optim.lr: must be a finite number, got an integer of 401 digits"),  # (OverflowError)
    ({"seed": 2**62}, "seed must be < 2**62"),
    # Residual scales below 1e-30 make the loss underflow to 0 (float32's smallest normal is 1.2e-38).
    ({"loss.name": "huber", "loss.delta": 1e-320}, "loss.delta = 1e-320 is below 1e-30"),
    ({"loss.name": "smooth_l1", "loss.beta": 1e-31}, "loss.beta = 1e-31 is below 1e-30"),
    ({"loss.name": "cauchy", "loss.scale": 1e-35}, "loss.scale = 1e-35 is below 1e-30"),
    ({"loss.name": "tukey", "loss.c": 5e-324}, "loss.c = 5e-324 is below 1e-30"),
    # Names become directories: the file system's 255 bytes, less room for -2, -3, ...
    ({"name": "a b"}, "name: use letters"),
    ({"name": "x" * 201}, "name: at most 200 bytes"),
    # Past float32's largest value (3.4028e38) a loss parameter or learning rate would be inf in the run.
    ({"loss.name": "huber", "loss.delta": 1e300}, "loss.delta = 1e+300 does not fit float32"),
    ({"loss.name": "general", "loss.alpha": -1e39}, "loss.alpha = -1e+39 does not fit float32"),
    ({"optim.lr": 1e39}, "optim.lr = 1e+39 does not fit float32"),
    # Steps 0..1000 decay three times (step_size 1001 // 3 = 333): 0.05 * 1e20^3 passes float32's range,
    # 0.05 * 1e300^3 float64's.
    ({"optim.schedule": "step", "optim.gamma": 1e20}, "optim.gamma = 1e+20: the learning rate of schedule 'step' grows"),
    ({"optim.schedule": "step", "optim.gamma": 1e300, "dtype": "float64"}, "grows past float64's range"),
    ({"data.n": -3}, "data: n=-3 is not allowed"),  # (not "batch_size is larger than data.n")
]


def test_an_override_given_twice_is_refused():
    # (which of the two was meant is a guess; a claim study's overrides come this way too)
    with pytest.raises(ConfigError, match="train.steps is given twice on the command line"):
        config.parse_overrides(["train.steps=5", "seed=1", "train.steps=7"])


@pytest.mark.parametrize("values,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_give_one_line_naming_the_problem(values, message):
    with pytest.raises(ConfigError) as err:
        config.from_flat(values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_values_that_fit_the_dtype_are_accepted():
    # The same values the float32 run refuses fit float64; float32's own largest value fits float32, and
    # -inf is Barron's alpha limit, not an overflow. A decay (gamma < 1) never grows.
    assert config.from_flat({"loss.name": "huber", "loss.delta": 1e300, "dtype": "float64"}).loss.delta == 1e300
    assert config.from_flat({"loss.name": "huber", "loss.delta": 3.4028234663852886e38}).loss.delta > 3e38
    assert config.from_flat({"loss.name": "general", "loss.alpha": float("-inf")}).loss.alpha == float("-inf")
    assert config.from_flat({"optim.schedule": "step", "optim.gamma": 1e-300}).optim.gamma == 1e-300
    assert config.from_flat({"optim.schedule": "step", "optim.gamma": 1e12}).optim.gamma == 1e12  # 5e34 fits


def test_malformed_toml_names_file_line_and_column(tmp_path):
    # Line 3 is `delta = ` with the value missing: tomllib reports the column after "delta = ".
    path = write(tmp_path, '[loss]\nname = "huber"\ndelta = \n')
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: invalid TOML")
    assert "line 3, column 9" in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path)


def test_file_errors_and_override_errors_are_the_same(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'loss.delta'"):
        config.load(write(tmp_path, "[loss]\ndelat = 1.0\n"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.load(None, ["seed"])


# ---------------------------------------------------------------------------------------------
# Sweeps: the [sweep] table, typed values, and loss/data parameters in a loss/data sweep.


def test_sweep_table_is_typed_and_overrides_take_keys_out_of_it(tmp_path):
    path = write(tmp_path, '[sweep]\n"loss.name" = ["mse", "mae"]\nseed = [0, 1, 2]\n"model.hidden" = [[8], [4, 4]]\n')
    _, sweep = config.load(path)
    assert sweep == {"loss.name": ["mse", "mae"], "seed": [0, 1, 2], "model.hidden": [(8,), (4, 4)]}
    _, sweep = config.load(path, ["seed=5"])
    assert "seed" not in sweep
    with pytest.raises(ConfigError, match="did you mean 'loss.name'"):
        config.load(write(tmp_path, '[sweep]\n"loss.nme" = ["mse"]\n', "b.toml"))
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        config.load(write(tmp_path, '[sweep]\nseed = ["a"]\n', "c.toml"))
    with pytest.raises(ConfigError, match="'seed' has no values"):
        config.load(write(tmp_path, "[sweep]\nseed = []\n", "d.toml"))


@pytest.mark.parametrize("text", ['"loss.name" = "mae"\n[loss]\nname = "huber"\n',
                                  '[sweep]\n"loss.name" = ["mse"]\n[sweep.loss]\nname = ["mae"]\n'])
def test_a_key_set_twice_as_dotted_and_in_its_table_is_refused(tmp_path, text):
    # TOML takes "loss.name" (quoted: one key) beside [loss] name: one of them was silently dropped.
    with pytest.raises(config.ConfigError, match=r"^loss\.name is set twice"):
        config.load(write(tmp_path, text))
