"""Problems and objectives shared by tests/test_reference.py and tests/test_quantile_fit.py."""

import numpy as np
import torch

from lab import losses
from lab.reference import Reference


def data(n=201, seed=0, offset=(0.0, 0.0)):
    """A noisy line with heavy-tailed (t, 2 dof) noise, so the losses' minimisers differ visibly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 1.5 * x - 0.5 + rng.standard_t(2, size=n)
    return x + offset[0], y + offset[1]


def objective(loss, params, model, x, y, theta, weight=None):
    """mean_i fn(f_theta(x_i), y_i) through lab.losses, in float64 (weighted mean if weight is given)."""
    s = losses.spec(loss)
    yt = torch.as_tensor(y, dtype=torch.float64)
    pred = theta[0] * torch.as_tensor(x, dtype=torch.float64) + theta[1] if model == "linear" else torch.full_like(yt, theta[0])
    w = torch.ones_like(yt) if weight is None else torch.as_tensor(weight, dtype=torch.float64)
    value = float((w * s.fn(pred, yt, **losses.check_params(s.name, params))).sum() / w.sum())
    return value ** 0.5 if s.root else value


def theta_of(ref: Reference, model):
    return [ref.params["slope"], ref.params["intercept"]] if model == "linear" else [ref.params["value"]]
