"""crelu_ext.fuse: hand-written CReLU idioms become the fused op, with the
same outputs and gradients bit for bit; everything else is left alone."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, make_input, readme_example
from torch import nn

import crelu_ext
from crelu_ext.fuse import _Forward


def _outputs_and_grads(model, x, grad_seed=0):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    grad_out = make_input(out.shape, out.dtype, seed=grad_seed, special_fraction=0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out, grads


def assert_fused_like(original, fused, x):
    """Same outputs, input gradient and parameter gradients, bit for bit, in
    training and in eval."""
    for training in (True, False):
        original.train(training)
        fused.train(training)
        out, grads = _outputs_and_grads(original, x)
        fused_out, fused_grads = _outputs_and_grads(fused, x)
        mode = "train" if training else "eval"
        assert_bitwise_equal(fused_out, out, f"{mode} output")
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


def test_readme_example_runs(capsys):
    exec(readme_example("Using it in an existing model"), {})
    printed = capsys.readouterr().out
    assert "['relu']" in printed and "['cat']" in printed and "fused_crelu(fc1, -1)" in printed


def test_submodule_modes_are_kept():
    model = DetectorBlock().train()
    model.bn.eval()  # a frozen BatchNorm, as detectors fine-tune
    model, fused = fuse_copy(model)
    assert model.training and not model.bn.training
    assert fused.training and not fused.bn.training
    assert_fused_like(model, fused, make_input((2, 3, 5, 5), torch.float32))
