"""The networks of the CReLU paper (Shang et al., 2016), with ReLU, CReLU or AVR.

- :func:`convpool_cnn_c`: ConvPool-CNN-C (Springenberg et al., 2014), Table 1 (CIFAR).
- :func:`all_cnn_b`: All-CNN-B (Springenberg et al., 2014), Tables 4 and 5 (ImageNet).
- :func:`vgg_cifar`: Zagoruyko's CIFAR VGG with batch normalization, Table 2.

Every builder takes ``backend``, which it passes to each :class:`~crelu_ext.CReLU`. A CReLU
doubles the channels it receives, so the convolution after it has twice the input channels:
that is where the CReLU models' extra parameters come from.
"""

from collections.abc import Iterable

import torch
from torch import nn

from ..nn import CReLU

ACTIVATIONS = ("relu", "crelu", "avr")


class AbsoluteValue(nn.Module):
    """AVR, ``|x|``: the paper's other baseline (it keeps the magnitude, drops the phase)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


def make_activation(name: str, backend: str = "auto") -> nn.Module:
    """``"relu"``, ``"crelu"`` (over the channel dim) or ``"avr"``."""
    if name == "relu":
        return nn.ReLU()
    if name == "crelu":
        return CReLU(dim=1, backend=backend)
    if name == "avr":
        return AbsoluteValue()
    raise ValueError(f"unknown activation {name!r}; choose one of {list(ACTIVATIONS)}")


def channel_factor(activation: str) -> int:
    """How many channels an activation emits per channel it receives."""
    return 2 if activation == "crelu" else 1


def _scaled(filters: int, width: float) -> int:
    return max(1, round(filters * width))


def _init_convolutions(model: nn.Sequential) -> nn.Sequential:
    """He (MSRA) initialization, as the Caffe models of the time had: each hidden
    convolution keeps the second moment of its input through the activation after it,
    and the classifier starts near linear scale. ReLU and CReLU halve each channel's
    energy (CReLU then doubles the channels, and the next fan-in with them), so their
    gain is sqrt(2); AVR keeps it, so its gain is 1. With torch's default initialization
    the stack's output shrinks layer by layer and ConvPool-CNN-C stayed at chance on the
    digits for 15 epochs (measured; see benchmarks/results/training/README.md).
    """
    convolutions = [m for m in model if isinstance(m, nn.Conv2d)]
    for conv, after in zip(convolutions, [*convolutions[1:], None], strict=True):
        activation = model[list(model).index(conv) + 1]
        keeps_energy = after is None or isinstance(activation, AbsoluteValue)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="linear" if keeps_energy else "relu")
        nn.init.zeros_(conv.bias)
    return model


def convpool_cnn_c(
    num_classes: int = 10,
    in_channels: int = 3,
    activation: str = "relu",
    width: float = 1.0,
    backend: str = "auto",
    dropout: float = 0.5,
) -> nn.Sequential:
    """ConvPool-CNN-C; ``activation`` follows conv1-conv8, ``width`` scales their filters,
    ``dropout`` is the rate after each max-pool (Springenberg et al.'s 0.5; the CReLU paper
    tunes it per model, and narrow networks on the digits need less).

    Parameters at width 1 for CIFAR-10 (Table 1): relu 1.4M, crelu 2.8M, avr 1.4M;
    relu at width 2 5.6M; crelu at width 0.5 0.7M.
    """
    make_activation(activation, backend)  # fail early on an unknown name
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    wide, wider = _scaled(96, width), _scaled(192, width)
    # (kernel, filters, padding) per convolution; "pool" is max-pool 3x3/2 then dropout.
    plan = [(3, wide, 1), (3, wide, 1), (3, wide, 1), "pool",
            (3, wider, 1), (3, wider, 1), (3, wider, 1), "pool",
            (3, wider, 0), (1, wider, 0)]  # fmt: skip
    layers: list[nn.Module] = []
    channels = in_channels
    for step in plan:
        if step == "pool":
            layers += [nn.MaxPool2d(3, stride=2), nn.Dropout(dropout)]
            continue
        kernel, filters, padding = step
        layers += [
            nn.Conv2d(channels, filters, kernel, padding=padding),
            make_activation(activation, backend),
        ]
        channels = filters * channel_factor(activation)
    # Springenberg et al. put a ReLU on the class scores; it is left out here. With it,
    # every step pushes the wrong classes' scores down (the softmax's gradient), no step
    # pushes them all up, and once a score is negative everywhere its ReLU passes no
    # gradient: training stopped at loss ln 10 (chance) within the first steps for CReLU.
    layers += [nn.Conv2d(channels, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _init_convolutions(nn.Sequential(*layers))


def _crelu_layers(crelu: Iterable[int] | str, num_convs: int) -> set[int]:
    """The 1-based convolutions that ``crelu`` names (``"all"`` names every one)."""
    if crelu == "all":
        return set(range(1, num_convs + 1))
    if isinstance(crelu, str):
        raise ValueError(f"crelu must be 'all' or a collection of layer numbers, got {crelu!r}")
    layers = set(crelu)
    outside = sorted(layer for layer in layers if not 1 <= layer <= num_convs)
    if outside:
        raise ValueError(f"crelu names convolutions {outside}; this network has conv1-{num_convs}")
    return layers


# All-CNN-B: (kernel, filters, stride) of conv1-conv11; conv12 is the 1x1 classifier.
ALL_CNN_B_CONVS = [(11, 96, 4), (1, 96, 1), (3, 96, 2), (5, 256, 1), (1, 256, 1), (3, 256, 2),
                   (3, 384, 1), (1, 384, 1), (3, 384, 2), (3, 1024, 1), (1, 1024, 1)]  # fmt: skip


def all_cnn_b(
    num_classes: int = 1000,
    crelu: Iterable[int] | str = (),
    halve: bool = False,
    backend: str = "auto",
) -> nn.Sequential:
    """All-CNN-B for ImageNet: twelve convolutions, each followed by ReLU, or by CReLU when
    ``crelu`` names it (1-based, or ``"all"``); ``halve`` halves those convolutions' filters.

    Parameters (Table 5): baseline 9.4M; ``crelu=(1, 2, 3, 4)`` 10.1M;
    ``crelu=(1, 4, 7), halve=True`` 8.6M; ``crelu="all", halve=True`` 4.7M. The last
    needs an even ``num_classes``: conv12 emits ``num_classes / 2`` maps and CReLU doubles
    them into the class scores, which is how "all" reaches 4.7M.
    """
    crelu_layers = _crelu_layers(crelu, num_convs=12)
    convs = [*ALL_CNN_B_CONVS, (1, num_classes, 1)]
    if 12 in crelu_layers and not (halve and num_classes % 2 == 0):
        raise ValueError(
            "CReLU after conv12 doubles the class scores; it needs halve=True and an even "
            f"num_classes (got halve={halve}, num_classes={num_classes})"
        )
    layers: list[nn.Module] = []
    channels = 3
    for number, (kernel, filters, stride) in enumerate(convs, start=1):
        if number == 10:
            layers.append(nn.Dropout(0.5))
        activation = "crelu" if number in crelu_layers else "relu"
        if activation == "crelu" and halve:
            filters //= 2
        layers.append(nn.Conv2d(channels, filters, kernel, stride=stride, padding=kernel // 2))
        # No ReLU on the class scores (see convpool_cnn_c); a CReLU there keeps every
        # score's gradient, one half or the other.
        if number < len(convs) or activation == "crelu":
            layers.append(make_activation(activation, backend))
        channels = filters * channel_factor(activation)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _init_convolutions(nn.Sequential(*layers))


# Zagoruyko's cifar.torch VGG: filters of conv1-conv13 ("M": max-pool), and the dropout
# after each convolution (0 for none).
VGG_CIFAR_FILTERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                     512, 512, 512, "M", 512, 512, 512, "M"]  # fmt: skip
VGG_CIFAR_DROPOUT = [0.3, 0, 0.4, 0, 0.4, 0.4, 0, 0.4, 0.4, 0, 0.4, 0.4, 0]


def vgg_cifar(
    num_classes: int = 10,
    crelu: Iterable[int] | str = (),
    halve: bool = True,
    backend: str = "auto",
) -> nn.Sequential:
    """VGG with batch normalization for 32x32 inputs (Section 3.1): conv-BN-activation x13,
    then dropout-linear-BN-ReLU-dropout-linear. ``crelu`` names the 1-based convolutions
    followed by CReLU instead of ReLU; ``halve`` halves their filters.
    ``crelu=(1, 3, 5)`` is Table 2's best row."""
    crelu_layers = _crelu_layers(crelu, num_convs=13)
    layers: list[nn.Module] = []
    channels, number = 3, 0
    for filters in VGG_CIFAR_FILTERS:
        if filters == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
            continue
        number += 1
        activation = "crelu" if number in crelu_layers else "relu"
        if activation == "crelu" and halve:
            filters //= 2
        layers += [
            nn.Conv2d(channels, filters, 3, padding=1, bias=False),
            nn.BatchNorm2d(filters),
            make_activation(activation, backend),
        ]
        if VGG_CIFAR_DROPOUT[number - 1]:
            layers.append(nn.Dropout(VGG_CIFAR_DROPOUT[number - 1]))
        channels = filters * channel_factor(activation)
    layers += [
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(channels, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    ]
    return nn.Sequential(*layers)


MODELS = {"convpool_cnn_c": convpool_cnn_c, "all_cnn_b": all_cnn_b, "vgg_cifar": vgg_cifar}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
