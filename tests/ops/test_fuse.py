"""crelu_ext.fuse: hand-written CReLU idioms become the fused op, with the
same outputs and gradients bit for bit; everything else is left alone.

test_fuse_live.py changes what a fused model's Python reads between calls;
test_fuse_deploy.py exports fused models."""

import copy
import inspect
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, make_input, readme_example
from torch import nn

import crelu_ext
from crelu_ext import _rewrite
from crelu_ext.fuse import FuseWarning, Skipped, dynamo_backend, rewrite


def _outputs_and_grads(model, x, grad_seed=0, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(grad_seed)  # the same random numbers for each model called (dropout)
    out = model(x, *args, **kwargs)
    grad_out = make_input(out.shape, out.dtype, seed=grad_seed, special_fraction=0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        out, [x, *params], grad_out, allow_unused=True, materialize_grads=True
    )
    return out, grads


def assert_same_call(original, fused, x, *args, x_feeds_others=False, what="", **kwargs):
    """One call of each, same outputs, input gradient and parameter gradients,
    bit for bit. When ``x`` also feeds other ops than the CReLU, the input
    gradient where ``x`` is NaN need only be NaN in the same places: autograd
    sums its parts there in another order."""
    out, grads = _outputs_and_grads(original, x, 0, *args, **kwargs)
    fused_out, fused_grads = _outputs_and_grads(fused, x, 0, *args, **kwargs)
    assert_bitwise_equal(fused_out, out, f"{what} output")
    if x_feeds_others:
        assert torch.equal(torch.isnan(fused_grads[0]), torch.isnan(grads[0]))
        keep = ~torch.isnan(x)
        fused_grads = (fused_grads[0][keep], *fused_grads[1:])
        grads = (grads[0][keep], *grads[1:])
    for i, (actual, expected) in enumerate(zip(fused_grads, grads, strict=True)):
        assert_bitwise_equal(actual, expected, f"{what} gradient {i}")


def assert_fused_like(original, fused, x, x_feeds_others=False):
    """:func:`assert_same_call` in training and in eval."""
    for training in (True, False):
        original.train(training)
        fused.train(training)
        mode = "train" if training else "eval"
        assert_same_call(original, fused, x, x_feeds_others=x_feeds_others, what=mode)


def fuse_copy(model, **options):
    """``(model as it was, model fused in place)``."""
    original = copy.deepcopy(model)
    fused = crelu_ext.fuse(model, **options)
    assert fused is model
    return original, fused


def generated(module) -> str:
    """The source of the forwards ``fuse`` gave ``module`` and its submodules."""
    texts = []
    for submodule in module.modules():
        forward = submodule.__dict__.get("forward")
        if _rewrite.is_rewritten(forward):
            texts.append(inspect.getsource(forward))
    return "".join(texts)


def fused_calls(module) -> int:
    return generated(module).count("__crelu_ext_fused__(")


def cats(module) -> int:
    """Concatenations the rewritten code still calls itself."""
    return generated(module).count("torch.cat(")


def native_calls(model, *args) -> int:
    """How many times one call of ``model`` runs the fused op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(*args)
    return sum(event.name == "crelu_ext::crelu" for event in profile.events())


class DetectorBlock(nn.Module):
    """conv -> BN -> cat([x, -x]) -> relu_, as face detectors write it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = torch.cat([x, -x], 1)
        x = F.relu(x, inplace=True)
        return self.head(x)


class MLP(nn.Module):
    """cat((relu(h), relu(-h)), dim=-1), as RL and Lipschitz-network code writes it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.cat((F.relu(h), F.relu(-h)), dim=-1))


class PVANetBlock(nn.Module):
    """cat((x, -x), 1) and then a ReLU module."""

    def __init__(self, inplace):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return (
            self.relu(torch.cat((self.conv(x), -self.conv(x) * 1), 1))
            + self.relu(torch.cat((x, x.neg()), 1)).sum()
        )


@pytest.mark.parametrize("model", [DetectorBlock(), MLP()], ids=["detector", "mlp"])
def test_documented_models(model):
    x = make_input((2, 3, 5, 5) if isinstance(model, DetectorBlock) else (4, 6), torch.float32)
    model, fused = fuse_copy(model)
    assert len(fused.fused) == 1 and fused_calls(fused) == 1 and cats(fused) == 0
    assert fused.fuse_skipped == []
    assert_fused_like(model, fused, x)
    assert native_calls(fused, x) == 1 and native_calls(model, x) == 0


def test_what_fused_lists():
    _, detector = fuse_copy(DetectorBlock())
    assert detector.fused == ["x = torch.cat([x, -x], 1); x = F.relu(x, inplace=True)"]
    _, mlp = fuse_copy(nn.Sequential(MLP(), nn.Sequential(MLP())))
    assert mlp.fused == [
        "0: torch.cat((F.relu(h), F.relu(-h)), dim=-1)",
        "1.0: torch.cat((F.relu(h), F.relu(-h)), dim=-1)",
    ]


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_module_after_cat(inplace):
    model = PVANetBlock(inplace)
    model, fused = fuse_copy(model)
    # The first cat is of two different tensors (two conv calls): left alone.
    assert fused_calls(fused) == 1 and cats(fused) == 1
    assert_fused_like(model, fused, make_input((2, 3, 4, 4), torch.float32))


# Each idiom as a forward: x * 1.0 so that the input is not mutated.


def cat_of_relus(self, x):
    x = x * 1.0
    return torch.cat([torch.relu(x), torch.relu(-x)], self.dim)


def cat_of_functional_relus_keyword_dim(self, x):
    x = x * 1.0
    return torch.cat([F.relu(x), F.relu(torch.neg(x))], dim=self.dim)


def cat_of_method_relus(self, x):
    x = x * 1.0
    return torch.cat((x.relu(), x.neg().relu()), self.dim)


def cat_of_relus_inplace_negative(self, x):
    x = x * 1.0
    return torch.cat([x.relu(), F.relu(-x, True)], self.dim)


def relu_of_cat(self, x):
    x = x * 1.0
    return torch.relu(torch.cat([x, -x], self.dim))


def relu__of_cat(self, x):
    x = x * 1.0
    return torch.relu_(torch.cat([x, -x], self.dim))


def method_relu_of_cat(self, x):
    x = x * 1.0
    return torch.cat((x, -x), self.dim).relu()


def method_relu__of_cat(self, x):
    x = x * 1.0
    return torch.cat((x, x.neg()), self.dim).relu_()


def functional_relu_inplace_of_cat(self, x):
    x = x * 1.0
    return F.relu(torch.cat([x, x.negative()], self.dim), inplace=True)


def mul_minus_one(self, x):
    x = x * 1.0
    return torch.cat([x, x.mul(-1)], self.dim).relu()


def minus_one_times(self, x):
    x = x * 1.0
    return torch.cat([x, -1.0 * x], self.dim).relu()


def torch_mul_minus_one(self, x):
    x = x * 1.0
    return torch.cat([x, torch.mul(x, -1)], self.dim).relu()


def concatenate_axis(self, x):
    x = x * 1.0
    return torch.concatenate([x, -x], axis=self.dim).relu()


def concat_of_relu_modules(self, x):
    x = x * 1.0
    return torch.concat([self.relu(x), self.relu(x * -1)], self.dim)


def pair_of_statements(self, x):
    x = x * 1.0
    x = torch.cat([x, -x], self.dim)
    x = self.relu(x)
    return x


def pair_returned(self, x):
    h = x * 1.0
    y = torch.cat((h, -h), self.dim)
    return F.relu(y)


def pair_in_place(self, x):
    x = x * 1.0
    y = torch.cat([x, -x], self.dim)
    F.relu(y, inplace=True)  # y holds the result
    return y * 2


def on_several_lines(self, x):
    x = x * 1.0
    return torch.cat(
        [
            F.relu(x),  # the positive half
            F.relu(-x),
        ],
        dim=self.dim,
    )


IDIOMS = [
    cat_of_relus,
    cat_of_functional_relus_keyword_dim,
    cat_of_method_relus,
    cat_of_relus_inplace_negative,
    relu_of_cat,
    relu__of_cat,
    method_relu_of_cat,
    method_relu__of_cat,
    functional_relu_inplace_of_cat,
    mul_minus_one,
    minus_one_times,
    torch_mul_minus_one,
    concatenate_axis,
    concat_of_relu_modules,
    pair_of_statements,
    pair_returned,
    pair_in_place,
    on_several_lines,
]


class Idiom(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.relu = nn.ReLU()


def idiom_model(forward, dim=1):
    return type(forward.__name__, (Idiom,), {"forward": forward})(dim)


@pytest.mark.parametrize("dim", [0, 1, -1, -3])
@pytest.mark.parametrize("forward", IDIOMS, ids=lambda f: f.__name__)
def test_idioms_are_fused(forward, dim):
    model, fused = fuse_copy(idiom_model(forward, dim))
    assert fused_calls(fused) == 1, generated(fused)
    assert cats(fused) == 0, generated(fused)
    assert len(fused.fused) == 1 and fused.fuse_skipped == []
    x = make_input((3, 4, 5), torch.float32)
    assert_fused_like(model, fused, x)
    assert native_calls(fused, x) == 1


def test_rewritten_code_keeps_its_lines():
    """The rewritten text keeps the original's line numbers, and its file
    names the original's."""
    _, fused = fuse_copy(idiom_model(on_several_lines))
    lines, start = inspect.getsourcelines(fused.forward)
    assert start == inspect.getsourcelines(on_several_lines)[1]
    assert len(lines) == len(inspect.getsourcelines(on_several_lines)[0])
    assert __file__ in fused.forward.__code__.co_filename


def different_tensors(self, x, y):
    return torch.cat([x.relu(), (-y).relu()], 1)


def halves_swapped(self, x, y):
    return torch.cat([(-x).relu(), x.relu()], 1)


def three_parts(self, x, y):
    return torch.cat([x, -x, x], 1).relu()


def no_relu(self, x, y):
    return torch.cat([x, -x], 1) * 2


def relu_on_one_half(self, x, y):
    return torch.cat([x.relu(), -x], 1)


def cat_also_used_elsewhere(self, x, y):
    c = torch.cat([x, -x], 1)
    d = c.relu()
    return d + c


def pair_not_rebinding(self, x, y):
    c = torch.cat([x, -x], 1)
    d = F.relu(c)
    return d + c


def mul_by_minus_two(self, x, y):
    return torch.cat([x, x * -2], 1).relu()


def relu_of_x_in_place(self, x, y):
    return torch.cat([F.relu(x, inplace=True), F.relu(-x)], 1)


def relu_inplace_method_on_x(self, x, y):
    return torch.cat([x.relu_(), (-x).relu()], 1)


def relu6(self, x, y):
    return torch.cat([F.relu6(x), F.relu6(-x)], 1)


def leaky_relu(self, x, y):
    return F.leaky_relu(torch.cat([x, -x], 1))


def other_function_named_like_a_relu(self, x, y):
    return torch.cat([torch.tanh(x), torch.tanh(-x)], 1)


NOT_IDIOMS = [
    different_tensors,
    halves_swapped,
    three_parts,
    no_relu,
    relu_on_one_half,
    cat_also_used_elsewhere,
    pair_not_rebinding,
    mul_by_minus_two,
    relu_of_x_in_place,
    relu_inplace_method_on_x,
    relu6,
    leaky_relu,
    other_function_named_like_a_relu,
]


class TwoInputs(nn.Module):
    pass


@pytest.mark.parametrize("forward", NOT_IDIOMS, ids=lambda f: f.__name__)
def test_other_code_is_left_alone(forward):
    model = type(forward.__name__, (TwoInputs,), {"forward": forward})()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FuseWarning)  # not an idiom: nothing to warn of
        model, fused = fuse_copy(model)
    assert fused.fused == [] and fused.fuse_skipped == [] and "forward" not in fused.__dict__
    x, y = make_input((2, 3), torch.float32, seed=1), make_input((2, 3), torch.float32, seed=2)
    assert_bitwise_equal(fused(x * 1.0, y * 1.0), model(x * 1.0, y * 1.0))


