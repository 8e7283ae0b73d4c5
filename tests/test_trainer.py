"""The population trainer: exact optima, equivalence with runs alone and with torch.optim, behaviour metrics."""

import dataclasses
import math
import signal

import numpy as np
import pytest
import torch

from lab import config, data, losses, population, reference, trainer


def cfg(**flat):
    base = {"device": "cpu", "dtype": "float64", "train.figures": False}
    return config.from_flat({**base, **flat})


def train(cfgs, **kw):
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    blocks = []
    res = trainer.train(cfgs, datasets, on_log=blocks.append, **kw)
    return res, datasets, blocks


def series(blocks, tag, run=0):
    """(steps, values) of one tag of one run from the logged blocks."""
    steps = np.concatenate([b.steps for b in blocks])
    t = blocks[0].tags.index(tag)
    return steps, np.concatenate([b.values[:, t, run] for b in blocks])


def test_mse_converges_to_least_squares():
    # Expected: numpy's least-squares line through the same training points.
    c = cfg(**{"data.kind": "clean", "data.n": 100, "train.steps": 1500, "optim.lr": 0.1})
    (res,), (ds,), _ = train([c])
    slope, intercept = np.polyfit(ds.x[:, 0].numpy(), ds.y.numpy(), 1)
    assert res.status == "completed"
    assert res.params["slope"] == pytest.approx(slope, abs=1e-8)
    assert res.params["intercept"] == pytest.approx(intercept, abs=1e-8)
    assert res.final["convergence/gap"] < 1e-12
    assert res.steps_to_converge is not None and 0 < res.steps_to_converge < 1500


@pytest.mark.parametrize("loss,extra", [("mae", {}), ("quantile", {"loss.tau": 0.8})])
def test_lp_losses_reach_the_lp_optimum_with_a_decaying_rate(loss, extra):
    # Expected: the exact LP optimum from scipy's HiGHS (lab.reference); the gap shrinks to ~0.
    c = cfg(**{"data.kind": "outliers", "data.n": 100, "loss.name": loss, **extra, "train.steps": 4000,
               "optim.lr": 0.5, "optim.schedule": "exponential", "optim.gamma": 1e-4})
    (res,), (ds,), _ = train([c])
    ref = reference.solve(loss, config.loss_params(c), "linear", ds.x, ds.y)
    assert res.reference["loss"] == pytest.approx(ref.loss, rel=1e-12)
    assert res.final["convergence/gap"] < 1e-4 * ref.loss
    assert res.final["convergence/gap"] >= -1e-12  # nothing beats the exact optimum


def test_huber_converges_to_its_float64_optimum():
    c = cfg(**{"data.kind": "heavy_tailed", "data.n": 150, "loss.name": "huber", "loss.delta": 0.5,
               "train.steps": 3000, "optim.lr": 0.5})
    (res,), (ds,), _ = train([c])
    ref = reference.solve("huber", {"delta": 0.5}, "linear", ds.x, ds.y)
    assert res.params["slope"] == pytest.approx(ref.params["slope"], abs=1e-7)
    assert res.params["intercept"] == pytest.approx(ref.params["intercept"], abs=1e-7)


def test_population_equals_runs_alone_with_mixed_losses():
    # Five runs that differ in loss, loss parameter, dataset, seed, lr, momentum and schedule, trained
    # together, must equal each trained alone (float64, 1e-10) — also in every logged scalar.
    flats = [
        {"loss.name": "mae", "seed": 3, "optim.lr": 0.05},
        {"loss.name": "huber", "loss.delta": 0.3, "data.kind": "outliers", "optim.momentum": 0.9, "optim.lr": 0.01},
        {"loss.name": "mse", "seed": 1, "optim.schedule": "cosine"},
        {"loss.name": "huber", "loss.delta": 2.0, "data.kind": "skewed", "seed": 7},
        {"loss.name": "rmse", "data.kind": "heavy_tailed", "optim.clip_grad_norm": 0.1},
    ]
    common = {"data.n": 64, "train.steps": 300, "train.log_every": 25}
    cfgs = [cfg(**common, **f) for f in flats]
    together, _, blocks = train(cfgs)
    for i, c in enumerate(cfgs):
        (alone,), _, blocks_alone = train([c])
        for key in alone.params:
            assert together[i].params[key] == pytest.approx(alone.params[key], abs=1e-10)
        t_all = np.concatenate([b.values[:, :, i] for b in blocks])
        t_one = np.concatenate([b.values[:, :, 0] for b in blocks_alone])
        assert np.allclose(t_all, t_one, atol=1e-10, equal_nan=True)


