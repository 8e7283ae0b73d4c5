"""Figures: every claims figure draws from a small payload, per-run and per-sweep figures still work."""

import numpy as np
import pytest

from lab import config, data, figures, sweeps, trainer

PNG = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


e = np.linspace(-4, 4, 81)
line = np.array([2.0, 1.0])
PAYLOADS = {
    "penalties": {"misses": np.arange(1, 7), "mse": np.arange(1, 7) ** 2.0, "mae": np.arange(1, 7) * 1.0},
    "gradients": {"errors": e, "curves": {"MSE": 2 * np.abs(e), "MAE": np.ones_like(e)}, "delta": 1.5},
    "log_cosh": {"errors": e, "log_cosh": np.log(np.cosh(e)), "half_mse": e**2 / 2, "mae_minus_log2": np.abs(e) - 0.69,
                 "small": 0.1, "large": 5.0},
    "statistics": {"y": np.random.default_rng(0).exponential(size=200), "stats": {"mean": 1.0, "median": 0.69},
                   "fits": {"MSE": 1.0, "MAE": 0.7, "quantile 0.9": 2.3}},
    "outliers": {"x": np.linspace(-2, 6, 20), "y": np.linspace(-3, 23, 20), "outlier": np.arange(20) == 19,
                 "x_before": np.array([0.5]), "y_before": np.array([2.0]),
                 "lines": {"mse": {"with": line + 1, "without": line}}, "truth": (2.0, 1.0)},
    "loss_curves": {"curves": {"mse": {"steps": np.arange(50), "loss": np.exp(-np.arange(50.0)) + 0.3,
                                       "relative_gap": np.exp(-np.arange(50.0)), "optimum": 0.3}}, "tol": 1e-3},
    "surface": {"x": np.linspace(-2, 2, 30), "y": 2 * np.linspace(-2, 2, 30) + 1,
                "paths": {"mse": np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 1.0]]),
                          "mae": np.array([[0.0, 0.0], [1.5, 0.9], [2.0, 1.0]])},
                "optima": {"mse": line, "mae": line}},
    "oscillation": {"traces": {"MAE, constant rate": {"steps": np.arange(10), "slope": np.sin(np.arange(10.0)),
                                                      "intercept": np.cos(np.arange(10.0))}}, "seed": 0},
    "scale": {"curves": {"targets x1000": {"steps": np.arange(5), "rel_rmse": np.array([1, 10, 100, 1e4, np.inf]),
                                           "diverged_step": 4}}, "model": "mlp [32, 32]", "lr": 0.05},
    "heavy_tails": {"distance": {"mse": [0.1, 0.3], "mae": [0.05, 0.04]}, "top1": {"mse": [0.2, 0.1], "mae": [0.01, 0.01]}},
    "interpolation": {"deltas": [0.1, 1.0, 10.0], "positions": {0: [0.0, 0.2, 1.0], 1: [0.01, 0.3, 1.0]}},
    "comparison": {"losses": ["mse", "mae"], "columns": ["robustness", "near_zero"], "values": [[1.0, 0.01], [0.1, 1.0]],
                   "ratings": [["poor", "excellent"], ["excellent", "poor"]],
                   "guide": [["poor", "excellent"], ["excellent", "moderate"]], "thresholds": {}},
}


def test_every_claims_figure_kind_has_a_payload_here():
    assert set(PAYLOADS) == set(figures.CLAIM_FIGURES)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_claims_figure_draws_a_png(kind):
    png = figures.claim_figure({"kind": kind, **PAYLOADS[kind]})
    assert png[:8] == PNG
    width, height = _size(png)
    assert 300 < width < 1600 and 200 < height < 1000  # readable, not a thumbnail or a poster


def test_unknown_claims_figure_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown claims figure kind 'pie'"):
        figures.claim_figure({"kind": "pie"})


def test_run_and_sweep_figures_still_work(tmp_path):
    cfg = config.from_flat({"data.kind": "outliers", "data.n": 50, "train.steps": 20, "device": "cpu"})
    ds = data.make(cfg.data.kind, seed=cfg.seed, **config.data_params(cfg.data))
    (res,) = trainer.train([cfg], [ds])
    pngs = figures.run_figures(cfg, ds, res)
    assert set(pngs) == {"fit", "residuals"} and all(p[:8] == PNG for p in pngs.values())
    run = sweeps.Run(cfg, "r", {}, tmp_path, {"final": {"convergence/gap": 0.5}})
    figures.sweep_figures([run], tmp_path)
    assert (tmp_path / "figures" / "final_gap.png").read_bytes()[:8] == PNG
    assert figures.LOSS_COLORS["mse"] == "tab:blue"  # the one colour per loss other figures rely on


def test_a_diverged_runs_gap_is_left_out_of_the_sweep_figure_quietly(tmp_path):
    # A gap of inf (a diverged run) on the log axis made numpy print "invalid value" warnings on stderr.
    import warnings

    cfg = config.from_flat({"device": "cpu"})
    runs = [sweeps.Run(cfg, name, {}, tmp_path, {"final": {"convergence/gap": gap}})
            for name, gap in (("calm", 0.5), ("wild", float("inf")), ("nan", float("nan")))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        figures.sweep_figures(runs, tmp_path)
    assert (tmp_path / "figures" / "final_gap.png").read_bytes()[:8] == PNG