def integer_idiom(self, x):
    return torch.cat([x, -x], self.dim).relu()


def test_integer_input_keeps_the_composition():
    model, fused = fuse_copy(idiom_model(integer_idiom))
    x = torch.arange(-6, 6).view(2, 6)
    assert fused_calls(fused) == 1 and torch.equal(fused(x), model(x))
    assert native_calls(fused, x) == 0


class AlreadyFused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.crelu = crelu_ext.CReLU(-1)

    def forward(self, x):
        return crelu_ext.crelu(self.crelu(self.fc(x)), dim=1)


def test_existing_crelu_calls_are_left_as_they_are():
    model, fused = fuse_copy(AlreadyFused())
    assert fused.fused == [] and fused.fuse_skipped == []
    assert_fused_like(model, fused, make_input((3, 4), torch.float32))


def test_fused_model_compiles():
    model, fused = fuse_copy(MLP())
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert_fused_like(model, compiled, make_input((4, 6), torch.float32))


def test_forward_that_branches_on_data_is_fused():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: plain Python, as written
                return torch.cat([x, -x], 1).relu()
            return x

    model, fused = fuse_copy(Branchy())
    assert fused.fused == ["torch.cat([x, -x], 1).relu()"]
    for sign in (1.0, -1.0):
        assert_fused_like(model, fused, make_input((2, 3), torch.float32).abs() * sign)