def test_population_of_one_equals_torch_optim_loop():
    # Reference: the ordinary PyTorch loop — nn.Linear, the lab's HuberLoss module, torch.optim.Adam,
    # autograd — from the same initial parameters on the same data.
    c = cfg(**{"loss.name": "huber", "loss.delta": 0.7, "optim.name": "adam", "optim.lr": 0.02,
               "data.kind": "outliers", "data.n": 80, "train.steps": 200})
    (res,), (ds,), _ = train([c])
    from lab import models

    model = models.make("linear")
    init = model.init(trainer.init_seed(c.seed), dtype=torch.float64)
    lin = torch.nn.Linear(1, 1).double()
    with torch.no_grad():
        lin.weight.copy_(init["weight"])
        lin.bias.copy_(init["bias"])
    opt = torch.optim.Adam(lin.parameters(), lr=0.02)
    loss_fn = losses.build("huber", delta=0.7)
    x, y = ds.x.double(), ds.y.double()
    for _ in range(200):
        opt.zero_grad()
        loss_fn(lin(x)[:, 0], y).backward()
        opt.step()
    assert res.params["slope"] == pytest.approx(lin.weight.item(), abs=1e-10)
    assert res.params["intercept"] == pytest.approx(lin.bias.item(), abs=1e-10)


def test_mae_oscillates_under_constant_rate_and_settles_with_decay():
    # The guide: MAE's constant-size gradient makes it oscillate near the optimum; MSE settles; a
    # decaying rate calms MAE. flip_rate = share of steps whose update reverses direction.
    # n = 1000: with few points the iterate can cycle through several vertices of the piecewise-linear
    # MAE surface (fewer direct reversals, flip rate ~0.1 at n = 100); with many it flips nearly every step.
    common = {"data.n": 1000, "train.steps": 2000, "optim.lr": 0.05}
    mae = cfg(**common, **{"loss.name": "mae"})
    mse = cfg(**common, **{"loss.name": "mse"})
    mae_decay = cfg(**common, **{"loss.name": "mae", "optim.schedule": "exponential", "optim.gamma": 1e-3})
    huber = cfg(**common, **{"loss.name": "huber", "loss.delta": 0.1})
    res, _, _ = train([mae, mse, mae_decay, huber])
    assert res[0].final["oscillation/flip_rate"] > 0.3
    assert res[1].final["oscillation/flip_rate"] < 0.05
    assert res[3].final["oscillation/flip_rate"] < 0.05
    # A decaying rate does not stop the reversals, it shrinks them: compare the amplitude.
    assert res[2].final["oscillation/param_amplitude"] < 0.01 * res[0].final["oscillation/param_amplitude"]


def test_mse_gradient_is_dominated_by_outliers_mae_is_not():
    common = {"data.kind": "outliers", "data.n": 200, "data.outlier_fraction": 0.05, "data.outlier_scale": 20.0,
              "train.steps": 500, "optim.lr": 0.05}
    res, (ds, _), _ = train([cfg(**common, **{"loss.name": "mse"}), cfg(**common, **{"loss.name": "mae"})])
    assert int(ds.outlier.sum()) == 10
    mse_share, mae_share = res[0].final["grad/outlier_share"], res[1].final["grad/outlier_share"]
    # MAE: every point pushes with |sign| = 1, so the outliers' share is their share of points (5%).
    assert mae_share == pytest.approx(0.05, abs=0.01)
    assert mse_share > 0.5 and mse_share > 10 * mae_share


def test_divergence_stops_only_that_run():
    common = {"data.n": 50, "train.steps": 200, "data.target_scale": 1000.0}
    res, _, blocks = train([cfg(**common, **{"optim.lr": 5.0}), cfg(**common, **{"optim.lr": 1e-8})])
    assert res[0].status == "diverged" and res[0].diverged_step is not None and res[0].diverged_step < 200
    assert all(np.isfinite(v) for v in res[0].last_finite.values())
    assert res[1].status == "completed"
    assert np.isfinite(series(blocks, "loss/train", run=1)[1]).all()


