"""Stateless model descriptions for training a population of runs at once.

A :class:`Model` holds only the architecture. Parameters live outside it, as a dict of tensors with a
leading run dimension, so one forward pass evaluates every run of a population:

    forward(params [runs, ...], x [runs, n, in_features]) -> [runs, n, n_outputs]

Each run's initial parameters come from its own CPU ``torch.Generator`` seeded with that run's seed, so
run i starts from the same point however many runs share the stack. ``vjp`` returns the gradient of
``sum(grad_output * forward(params, x))`` for each parameter: the chain rule's step from dLoss/dPrediction
to dLoss/dParameter, done in closed form for ``constant`` and ``linear`` (the trainer's hot path) and by
autograd for ``mlp``. A model whose loss has k taus has k outputs, one per tau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {
    "tanh": (torch.tanh, nn.Tanh),
    "relu": (torch.relu, nn.ReLU),
    "gelu": (F.gelu, nn.GELU),
    "silu": (F.silu, nn.SiLU),
}
# constant and linear start at N(0, 0.1^2): near zero, so the path to the truth is the loss's doing
INIT_STD = 0.1


@dataclass(frozen=True)
class Model:
    """An architecture: parameter shapes, seeded init, a batched forward and its vector-Jacobian product."""

    kind: ClassVar[str]
    in_features: int = 1
    n_outputs: int = 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-run parameter shapes, in initialisation order."""
        raise NotImplementedError

    def _draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def init(self, seed: int, dtype=torch.float64) -> dict[str, Tensor]:
        """One run's parameters on the CPU, drawn in float64 from a generator seeded with ``seed``."""
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"seed must be an integer; got {seed!r}")
        params = self._draw(torch.Generator().manual_seed(int(seed)))
        return {name: value.to(dtype) for name, value in params.items()}

    def init_stack(self, seeds: Sequence[int], dtype=torch.float64, device="cpu") -> dict[str, Tensor]:
        """[runs, ...] parameters: ``init(seed)`` for each seed, stacked, then cast and moved."""
        if len(seeds) == 0:
            raise ValueError("seeds must name at least one run; got an empty list")
        runs = [self.init(seed) for seed in seeds]
        return {name: torch.stack([r[name] for r in runs]).to(dtype=dtype, device=device) for name in runs[0]}

    def forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Predictions [runs, n, n_outputs] for x [runs, n, in_features]."""
        raise NotImplementedError

    def vjp(self, params: dict[str, Tensor], x: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        """d/dparams of sum(grad_output * forward(params, x)); grad_output [runs, n, n_outputs]."""
        raise NotImplementedError

    def named_floats(self, params_one_run: dict[str, Tensor]) -> dict[str, float]:
        """The parameters in the guide's language (e.g. slope, intercept) as Python floats."""
        return {}

    def module(self, params_one_run: dict[str, Tensor]) -> nn.Module:
        """A plain single-run ``nn.Module`` holding copies of the parameters; forward(x [n, in]) [n, out]."""
        raise NotImplementedError

    # -- shared checks: shapes only, so they cost no host-device sync on the hot path --

    def _check(self, params: dict[str, Tensor], x: Tensor, grad_output: Tensor | None = None) -> int:
        shapes = self.param_shapes()
        if set(params) != set(shapes):
            raise ValueError(f"{self.kind} params must have keys {sorted(shapes)}; got {sorted(params)}")
        runs = next(iter(params.values())).shape[0] if params else 0
        for name, shape in shapes.items():
            if tuple(params[name].shape) != (runs, *shape):
                raise ValueError(
                    f"params[{name!r}] must have shape [runs, {', '.join(map(str, shape))}] = "
                    f"{[runs, *shape]}; got {list(params[name].shape)}"
                )
        if x.ndim != 3 or x.shape[0] != runs or x.shape[2] != self.in_features:
            raise ValueError(
                f"x must have shape [runs={runs}, n, in_features={self.in_features}]; got {list(x.shape)}"
            )
        if grad_output is not None and tuple(grad_output.shape) != (runs, x.shape[1], self.n_outputs):
            raise ValueError(
                f"grad_output must have the forward's shape {[runs, x.shape[1], self.n_outputs]}; "
                f"got {list(grad_output.shape)}"
            )
        return runs

    def _one_run(self, params_one_run: dict[str, Tensor]) -> dict[str, Tensor]:
        shapes = self.param_shapes()
        if set(params_one_run) != set(shapes) or any(
            tuple(params_one_run[k].shape) != s for k, s in shapes.items()
        ):
            got = {k: list(v.shape) for k, v in params_one_run.items()}
            raise ValueError(f"expected one run's params with shapes {shapes} (no run axis); got {got}")
        return params_one_run

    def _suffix(self, output: int) -> str:
        return f"_{output}" if self.n_outputs > 1 else ""