def test_fusing_twice_changes_nothing():
    model = DetectorBlock()
    crelu_ext.fuse(model, recompute=True)
    forward, source = model.forward, generated(model)
    assert "__crelu_ext_recompute__" not in source  # eager only: not in the text TorchScript reads
    assert crelu_ext.fuse(model).fused == ["x = torch.cat([x, -x], 1); x = F.relu(x, inplace=True)"]
    assert generated(model) == source and model.forward.__func__ is not forward.__func__
    assert model.__dict__["__crelu_ext_fuse__"].recompute is False
    crelu_ext.fuse(model, recompute=True)
    assert model.forward.__func__ is forward.__func__  # the same rewrite, cached, not wrapped again
    assert model.__dict__["__crelu_ext_fuse__"].original is None


def test_fuse_refuses_what_is_not_a_module():
    with pytest.raises(
        TypeError, match=r"crelu_ext\.fuse: expected a torch\.nn\.Module, got function"
    ):
        crelu_ext.fuse(lambda x: x)


def test_documented_example_runs(tmp_path, capsys):
    """The example of docs/fuse.md, run from a file as users do (fuse reads
    the source of the forwards it rewrites)."""
    text = (Path(__file__).parents[2] / "docs" / "fuse.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    path = tmp_path / "example.py"
    path.write_text(example)
    runpy.run_path(str(path), run_name="example")
    assert "['block: " in capsys.readouterr().out


def test_readme_example_runs(tmp_path, capsys):
    path = tmp_path / "example.py"
    path.write_text(readme_example("Using it in an existing model"))
    runpy.run_path(str(path), run_name="example")
    assert "['block: " in capsys.readouterr().out


def test_submodule_modes_are_kept():
    model = DetectorBlock().train()
    model.bn.eval()  # a frozen BatchNorm, as detectors fine-tune
    model, fused = fuse_copy(model)
    assert model.training and not model.bn.training
    assert fused.training and not fused.bn.training
    assert_fused_like(model, fused, make_input((2, 3, 5, 5), torch.float32))


# Models shaped like the public code that writes CReLU by hand.


class FaceBoxesCReLU(nn.Module):
    """FaceBoxes' CReLU block: conv -> BN -> cat([x, -x], 1) -> relu_."""

    def __init__(self, in_channels, out_channels, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        x = torch.cat([x, -x], 1)
        x = F.relu(x, inplace=True)
        return x


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = FaceBoxesCReLU(3, 4, kernel_size=5, stride=2, padding=2)
        self.conv2 = FaceBoxesCReLU(8, 6, kernel_size=3, stride=1, padding=1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 3, stride=2, padding=1)
        return self.head(self.conv2(x))


class PlasticineCReLU(nn.Module):
    """The RL agents' own CReLU module."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.cat((F.relu(x), F.relu(-x)), self.dim)


class Agent(nn.Module):
    """An RL agent: an encoder with CReLU after a conv and a linear layer, a
    forward that asserts on the input's shape and writes one more CReLU,
    a critic and an ``actor_logstd`` that only the other methods use."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2),
            PlasticineCReLU(1),
            nn.Flatten(),
            nn.Linear(6 * 2 * 2, 5),
            PlasticineCReLU(-1),
        )
        self.trunk = nn.Linear(10, 4)
        self.actor_mean = nn.Linear(8, 2)
        self.critic = nn.Linear(8, 1)
        self.actor_logstd = nn.Parameter(torch.full((1, 2), -0.5))

    def hidden(self, x):
        h = self.trunk(self.encoder(x))
        return torch.cat((F.relu(h), F.relu(-h)), -1)

    def forward(self, x):
        assert x.shape[1:] == (2, 5, 5), x.shape
        h = self.trunk(self.encoder(x))
        return self.actor_mean(torch.cat((F.relu(h), F.relu(-h)), -1))

    def get_value(self, x):
        return self.critic(self.hidden(x))

    def get_action_and_value(self, x, action):
        hidden = self.hidden(x)
        mean = self.actor_mean(hidden)
        probs = torch.distributions.Normal(mean, self.actor_logstd.expand_as(mean).exp())
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(hidden)


def max_min(input, dim=None):
    """deel-torchlip's MaxMin activation, its dim from the input's rank."""
    if dim is None:
        dim = 1 if len(input.shape) > 2 else -1
    return torch.cat((F.relu(input), F.relu(-input)), dim=dim)


class MaxMin(nn.Module):
    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, input):
        return max_min(input, self.dim)