def test_normalize_targets_reports_original_units():
    # Same optimum for MSE (scale-equivariant), reported in original units either way.
    common = {"data.n": 100, "data.target_scale": 1000.0, "train.steps": 1500, "optim.lr": 0.1}
    res, (ds, _), _ = train([cfg(**common, **{"train.normalize_targets": True}),
                               cfg(**{**common, "optim.lr": 1e-7})])
    slope, intercept = np.polyfit(ds.x[:, 0].numpy(), ds.y.numpy(), 1)
    assert res[0].params["slope"] == pytest.approx(slope, rel=1e-8)
    assert res[0].params["intercept"] == pytest.approx(intercept, rel=1e-8)
    assert res[0].final["loss/train"] == pytest.approx(np.mean((slope * ds.x[:, 0].numpy() + intercept - ds.y.numpy()) ** 2),
                                                       rel=1e-6)


def test_minibatches_are_seeded_per_run():
    common = {"data.n": 64, "train.batch_size": 16, "train.steps": 100}
    a = cfg(**common, seed=1)
    b = cfg(**common, seed=2)
    together, _, _ = train([a, b])
    (alone,), _, _ = train([b])
    assert together[1].params == pytest.approx(alone.params, abs=1e-12)
    assert together[0].params != pytest.approx(together[1].params, abs=1e-6)


def test_every_tag_is_logged_and_finite_on_clean_data():
    (res,), _, blocks = train([cfg(**{"train.steps": 100, "train.log_every": 10})])
    steps, _ = series(blocks, "loss/train")
    assert list(steps) == list(range(0, 101, 10))
    for tag in blocks[0].tags:
        if tag != "grad/outlier_share":
            assert np.isfinite(series(blocks, tag)[1]).all(), tag
    assert set(res.final) == set(blocks[0].tags)


@pytest.mark.parametrize("loss,kind", [("mse", "outliers"), ("mae", "heavy_tailed"), ("huber", "outliers"),
                                       ("log_cosh", "skewed"), ("quantile", "clean")])
