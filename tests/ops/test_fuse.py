"""crelu_ext.fuse: hand-written CReLU idioms become the fused op, with the
same outputs and gradients bit for bit; everything else is left alone."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, make_input, readme_example
from torch import nn

import crelu_ext
from crelu_ext.fuse import _Forward, dynamo_backend, rewrite


def _outputs_and_grads(model, x, grad_seed=0):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    grad_out = make_input(out.shape, out.dtype, seed=grad_seed, special_fraction=0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        out, [x, *params], grad_out, allow_unused=True, materialize_grads=True
    )
    return out, grads


def assert_fused_like(original, fused, x, x_feeds_others=False):
    """Same outputs, input gradient and parameter gradients, bit for bit, in
    training and in eval. When ``x`` also feeds other ops than the CReLU, the
    input gradient where ``x`` is NaN need only be NaN in the same places:
    autograd sums its parts there in another order."""
    for training in (True, False):
        original.train(training)
        fused.train(training)
        out, grads = _outputs_and_grads(original, x)
        fused_out, fused_grads = _outputs_and_grads(fused, x)
        mode = "train" if training else "eval"
        assert_bitwise_equal(fused_out, out, f"{mode} output")
        if x_feeds_others:
            assert torch.equal(torch.isnan(fused_grads[0]), torch.isnan(grads[0]))
            keep = ~torch.isnan(x)
            fused_grads = (fused_grads[0][keep], *fused_grads[1:])
            grads = (grads[0][keep], *grads[1:])
        for i, (actual, expected) in enumerate(zip(fused_grads, grads, strict=True)):
            assert_bitwise_equal(actual, expected, f"{mode} gradient {i}")


def fuse_copy(model, **options):
    """``(model as it was, model fused in place)``."""
    original = copy.deepcopy(model)
    fused = crelu_ext.fuse(model, **options)
    assert fused is model
    return original, fused


def generated(module) -> str:
    """The source of the forwards ``fuse`` gave ``module`` and its submodules."""
    forwards = (m.__dict__.get("forward") for m in module.modules())
    return "".join(f.source or "" for f in forwards if isinstance(f, _Forward))


def fused_calls(module) -> int:
    return generated(module).count("fused_crelu(")


def cats(module) -> int:
    return generated(module).count("torch.cat(")


class Lambda(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


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
    assert_fused_like(model, fused, x)


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_module_after_cat(inplace):
    model = PVANetBlock(inplace)
    model, fused = fuse_copy(model)
    # The first cat is of two different tensors (two conv calls): left alone.
    assert fused_calls(fused) == 1 and cats(fused) == 1
    assert_fused_like(model, fused, make_input((2, 3, 4, 4), torch.float32))


IDIOMS = {
    "cat-of-relus": lambda x, d: torch.cat([torch.relu(x), torch.relu(-x)], d),
    "cat-of-F.relus-kw-dim": lambda x, d: torch.cat([F.relu(x), F.relu(torch.neg(x))], dim=d),
    "cat-of-method-relus": lambda x, d: torch.cat((x.relu(), x.neg().relu()), d),
    "cat-of-relus-inplace-negative": lambda x, d: torch.cat([x.relu(), F.relu(-x, True)], d),
    "relu-of-cat": lambda x, d: torch.relu(torch.cat([x, -x], d)),
    "relu_-of-cat": lambda x, d: torch.relu_(torch.cat([x, -x], d)),
    "method-relu-of-cat": lambda x, d: torch.cat((x, -x), d).relu(),
    "method-relu_-of-cat": lambda x, d: torch.cat((x, x.neg()), d).relu_(),
    "F.relu-inplace-of-cat": lambda x, d: F.relu(torch.cat([x, x.negative()], d), inplace=True),
    "mul-minus-one": lambda x, d: torch.cat([x, x.mul(-1)], d).relu(),
    "minus-one-times": lambda x, d: torch.cat([x, -1.0 * x], d).relu(),
    "concat-axis": lambda x, d: torch.concatenate([x, -x], axis=d).relu(),
}


@pytest.mark.parametrize("dim", [0, 1, -1, -3])
@pytest.mark.parametrize("idiom", IDIOMS)
def test_idioms_are_fused(idiom, dim):
    function = IDIOMS[idiom]
    model = Lambda(lambda x: function(x * 1.0, dim))  # x * 1.0: the input is not mutated
    model, fused = fuse_copy(model)
    assert fused_calls(fused) == 1, generated(fused)
    assert "cat(" not in generated(fused).replace("fused_crelu(", "")
    assert_fused_like(model, fused, make_input((3, 4, 5), torch.float32))


def test_relu_inplace_result_unused_but_cat_used_later():
    def forward(x):
        y = torch.cat([x, -x], 1)
        F.relu(y, inplace=True)  # y holds the result
        return y * 2

    model = Lambda(forward)
    model, fused = fuse_copy(model)
    assert fused_calls(fused) == 1
    assert_fused_like(model, fused, make_input((2, 3), torch.float32))


NOT_IDIOMS = {
    "different-tensors": lambda x, y: torch.cat([x.relu(), (-y).relu()], 1),
    "halves-swapped": lambda x, y: torch.cat([(-x).relu(), x.relu()], 1),
    "three-parts": lambda x, y: torch.cat([x, -x, x], 1).relu(),
    "no-relu": lambda x, y: torch.cat([x, -x], 1) * 2,
    "relu-on-one-half": lambda x, y: torch.cat([x.relu(), -x], 1),
    "cat-also-used-elsewhere": lambda x, y: (lambda c: c.relu() + c)(torch.cat([x, -x], 1)),
    "mul-by-minus-two": lambda x, y: torch.cat([x, x * -2], 1).relu(),
    "relu-of-x-in-place": lambda x, y: torch.cat([F.relu(x, inplace=True), F.relu(-x)], 1),
}


class TwoInputs(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x, y):
        return self.function(x * 1.0, y * 1.0)


@pytest.mark.parametrize("case", NOT_IDIOMS)
def test_other_code_is_left_alone(case):
    model = TwoInputs(NOT_IDIOMS[case])
    model, fused = fuse_copy(model)
    assert fused.fused == [] and fused_calls(fused) == 0
    x, y = make_input((2, 3), torch.float32, seed=1), make_input((2, 3), torch.float32, seed=2)
    assert_bitwise_equal(fused(x, y), model(x, y))


def test_intermediate_with_another_use_is_left_alone():
    def forward(x):
        negated = -x
        return torch.cat([x.relu(), negated.relu()], 1) + negated.sum()

    assert crelu_ext.fuse(Lambda(forward)).fused == []


def test_write_between_the_steps_is_left_alone():
    def forward(x):
        x = x * 1.0
        positive = x.relu()
        x.add_(1)  # the negative half sees the new x: not a CReLU
        return torch.cat([positive, (-x).relu()], 1)

    model = Lambda(forward)
    model, fused = fuse_copy(model)
    assert fused.fused == []
    x = make_input((2, 3), torch.float32)
    assert_bitwise_equal(fused(x), model(x))


def test_integer_input_keeps_the_composition():
    model = Lambda(lambda x: torch.cat([x, -x], 1).relu())
    model, fused = fuse_copy(model)
    x = torch.arange(-6, 6).view(2, 6)
    assert fused_calls(fused) == 1 and torch.equal(fused(x), model(x))


class AlreadyFused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.crelu = crelu_ext.CReLU(-1)

    def forward(self, x):
        return crelu_ext.crelu(self.crelu(self.fc(x)), dim=1)


def test_existing_crelu_calls_are_traced_through():
    model = AlreadyFused()
    model, fused = fuse_copy(model)
    assert fused.fused == []
    assert_fused_like(model, fused, make_input((3, 4), torch.float32))


def test_fused_model_compiles():
    model = MLP()
    model, fused = fuse_copy(model)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert_fused_like(model, compiled, make_input((4, 6), torch.float32))


def test_untraceable_forward_is_left_alone():
    def forward(x):
        if x.sum() > 0:  # data-dependent control flow
            return torch.cat([x, -x], 1).relu()
        return x

    model, fused = fuse_copy(Lambda(forward))
    assert fused.fused == [] and "forward" not in fused.__dict__
    assert_fused_like(model, fused, make_input((2, 3), torch.float32))


def test_forward_that_branches_on_training_is_left_alone():
    class Noisy(nn.Module):
        def forward(self, x):
            if self.training:
                x = x * 2
            return torch.cat([x, -x], 1).relu()

    model = Noisy().eval()
    model, fused = fuse_copy(model)
    assert fused.fused == [] and not fused.training  # the mode is restored
    assert_fused_like(model, fused, make_input((2, 3), torch.float32))


def test_fusing_twice_changes_nothing():
    model = DetectorBlock()
    crelu_ext.fuse(model, recompute=True)
    source = generated(model)
    assert crelu_ext.fuse(model).fused == ["relu"]
    assert generated(model) == source and not model.forward.recompute


def first_python_block(path) -> str:
    text = (Path(__file__).parents[2] / path).read_text()
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


@pytest.mark.parametrize("where", ["README.md", "docs/fuse.md"])
def test_documented_example_runs(where, capsys):
    if where == "README.md":
        example = readme_example("Using it in an existing model")
    else:
        example = first_python_block(where)
    exec(example, {"__name__": "example"})
    assert "['block: relu']" in capsys.readouterr().out


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
    """A forward that torch.fx cannot trace (it compares the input's device),
    around blocks that write CReLU with a ReLU module."""

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


# model, input shape, what fuse replaces, whether the input feeds other ops too
REAL_MODELS = {
    "detector": (Detector, (2, 3, 12, 12), ["conv1: relu", "conv2: relu"], False),
    "agent": (Agent, (3, 2, 5, 5), ["encoder.1: cat", "encoder.4: cat"], False),
    "maxmin": (Lipschitz, (4, 6), [], False),
    "pvanet": (PVANet, (2, 3, 4, 4), ["block1: relu_1", "block2: relu_1"], True),
    "residual": (Residual, (2, 3, 4, 4), ["relu"], True),
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
    assert model.fused == REAL_MODELS[kind][2]
    assert list(model.state_dict()) == list(original.state_dict())
    model.load_state_dict(original.state_dict())  # the original's weights still load
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in original.named_modules()]
    assert_fused_like(original, model, x, REAL_MODELS[kind][3])


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
    """Bitwise the same computation: the same generated code, the same results."""
    assert type(other) is type(model) and other.fused == model.fused
    assert generated(other) == generated(model)
    assert_fused_like(model, other, x)


@pytest.mark.parametrize("kind", REAL_MODELS)
def test_real_models_deepcopy_and_pickle(kind, tmp_path):
    _, model, x = real_model(kind)
    assert_same_model(model, copy.deepcopy(model), x)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert_same_model(model, loaded, x)
    for name, module in loaded.named_modules():
        forward = module.__dict__.get("forward")
        assert forward is None or forward.module is module, name


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


@pytest.mark.parametrize("kind", ["detector", "agent", "residual"])
def test_real_models_compile(kind):
    original, model, x = real_model(kind)
    compiled = torch.compile(model, backend="aot_eager")
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
    # The agent's forward (its shape assert) and MaxMin (its dim from the rank)
    # are beyond torch.fx, not beyond Dynamo.
    [("agent", 3), ("maxmin", 1), ("detector", 2), ("residual", 1), ("pvanet", 2)],
)
def test_dynamo_rewrites_what_fx_cannot_trace(kind, expected):
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
    assert fused.fused == []  # each module's own forward holds half of it
    replaced = []
    compiled = torch.compile(fused, backend=rewriting_backend(replaced))
    assert_fused_like(original, compiled, make_input((2, 3), torch.float32))
    assert len(set(replaced)) == 1


def test_fused_with_recompute_compiles_without_graph_breaks():
    original, model, x = real_model("detector", recompute=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_fused_like(original, compiled, x)


@pytest.mark.parametrize(("kind", "ops"), [("detector", 2), ("agent", 2)])
def test_fused_models_export(kind, ops):
    original, model, x = real_model(kind)
    original.eval()
    program = torch.export.export(model.eval(), (x,))
    assert (
        sum(node.target is torch.ops.crelu_ext.crelu.default for node in program.graph.nodes) == ops
    )
    assert_bitwise_equal(program.module()(x), original(x))