@dataclass(frozen=True)
class Constant(Model):
    """prediction = value, whatever x: the lab's cleanest view of what each loss converges to.

    With no x to explain, MSE drives ``value`` to the mean of y, MAE to its median and the pinball loss
    to its tau-quantile. Parameter: value [n_outputs]; init N(0, INIT_STD^2).
    """

    kind: ClassVar[str] = "constant"

    def param_shapes(self):
        return {"value": (self.n_outputs,)}

    def _draw(self, generator):
        return {"value": INIT_STD * torch.randn(self.n_outputs, generator=generator, dtype=torch.float64)}

    def forward(self, params, x):
        runs = self._check(params, x)
        # A broadcast view of the parameter, not a copy: read it, never write into it.
        return params["value"][:, None, :].expand(runs, x.shape[1], self.n_outputs)

    def vjp(self, params, x, grad_output):
        """d/dvalue_o sum_n g_no * value_o = sum_n g_no: every point's prediction is the value itself."""
        self._check(params, x, grad_output)
        return {"value": grad_output.sum(dim=1)}

    def named_floats(self, params_one_run):
        value = self._one_run(params_one_run)["value"].tolist()  # .tolist(): one host sync for all outputs
        return {f"value{self._suffix(k)}": v for k, v in enumerate(value)}

    def module(self, params_one_run):
        return ConstantModule(self._one_run(params_one_run)["value"], self.in_features)


