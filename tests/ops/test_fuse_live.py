"""A fused forward is the model's own Python with only the idioms replaced:
what it reads (attributes, arguments, self.training, globals, closures,
instance-level forwards, parametrizations, hooks) it reads at each call. Each
test changes what a user can change and compares the fused model with a copy
made before fusing, call by call, outputs and gradients bit for bit.

The models here are also those test_fuse_deploy.py exports."""

import copy
import functools
import importlib
import linecache
import os
import sys
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, make_input
from test_fuse import assert_same_call, fuse_copy, native_calls
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

import crelu_ext
from crelu_ext import _rewrite
from crelu_ext.fuse import FuseWarning

SCALE = 1.0  # a global that forwards read at each call


class Tempered(nn.Module):
    """An attribute, an optional argument, a global and an nn.ReLU whose
    ``inplace`` flag decides whether the second idiom is one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.relu = nn.ReLU()
        self.temperature = 1.0

    def forward(self, x, shift=None):
        h = self.fc(x) / self.temperature
        if shift is not None:
            h = h + shift
        h = torch.cat([h, -h], -1)
        h = self.relu(h)
        g = h * SCALE
        # With relu.inplace, self.relu(g) writes g, which -g then reads: no CReLU.
        return torch.cat([self.relu(g), self.relu(-g)], -1)


class Dropped(nn.Module):
    """Dropout that follows self.training, and a branch on it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(10, 3)
        self.p = 0.5

    def forward(self, x):
        h = F.dropout(self.fc1(x), self.p, training=self.training)
        h = torch.cat((F.relu(h), F.relu(-h)), dim=-1)
        if self.training:
            h = h * 0.5
        return self.fc2(h)


class Switchable(nn.Module):
    """Its instance gets another forward, one of its methods."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(x)

    def crelu_forward(self, x):
        h = self.fc(x)
        return torch.cat([h.relu(), (-h).relu()], -1)


def switched():
    model = Switchable()
    model.forward = model.crelu_forward
    return model


def standalone(x):
    """A plain function set as an instance's forward."""
    return torch.cat([x, x.neg()], -1).relu()


class Holder(nn.Module):
    pass


def holding_a_function():
    model = Holder()
    model.forward = standalone
    return model


class Normed(nn.Module):
    """A module of the user's own under spectral_norm (a parametrization: its
    class becomes a subclass made in torch's namespace)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6) / 3)

    def forward(self, x):
        h = F.linear(x, self.weight)
        return torch.cat([F.relu(h), F.relu(-h)], -1)


def spectral_normed():
    return spectral_norm(Normed())


def make_shifted():
    """A class whose forward reads a closure variable, with its setter."""
    offset = 0.0

    class Shifted(nn.Module):
        def forward(self, x):
            h = x * SCALE + offset
            return torch.cat([F.relu(h), F.relu(-h)], -1)

    def set_offset(value):
        nonlocal offset
        offset = value

    return Shifted(), set_offset


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = self.fc(x)
        return torch.cat([F.relu(h), F.relu(-h)], -1)


class Derived(Base):
    """super().forward, whose own idiom is rewritten too, and one more idiom."""

    def __init__(self):
        super().__init__()
        self.__gain = 2.0  # a private name, mangled as in the class

    def forward(self, x):
        h = super().forward(x) * self.__gain
        return torch.cat([h, -h], -1).relu()


class WithHelpers(nn.Module):
    """Idioms in a method and in a function that the method calls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def activation(self, h):
        return helper(h, -1) * 2

    def forward(self, x):
        return self.activation(self.fc(x))


def helper(h, dim):
    h = torch.cat((h, -h), dim)
    return F.relu(h)


class PartlyLeft(nn.Module):
    """One idiom fused, one left: its operand is not a plain name."""

    def forward(self, x):
        pair = (x * 1.0, x * 2.0)
        left = torch.cat([F.relu(pair[0]), F.relu(-pair[0])], -1)
        return left + torch.cat([x, -x], -1).relu()