def test_every_tag_equals_the_usual_per_run_computation(loss, kind, tmp_path):
    # Reference: lab.usual_loop.run, the ordinary loop (nn.Linear, the loss module, torch.optim.SGD,
    # autograd, loss.item() windows in deques, torch.quantile, (y <= pred).mean()) on the same float64
    # data from the same start. Every logged tag of the last row must agree to float64 rounding.
    from lab import usual_loop

    c = cfg(**{"loss.name": loss, "data.kind": kind, "data.n": 150, "train.steps": 120, "train.log_every": 10,
               "train.window": 20, "optim.lr": 0.05, "train.hist_every": 0})
    ds = data.make(c.data.kind, seed=c.seed, dtype=torch.float64, **config.data_params(c.data))
    (res,) = trainer.train([c], [ds])
    usual = usual_loop.run(c, ds, tmp_path)
    assert set(usual["final"]) == set(res.final)
    for tag, value in usual["final"].items():
        assert res.final[tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
    assert res.steps_to_converge == usual["steps_to_converge"]


def test_logging_off_computes_only_the_final_row():
    # train.log_every = 0 (the benchmark's "logging off"): no callbacks, the same parameters, and the
    # summary's final values equal those of the last row of a logged run.
    import dataclasses

    c = cfg(**{"loss.name": "huber", "data.kind": "outliers", "data.n": 80, "train.steps": 150})
    off = dataclasses.replace(c, train=dataclasses.replace(c.train, log_every=0))
    calls = []
    (logged,), _, _ = train([c])
    (quiet,), _, _ = train([off], on_hist=calls.append)
    assert calls == []
    assert quiet.params == logged.params
    assert quiet.steps_to_converge == logged.steps_to_converge
    for tag, value in logged.final.items():
        assert quiet.final[tag] == pytest.approx(value, rel=1e-12, abs=1e-15, nan_ok=True), tag


def test_blocks_of_runs_do_not_change_any_number(monkeypatch):
    # Runs are processed in cache-sized blocks; one run per block must give the same numbers as one
    # block per loss (float64, 1e-12), in the parameters and in every logged value.
    flats = [{"loss.name": "mae", "seed": s} for s in range(3)] + [{"loss.name": "quantile", "loss.tau": 0.3 + 0.2 * s,
                                                                    "seed": s} for s in range(3)]
    cfgs = [cfg(**{"data.kind": "outliers", "data.n": 64, "train.steps": 60, **f}) for f in flats]
    big, _, blocks_big = train(cfgs)
    monkeypatch.setattr(population, "BLOCK_ELEMENTS", 64)  # one run per block
    small, _, blocks_small = train(cfgs)
    for a, b in zip(big, small):
        assert a.params == pytest.approx(b.params, abs=1e-12)
    v_big = np.concatenate([b.values for b in blocks_big])
    v_small = np.concatenate([b.values for b in blocks_small])
    assert np.allclose(v_big, v_small, rtol=1e-12, atol=1e-15, equal_nan=True)
    # and the log row taken chunk by chunk (one block each) rather than all blocks at once
    from lab import log_row

    monkeypatch.setattr(log_row, "_ROW_ELEMENTS", 1)
    _, _, blocks_chunked = train(cfgs)
    v_chunked = np.concatenate([b.values for b in blocks_chunked])
    assert np.allclose(v_big, v_chunked, rtol=1e-12, atol=1e-15, equal_nan=True)


def _least_squares_loss(x, y):
    """The optimal MSE of a line through (x, y), from numpy's least squares."""
    A = np.stack([x, np.ones_like(x)], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return np.mean((A @ coef - y) ** 2)


def test_steps_to_converge_matches_an_independent_gradient_descent():
    c = cfg(**{"data.n": 100, "train.steps": 300, "optim.lr": 0.1})
    (res,), (ds,), _ = train([c])
    from lab import models

    theta = models.make("linear").init(trainer.init_seed(c.seed), dtype=torch.float64)
    w, b = theta["weight"].item(), theta["bias"].item()
    x, y = ds.x[:, 0].double().numpy(), ds.y.double().numpy()
    # Independent numpy replica of full-batch GD on MSE; the lab's rule: the first step after which the gap
    # stays <= 1e-3 * the optimal loss.
    best = _least_squares_loss(x, y)
    last_above = -1
    for step in range(301):
        r = w * x + b - y
        if not np.mean(r**2) - best <= 1e-3 * best:
            last_above = step
        w, b = w - 0.1 * np.mean(2 * r * x), b - 0.1 * np.mean(2 * r)
    assert res.steps_to_converge == last_above + 1


def test_minibatch_convergence_is_judged_on_the_full_training_set():
    # Minibatch losses scatter around the optimum by far more than the tolerance; the full-data gap does
    # not. With a decaying rate the run converges, and the step is a log step.
    c = cfg(**{"data.n": 200, "train.batch_size": 50, "train.steps": 800, "train.log_every": 10,
               "optim.lr": 0.1, "optim.schedule": "exponential", "optim.gamma": 0.01})
    (res,), _, blocks = train([c])
    steps, gaps = series(blocks, "convergence/gap")
    assert res.steps_to_converge is not None and res.steps_to_converge < 800
    tol = 1e-3 * res.reference["loss"]
    after = steps >= res.steps_to_converge
    assert (gaps[after] <= tol).all() and gaps[~after][-1] > tol
    # a log step: the first from which the gap stayed within tolerance (it was the step after the last log
    # step above, 9 steps before any measurement had said so)
    assert res.steps_to_converge % 10 == 0
    # Logging off: the full-set gap is measured at the last step only, so no step is claimed (it was 0).
    (off,), _, _ = train([cfg(**{**config.to_flat(c), "train.log_every": 0})])
    assert off.status == "completed" and off.final["convergence/gap"] <= tol and off.steps_to_converge is None


def test_tiny_targets_converge_by_the_relative_rule():
    # Targets of scale 1e-6: the optimal MSE is ~1e-13, so a fixed absolute floor of 1e-12 would call the
    # run converged long before the relative rule does. Expected: the rule applied to the logged gap.
    c = cfg(**{"data.n": 100, "train.steps": 400, "optim.lr": 0.1, "data.target_scale": 1e-6,
               "train.log_every": 1})
    (res,), _, blocks = train([c])
    steps, gaps = series(blocks, "convergence/gap")
    above = np.nonzero(~(gaps <= 1e-3 * res.reference["loss"]))[0]
    assert res.reference["loss"] < 1e-12
    assert res.steps_to_converge == steps[above[-1]] + 1


def test_a_run_at_rest_does_not_oscillate():
    # float32 Huber run at its optimum: updates are rounding noise; they must not count as reversals.
    c = config.from_flat({"device": "cpu", "dtype": "float32", "loss.name": "huber", "data.n": 100,
                          "train.steps": 3000, "optim.lr": 0.5, "train.figures": False})
    (res,), _, _ = train([c])
    assert res.final["convergence/gap"] <= 1e-5
    assert res.final["oscillation/flip_rate"] < 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model,batch_size", [("linear", 0), ("mlp", 0), ("linear", 16)])
def test_population_on_cuda_equals_the_same_population_on_cpu(model, batch_size):
    # Reference: the same mixed population trained on the CPU (float64). Data, initial parameters and
    # minibatches come from CPU generators, so a run is the same run on either device; the GPU reduces
    # in another order, so the two agree to float64 rounding carried through 200 steps, not bit for
    # bit: in the parameters, in every logged scalar and in every histogram's counts and edges.
    flats = [
        {"loss.name": "mae", "seed": 3, "optim.lr": 0.05},
        {"loss.name": "huber", "loss.delta": 0.3, "data.kind": "outliers", "optim.momentum": 0.9, "optim.lr": 0.01},
        {"loss.name": "quantile", "loss.tau": 0.8, "data.kind": "skewed", "optim.momentum": 0.5, "optim.lr": 0.02},
        {"loss.name": "log_cosh", "data.kind": "heavy_tailed"},
        {"loss.name": "mse", "seed": 1, "optim.schedule": "cosine", "optim.clip_grad_norm": 0.5},
    ]
    common = {"data.n": 64, "train.steps": 200, "train.log_every": 10, "train.hist_every": 50, "model.kind": model,
              "train.batch_size": batch_size}
    results, hists = {}, {}
    for device in ("cpu", "cuda"):
        cfgs = [cfg(**common, **f, device=device) for f in flats]
        hists[device] = []
        res, _, blocks = train(cfgs, on_hist=lambda *h, out=hists[device]: out.append(h))
        results[device] = (res, np.concatenate([b.values for b in blocks]))
    (cpu, v_cpu), (gpu, v_gpu) = results["cpu"], results["cuda"]
    for a, b in zip(cpu, gpu):
        assert a.status == b.status == "completed"
        for key in a.params:
            assert np.allclose(b.params[key], a.params[key], rtol=1e-9, atol=1e-12), key
        # a gap within rounding of the tolerance at the step it crosses may cross one step apart
        # (minibatch runs: one log step apart, where convergence is judged)
        if a.steps_to_converge is None or b.steps_to_converge is None:
            assert a.steps_to_converge == b.steps_to_converge
        else:
            assert abs(a.steps_to_converge - b.steps_to_converge) <= (10 if batch_size else 1)
    assert np.allclose(v_gpu, v_cpu, rtol=1e-7, atol=1e-10, equal_nan=True)
    assert len(hists["cpu"]) == len(hists["cuda"]) > 0
    for (s1, t1, c1, lo1, hi1), (s2, t2, c2, lo2, hi2) in zip(hists["cpu"], hists["cuda"]):
        assert (s1, t1) == (s2, t2)
        assert np.allclose(lo2, lo1, rtol=1e-9) and np.allclose(hi2, hi1, rtol=1e-9)
        assert np.abs(c2 - c1).sum() <= 2 * len(c1)  # a point on a bin edge may fall either side


def test_the_loss_of_predicting_zero_is_each_losss_own_mean_over_the_targets():
    # Expected: the elementwise formula of lab.losses at input 0, target y, averaged (rmse: its root), in
    # float64: the convergence floor is eps times this, in the loss's own units (lab.population.build).
    cfgs = [cfg(**{"data.kind": "outliers", "data.n": 60, "loss.name": name, **extra, "seed": i})
            for i, (name, extra) in enumerate([("mse", {}), ("mae", {}), ("rmse", {}), ("huber", {"loss.delta": 0.3}),
                                               ("quantile", {"loss.tau": 0.8}), ("log_cosh", {})])]
    cfgs = sorted(cfgs, key=lambda c: c.loss.name)  # the population's layout: runs contiguous by loss
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
    pop, *_ = population.build(cfgs, datasets, torch.device("cpu"), torch.float64)
    got = population._loss_of_zero(pop.blocks, pop.root, pop.k)
    for i, (c, ds) in enumerate(zip(cfgs, datasets)):
        s = losses.spec(c.loss.name)
        y = ds.y.double()
        expected = s.fn(torch.zeros_like(y), y, **config.loss_params(c)).mean()
        expected = expected.sqrt() if s.root else expected
        assert got[i].item() == pytest.approx(expected.item(), rel=1e-12), c.loss.name


def test_a_run_too_small_a_loss_scale_to_move_is_not_called_converged():
    # Huber with delta 1e-10 in float32: its losses are ~1e-10 |y|, its steps ~lr * 1e-10, so in 20 steps the
    # gap stays at the optimal loss's own size (~1.4e-10). A floor of eps * mean y^2 (~1e-9 here: MSE's
    # units) called it converged at step 0; in the loss's own units the floor is ~1e-17, below the gap.
    c = config.from_flat({"device": "cpu", "dtype": "float32", "train.figures": False, "loss.name": "huber",
                          "loss.delta": 1e-10, "data.kind": "outliers", "data.n": 50, "train.steps": 20})
    (res,), _, _ = train([c])
    assert res.final["convergence/gap"] > 0.5 * res.reference["loss"] > 0
    assert res.steps_to_converge is None


def test_datasets_that_do_not_match_the_configs_are_refused():
    # One dataset per run, of the config's sizes: fewer datasets used to raise an IndexError deep inside,
    # more were silently ignored, and a dataset of another n trained silently.
    c = cfg(**{"data.n": 30, "train.steps": 5})
    ds = data.make("clean", n=30, seed=0)
    with pytest.raises(ValueError, match="2 configs and 1 datasets"):
        trainer.train([c, c], [ds])
    with pytest.raises(ValueError, match="1 configs and 2 datasets"):
        trainer.train([c], [ds, ds])
    with pytest.raises(ValueError, match=r"run 0: its dataset has n = 40, n_val = 200; its config says data.n = 30"):
        trainer.train([c], [data.make("clean", n=40, seed=0)])


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_a_ctrl_c_inside_an_update_reports_the_updates_its_parameters_hold(monkeypatch, loss):
    # A real SIGINT (Ctrl-C) raised while the 7th update is being kept, in P.copy_: the update was already
    # counted then, so the run said steps = 7 with the parameters of 6 updates. Expected: an interrupted
    # run's parameters are those of an uninterrupted run of `steps` steps (full-batch SGD at a constant
    # rate follows the same trajectory whatever the step count), bit for bit, and the handler is given back.
    c = cfg(**{"data.kind": "outliers", "data.n": 50, "loss.name": loss, "train.steps": 40, "optim.lr": 0.1})
    build, copies = population.build, [0]

    def build_with_a_ctrl_c(*args, **kw):
        built = build(*args, **kw)
        P, copy = built[1], built[1].copy_

        def copy_then_ctrl_c(src):  # the signal arrives as the update is written
            copies[0] += 1
            if copies[0] == 7:
                signal.raise_signal(signal.SIGINT)
            return copy(src)

        P.copy_ = copy_then_ctrl_c  # (an attribute of this tensor: the method of every other is untouched)
        return built

    monkeypatch.setattr(trainer.population, "build", build_with_a_ctrl_c)
    (cut,), _, _ = train([c])
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert (cut.status, cut.steps) == ("interrupted", 7)
    (whole,), _, _ = train([dataclasses.replace(c, train=dataclasses.replace(c.train, steps=7))])
    assert whole.status == "completed" and cut.params == whole.params


def test_histograms_every_step_flush_early_with_the_same_numbers(monkeypatch):
    # A flush holds its rows' histograms until it logs them: with histograms every step and 10,000 runs,
    # 50 rows of them were ~256 MB (float64). Past _HISTOGRAM_BYTES a flush now comes early. Expected:
    # with the budget at one row, a flush per histogram row, and every scalar and histogram the same
    # as with the usual flushes (the flush boundaries change no number).
    cfgs = [cfg(**{"data.kind": "outliers", "data.n": 60, "loss.name": loss, "train.steps": 30, "train.log_every": 1,
                   "train.hist_every": 1, "optim.lr": 0.05, "seed": i}) for i, loss in enumerate(["mse", "mae", "huber"])]

    def run():
        datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data)) for c in cfgs]
        blocks, hists = [], []
        trainer.train(cfgs, datasets, on_log=blocks.append, on_hist=lambda *a: hists.append(a), flush_every=10)
        return blocks, hists

    usual_blocks, usual_hists = run()
    monkeypatch.setattr(trainer, "_HISTOGRAM_BYTES", 1)
    early_blocks, early_hists = run()
    assert len(usual_blocks) == 4 and len(early_blocks) == 31  # rows 0..30: 10 a flush, or one
    for name in ("steps", "values"):
        usual = np.concatenate([getattr(b, name) for b in usual_blocks])
        early = np.concatenate([getattr(b, name) for b in early_blocks])
        assert np.array_equal(usual, early, equal_nan=True)
    assert len(usual_hists) == len(early_hists) == 31 * 2
    for a, b in zip(usual_hists, early_hists):
        assert a[:2] == b[:2] and all(np.array_equal(x, y) for x, y in zip(a[2:], b[2:]))


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_gradient_tags_describe_the_gradient_before_clipping(model):
    # grad/norm was the pre-clip norm but grad/max_abs the clipped gradient's largest component: two tags
    # of one row about different vectors. Expected: at step 0 (the same parameters with or without clipping)
    # both tags of a clipped run equal the unclipped run's, the gradient of its loss (max_abs above the
    # clip norm, which bounds every component of the clipped gradient).
    flat = {"data.kind": "outliers", "data.n": 80, "loss.name": "log_cosh", "train.steps": 3, "train.log_every": 1,
            "model.kind": model, "model.hidden": [4], "optim.lr": 0.01}
    _, _, plain = train([cfg(**flat)])
    _, _, clipped = train([cfg(**flat, **{"optim.clip_grad_norm": 0.01})])
    for tag in ("grad/norm", "grad/max_abs"):
        assert series(clipped, tag)[1][0] == series(plain, tag)[1][0]
    assert series(clipped, "grad/max_abs")[1][0] > 0.01


