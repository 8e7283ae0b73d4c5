"""Tests for lab.models: the stacked forward against PyTorch's own single-run modules, the closed-form
vjp against autograd, and seeded initialisation that does not depend on the population size."""

import math

import pytest
import torch
from torch import nn

from lab import models

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)
ARCHITECTURES = [
    ("constant", {}),
    ("constant", {"n_outputs": 3}),
    ("linear", {}),
    ("linear", {"n_outputs": 3}),
    ("linear", {"in_features": 2, "n_outputs": 2}),
    ("mlp", {"hidden": (5, 4), "activation": "tanh"}),
    ("mlp", {"hidden": (6,), "activation": "relu", "n_outputs": 2}),
    ("mlp", {"hidden": (4, 4), "activation": "gelu", "in_features": 2}),
    ("mlp", {"hidden": (3,), "activation": "silu", "n_outputs": 3}),
]
IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for kind, kw in ARCHITECTURES]


def batch(model, runs=3, n=7, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(runs, n, model.in_features, generator=g, dtype=dtype).to(device)
    return model.init_stack(list(range(10, 10 + runs)), dtype=dtype, device=device), x


def one_run(params, r):
    return {name: value[r] for name, value in params.items()}


def test_available_and_param_shapes():
    assert models.available() == ["constant", "linear", "mlp"]
    assert models.make("constant", n_outputs=3).param_shapes() == {"value": (3,)}
    assert models.make("linear", in_features=2, n_outputs=3).param_shapes() == {
        "weight": (3, 2),
        "bias": (3,),
    }
    assert models.make("mlp", hidden=(5, 4), n_outputs=2).param_shapes() == {
        "0.weight": (5, 1),
        "0.bias": (5,),
        "2.weight": (4, 5),
        "2.bias": (4,),
        "4.weight": (2, 4),
        "4.bias": (2,),
    }


@pytest.mark.parametrize(("kind", "kw"), ARCHITECTURES, ids=IDS)
def test_stacked_forward_equals_each_runs_module(kind, kw):
    model = models.make(kind, **kw)
    params, x = batch(model)
    out = model.forward(params, x)
    assert out.shape == (3, 7, model.n_outputs) and out.dtype == torch.float64
    for r in range(3):
        module = model.module(one_run(params, r))
        assert isinstance(module, nn.Module)
        with torch.no_grad():
            torch.testing.assert_close(out[r], module(x[r]), rtol=1e-12, atol=1e-12)


def test_module_views_are_the_pytorch_modules_users_know():
    linear = models.make("linear")
    params = linear.init(0)
    layer = linear.module(params)
    assert type(layer) is nn.Linear and torch.equal(layer.weight.data, params["weight"])
    mlp = models.make("mlp", hidden=(4,), activation="relu")
    net = mlp.module(mlp.init(0))
    assert isinstance(net, nn.Sequential) and [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear]
    constant = models.make("constant", n_outputs=2).module({"value": torch.tensor([1.5, -2.0])})
    assert [name for name, _ in constant.named_parameters()] == ["value"]
    assert constant(torch.zeros(4, 1)).tolist() == [[1.5, -2.0]] * 4


def test_linear_forward_worked_example():
    # slope 2, intercept 1 at x = 0, 1, 2 -> 1, 3, 5; a second run with slope -1, intercept 0 -> 0, -1, -2
    model = models.make("linear")
    params = {"weight": torch.tensor([[[2.0]], [[-1.0]]]), "bias": torch.tensor([[1.0], [0.0]])}
    x = torch.tensor([0.0, 1.0, 2.0])[None, :, None].expand(2, 3, 1)
    assert model.forward(params, x)[..., 0].tolist() == [[1.0, 3.0, 5.0], [0.0, -1.0, -2.0]]


@pytest.mark.parametrize(("kind", "kw"), ARCHITECTURES, ids=IDS)
def test_vjp_equals_autograd(kind, kw):
    model = models.make(kind, **kw)
    params, x = batch(model, seed=1)
    grad_output = torch.randn(
        3, 7, model.n_outputs, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    leaves = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    (model.forward(leaves, x) * grad_output).sum().backward()
    with torch.no_grad():  # the trainer's context: the vjp must not depend on grad mode
        got = model.vjp(params, x, grad_output)
    assert set(got) == set(params)
    for name in params:
        assert got[name].shape == params[name].shape
        torch.testing.assert_close(got[name], leaves[name].grad, rtol=1e-12, atol=1e-12)


def test_constant_vjp_worked_example():
    # forward is the value at every point, so d/dvalue sum(g * forward) = sum of g over points: 1+2+3 = 6
    model = models.make("constant")
    params = {"value": torch.zeros(1, 1)}
    grad = model.vjp(params, torch.zeros(1, 3, 1), torch.tensor([1.0, 2.0, 3.0])[None, :, None])
    assert grad["value"].tolist() == [[6.0]]


@pytest.mark.parametrize(("kind", "kw"), ARCHITECTURES, ids=IDS)
def test_init_is_per_seed_and_independent_of_stack_size(kind, kw):
    model = models.make(kind, **kw)
    pair, single = model.init_stack([3, 5]), model.init_stack([5])
    for name in model.param_shapes():
        assert torch.equal(pair[name][1], single[name][0])
        assert torch.equal(pair[name][0], model.init(3)[name])
    assert any(not torch.equal(pair[name][0], pair[name][1]) for name in pair)  # seeds 3 and 5 differ


def test_init_stack_dtype_and_device():
    params = models.make("mlp", hidden=(3,)).init_stack([0, 1], dtype=torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    # float32 stack is the float64 draw rounded, so every run starts from the same point in either dtype
    torch.testing.assert_close(
        params["0.weight"][1], models.make("mlp", hidden=(3,)).init(1)["0.weight"].float()
    )


def test_mlp_init_matches_pytorch_default_distribution():
    # nn.Linear's default (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight
    # and bias; a uniform on [-b, b] has sd b/sqrt(3). 256*256 draws put the sample sd within 1% of it.
    model = models.make("mlp", in_features=4, hidden=(256, 256), n_outputs=1)
    params = model.init(0)
    for name, fan_in in [("0.weight", 4), ("2.weight", 256), ("2.bias", 256), ("4.weight", 256)]:
        bound = 1 / math.sqrt(fan_in)
        assert params[name].abs().max() <= bound
        if name == "2.weight":
            assert params[name].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
            assert params[name].abs().max() > 0.99 * bound  # it fills the range
    # Reference: PyTorch's own nn.Linear(256, 256) draws the same distribution (same range, same spread).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = nn.Linear(256, 256, dtype=torch.float64).weight.detach()
    ours = params["2.weight"]
    assert ours.std().item() == pytest.approx(reference.std().item(), rel=0.02)
    assert ours.abs().max().item() == pytest.approx(reference.abs().max().item(), rel=0.01)


def test_linear_and_constant_init_are_small_normals():
    # documented: N(0, 0.1^2); 4000 draws put the sample sd within 5% of 0.1 (sd of a sample sd ~ 1.1%)
    weights = models.make("linear", n_outputs=4000).init(0)["weight"]
    assert weights.std().item() == pytest.approx(models.INIT_STD, rel=0.05)


def test_named_floats_speak_the_guides_language():
    linear = models.make("linear")
    params = {
        "weight": torch.tensor([[2.5]], dtype=torch.float64),
        "bias": torch.tensor([-0.75], dtype=torch.float64),
    }
    assert linear.named_floats(params) == {"slope": 2.5, "intercept": -0.75}
    two = models.make("linear", n_outputs=2)
    p = two.init(4)
    assert two.named_floats(p) == {
        "slope_0": p["weight"][0, 0].item(),
        "intercept_0": p["bias"][0].item(),
        "slope_1": p["weight"][1, 0].item(),
        "intercept_1": p["bias"][1].item(),
    }
    assert models.make("constant").named_floats({"value": torch.tensor([3.0])}) == {"value": 3.0}
    assert models.make("constant", n_outputs=2).named_floats({"value": torch.tensor([1.0, 2.0])}) == {
        "value_0": 1.0,
        "value_1": 2.0,
    }
    assert models.make("mlp").named_floats(models.make("mlp").init(0)) == {}
    with pytest.raises(ValueError, match="no run axis"):  # a stacked dict by mistake
        linear.named_floats(linear.init_stack([0, 1]))


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize(("kind", "kw"), ARCHITECTURES, ids=IDS)
def test_cuda_matches_cpu(kind, kw, device):
    model = models.make(kind, **kw)
    params, x = batch(model)
    params_gpu, x_gpu = batch(model, device=device)
    assert all(torch.equal(params_gpu[k].cpu(), params[k]) for k in params)  # drawn on the CPU, then moved
    out = model.forward(params_gpu, x_gpu)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), model.forward(params, x), rtol=1e-12, atol=1e-12)
    grad = torch.ones_like(out)
    for name, value in model.vjp(params_gpu, x_gpu, grad).items():
        torch.testing.assert_close(
            value.cpu(), model.vjp(params, x, grad.cpu())[name], rtol=1e-12, atol=1e-12
        )


def test_shape_errors_name_the_expected_layout():
    model = models.make("linear")
    params, x = batch(model, runs=2)
    with pytest.raises(ValueError, match=r"\[runs=2, n, in_features=1\]"):
        model.forward(params, x[0])  # forgot the run axis
    with pytest.raises(ValueError, match="runs=2"):
        model.forward(params, x[:1])
    with pytest.raises(ValueError, match="grad_output"):
        model.vjp(params, x, torch.ones(2, 7))
    with pytest.raises(ValueError, match="keys"):
        model.forward({"weight": params["weight"]}, x)


@pytest.mark.parametrize(
    ("kwargs", "mentions"),
    [
        ({"kind": "quadratic"}, "constant, linear, mlp"),
        ({"kind": "mlp", "activation": "sigmoid"}, "tanh, relu, gelu, silu"),
        ({"kind": "linear", "in_features": 0}, "in_features"),
        ({"kind": "linear", "n_outputs": 0}, "n_outputs"),
        ({"kind": "linear", "n_outputs": 1.5}, "n_outputs"),
        ({"kind": "mlp", "hidden": (32, 0)}, "hidden"),
        ({"kind": "mlp", "hidden": ()}, "hidden"),
        ({"kind": "mlp", "hidden": 32}, "hidden"),
    ],
)
def test_bad_model_arguments_raise_value_error(kwargs, mentions):
    with pytest.raises(ValueError, match=mentions):
        models.make(**kwargs)


def test_models_are_comparable_descriptions():
    assert models.make("mlp", hidden=[8, 8]) == models.make("mlp", hidden=(8, 8))  # a TOML list is fine
    assert models.make("linear", n_outputs=3).n_outputs == 3 and models.make("linear").kind == "linear"
