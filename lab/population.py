"""A population's layout and its step: stacked data and parameters, runs in blocks by loss, and
each block's loss and gradient in one pass (`Population.terms`).

A population is N runs that share a model shape, data size and step count (lab.trainer trains it).
Its parameters are one tensor [N, P], its data [N, n, 1]. Runs are laid out contiguously by loss, and
split into blocks of runs with one loss each, at most `BLOCK_ELEMENTS` [run, point] values, so that a
block's tensors stay in cache through the step's elementwise ops. Each block computes its residuals
e = pred - target, psi = dl/dy_hat and its loss in one pass (lab.fused), and its share of the gradient
as explicit sums (the linear model: sum psi x and sum psi, elementwise, not 1x1 matmuls); only the
[N, P] gradients are joined. A row step (lab.log_row) also keeps every block's e and psi in the
population's row buffers, where the log row reads them in place.

`build` makes a population from configs and datasets: its device tensors, the blocks, the exact
reference optimum of every run (lab.reference), and what the log row needs once (outlier index lists,
data moments, candidate lists for order statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lab import fused, log_row, losses, models, reference, row_shortcuts
from lab.config import Config, loss_params, n_outputs
from lab.data import Dataset

# Runs are processed in blocks of at most this many [run, point] values (512 KiB of float32): a block's
# tensors stay in cache through the ~30 elementwise ops of a step, where one op over a whole large
# population streams every tensor through main memory. Measured on 10 000 runs x 1000 points, 100
# steps (2-core EPYC, 1 MiB L2): 2^14 values 11.6 s, 2^16 7.6 s, 2^17 7.0 s, 2^19 8.9 s, no blocks 12.8 s.
BLOCK_ELEMENTS = 1 << 17


def init_seed(seed: int) -> int:
    """Initialisation seed derived from the run seed, so data and init draw from different streams."""
    return (seed * 1_000_003 + 0x5EED) % (2**63)


def _stack_loss_params(cfgs: list[Config], name: str, dtype, device) -> dict:
    """Per-run loss parameters of one loss group as tensors [G, 1, 1] (or [G, 1, k] for tau lists)."""
    per_run = [loss_params(c) for c in cfgs]
    out = {}
    for key in per_run[0]:
        vals = [p[key] for p in per_run]
        if all(v == vals[0] for v in vals):
            v = vals[0]
            out[key] = torch.tensor(v, dtype=dtype, device=device) if isinstance(v, (list, tuple)) else v
        else:
            t = torch.tensor(vals, dtype=dtype, device=device)
            out[key] = t.view(len(cfgs), 1, -1)
    return out


class Flat:
    """Views of a flat parameter tensor [N, P] as the model's named parameters."""

    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes.values()]

    def named(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split(self.sizes, dim=1)
        return {k: p.view(flat.shape[0], *s) for (k, s), p in zip(self.shapes.items(), parts)}

    def flat(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([named[k].reshape(named[k].shape[0], -1) for k in self.shapes], dim=1)


@dataclass
class Block:
    """Contiguous runs that share a loss, few enough that one [runs, n] tensor of theirs stays in cache.

    The views (data, parameters) are taken once: the parameters are updated in place, so they stay current.
    """

    runs: slice
    spec: losses.LossSpec
    terms: Callable  # lab.fused.residual_terms(spec): e -> (psi, per-run loss sum)
    params: dict  # loss parameters: floats, or [B, 1, 1] tensors where runs differ
    x: torch.Tensor  # [B, n, 1]
    y3: torch.Tensor  # [B, n, 1] training targets
    named: dict  # this block's parameter views {name: [B, ...]}
    quantile_classes: tuple | None = None  # a quantile block's |psi| values for the log row (lab.log_row)
    # psi is a few elementwise ops of e (lab.fused.CHEAP_PSI): a row's worker derives it rather than the
    # step writing it to the row buffer (`Population.psi_derived`)
    cheap_psi: bool = False


@dataclass
class Population:
    """Everything about a population that does not change during training (device tensors, run order),
    and the row buffers that each row step rewrites."""

    model: models.Model
    named: dict  # views into the live parameters [N, P]
    blocks: list[Block]
    x: torch.Tensor  # [N, n, 1]
    y3: torch.Tensor  # [N, n, 1] training targets
    y_orig: torch.Tensor  # [N, n]
    x_val: torch.Tensor  # [N, n_val, 1]
    signal_val: torch.Tensor  # [N, n_val]
    outlier: torch.Tensor  # [N, n] bool
    outlier_at: torch.Tensor  # [N, m] indices of each run's outliers, padded (m: the most any run has)
    outlier_w: torch.Tensor  # [N, m] 1 at a real outlier index, 0 at padding (training dtype)
    mu: torch.Tensor  # [N, 1]
    sd: torch.Tensor  # [N, 1]
    any_norm: bool
    root: torch.Tensor | None  # [N] bool, None when no run takes a root (rmse)
    ref_loss: torch.Tensor  # [N]
    ref_params: torch.Tensor  # [N, K]
    true_params: torch.Tensor  # [N, K]
    k: int
    shapes: Flat
    moments: row_shortcuts.ResidualMoments | None  # the residual kurtosis without a pass (line models)
    largest: row_shortcuts.LargestResiduals | None  # candidates for the row's order statistics (CPU, line models)
    compiled: bool = False
    # A row step's residuals and psi [N, n, k] for all runs, written block by block by the step itself, so
    # that the log row reads chunks of whole blocks as views instead of concatenating them (lab.log_row).
    # They hold 2 N n k values for the whole training (80 MB for 10,000 runs of 1000 points in float32),
    # what the concatenated chunks of a row used to take for a moment.
    row_e: torch.Tensor | None = None
    row_psi: torch.Tensor | None = None
    # Set by a log-row worker (lab.row_worker): a row step writes no psi of the `cheap_psi` blocks, whose
    # reader derives it from e (lab.log_row.row_psi). A cold write of psi cost the step more than the worker
    # pays to derive it (measured with a row every step, 200 runs: 0.2 s of 2.6 s for all of psi).
    psi_derived: bool = False
    # Set by a log-row worker for line models (linear, constant; not compiled): a row step writes no e at
    # all, and the row's reader recomputes it from the row's parameters with the step's own ops
    # (`row_residuals`: the same bits). The step keeps e in its own warm memory, and no cache line of the
    # slots moves between the cores but the parameters'.
    e_derived: bool = False

    def forward(self, named: dict, x: torch.Tensor) -> torch.Tensor:
        """Predictions [B, b, k] of the runs whose parameter views are `named`, at x [B, b, 1]."""
        if self.model.kind == "linear":  # in_features = 1: elementwise, not a batch of 1x1 matmuls
            return x * named["weight"].transpose(1, 2) + named["bias"][:, None, :]
        return self.model.forward(named, x)

    def terms(self, x: torch.Tensor | None = None, y3: torch.Tensor | None = None, keep: bool = False):
        """Each run's own loss and its gradient at the current parameters, block by block.

        x, y3: a minibatch [N, b, 1] (None: the full training set). Returns (mean loss m [N] in
        training units, dm/dtheta [N, P] times b * k, and per block its residuals e = pred - target
        and psi [B, b, k]). keep (full batch only): the residuals and psi go to `row_e` and `row_psi`,
        and the returned ones are views of them (but where a row worker derives them, `e_derived` and
        `psi_derived` for the `cheap_psi` blocks: temporaries, and the buffers are not written there).
        """
        values, weight_grads, bias_grads, flats, resids, psis = [], [], [], [], [], []
        if keep and x is not None:
            raise ValueError("keep=True needs the full batch (x=None): the row buffers hold all n points")
        if keep and self.row_e is None:
            shape = (*self.y3.shape[:2], self.k)
            self.row_e, self.row_psi = self.y3.new_empty(shape), self.y3.new_empty(shape)
        for blk in self.blocks:
            xb = blk.x if x is None else x[blk.runs]
            target = blk.y3 if y3 is None else y3[blk.runs]
            e_out = self.row_e[blk.runs] if keep and not self.e_derived else None
            derived = self.psi_derived and blk.cheap_psi and not self.compiled  # (a compiled step keeps all psi)
            psi_out = self.row_psi[blk.runs] if keep and not derived else None
            if self.model.kind in ("linear", "constant"):
                if self.compiled:  # (writes neither buffer: copied below)
                    value, weight_grad, bias_grad, e, psi = _compiled(blk.spec, self.model.kind)(
                        blk.terms, self.model.kind, blk.named, xb, target, blk.params)
                else:
                    value, weight_grad, bias_grad, e, psi = _block_terms(blk.terms, self.model.kind, blk.named, xb,
                                                                         target, blk.params, e_out, psi_out)
                if weight_grad is not None:
                    weight_grads.append(weight_grad)
                bias_grads.append(bias_grad)
            else:
                e = torch.sub(self.forward(blk.named, xb), target, out=e_out)
                psi, value = blk.terms(e, out=psi_out, **blk.params)
                value = value / (e.shape[1] * e.shape[2])
                flats.append(self.shapes.flat(self.model.vjp(blk.named, xb, psi)))
            if keep and e_out is not None and e.data_ptr() != e_out.data_ptr():  # a compiled step's own tensors
                e, psi = e_out.copy_(e), psi_out.copy_(psi)
            values.append(value)
            resids.append(e)
            psis.append(psi)
        if self.model.kind == "linear":  # the flat order: weight [k x 1], then bias [k]
            flat = torch.cat([_join(weight_grads), _join(bias_grads)], dim=1)
        else:
            flat = _join(bias_grads if self.model.kind == "constant" else flats)
        return _join(values), flat, resids, psis

    def row_residuals(self, P: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residuals e = pred - target [N, n, k] on the full training set at parameters P [N, P] of a
        line model, into `out`: block by block with the step's own ops (`block_residuals`), so they are
        the bits the step computed at those parameters (for a row whose step did not keep them: e_derived)."""
        named = self.shapes.named(P)
        for blk in self.blocks:
            block_residuals(self.model.kind, {key: v[blk.runs] for key, v in named.items()}, blk.x, blk.y3,
                            out[blk.runs])
        return out

    def chain(self, m: torch.Tensor):
        """(loss L [N], dL/dm [N] or None): rmse runs report sqrt(m); dL/dm = 1/(2 sqrt m), 0 at m = 0."""
        if self.root is None:
            return m, None
        sq = m.clamp_min(torch.finfo(m.dtype).tiny).sqrt()
        positive = m > 0
        loss = torch.where(self.root, torch.where(positive, sq, 0.0), m)
        return loss, torch.where(self.root, torch.where(positive, 0.5 / sq, 0.0), 1.0)


def _block_terms(terms, kind: str, named: dict, x, target, params, e_out=None, psi_out=None):
    """One block of a linear or constant model: (mean loss [B], d/dweight [B, k] or None, d/dbias [B, k],
    residuals e = pred - target and psi [B, b, k]); the gradients are sums over points (not yet divided
    by b * k). terms: the block loss's lab.fused.residual_terms; e_out, psi_out: where to write e and psi
    (or None), a row step's buffers: written in place, not copied there afterwards."""
    e = block_residuals(kind, named, x, target, e_out)
    psi, value_sum = terms(e, out=psi_out, **params)
    # d/dw = sum_i psi_i x_i, d/db = sum_i psi_i (per output); the constant's value is a bias
    weight_grad = torch.linalg.vecdot(psi, x, dim=1) if kind == "linear" else None
    return value_sum / (e.shape[1] * e.shape[2]), weight_grad, psi.sum(1), e, psi


def block_residuals(kind: str, named: dict, x, target, out=None) -> torch.Tensor:
    """e = pred - target [B, b, k] of a block of a linear or constant model (into `out`, or a new tensor)."""
    if kind == "linear":  # in_features = 1: elementwise, not a batch of 1x1 matmuls
        return torch.mul(x, named["weight"].transpose(1, 2), out=out).add_(named["bias"][:, None, :]).sub_(target)
    return torch.sub(named["value"][:, None, :], target, out=out)  # [B, b, k]: the value broadcast over points


_COMPILED: dict = {}


def _compiled(spec, kind: str):
    """`_block_terms` through torch.compile, one compiled function per (loss, model kind).

    Measured by `scripts/bench --compile` on the 200-run benchmark population (2000 steps, in process):
    on 2 EPYC cores (one thread) eager 2.7 s, compiled 1.9 s plus 28 s compiling; on an H100 eager 2.6 s,
    compiled 1.9 s plus 13 s compiling. Compiling costs more than the whole training of such a study,
    so it is off by default; on a CPU it also needs a C++ compiler at run time.
    """
    key = (spec.name, kind)
    if key not in _COMPILED:
        def terms(terms_, kind_, named, x, target, params):  # the row buffers: copied by the caller
            return _block_terms(fused.residual_terms(spec), kind, named, x, target, params)

        _COMPILED[key] = torch.compile(terms, dynamic=True)
    return _COMPILED[key]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def build(cfgs, datasets, device, dtype):
    """Device tensors of a population (runs already in loss order), its parameters and references."""
    cfg0 = cfgs[0]
    N = len(cfgs)
    x = torch.stack([d.x for d in datasets]).to(device, dtype)  # [N, n, 1]
    y_orig = torch.stack([d.y for d in datasets]).to(device, dtype)  # [N, n]
    x_val = torch.stack([d.x_val for d in datasets]).to(device, dtype)  # [N, n_val, 1]
    signal_val = torch.stack([d.truth.signal(d.x_val).reshape(-1) for d in datasets]).to(device, dtype)
    outlier = torch.stack([d.outlier for d in datasets]).to(device)  # [N, n] bool
    any_norm = any(c.train.normalize_targets for c in cfgs)
    if any_norm:
        norm = torch.tensor([c.train.normalize_targets for c in cfgs], device=device)
        mu = torch.where(norm, y_orig.mean(1), 0.0)[:, None]  # [N, 1]
        sd = torch.where(norm, y_orig.std(1).clamp_min(1e-12), 1.0)[:, None]
        y = (y_orig - mu) / sd  # [N, n] training targets
    else:  # no copy: training and original units coincide
        mu = torch.zeros(N, 1, dtype=dtype, device=device)
        sd = torch.ones(N, 1, dtype=dtype, device=device)
        y = y_orig
    k = n_outputs(cfg0)
    model = models.make(cfg0.model.kind, in_features=1, n_outputs=k, hidden=cfg0.model.hidden,
                        activation=cfg0.model.activation)
    shapes = Flat(model.param_shapes())
    P = shapes.flat(model.init_stack([init_seed(c.seed) for c in cfgs], dtype=dtype, device=device))  # [N, P]

    named = shapes.named(P)
    y3 = y[..., None]
    # Blocks: contiguous runs of one loss, at most BLOCK_ELEMENTS training values (x width for mlp) each.
    width = max(cfg0.model.hidden) if model.kind == "mlp" else 1
    per_block = max(1, BLOCK_ELEMENTS // (x.shape[1] * width * k))
    blocks, start = [], 0
    line = model.kind in ("linear", "constant")
    # Candidate order statistics need one host read per row: free on a CPU, a sync on a GPU.
    candidates = row_shortcuts.candidate_count(x.shape[1]) if line and device.type == "cpu" else 0
    for name in dict.fromkeys(c.loss.name for c in cfgs):
        count = sum(c.loss.name == name for c in cfgs)
        spec = losses.spec(name)
        for lo in range(start, start + count, per_block):
            sl = slice(lo, min(lo + per_block, start + count))
            params = _stack_loss_params(cfgs[sl], name, dtype, device)
            # the quantile loss's top-1% share from counts (lab.log_row), one level of tau (several: a topk)
            single = name == "quantile" and k == 1
            classes = log_row.quantile_classes(params["tau"], x, sl.stop - sl.start) if single else None
            blocks.append(Block(runs=sl, spec=spec, terms=fused.residual_terms(spec), params=params, x=x[sl],
                                y3=y3[sl], named={key: v[sl] for key, v in named.items()}, quantile_classes=classes,
                                cheap_psi=name in fused.CHEAP_PSI))
        start += count
    roots = [losses.spec(c.loss.name).root for c in cfgs]
    root = torch.tensor(roots, device=device) if any(roots) else None

    # The outliers as padded index lists: the row sums |psi| over them with a gather of a few entries per
    # run instead of a pass over all n points (most runs have none).
    counts = outlier.sum(1)
    most = max(int(counts.max()), 1)  # the most outliers any run has (once, at setup: a host read)
    outlier_at = torch.argsort((~outlier).to(torch.int8), dim=1, stable=True)[:, :most].contiguous()  # outliers first
    outlier_w = (torch.arange(most, device=device) < counts[:, None]).to(dtype)

    # exact reference optimum of each run's own objective (float64, once)
    refs = _references(cfgs, datasets, model.kind, mu, sd)
    nan = float("nan")
    ref_loss = torch.tensor([r.loss if r else nan for r in refs], dtype=dtype, device=device)  # training units
    # Converged: gap <= converge_tol * |optimal loss|. For an (almost) exact fit the optimal loss is ~0, so
    # the scale floor is the float rounding of the loss itself, eps times the loss of predicting 0 (for mse
    # eps * mean y^2), not a fixed number that would swamp the relative rule for targets of scale 1e-6. In
    # the loss's own units: a huber delta of 1e-10 makes losses of ~1e-10 |y|, which eps * mean y^2 would
    # have called converged before a run had moved.
    floor = torch.finfo(dtype).eps * _loss_of_zero(blocks, root, k).abs()
    tol = torch.tensor([c.train.converge_tol for c in cfgs], dtype=dtype, device=device) * torch.maximum(
        ref_loss.abs(), floor)
    named_keys = named_param_keys(model.kind, k)
    mu_h, sd_h = mu[:, 0].tolist(), sd[:, 0].tolist()  # one host copy
    ref_params = torch.tensor([[to_original_units(r.params, c, mu_h[i], sd_h[i])[p] if r else nan for p in named_keys]
                               for i, (r, c) in enumerate(zip(refs, cfgs))], dtype=dtype, device=device)
    true_params = torch.tensor([[_true(d, p) for p in named_keys] for d in datasets], dtype=dtype, device=device)
    pop = Population(model=model, named=named, blocks=blocks, x=x, y3=y3, y_orig=y_orig, x_val=x_val,
                      signal_val=signal_val, outlier=outlier, outlier_at=outlier_at, outlier_w=outlier_w, mu=mu, sd=sd,
                      any_norm=any_norm, root=root, ref_loss=ref_loss, ref_params=ref_params,
                      true_params=true_params, k=k, shapes=shapes,
                      moments=row_shortcuts.ResidualMoments(x, y) if line else None,
                      largest=row_shortcuts.LargestResiduals(x, y3, model.kind, k, candidates) if candidates else None)
    return pop, P, refs, tol, named_keys, shapes


def _loss_of_zero(blocks: list[Block], root: torch.Tensor | None, k: int) -> torch.Tensor:
    """Each run's training loss [N] (training units) when it predicts 0 everywhere: e = -y."""
    sums = [blk.terms((-blk.y3).expand(-1, -1, k).contiguous(), **blk.params)[1] for blk in blocks]
    m = _join(sums) / (blocks[0].y3.shape[1] * k)
    return m if root is None else torch.where(root, m.clamp_min(0).sqrt(), m)


def named_param_keys(kind: str, k: int) -> list[str]:
    if kind == "linear":
        return ["slope", "intercept"] if k == 1 else [f"{p}_{j}" for j in range(k) for p in ("slope", "intercept")]
    if kind == "constant":
        return ["value"] if k == 1 else [f"value_{j}" for j in range(k)]
    return []


def to_original_units(named: dict[str, float], cfg: Config, mu, sd) -> dict[str, float]:
    """Map named parameters from normalised-target units back to original units."""
    mu, sd = float(mu), float(sd)
    out = {}
    for key, v in named.items():
        if key.startswith(("slope", "weight")):
            out[key] = v * sd
        elif key.startswith(("intercept", "value", "bias")):
            out[key] = v * sd + mu
        else:
            out[key] = v
    return out


def _true(ds: Dataset, key: str) -> float:
    t = ds.truth
    if key.startswith("slope") and t.slope is not None:
        return float(t.slope)
    if key.startswith("intercept") and t.intercept is not None:
        return float(t.intercept)
    return float("nan")


def _references(cfgs, datasets, model_kind, mu, sd) -> list:
    """Exact optimum of each run's training objective, grouped by loss for the batched solver."""
    if model_kind not in ("constant", "linear"):
        return [None] * len(cfgs)
    out = [None] * len(cfgs)
    by_problem: dict = {}
    for i, c in enumerate(cfgs):
        key = (c.loss.name, tuple(sorted((kk, tuple(v) if isinstance(v, list) else v)
                                         for kk, v in loss_params(c).items())))
        by_problem.setdefault(key, []).append(i)
    mu_c, sd_c = mu.double().cpu(), sd.double().cpu()
    for (name, params), idx in by_problem.items():
        xs = torch.stack([datasets[i].x.reshape(-1).double() for i in idx])
        ys = torch.stack([(datasets[i].y.double() - mu_c[i]) / sd_c[i] for i in idx])
        try:
            solved = reference.solve_many(name, {kk: list(v) if isinstance(v, tuple) else v for kk, v in params},
                                          model_kind, xs.numpy(), ys.numpy())
        except NotImplementedError:
            solved = [None] * len(idx)
        for i, r in zip(idx, solved):
            out[i] = r
    return out