def test_a_loss_that_leaves_the_finite_numbers_at_the_last_step_is_a_divergence():
    # lr 3 on MSE multiplies the error each step: the loss is finite through step 24 and inf at step 25.
    # With train.steps = 25 the loop left before checking the last loss: 'completed' with loss inf; with
    # 26 steps the same run was 'diverged' at 25. Expected: diverged at step 25 either way, after 25 updates.
    for steps in (25, 26):
        c = cfg(**{"dtype": "float32", "data.n": 50, "optim.lr": 3.0, "train.steps": steps, "train.log_every": 0})
        (res,), _, _ = train([c])
        assert (res.status, res.steps, res.diverged_step) == ("diverged", 25, 25), steps
        assert math.isinf(res.final["loss/train"]) and all(math.isfinite(v) for v in res.last_finite.values())


def test_histograms_come_at_each_multiple_of_hist_every_and_rows_carry_their_own_wall_time():
    # Histograms were taken at rows whose step is a multiple of hist_every: with log_every = 30 and
    # hist_every = 200 that is every 600 steps. Expected: at the first row on or after each multiple.
    # And every row of a flush carried the flush's one wall time (TensorBoard's relative and wall axes
    # then stack 50 points on one instant); each row now has the time its step was taken.
    c = cfg(**{"data.n": 50, "train.steps": 1000, "train.log_every": 30, "train.hist_every": 200})
    hists = []
    _, _, blocks = train([c], on_hist=lambda step, tag, *a: hists.append((step, tag)))
    assert sorted({s for s, _ in hists}) == [0, 210, 420, 600, 810, 1000]
    assert all(len(b.wall_time) == len(b.steps) for b in blocks)
    times = np.concatenate([b.wall_time for b in blocks])
    assert (np.diff(times) >= 0).all() and times[-1] > times[0] and len(set(blocks[0].wall_time.tolist())) > 1


def test_the_collector_leaves_the_objects_of_the_start_alone_while_training():
    # A logged study triggered about one full collection, which scanned ~200,000 objects of the process's
    # start and, after the row worker's fork, copied the pages they sit on (2.50 -> 2.26 s measured).
    # Expected: those objects frozen while training, given back after; a caller's own freeze untouched.
    import gc

    frozen_while_logging = []
    c = cfg(**{"data.n": 40, "train.steps": 20, "train.log_every": 10})
    datasets = [data.make(c.data.kind, seed=c.seed, **config.data_params(c.data))]
    assert gc.get_freeze_count() == 0
    trainer.train([c], datasets, on_log=lambda b: frozen_while_logging.append(gc.get_freeze_count()))
    assert frozen_while_logging and min(frozen_while_logging) > 1000 and gc.get_freeze_count() == 0
    gc.freeze()  # the caller's: kept frozen, and not given back by the trainer
    try:
        before = gc.get_freeze_count()
        trainer.train([c], datasets)
        assert gc.get_freeze_count() >= before > 0
    finally:
        gc.unfreeze()