class ConstantModule(nn.Module):
    """Single-run view of :class:`Constant`: one Parameter ``value`` [out], forward(x [n, in]) -> [n, out]."""

    def __init__(self, value: Tensor, in_features: int = 1):
        super().__init__()
        self.in_features = in_features
        self.value = nn.Parameter(value.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand(x.shape[0], -1)


@dataclass(frozen=True)
class Linear(Model):
    """prediction = x @ weight.T + bias: slope and intercept in the guide's one-feature case.

    Parameters: weight [n_outputs, in_features], bias [n_outputs]; both init N(0, INIT_STD^2), weight
    drawn first.
    """

    kind: ClassVar[str] = "linear"

    def param_shapes(self):
        return {"weight": (self.n_outputs, self.in_features), "bias": (self.n_outputs,)}

    def _draw(self, generator):
        return {
            name: INIT_STD * torch.randn(shape, generator=generator, dtype=torch.float64)
            for name, shape in self.param_shapes().items()
        }

    def forward(self, params, x):
        self._check(params, x)
        # [runs, n, in] x [runs, out, in] -> [runs, n, out]
        return torch.baddbmm(params["bias"][:, None, :], x, params["weight"].transpose(1, 2))

    def vjp(self, params, x, grad_output):
        """With g = grad_output: d/dW_oi sum_n g_no (sum_i x_ni W_oi + b_o) = sum_n g_no x_ni, i.e. g^T x
        per run; d/db_o = sum_n g_no. Two batched ops, no autograd: this is the trainer's hot path."""
        self._check(params, x, grad_output)
        return {"weight": torch.bmm(grad_output.transpose(1, 2), x), "bias": grad_output.sum(dim=1)}

    def named_floats(self, params_one_run):
        p = self._one_run(params_one_run)
        weight, bias = p["weight"].tolist(), p["bias"].tolist()  # host sync, once per tensor
        floats = {}
        for k in range(self.n_outputs):
            for j in range(self.in_features):
                feature = f"_x{j}" if self.in_features > 1 else ""
                floats[f"slope{self._suffix(k)}{feature}"] = weight[k][j]
            floats[f"intercept{self._suffix(k)}"] = bias[k]
        return floats

    def module(self, params_one_run):
        p = self._one_run(params_one_run)
        layer = nn.Linear(
            self.in_features, self.n_outputs, device=p["weight"].device, dtype=p["weight"].dtype
        )
        with torch.no_grad():
            layer.weight.copy_(p["weight"])
            layer.bias.copy_(p["bias"])
        return layer


@dataclass(frozen=True)
class MLP(Model):
    """Fully connected network: Linear -> activation -> ... -> Linear, with ``hidden`` widths.

    Parameter names follow ``nn.Sequential``'s state_dict ("0.weight", "0.bias", "2.weight", ...), so
    ``module()`` loads them as they are. Init matches ``nn.Linear``'s default (kaiming-uniform with
    a=sqrt(5)): weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn layer by layer, weight first,
    from the run's own generator.
    """

    kind: ClassVar[str] = "mlp"
    hidden: tuple[int, ...] = (32, 32)
    activation: str = "tanh"
    _layers: tuple[tuple[str, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        widths = (self.in_features, *self.hidden, self.n_outputs)
        # (sequential index, fan_in, fan_out); activations sit at the odd indices between layers
        layers = tuple((str(2 * i), widths[i], widths[i + 1]) for i in range(len(widths) - 1))
        object.__setattr__(self, "_layers", layers)

    def param_shapes(self):
        shapes = {}
        for index, fan_in, fan_out in self._layers:
            shapes[f"{index}.weight"] = (fan_out, fan_in)
            shapes[f"{index}.bias"] = (fan_out,)
        return shapes

    def _draw(self, generator):
        params = {}
        for name, shape in self.param_shapes().items():
            fan_in = self._layers[int(name.split(".")[0]) // 2][1]
            bound = 1 / math.sqrt(fan_in)
            params[name] = (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * bound
        return params

    def _apply(self, params, x):
        act = _ACTIVATIONS[self.activation][0]
        h = x
        for i, (index, _, _) in enumerate(self._layers):
            if i > 0:
                h = act(h)
            h = torch.baddbmm(
                params[f"{index}.bias"][:, None, :], h, params[f"{index}.weight"].transpose(1, 2)
            )
        return h

    def forward(self, params, x):
        self._check(params, x)
        return self._apply(params, x)

    def vjp(self, params, x, grad_output):
        self._check(params, x, grad_output)
        with torch.enable_grad():  # the trainer may run under no_grad; this gradient is wanted regardless
            leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
            out = self._apply(leaves, x.detach())
            grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
        return dict(zip(leaves, grads, strict=True))

    def module(self, params_one_run):
        p = self._one_run(params_one_run)
        any_param = next(iter(p.values()))
        layers = []
        for i, (_, fan_in, fan_out) in enumerate(self._layers):
            if i > 0:
                layers.append(_ACTIVATIONS[self.activation][1]())
            layers.append(nn.Linear(fan_in, fan_out, device=any_param.device, dtype=any_param.dtype))
        net = nn.Sequential(*layers)
        net.load_state_dict(p)
        return net


_KINDS = {"constant": Constant, "linear": Linear, "mlp": MLP}


def available() -> list[str]:
    """Model kinds: constant, linear, mlp."""
    return list(_KINDS)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def make(kind: str, in_features=1, n_outputs=1, hidden=(32, 32), activation="tanh") -> Model:
    """Build a model description. ``hidden`` and ``activation`` are checked always but used only by mlp.

    A loss with k taus needs ``n_outputs=k``: one output per quantile.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}; available: {', '.join(_KINDS)}")
    in_features = _positive_int("in_features", in_features)
    n_outputs = _positive_int("n_outputs", n_outputs)
    # A config value: a wrong type is a bad value here, so it gets ValueError like the rest.
    widths = list(hidden) if isinstance(hidden, Sequence) and not isinstance(hidden, str) else None
    if widths is None:
        raise ValueError(f"hidden must be a list of layer widths, e.g. [32, 32]; got {hidden!r}")
    hidden = tuple(_positive_int("hidden widths", width) for width in widths)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; available: {', '.join(_ACTIVATIONS)}")
    if kind == "mlp":
        if not hidden:
            raise ValueError("hidden must list at least one width for kind 'mlp' (with none it is 'linear')")
        return MLP(in_features, n_outputs, hidden, activation)
    return _KINDS[kind](in_features, n_outputs)
