"""Synthetic regression datasets that carry their own truth.

Every kind draws

    x ~ U(x_lo, x_hi),    y = target_scale * (f(x) + eps),

with f the noise-free signal (``slope * x + intercept``, or ``intercept + slope * sin(2x)`` for
``nonlinear``) and eps the kind's noise. Because the process is known, each :class:`Dataset` holds a
:class:`Truth` that answers in closed form what a loss should converge to: the conditional mean (MSE),
median (MAE) and tau-quantile (pinball loss). ``target_scale`` multiplies y *and* the truth: the
guide's "house prices in thousands" pitfall, where MSE values grow by target_scale**2.

Determinism: everything is drawn in float64 from one seeded CPU ``torch.Generator`` and only then cast
and moved, so a (kind, params, seed) triple gives bitwise-identical tensors on every device. The
training set uses the generator seeded ``2 * seed`` and the validation set ``2 * seed + 1``: the two
streams never overlap for different seeds, and the validation draw does not change when n changes.
Within a set the draw order is: x, then the noise, then (outliers only) which points to displace and
their signs.

One concept per module, in the order they depend on each other: `lab.data.kinds` (the kinds and their
parameters), `lab.data.process` (the signal, the noise and its closed forms) and `lab.data.dataset`
(`make`, `Dataset`, `Truth`, `load`); everything is importable from `lab.data` itself.
"""

from lab.atomic import write_atomic  # noqa: F401 (the one implementation of atomic files, as lab.rundir's)
from lab.data.dataset import (  # noqa: F401 (re-exported)
    DataRangeError,
    Dataset,
    Truth,
    load,
    make,
)
from lab.data.kinds import (  # noqa: F401 (re-exported)
    KINDS,
    Kind,
    Param,
    available,
    check,
    defaults,
)
