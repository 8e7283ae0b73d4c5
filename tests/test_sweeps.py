"""Sweeps (lab.sweeps): the grid a base config and swept values make, which runs take a fixed loss or
data parameter, and the runs' names. Expected grids and names are written out by hand from the rules in
lab.sweeps' docstrings."""

import re

import pytest

from lab import config, sweeps
from lab.config import ConfigError


def test_a_loss_parameter_applies_to_the_swept_losses_that_take_it():
    base, sweep = config.load(None, ["loss.delta=0.5"], sweep={"loss.name": ["mse", "huber", "pseudo_huber"]})
    grid = sweeps.expand(base, sweep)
    assert [(c.loss.name, c.loss.delta) for c, _ in grid] == [("mse", None), ("huber", 0.5), ("pseudo_huber", 0.5)]


def test_a_loss_parameter_no_swept_loss_takes_is_an_error():
    base, sweep = config.load(None, ["loss.delta=0.5"], sweep={"loss.name": ["mse", "mae"]})
    with pytest.raises(ConfigError, match=r"loss.delta = 0.5 is taken by none of the swept loss.name values \(mse, mae\)"):
        sweeps.expand(base, sweep)


def test_a_swept_loss_parameter_must_apply_to_every_run():
    base, sweep = config.load(None, [], sweep={"loss.name": ["mse", "huber"], "loss.delta": [0.5, 1.0]})
    with pytest.raises(ConfigError, match="loss.delta is swept but loss.name = 'mse' does not take it"):
        sweeps.expand(base, sweep)


def test_a_data_parameter_applies_to_the_swept_kinds_that_take_it():
    base, sweep = config.load(None, ["data.outlier_fraction=0.3"], sweep={"data.kind": ["clean", "outliers"]})
    grid = sweeps.expand(base, sweep)
    assert [(c.data.kind, c.data.outlier_fraction) for c, _ in grid] == [("clean", None), ("outliers", 0.3)]


def test_a_bad_value_in_a_grid_point_is_found_before_training():
    base, sweep = config.load(None, [], sweep={"optim.lr": [0.1, -1.0]})
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        sweeps.expand(base, sweep)


def test_run_names_say_what_differs_and_never_repeat():
    base, sweep = config.load(None, ["data.kind=outliers"], sweep={"loss.name": ["mse", "l1"], "optim.lr": [0.1, 1e-3],
                                                                  "seed": [0, 1]})
    names = [r.name for r in sweeps.sweep_runs(base, sweep)]
    assert names[:4] == ["outliers-mse-lr0.1-s0", "outliers-mse-lr0.1-s1", "outliers-mse-lr0.001-s0",
                         "outliers-mse-lr0.001-s1"]
    assert "outliers-mae-lr0.1-s0" in names  # the alias l1 is named by its registry name
    assert len(set(names)) == 8
    # Values that print alike would share a name; the later ones get -2, -3 (grid order).
    base, sweep = config.load(None, [], sweep={"optim.lr": [0.1, 0.1000001]})
    names = [r.name for r in sweeps.sweep_runs(base, sweep)]
    assert names == ["clean-mse-lr0.1-s0", "clean-mse-lr0.1-s0-2"]


def test_a_name_past_LONG_NAME_bytes_is_cut_with_a_hash_of_the_whole_name():
    # Width lists of 130 and 131 layers: the same first 100 characters, different names; each cut to
    # LONG_NAME bytes, still led by data kind and loss and ended by the seed; a short name is untouched.
    base, sweep = config.load(None, ["model.kind=mlp", "seed=4"], sweep={"model.hidden": [[3], [2] * 130, [2] * 131]})
    short, long1, long2 = [r.name for r in sweeps.sweep_runs(base, sweep)]
    assert short == "clean-mse-hidden3-s4"
    for name in (long1, long2):
        assert len(name.encode()) == sweeps.LONG_NAME and name.startswith("clean-mse-hidden2_2_2")
        assert name.endswith("-s4") and re.search(r"-h[0-9a-f]{8}-s4$", name)
    assert long1 != long2
    # Multi-byte letters are cut on a character boundary: the name is still valid UTF-8 within the limit.
    name = sweeps.run_name(base, {"name": "é" * 200})
    assert len(name.encode()) <= sweeps.LONG_NAME and config.name_problem(name) is None
