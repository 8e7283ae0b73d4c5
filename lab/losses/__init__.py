"""Regression losses: per-element formulas, their closed-form derivatives, thin modules and a registry.

The package keeps one concept per module, in the order they depend on each other:

- ``lab.losses.functional``: each loss per element (``mse``, ``huber``, ...), its ``*_psi``, and ``reduce_loss``;
- ``lab.losses.params``: each loss's parameters, their defaults and ranges, and ``check``;
- ``lab.losses.modules``: the ``nn.Module`` of each loss (``HuberLoss``, ...);
- ``lab.losses.registry``: every loss by name and alias (``spec``, ``build``, ``check_params``, ``describe``).

Everything a caller uses is importable from ``lab.losses`` itself.

Conventions used by every loss here:

- Residual ``e = input - target`` (prediction minus truth). The quantile and expectile losses are written,
  as in the guide, in ``u = target - input = -e``: ``tau*u if u >= 0 else (tau-1)*u``.
- ``fn(input, target, **params)`` returns per-element values (no reduction) and broadcasts like any
  elementwise op; ``psi(input, target, **params)`` returns ``d fn / d input`` per element (the influence
  function) in closed form, so a trainer can form gradients without autograd.
- A parameter is a Python float or a tensor broadcastable against the input (per-run values, e.g. delta
  of shape [G, 1, 1] against input [G, n, 1]). Nothing here calls ``.item()`` or branches in Python on a
  tensor's value, so a population of runs trains without host-device syncs.
- float16/bfloat16 inputs are computed in float32 and returned in the input dtype: squares such as
  ``(e/delta)^2`` overflow float16 (max 65504) long before the loss itself does.
- The modules validate (shape mismatch -> ValueError, non-floating dtype -> TypeError, bad parameter ->
  ValueError); ``fn`` and ``psi`` do not, because they run inside the training loop.
- The smooth robust losses (huber, log_cosh, pseudo_huber, cauchy, tukey; general at scale 1) are all
  ``e^2/2 + O(e^4)`` near zero, whatever their parameter: half of MSE there, so their learning rates compare.
"""

from lab.losses.functional import (  # noqa: F401 (re-exported)
    REDUCTIONS,
    cauchy,
    cauchy_psi,
    expectile,
    expectile_psi,
    general,
    general_psi,
    huber,
    huber_psi,
    log_cosh,
    log_cosh_psi,
    mae,
    mae_psi,
    mse,
    mse_psi,
    pseudo_huber,
    pseudo_huber_psi,
    quantile,
    quantile_psi,
    reduce_loss,
    rmse,
    rmse_psi,
    safe_sqrt,
    smooth_l1,
    smooth_l1_psi,
    tukey,
    tukey_psi,
)
from lab.losses.modules import (  # noqa: F401 (re-exported)
    CauchyLoss,
    ExpectileLoss,
    GeneralRobustLoss,
    HuberLoss,
    LogCoshLoss,
    MAELoss,
    MSELoss,
    PseudoHuberLoss,
    QuantileLoss,
    RMSELoss,
    SmoothL1Loss,
    TukeyLoss,
)
from lab.losses.params import (  # noqa: F401 (re-exported)
    ParamSpec,
)
from lab.losses.registry import (  # noqa: F401 (re-exported)
    LossSpec,
    available,
    build,
    check_params,
    describe,
    spec,
)
