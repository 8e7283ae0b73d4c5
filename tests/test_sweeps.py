"""Sweeps (lab.sweeps): the grid a base config and swept values make, which runs take a fixed loss or
data parameter, and the runs' names. Expected grids and names are written out by hand from the rules in
lab.sweeps' docstrings."""

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
