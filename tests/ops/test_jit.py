"""TorchScript: ``torch.jit.script`` of CReLU, of modules that call
``crelu_ext.crelu`` and of fused modules, bitwise equal to eager mode;
``torch.jit.trace`` of the same."""

import pytest
import torch
from helpers import make_input
from test_fuse import (
    MLP,
    DetectorBlock,
    Residual,
    assert_fused_like,
    fuse_copy,
    real_model,
)
from torch import nn

import crelu_ext
from crelu_ext import _rewrite

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


class CallsCReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return crelu_ext.crelu(self.fc(x), -1)


class UsesTheModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = crelu_ext.CReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def scripted(module, tmp_path):
    """``module`` scripted, saved and loaded back."""
    script = torch.jit.script(module)
    torch.jit.save(script, tmp_path / "module.pt")
    return torch.jit.load(tmp_path / "module.pt")


@pytest.mark.parametrize("dim", [1, -1, 0])
def test_script_crelu_module(dim, tmp_path):
    module = crelu_ext.CReLU(dim)
    script = scripted(module, tmp_path)
    assert "crelu_ext::crelu" in str(script.graph)
    assert_fused_like(module, script, make_input((3, 4, 5), torch.float32))


@pytest.mark.parametrize("model", [CallsCReLU, UsesTheModule])
def test_script_modules_that_use_crelu(model, tmp_path):
    torch.manual_seed(0)
    module = model()
    shape = (4, 6) if model is CallsCReLU else (2, 3, 4, 4)
    assert_fused_like(module, scripted(module, tmp_path), make_input(shape, torch.float32))


@pytest.mark.parametrize("model", [DetectorBlock, MLP, Residual])
def test_script_fused_modules(model, tmp_path):
    torch.manual_seed(0)
    original, fused = fuse_copy(model())
    assert fused.fused
    script = scripted(fused, tmp_path)
    assert "crelu_ext::crelu" in str(script.inlined_graph)
    shape = {DetectorBlock: (2, 3, 5, 5), MLP: (4, 6), Residual: (2, 3, 4, 4)}[model]
    x = make_input(shape, torch.float32, special_fraction=0 if model is Residual else 0.25)
    assert_fused_like(original, script, x)
    # Scripting left the eager module fused, with its own forward.
    assert _rewrite.is_rewritten(fused.forward) and fused.forward.__self__ is fused


def test_script_fused_submodules_of_a_model(tmp_path):
    original, detector, x = real_model("detector")
    script = scripted(detector, tmp_path)
    assert str(script.inlined_graph).count("crelu_ext::crelu") == 2
    assert_fused_like(original, script, x)


def test_trace_crelu_and_fused_modules():
    original, fused = fuse_copy(DetectorBlock())
    x = make_input((2, 3, 5, 5), torch.float32)
    traced = torch.jit.trace(fused, x)
    assert "crelu_ext::crelu" in str(traced.inlined_graph)
    assert_fused_like(original, traced, x)


def test_script_a_model_fused_with_recompute(tmp_path):
    original, model, x = real_model("detector", recompute=True)
    assert_fused_like(original, scripted(model, tmp_path), x)
