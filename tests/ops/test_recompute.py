"""crelu_ext.recompute(): the layer after a fused CReLU keeps CReLU's input,
and backward recomputes the output bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, make_input
from test_fuse import FACEBOXES, FaceBoxesCReLU, _outputs_and_grads, assert_fused_like
from torch import nn

import crelu_ext
from crelu_ext._memory import saved_bytes


class Stem(nn.Module):
    """conv -> BN -> CReLU -> conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = crelu_ext.CReLU()
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


class HandWrittenBlock(nn.Module):
    """conv -> BN -> cat([x, -x], 1) -> relu_ -> conv, as FaceBoxes writes it."""

    def __init__(self):
        super().__init__()
        self.block = FaceBoxesCReLU(3, 8, kernel_size=3, padding=1)
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.block(x))


class CReLUMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(12, 16), crelu_ext.CReLU(-1), nn.Linear(32, 16), crelu_ext.CReLU(-1)
        )
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.layers(x))


# model, input shape, bytes of all its CReLU outputs (float32)
MODELS = {
    "stem": (Stem, (4, 3, 16, 16), 4 * 16 * 16 * 16 * 4),
    "hand-written": (HandWrittenBlock, (4, 3, 16, 16), 4 * 16 * 16 * 16 * 4),
    "mlp": (CReLUMLP, (64, 12), 2 * 64 * 32 * 4),
}


def saved(model, x, context=None):
    def run():
        model(x.detach().requires_grad_(True))

    def in_context():
        with context:
            run()

    return saved_bytes(in_context if context else run, exclude=list(model.parameters()))


@pytest.mark.parametrize("kind", MODELS)
def test_recompute_halves_what_crelu_outputs_cost(kind):
    factory, shape, output_bytes = MODELS[kind]
    torch.manual_seed(0)
    plain = factory()
    x = make_input(shape, torch.float32)
    if kind == "hand-written":  # the idiom, fused and run inside recompute()
        model = crelu_ext.fuse(copy.deepcopy(plain), recompute=True)
        before, after = saved(crelu_ext.fuse(copy.deepcopy(plain)), x), saved(model, x)
        assert model.fused == [f"block: {FACEBOXES}"]
    else:
        model = plain
        before, after = saved(plain, x), saved(plain, x, crelu_ext.recompute())
    assert before - after >= 0.45 * output_bytes, (before, after, output_bytes)
    if kind != "hand-written":
        model = _InContext(plain)
    assert_fused_like(plain, model, x)


class _InContext(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with crelu_ext.recompute():
            return self.model(x)


def test_recompute_runs_inside_the_fused_forward_only():
    torch.manual_seed(0)
    stem = Stem()
    x = make_input((2, 3, 8, 8), torch.float32)
    before = saved(stem, x)
    model = crelu_ext.fuse(HandWrittenBlock(), recompute=True)
    plain = HandWrittenBlock()
    assert saved(model, x) < saved(plain, x)
    assert saved(stem, x) == before  # after the fused forward, CReLU keeps its output again


def test_input_modified_in_place_is_a_clear_error():
    act = crelu_ext.CReLU()
    conv = nn.Conv2d(8, 2, 1)
    x = make_input((2, 4, 3, 3), torch.float32).requires_grad_(True)
    with crelu_ext.recompute():
        h = x * 2
        out = conv(act(h)).sum()
    h.add_(1)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.recompute: the input of a CReLU"):
        out.backward()


def test_outside_the_context_nothing_changes():
    torch.manual_seed(0)
    model = Stem()
    x = make_input((2, 3, 8, 8), torch.float32)
    before = saved(model, x)
    with crelu_ext.recompute():
        pass
    assert saved(model, x) == before


def test_double_backward_through_a_recomputed_output():
    torch.manual_seed(0)
    model = CReLUMLP().double()
    x = make_input((5, 12), torch.float64, special_fraction=0).requires_grad_(True)

    def second_order(context):
        with context:
            out = model(x).square().sum()
        (grad,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), x)[0]

    assert_bitwise_equal(
        second_order(crelu_ext.recompute()), second_order(torch.enable_grad()), "grad of grad"
    )


def test_other_saved_tensors_hooks_see_what_is_kept():
    """An outer pair of hooks keeps working inside recompute()."""
    torch.manual_seed(0)
    model = Stem()
    x = make_input((2, 3, 8, 8), torch.float32).requires_grad_(True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), crelu_ext.recompute():
        out, grads = _outputs_and_grads(model, x)
    assert torch.Size([2, 8, 8, 8]) in packed and torch.Size([2, 16, 8, 8]) not in packed
    expected_out, expected = _outputs_and_grads(model, x)
    assert_bitwise_equal(out, expected_out)
    for actual, wanted in zip(grads, expected, strict=True):
        assert_bitwise_equal(actual, wanted)


def test_recompute_with_the_idiom_under_functional_relu():
    """The fused idiom's output saved by max pooling is recomputed too."""

    class Pooled(nn.Module):
        def forward(self, x):
            x = x * 1.0
            return F.max_pool2d(F.relu(torch.cat([x, -x], 1), inplace=True), 2)

    torch.manual_seed(0)
    plain = Pooled()
    model = crelu_ext.fuse(Pooled(), recompute=True)
    x = make_input((2, 3, 8, 8), torch.float32)
    assert model.fused == ["F.relu(torch.cat([x, -x], 1), inplace=True)"]
    assert saved(model, x) < saved(plain, x)
    assert_fused_like(plain, model, x)


def test_output_modified_before_it_is_saved_is_kept_as_is():
    torch.manual_seed(0)
    act, conv = crelu_ext.CReLU(), nn.Conv2d(8, 2, 1)
    x = make_input((2, 4, 3, 3), torch.float32)

    def run(context):
        leaf = x.detach().requires_grad_(True)
        with context:
            out = act(leaf * 2)
            out.mul_(3)  # then saved by the conv: not CReLU's output any more
            loss = conv(out).sum()
        return torch.autograd.grad(loss, [leaf, conv.weight])

    for actual, expected in zip(run(crelu_ext.recompute()), run(torch.enable_grad()), strict=True):
        assert_bitwise_equal(actual, expected)


def test_output_modified_after_it_is_saved_is_a_clear_error():
    act, conv = crelu_ext.CReLU(), nn.Conv2d(8, 2, 1)
    x = make_input((2, 4, 3, 3), torch.float32).requires_grad_(True)
    with crelu_ext.recompute():
        out = act(x * 2)
        loss = conv(out).sum()
    out.mul_(3)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.recompute: the output of a CReLU"):
        loss.backward()
