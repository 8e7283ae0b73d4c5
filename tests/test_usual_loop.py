"""lab.usual_loop, the loops the lab is measured against: what they log is what they trained, and the
minimal loop trains the same run."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lab import config, data, losses, metrics, usual_loop


def _run(loss="huber"):
    return config.from_flat({"device": "cpu", "loss.name": loss, "data.kind": "outliers", "data.n": 80,
                             "train.steps": 30, "train.log_every": 10, "train.hist_every": 10, "optim.lr": 0.05})


@pytest.mark.parametrize("loss", ["huber", "quantile"])
def test_the_usual_loop_logs_every_tag_at_every_log_step_and_its_last_row_is_its_result(loss, tmp_path):
    # Reference: TensorBoard's own reader for the event file, and the loss module evaluated afresh at the
    # loop's final parameters for its last loss/train.
    cfg = _run(loss)
    ds = data.make(cfg.data.kind, seed=cfg.seed, **config.data_params(cfg.data))
    out = usual_loop.run(cfg, ds, tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(metrics.SCALAR_TAGS) | {"param/slope", "param/intercept"}
    for tag in acc.Tags()["scalars"]:
        assert [e.step for e in acc.Scalars(tag)] == [0, 10, 20, 30], tag
    assert set(acc.Tags()["histograms"]) == {"residual/values", "grad/per_sample_abs"}
    slope, intercept = out["params"]["slope"], out["params"]["intercept"]
    pred = ds.x[:, 0] * slope + intercept
    fresh = losses.build(cfg.loss.name, **config.loss_params(cfg))(pred, ds.y).item()
    assert out["final"]["loss/train"] == pytest.approx(fresh, rel=1e-5)
    assert acc.Scalars("param/slope")[-1].value == pytest.approx(slope, rel=1e-6)


def test_the_minimal_loop_trains_the_same_run_as_the_usual_loop(tmp_path):
    # The same initial parameters, data and SGD steps, without logging: the same final parameters
    # (float32; logging reads, it never writes what trains).
    cfg = _run("mae")
    ds = data.make(cfg.data.kind, seed=cfg.seed, **config.data_params(cfg.data))
    _, params = usual_loop.minimal(cfg, ds)
    logged = usual_loop.run(cfg, ds, tmp_path)["params"]
    assert params["slope"] == pytest.approx(logged["slope"], rel=1e-6)
    assert params["intercept"] == pytest.approx(logged["intercept"], rel=1e-6)
