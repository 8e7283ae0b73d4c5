"""lab.population: the step's loss and gradient of every run of a mixed population against autograd through
the lab's loss modules, and the row buffers a row step fills."""

import numpy as np
import pytest
import torch

from lab import config, data, losses, population, trainer

# One population, five losses (two runs with different deltas in one block: a per-run parameter tensor).
FLATS = [{"loss.name": "huber", "loss.delta": 0.3, "data.kind": "outliers"},
         {"loss.name": "huber", "loss.delta": 2.0, "seed": 4},
         {"loss.name": "log_cosh", "data.kind": "heavy_tailed"},
         {"loss.name": "mae", "data.kind": "skewed", "seed": 2},
         {"loss.name": "mse", "data.kind": "outliers", "seed": 1},
         {"loss.name": "quantile", "loss.tau": 0.8, "seed": 3}]


def _population(model="linear", **extra):
    cfgs = [config.from_flat({"device": "cpu", "dtype": "float64", "data.n": 50, "model.kind": model, **extra, **f})
            for f in FLATS]  # already in loss order, as lab.trainer lays runs out
    datasets = [data.make(c.data.kind, seed=c.seed, dtype=torch.float64, **config.data_params(c.data)) for c in cfgs]
    pop, P, *_ = population.build(cfgs, datasets, torch.device("cpu"), torch.float64)
    return cfgs, pop, P


@pytest.mark.parametrize("model", ["linear", "constant", "mlp"])
def test_terms_equal_autograd_through_each_runs_loss_module(model):
    # Reference: for each run alone, its parameters as leaf tensors, the model's forward, the lab's loss
    # module (mean reduction) and autograd. terms() gives the mean loss and the gradient times n.
    cfgs, pop, P = _population(model)
    m, flat, resids, psis = pop.terms()
    n = pop.y3.shape[1]
    for i, c in enumerate(cfgs):
        theta = P[i:i + 1].clone().requires_grad_(True)
        pred = pop.model.forward(pop.shapes.named(theta), pop.x[i:i + 1])[0, :, 0]
        loss = losses.build(c.loss.name, **config.loss_params(c))(pred, pop.y3[i, :, 0])
        (grad,) = torch.autograd.grad(loss, theta)
        assert m[i].item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-15), c.loss.name
        torch.testing.assert_close(flat[i] / n, grad[0], rtol=1e-10, atol=1e-13)
    assert sum(e.shape[0] for e in resids) == len(cfgs) == sum(p.shape[0] for p in psis)


@pytest.mark.parametrize("model", ["linear", "constant", "mlp"])
def test_a_row_step_keeps_residuals_and_psi_in_the_row_buffers(model):
    # keep=True changes no number of the step, and its per-block residuals and psi are the row
    # buffers themselves (views), equal to what a step without keep returns.
    _, pop, _ = _population(model)
    m, flat, resids, psis = pop.terms()
    m_k, flat_k, resids_k, psis_k = pop.terms(keep=True)
    assert torch.equal(m, m_k) and torch.equal(flat, flat_k)
    for blk, e, psi, e_k, psi_k in zip(pop.blocks, resids, psis, resids_k, psis_k):
        assert e_k.data_ptr() == pop.row_e[blk.runs].data_ptr()
        assert psi_k.data_ptr() == pop.row_psi[blk.runs].data_ptr()
        assert torch.equal(e, e_k) and torch.equal(psi, psi_k)
    assert torch.equal(pop.row_e[..., 0], torch.cat([e[..., 0] for e in resids]))


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_a_row_step_for_a_worker_leaves_out_the_cheap_psi_which_row_psi_derives_to_the_bit(model):
    # With psi_derived (a row worker runs), the step writes no psi of the cheap blocks (mse, mae, huber,
    # quantile here; log-cosh's it still writes), and log_row.row_psi rebuilds from e exactly the psi
    # a step without psi_derived keeps. Reference: that step's own row buffer.
    from lab import log_row

    _, pop, _ = _population(model)
    m_kept, flat_kept, _, _ = pop.terms(keep=True)
    kept_e, kept_psi = pop.row_e.clone(), pop.row_psi.clone()
    pop.row_psi.fill_(float("nan"))
    pop.psi_derived = True
    m, flat, _, psis = pop.terms(keep=True)
    assert torch.equal(m, m_kept) and torch.equal(flat, flat_kept)  # the step's numbers do not change
    assert {blk.spec.name for blk in pop.blocks if blk.cheap_psi} == {"huber", "mae", "mse", "quantile"}
    for blk, psi in zip(pop.blocks, psis):
        assert torch.equal(psi, kept_psi[blk.runs])  # the step's own psi is unchanged
        assert pop.row_psi[blk.runs].isnan().all() == blk.cheap_psi  # written only where not derived
    assert torch.equal(pop.row_e, kept_e)
    assert torch.equal(log_row.row_psi(pop, pop.row_e, pop.row_psi), kept_psi)
    pop.psi_derived = False
    assert log_row.row_psi(pop, pop.row_e, pop.row_psi) is pop.row_psi  # nothing to derive


def test_original_units_invert_the_target_normalisation():
    # Closed form: with y_train = (y - mu) / sd, a line w x + b in training units is (sd w) x + (sd b + mu).
    cfg = config.from_flat({"device": "cpu"})
    out = population.to_original_units({"slope": 2.0, "intercept": -2.0, "value": 0.5}, cfg, mu=3.0, sd=4.0)
    assert out == {"slope": 8.0, "intercept": -5.0, "value": 5.0}


def test_a_minibatch_step_cannot_fill_the_row_buffers():
    _, pop, _ = _population()
    with pytest.raises(ValueError, match="full batch"):
        pop.terms(pop.x[:, :10], pop.y3[:, :10], keep=True)


def test_a_compiled_step_fills_the_row_buffers_too(monkeypatch):
    # A compiled block step returns its own tensors, which a row step copies into the buffers. Stand-in
    # for torch.compile (minutes and a C++ compiler): the eager block step behind a function that
    # returns fresh tensors, as a compiled one does. Reference: the eager training, every logged number.
    def fresh(spec, kind):
        def terms(terms_, kind_, named, x, target, params):
            return tuple(t.clone() if t is not None else None
                         for t in population._block_terms(terms_, kind_, named, x, target, params))
        return terms

    cfgs = [config.from_flat({"device": "cpu", "dtype": "float64", "data.n": 60, "train.steps": 40,
                              "train.log_every": 5, "train.hist_every": 20, **f}) for f in FLATS]
    datasets = [data.make(c.data.kind, seed=c.seed, dtype=torch.float64, **config.data_params(c.data)) for c in cfgs]
    logged = {}
    for compile in (False, True):
        monkeypatch.setattr(population, "_compiled", fresh)
        blocks, hists = [], []
        trainer.train(cfgs, datasets, on_log=blocks.append, on_hist=lambda *h, out=hists: out.append(h),
                      compile=compile)
        logged[compile] = (np.concatenate([b.values for b in blocks]), hists)
    assert np.array_equal(logged[True][0], logged[False][0], equal_nan=True)
    for (_, _, c1, lo1, hi1), (_, _, c2, lo2, hi2) in zip(logged[False][1], logged[True][1]):
        assert np.array_equal(c1, c2) and np.array_equal(lo1, lo2) and np.array_equal(hi1, hi2)