class Lipschitz(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.act = MaxMin()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PVANet(nn.Module):
    """A forward that compares the input's device, around blocks that write
    CReLU with a ReLU module."""

    def __init__(self):
        super().__init__()
        self.block1 = PVANetBlock(inplace=True)
        self.block2 = PVANetBlock(inplace=False)
        self.fuse_device = -1

    def forward(self, x):
        if x.get_device() != self.fuse_device:
            x = x.to(torch.device("cpu"))
        return self.block1(x) - self.block2(x)


class Residual(nn.Module):
    """``x`` feeds the CReLU and the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.conv(torch.cat([x, x.neg()], 1).relu()) + x


FACEBOXES = "x = torch.cat([x, -x], 1); x = F.relu(x, inplace=True)"
PLASTICINE = "torch.cat((F.relu(x), F.relu(-x)), self.dim)"
PVANET = "self.relu(torch.cat((x, x.neg()), 1))"

# model, input shape, what fuse replaces, whether the input feeds other ops too
REAL_MODELS = {
    "detector": (Detector, (2, 3, 12, 12), [f"conv1: {FACEBOXES}", f"conv2: {FACEBOXES}"], False),
    "agent": (
        Agent,
        (3, 2, 5, 5),
        [
            "torch.cat((F.relu(h), F.relu(-h)), -1)",
            f"encoder.1: {PLASTICINE}",
            f"encoder.4: {PLASTICINE}",
        ],
        False,
    ),
    "maxmin": (
        Lipschitz,
        (4, 6),
        ["act: max_min: torch.cat((F.relu(input), F.relu(-input)), dim=dim)"],
        False,
    ),
    "pvanet": (PVANet, (2, 3, 4, 4), [f"block1: {PVANET}", f"block2: {PVANET}"], True),
    "residual": (Residual, (2, 3, 4, 4), ["torch.cat([x, x.neg()], 1).relu()"], True),
}


def real_model(kind, **options):
    """``(model as it was, fused in place, input)``."""
    factory, shape, _, _ = REAL_MODELS[kind]
    torch.manual_seed(0)
    return (*fuse_copy(factory(), **options), make_input(shape, torch.float32))


@pytest.mark.parametrize("kind", REAL_MODELS)
def test_real_models_keep_what_they_are(kind):
    original, model, x = real_model(kind)
    assert type(model) is type(original)
    assert model.fused == REAL_MODELS[kind][2] and model.fuse_skipped == []
    assert list(model.state_dict()) == list(original.state_dict())
    model.load_state_dict(original.state_dict())  # the original's weights still load
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in original.named_modules()]
    assert_fused_like(original, model, x, REAL_MODELS[kind][3])
    assert native_calls(model.eval(), x) == len(REAL_MODELS[kind][2])


def test_agent_methods_get_the_fused_op():
    original, agent, _ = real_model("agent")
    x = make_input((3, 2, 5, 5), torch.float32, special_fraction=0)  # Normal refuses NaN
    # The optimizer sees every parameter, those forward does not use included.
    assert {id(p) for p in agent.parameters()} >= {id(agent.critic.weight), id(agent.actor_logstd)}
    assert fused_calls(agent.encoder[1]) == 1 and fused_calls(agent.encoder[4]) == 1
    action = make_input((3, 2), torch.float32, seed=3, special_fraction=0)
    for training in (True, False):
        original.train(training)
        agent.train(training)
        expected = original.get_action_and_value(x, action)
        actual = agent.get_action_and_value(x, action)
        for a, e in zip(actual, expected, strict=True):
            assert_bitwise_equal(a, e, "get_action_and_value")
        assert_bitwise_equal(agent.get_value(x), original.get_value(x), "get_value")
    with pytest.raises(AssertionError):
        agent(x.reshape(3, 2, 25))  # the shape assert still holds


def assert_same_model(model, other, x):
    """Bitwise the same computation: the same rewritten code, the same results."""
    assert type(other) is type(model) and other.fused == model.fused
    assert generated(other) == generated(model)
    for a, b in zip(model.modules(), other.modules(), strict=True):
        forward = b.__dict__.get("forward")
        assert _rewrite.is_rewritten(forward) == _rewrite.is_rewritten(a.__dict__.get("forward"))
        assert forward is None or forward.__self__ is b  # bound to the copy, not the original
    assert_fused_like(model, other, x, x_feeds_others=True)


@pytest.mark.parametrize("kind", REAL_MODELS)
def test_real_models_deepcopy_and_pickle(kind, tmp_path):
    _, model, x = real_model(kind, recompute=True)
    assert_same_model(model, copy.deepcopy(model), x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert_same_model(model, loaded, x)
    assert loaded.__dict__["__crelu_ext_fuse__"].recompute
    assert "__crelu_ext_fuse__" not in copy.deepcopy(Detector()).__dict__


def test_residual_nan_limit():
    """Where x is NaN and x also feeds the sum, autograd adds the two gradient
    parts in another order: that position may differ by rounding, while the
    outputs, the NaN positions and every other gradient stay bitwise equal."""
    torch.manual_seed(0)
    original, model = fuse_copy(Residual())
    x = make_input((2, 3, 4, 4), torch.float32, special_fraction=0.5)
    nan = torch.isnan(x)
    assert nan.any()
    for training in (True, False):
        original.train(training)
        model.train(training)
        out, grads = _outputs_and_grads(original, x)
        fused_out, fused_grads = _outputs_and_grads(model, x)
        assert_bitwise_equal(fused_out, out, "output")
        assert torch.equal(torch.isnan(fused_grads[0]), torch.isnan(grads[0]))
        assert_bitwise_equal(fused_grads[0][~nan], grads[0][~nan], "input gradient off NaN")
        for actual, expected in zip(fused_grads[1:], grads[1:], strict=True):
            assert torch.equal(torch.isnan(actual), torch.isnan(expected))


@pytest.mark.parametrize("kind", ["detector", "agent", "maxmin", "residual"])
def test_real_models_compile(kind):
    original, model, x = real_model(kind)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_fused_like(original, compiled, x, REAL_MODELS[kind][3])


def rewriting_backend(replaced):
    """A Dynamo backend that rewrites as backend="crelu_ext" does and runs the
    graph eagerly (Inductor's own rounding aside)."""

    def backend(graph_module, example_inputs):
        replaced.extend(rewrite(graph_module))
        return graph_module.forward

    return backend


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("agent", 3), ("maxmin", 1), ("detector", 2), ("residual", 1), ("pvanet", 2)],
)
def test_dynamo_backend_rewrites_the_graphs(kind, expected):
    torch.manual_seed(0)
    factory, shape, _, x_feeds_others = REAL_MODELS[kind]
    model = factory()
    replaced = []
    compiled = torch.compile(copy.deepcopy(model), backend=rewriting_backend(replaced))
    x = make_input(shape, torch.float32)
    assert_fused_like(model, compiled, x, x_feeds_others)
    assert len(replaced) >= expected and len(set(replaced)) == expected, replaced