def passthrough(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    return wrapper


class CalledTwice(nn.Module):
    """The operand is a call, written in each half: two calls, maybe two values."""

    def forward(self, x):
        return torch.cat([F.relu(x.t()), F.relu(-x.t())], -1)


class Decorated(nn.Module):
    @passthrough
    def forward(self, x):
        return torch.cat([x, -x], -1).relu()


class LocalReLU(nn.Module):
    def forward(self, x):
        relu = torch.relu
        return torch.cat([relu(x), relu(-x)], -1)


def with_a_lambda():
    model = Holder()
    model.forward = lambda x: torch.cat([x, -x], -1).relu()
    return model


def without_source():
    namespace = {"torch": torch, "nn": nn}
    code = (
        "class Hidden(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.cat([x, -x], -1).relu()\n"
    )
    exec(code, namespace)
    return namespace["Hidden"]()


def both(original, fused, change):
    change(original)
    change(fused)


def test_attributes_arguments_and_globals_are_read_at_each_call(monkeypatch):
    original, fused = fuse_copy(Tempered())
    assert fused.fused == [
        "h = torch.cat([h, -h], -1); h = self.relu(h)",
        "torch.cat([self.relu(g), self.relu(-g)], -1)",
    ]
    x, shift = make_input((4, 6), torch.float32), make_input((4, 5), torch.float32, seed=1)

    def calls(expected_ops):
        for training in (True, False):
            original.train(training)
            fused.train(training)
            assert_same_call(original, fused, x)
            assert_same_call(original, fused, x, shift)  # the argument given
            assert_same_call(original, fused, x, shift=shift)
            assert native_calls(fused, x) == expected_ops

    calls(2)
    both(original, fused, lambda m: setattr(m, "temperature", 3.0))
    calls(2)
    both(original, fused, lambda m: setattr(m.relu, "inplace", True))
    calls(1)  # the second idiom is no CReLU now: it runs as written
    monkeypatch.setattr(sys.modules[__name__], "SCALE", -2.0)
    calls(1)
    both(original, fused, lambda m: setattr(m.relu, "inplace", False))
    calls(2)
    both(original, fused, lambda m: setattr(m, "relu", nn.ReLU6()))
    calls(0)


def test_hooks_still_fire():
    original, fused = fuse_copy(Tempered())
    x = make_input((4, 6), torch.float32)
    counts = {"original": 0, "fused": 0}
    for name, model in (("original", original), ("fused", fused)):
        model.register_forward_hook(
            lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)
        )
        model.relu.register_forward_hook(
            lambda module, args, out, name=name: counts.__setitem__(name, counts[name] + 10)
        )
    assert_same_call(original, fused, x)
    assert counts["fused"] == counts["original"] == 31  # the model's hook, three ReLU calls
    assert native_calls(fused, x) == 0  # a hooked ReLU: the idioms run as written


def test_dropout_follows_training():
    original, fused = fuse_copy(Dropped())
    assert fused.fused == ["torch.cat((F.relu(h), F.relu(-h)), dim=-1)"]
    x = make_input((8, 6), torch.float32, special_fraction=0)
    for training in (True, False, True):
        original.train(training)
        fused.train(training)
        assert_same_call(original, fused, x)
    both(original, fused, lambda m: setattr(m, "p", 0.9))
    assert_same_call(original, fused, x)


@pytest.mark.parametrize("factory", [switched, holding_a_function], ids=["method", "function"])
def test_instance_level_forward_is_the_one_rewritten(factory):
    original, fused = fuse_copy(factory())
    assert len(fused.fused) == 1
    x = make_input((4, 6) if factory is switched else (3, 4), torch.float32)
    assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 1
    # A forward set after fuse is the one that runs, and the one a new fuse rewrites.
    if factory is switched:
        fused.forward = fused.crelu_forward
        original.forward = original.crelu_forward
        assert native_calls(fused, x) == 0
        assert_same_call(original, fused, x)
        crelu_ext.fuse(fused)
        assert native_calls(fused, x) == 1
        assert_same_call(original, fused, x)


def test_a_parametrized_module_is_the_users_class():
    torch.manual_seed(0)
    original, fused = fuse_copy(spectral_normed())
    assert parametrize.is_parametrized(fused) and type(fused).__module__.startswith("torch.")
    assert fused.fused == ["torch.cat([F.relu(h), F.relu(-h)], -1)"]
    x = make_input((4, 6), torch.float32)
    for training in (True, False):  # training: the power iteration runs at each call
        original.train(training)
        fused.train(training)
        assert_same_call(original, fused, x)
        assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 1
    copied = copy.deepcopy(fused)  # the parametrized class's own __deepcopy__
    assert copied.forward.__self__ is copied
    assert_same_call(original, copied, x)


def test_closures_and_globals_are_read_at_each_call(monkeypatch):
    model, set_offset = make_shifted()
    original, fused = fuse_copy(model)
    assert len(fused.fused) == 1
    x = make_input((3, 4), torch.float32)
    assert_same_call(original, fused, x)
    set_offset(1.5)
    assert_same_call(original, fused, x)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 1


def test_functions_the_idiom_names_are_read_at_each_call(monkeypatch):
    """A module's F rebound after fuse: the idiom runs as written with it."""
    _, fused = fuse_copy(Dropped())
    x = make_input((3, 6), torch.float32)
    assert native_calls(fused.eval(), x) == 1
    monkeypatch.setattr(F, "relu", torch.tanh)
    assert native_calls(fused, x) == 0
    assert_bitwise_equal(fused(x), Dropped.forward(fused, x))


