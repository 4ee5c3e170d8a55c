"""The paper's networks: parameter counts (Tables 1 and 5), structure, backends, errors."""

import pytest
import torch
from torch import nn

import crelu_ext
from crelu_ext.paper.models import (
    AbsoluteValue,
    all_cnn_b,
    convpool_cnn_c,
    count_parameters,
    vgg_cifar,
)

PAPER_PARAMETERS = [
    # (builder, keyword arguments, the paper's count)
    pytest.param(convpool_cnn_c, {"activation": "relu"}, 1.4e6, id="table1-baseline"),
    pytest.param(convpool_cnn_c, {"activation": "relu", "width": 2}, 5.6e6, id="table1-double"),
    pytest.param(convpool_cnn_c, {"activation": "avr"}, 1.4e6, id="table1-avr"),
    pytest.param(convpool_cnn_c, {"activation": "crelu"}, 2.8e6, id="table1-crelu"),
    pytest.param(convpool_cnn_c, {"activation": "crelu", "width": 0.5}, 0.7e6, id="table1-half"),
    pytest.param(all_cnn_b, {}, 9.4e6, id="table5-baseline"),
    pytest.param(all_cnn_b, {"crelu": (1, 2, 3, 4)}, 10.1e6, id="table5-conv1-4"),
    pytest.param(all_cnn_b, {"crelu": (1, 4, 7), "halve": True}, 8.6e6, id="table5-conv1,4,7"),
    pytest.param(all_cnn_b, {"crelu": "all", "halve": True}, 4.7e6, id="table5-all"),
]


@pytest.mark.parametrize(("builder", "kwargs", "paper"), PAPER_PARAMETERS)
def test_parameter_counts_match_the_paper(builder, kwargs, paper):
    assert count_parameters(builder(**kwargs)) == pytest.approx(paper, rel=0.03)


def test_vgg_with_crelu_at_conv1_3_5_halved_has_fewer_parameters():
    assert count_parameters(vgg_cifar(crelu=(1, 3, 5))) < count_parameters(vgg_cifar())


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_crelu_doubles_the_next_convolutions_input_channels():
    convs = _convs(convpool_cnn_c(activation="crelu", width=0.5))
    assert [c.out_channels for c in convs] == [48] * 3 + [96] * 5 + [10]
    assert [c.in_channels for c in convs] == [3] + [96] * 3 + [192] * 5


def test_all_cnn_b_all_crelu_halves_the_classifier_and_crelu_restores_the_classes():
    model = all_cnn_b(num_classes=10, crelu="all", halve=True)
    assert _convs(model)[-1].out_channels == 5
    assert isinstance(model[-3], crelu_ext.CReLU)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_crelu_layers_are_the_named_ones():
    model = vgg_cifar(crelu=(1, 3, 5))
    layers = list(model)
    conv_positions = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
    # conv -> BatchNorm -> activation
    followed_by_crelu = [
        number
        for number, position in enumerate(conv_positions, start=1)
        if isinstance(layers[position + 2], crelu_ext.CReLU)
    ]
    assert followed_by_crelu == [1, 3, 5]
    assert _convs(model)[0].out_channels == 32  # halved from 64
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "model",
    [
        convpool_cnn_c(activation="crelu", width=0.25, backend="reference"),
        all_cnn_b(crelu=(1, 4, 7), halve=True, backend="reference"),
        vgg_cifar(crelu=(1, 3), backend="reference"),
    ],
    ids=["convpool_cnn_c", "all_cnn_b", "vgg_cifar"],
)
def test_every_crelu_gets_the_builders_backend(model):
    backends = {m.backend for m in model.modules() if isinstance(m, crelu_ext.CReLU)}
    assert backends == {"reference"}


def test_convpool_cnn_c_output_and_avr():
    model = convpool_cnn_c(num_classes=7, in_channels=1, activation="avr", width=0.25)
    assert isinstance(model[1], AbsoluteValue)
    x = torch.randn(5, 1, 32, 32)
    assert torch.equal(model[1](x), x.abs())
    assert model(x).shape == (5, 7)


@pytest.mark.skipif("native" not in crelu_ext.available_backends("cpu"), reason="no native")
def test_native_and_reference_models_are_bitwise_equal_forward_and_backward():
    outputs, grads = [], []
    for backend in ["native", "reference"]:
        torch.manual_seed(0)
        model = convpool_cnn_c(activation="crelu", width=0.25, backend=backend).eval()
        out = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        out.square().sum().backward()
        outputs.append(out)
        grads.append([p.grad for p in model.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: convpool_cnn_c(activation="tanh"), "unknown activation"),
        (lambda: convpool_cnn_c(width=0), "width must be positive"),
        (lambda: convpool_cnn_c(dropout=1), r"dropout must be in \[0, 1\)"),
        (lambda: all_cnn_b(crelu=(0, 13)), r"\[0, 13\].*conv1-12"),
        (lambda: vgg_cifar(crelu="first"), "'all' or a collection"),
        (lambda: all_cnn_b(crelu="all"), "halve=True and an even num_classes"),
        (lambda: all_cnn_b(num_classes=5, crelu=(12,), halve=True), "even num_classes"),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "model",
    [convpool_cnn_c(activation="relu", width=0.25), all_cnn_b(num_classes=10)],
    ids=["convpool_cnn_c", "all_cnn_b"],
)
def test_class_scores_carry_no_relu(model):
    # A ReLU there lets the softmax push every score to zero, where it stops learning.
    last_conv = max(i for i, layer in enumerate(model) if isinstance(layer, nn.Conv2d))
    assert isinstance(model[last_conv + 1], nn.AdaptiveAvgPool2d)


def test_convpool_dropout_is_the_rate_after_each_pool():
    rates = [m.p for m in convpool_cnn_c(dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.3, 0.3]
