"""lab.history: the oscillation tags of many rows at once, against the per-row definitions in lab.metrics."""

import numpy as np
import pytest
import torch

from lab import config, data, metrics, trainer
from lab.history import History


def _per_row(theta, loss, s, window):
    """The definitions, one row at a time (metrics.flip_rate, relative_amplitude, param_amplitude): the
    flip rate over window + 2 parameter vectors ending at s, the amplitudes over the last `window` steps."""
    recent = theta[max(0, s - window - 1):s + 1]
    flip = metrics.flip_rate(recent, min(s, window))
    return torch.stack([flip, metrics.relative_amplitude(loss[max(0, s - window + 1):s + 1]),
                        metrics.param_amplitude(theta[max(0, s - window + 1):s + 1])])


@pytest.mark.parametrize("window,log_every,capacity,flush_every", [
    (5, 1, 7, 50),  # every step, the smallest ring: flushes forced by the ring, not by flush_every
    (5, 1, 60, 50),
    (6, 3, 20, 4),  # overlapping windows
    (4, 10, 12, 50),  # windows far apart: steps between them are never recorded
    (50, 10, 542, 50),  # the defaults
])
def test_rows_of_a_flush_equal_the_per_row_definitions(window, log_every, capacity, flush_every):
    # A random walk with reversals, plateaus (updates of 0 and of rounding size, which must not count)
    # and a loss that falls by 8 orders of magnitude (the amplitudes' means must not cancel).
    gen = torch.Generator().manual_seed(0)
    steps, runs, params = 130, 4, 3
    step_sizes = torch.randn(steps, runs, params, generator=gen, dtype=torch.float64)
    step_sizes[40:60, 1] = 0.0
    theta = torch.cat([torch.ones(1, runs, params, dtype=torch.float64), 1 + step_sizes.cumsum(0)])
    theta[70:90, 2] = theta[70, 2] * (1 + 5e-17 * torch.randn(20, params, generator=gen, dtype=torch.float64))
    loss = torch.logspace(4, -4, steps + 1, dtype=torch.float64)[:, None] * (1 + 0.1 * torch.rand(
        steps + 1, runs, generator=gen, dtype=torch.float64))
    h = History(runs, params, window, capacity, True, torch.float64, torch.device("cpu"))
    row_steps = sorted(set(range(0, steps + 1, log_every)) | {steps})
    pending, got, flushes = [], {}, 0
    for s in range(steps + 1):
        h.record(s, loss[s], theta[s])
        if s in row_steps:
            pending.append(s)
            later = [t for t in row_steps if t > s]
            if len(pending) >= flush_every or h.must_flush(pending[0], later[0] if later else None) or s == steps:
                for step, row in zip(pending, h.tags(pending).unbind(1)):
                    got[step] = row
                pending, flushes = [], flushes + 1
    assert sorted(got) == row_steps
    if capacity == 7:
        assert flushes > len(row_steps) // 2  # the ring, not flush_every, decided
    for s in row_steps:
        torch.testing.assert_close(got[s], _per_row(theta, loss, s, window), rtol=1e-12, atol=0)
    # rounding-size updates of run 2 (steps 70-89) reverse nothing: no flips in a window inside them
    inside = [s for s in row_steps if 70 + window + 1 <= s <= 89]
    for s in inside:
        assert got[s][0, 2] == 0.0


def test_untracked_models_sum_the_recorded_per_step_shares():
    # Models too large to keep parameters record each step's share of reversing parameters; the rate is
    # their sum over the window's steps divided by min(step, window), and the parameter amplitude NaN.
    gen = torch.Generator().manual_seed(1)
    window, steps, runs = 4, 30, 2
    shares = torch.rand(steps + 1, runs, generator=gen, dtype=torch.float64)
    h = History(runs, 100, window, window + 2, False, torch.float64, torch.device("cpu"))
    for s in range(steps + 1):
        h.record(s, torch.ones(runs, dtype=torch.float64), None)
        if s in (0, 1, 2, 9):
            (flip, loss_amplitude, amplitude), = h.tags([s]).unbind(1)[:1]
            expected = shares[max(1, s - window):s].sum(0) / max(min(s, window), 1)
            torch.testing.assert_close(flip, expected, rtol=1e-14, atol=0)
            assert loss_amplitude.tolist() == [0.0, 0.0]
            assert torch.isnan(amplitude).all()
        h.record_flips(s, shares[s])  # the update of step s, after the row


def test_a_ring_smaller_than_a_flush_changes_no_logged_number(monkeypatch):
    # The trainer flushes early when the ring would overwrite a pending row's window: with a ring of
    # window + 2 steps (a flush every row or two) every logged value equals the default ring's (float64).
    flats = [{"loss.name": loss, "seed": s, "data.kind": "outliers", "data.n": 50, "train.steps": 60,
              "train.log_every": 3, "train.window": 8, "dtype": "float64", **model}
             for s, (loss, model) in enumerate([("mse", {}), ("mae", {}), ("huber", {"model.kind": "mlp",
                                                                                    "model.hidden": [16]})])]
    for same_model in ([flats[0], flats[1]], [flats[2]]):
        cfgs = [config.from_flat(f) for f in same_model]
        datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
        wide, narrow = [], []
        trainer.train(cfgs, datasets, on_log=wide.append)
        monkeypatch.setattr(trainer, "_HISTORY_ELEMENTS", 1)  # capacity falls back to window + 2
        trainer.train(cfgs, datasets, on_log=narrow.append)
        monkeypatch.undo()
        assert len(narrow) > len(wide) == 1
        a = np.concatenate([b.values for b in wide])
        b = np.concatenate([b.values for b in narrow])
        assert np.array_equal(np.concatenate([b.steps for b in wide]), np.concatenate([b.steps for b in narrow]))
        assert np.allclose(a, b, rtol=1e-13, atol=1e-15, equal_nan=True)


def test_too_small_a_ring_is_refused():
    with pytest.raises(ValueError, match="window \\+ 2"):
        History(1, 1, 10, 11, True, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("width", [1, 2, 3, 7, 8, 50, 64, 130])
def test_sliding_windows_by_doubling_equal_the_windows_themselves(width):
    # history._sliding over [130, runs, P] against each window reduced directly (unfold): max and min
    # exact, the sum to rounding (another order of additions). Widths: 1, powers of 2, odd, the default 50,
    # the whole length.
    from lab.history import _sliding

    values = torch.randn(130, 3, 2, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    windows = values.unfold(0, width, 1)  # [130 - width + 1, 3, 2, width]
    assert torch.equal(_sliding(values, width, torch.maximum), windows.amax(-1))
    assert torch.equal(_sliding(values, width, torch.minimum), windows.amin(-1))
    torch.testing.assert_close(_sliding(values, width, torch.add), windows.sum(-1), rtol=1e-13, atol=1e-13)