def test_super_and_private_names():
    torch.manual_seed(0)
    original, fused = fuse_copy(Derived())
    assert fused.fused == [
        "Base.forward: torch.cat([F.relu(h), F.relu(-h)], -1)",
        "torch.cat([h, -h], -1).relu()",
    ]
    x = make_input((4, 6), torch.float32)
    assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 2
    both(original, fused, lambda m: setattr(m, "_Derived__gain", -1.0))
    assert_same_call(original, fused, x)


def test_functions_a_forward_calls_are_rewritten_for_that_call(monkeypatch):
    original, fused = fuse_copy(WithHelpers())
    assert fused.fused == [
        "WithHelpers.activation: helper: h = torch.cat((h, -h), dim); return F.relu(h)"
    ]
    x = make_input((4, 6), torch.float32)
    assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 1
    assert native_calls(original, x) == 0  # helper itself, and the class, are as they were
    # What the forward calls is read at each call: another method, another helper.
    monkeypatch.setattr(sys.modules[__name__], "helper", lambda h, dim: torch.tanh(h))
    assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 0
    monkeypatch.undo()
    both(original, fused, lambda m: setattr(m, "activation", torch.sigmoid))
    assert_same_call(original, fused, x)
    assert native_calls(fused, x) == 0


def test_what_fuse_leaves_it_names_once():
    model = nn.ModuleDict(
        {
            "partly": PartlyLeft(),
            "called": CalledTwice(),
            "decorated": Decorated(),
            "local": LocalReLU(),
            "lambda": with_a_lambda(),
            "hidden": without_source(),
            "plain": nn.Linear(3, 3),  # no idiom: nothing to say
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        original, fused = fuse_copy(model)
    messages = [w for w in caught if issubclass(w.category, FuseWarning)]
    assert len(messages) == 1
    assert fused.fused == ["partly: torch.cat([x, -x], -1).relu()"]
    left = {entry.module: entry for entry in fused.fuse_skipped}
    assert sorted(left) == ["called", "decorated", "hidden", "lambda", "local", "partly"]
    assert left["partly"].idiom == "torch.cat([F.relu(pair[0]), F.relu(-pair[0])], -1)"
    assert "not a plain name" in left["partly"].reason
    assert "`x.t()` is not a plain name" in left["called"].reason
    assert left["partly"].line == PartlyLeft.forward.__code__.co_firstlineno + 2
    assert "decorated" in left["decorated"].reason
    assert "`relu`" in left["local"].reason
    assert "lambda" in left["lambda"].reason
    assert "cannot be read" in left["hidden"].reason
    for name in ("decorated", "local", "lambda", "hidden"):
        assert 'torch.compile(model, backend="crelu_ext")' in left[name].reason
        assert name in str(messages[0].message)
    x = make_input((3, 4), torch.float32)
    for name in model:
        if name != "plain":
            assert_same_call(original[name], fused[name], x)


EDITED = """
import torch


class Model(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x, -x], 1).relu() * {factor}
"""


def test_a_file_edited_after_import_is_not_read(tmp_path, monkeypatch):
    """The text read must compile to the code that runs: a file edited since
    its import (its idiom's line included) leaves the forward as it runs."""
    path = tmp_path / "edited_model_for_fuse.py"
    path.write_text(EDITED.format(factor=2))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("edited_model_for_fuse")
    monkeypatch.delitem(sys.modules, "edited_model_for_fuse")
    path.write_text(EDITED.format(factor=3))
    os.utime(path, (1, 1))  # another modification time: linecache reads the file again
    linecache.checkcache(str(path))
    model = module.Model()
    with pytest.warns(FuseWarning, match="not the code it runs"):
        crelu_ext.fuse(model)
    assert model.fused == [] and "forward" not in model.__dict__
    x = make_input((2, 3), torch.float32)
    assert_bitwise_equal(model(x), module.Model.forward(model, x))


def test_tracebacks_show_the_users_file_and_line():
    _, fused = fuse_copy(Tempered())
    with pytest.raises(RuntimeError) as error:
        fused(torch.randn(2, 4))  # the linear layer refuses the shape
    frame = next(f for f in traceback.extract_tb(error.tb) if f.name == "forward")
    assert __file__ in frame.filename and frame.filename.startswith("<crelu_ext.fuse")
    assert frame.line == "h = self.fc(x) / self.temperature"
    lines, start = Tempered.forward.__code__.co_firstlineno, 0
    assert frame.lineno == lines + 1 + start


def test_only_forwards_are_rewritten():
    """The functions a forward calls are rewritten for that call only: the
    module's globals and the callee stay as they were."""
    model = Derived()
    crelu_ext.fuse(model)
    assert not _rewrite.is_rewritten(Base.forward) and not _rewrite.is_rewritten(Derived.forward)
    assert "__crelu_ext" not in " ".join(vars(sys.modules[__name__]))