def test_crelu_ext_backend_compiles_with_inductor():
    torch.manual_seed(0)
    model = Lipschitz()
    x = make_input((4, 6), torch.float32)
    expected = torch.compile(copy.deepcopy(model), backend="inductor")
    actual = torch.compile(model, backend=dynamo_backend)
    assert_fused_like(expected, actual, x)


def test_backend_is_registered_by_name():
    code = "import torch._dynamo, crelu_ext; assert 'crelu_ext' in torch._dynamo.list_backends()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


class Negation(nn.Module):
    def forward(self, x):
        return torch.cat([x, -x], 1)


def test_dynamo_rewrites_an_idiom_split_across_modules():
    model = nn.Sequential(nn.Linear(3, 4), Negation(), nn.ReLU())
    original, fused = fuse_copy(model)
    assert fused.fused == [] and fused.fuse_skipped == []  # each forward holds half of it
    replaced = []
    compiled = torch.compile(fused, backend=rewriting_backend(replaced))
    assert_fused_like(original, compiled, make_input((2, 3), torch.float32))
    assert len(set(replaced)) == 1


def test_fused_with_recompute_compiles_without_graph_breaks():
    original, model, x = real_model("detector", recompute=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_fused_like(original, compiled, x)


def test_recompute_on_a_torch_container():
    """recompute=True on a model whose forward is torch's own (a Sequential)."""
    model = nn.Sequential(nn.Linear(6, 4), PlasticineCReLU(-1), nn.Linear(8, 2))
    original, fused = fuse_copy(model, recompute=True)
    assert fused.fused == [f"1: {PLASTICINE}"] and fused.fuse_skipped == []
    assert _rewrite.is_rewritten(fused.__dict__["forward"])
    assert_fused_like(original, fused, make_input((3, 6), torch.float32))


def test_skipped_is_a_record_a_program_reads():
    skipped = Skipped("block", "Block.forward", 12, "torch.cat([x, -x], 1).relu()", "why")
    assert skipped.module == "block" and skipped._asdict()["reason"] == "why"
