"""``python -m crelu_ext analyze``: the CReLU paper's analyses of a trained network.

    python -m crelu_ext train --activation crelu --width 0.25 --epochs 5 --checkpoint run.pt
    python -m crelu_ext analyze --checkpoint run.pt --out analysis/
    python -m crelu_ext analyze --activation crelu --width 0.25 --epochs 5 --out analysis/

- Pairing (Section 2.1, Figures 2 and 3): :func:`pairing_cosines` gives, for each unit-norm
  filter, the cosine with its most opposite filter; :func:`random_pairing_cosines` the same
  for Gaussian filters. A ReLU network's low layers learn opposite pairs (learned cosines
  shifted negative against random); a CReLU network should not need to.
- Reconstruction (Proposition 2.1, Algorithm 1, Figure 5): CReLU features keep the whole
  pre-activation ``z = relu(z) - relu(-z)``, so the part of the input that the filters span
  is recovered by linear least squares, with no learning (:func:`reconstruct_from_crelu`,
  :func:`reconstruct_through_stack`). ReLU features lose ``z`` where it is negative.
- Pair correlations (Table 6): :func:`pair_correlations` compares the outgoing weights of a
  channel's positive and negative halves with those of unmatched channels.

Everything here is float64 linear algebra on the CPU: it analyses a network, it does not
train one.
"""

import argparse
import copy
import json
import math
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import CReLU
from .models import ACTIVATIONS, MODELS

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
# Random draws pooled for the Gaussian baseline: one draw of 24 filters of dimension 9 gives
# a ragged histogram and a mean with a std of 0.033 across seeds; 20 draws pooled, 0.009.
RANDOM_DRAWS = 20
# method="lstsq" materializes A: (outputs x unknowns) float64; 4096 unknowns against ~4x
# as many outputs is ~0.5 GB.
LSTSQ_MAX_UNKNOWNS = 4096


# --- Pairing (Section 2.1) -------------------------------------------------------------


def _unit_filters(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, kh, kw) -> (K, C*kh*kw) with unit rows."""
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (K, C, kh, kw), got shape {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"pairing needs at least 2 filters, got {weight.shape[0]}")
    filters = weight.detach().flatten(1).double()
    norms = filters.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a filter is all zeros: its cosine with other filters is undefined")
    return filters / norms


def pairing_cosines(weight: torch.Tensor) -> torch.Tensor:
    """mu_i = min over j != i of <phi_i, phi_j> for the unit-normalized filters phi of a
    conv weight (K, C, kh, kw); shape (K,), float64. mu_i = -1: filter i has an exact
    opposite."""
    filters = _unit_filters(weight)
    cosines = filters @ filters.T
    cosines.fill_diagonal_(math.inf)  # a filter is not its own pair
    return cosines.min(dim=1).values


def random_pairing_cosines(shape: tuple[int, ...] | torch.Size, seed: int = 0) -> torch.Tensor:
    """:func:`pairing_cosines` of i.i.d. Gaussian filters of ``shape``: the baseline that
    learned filters are compared against (slightly negative on average, more so when the
    filters are many compared with their dimension)."""
    generator = torch.Generator().manual_seed(seed)
    return pairing_cosines(torch.randn(tuple(shape), generator=generator, dtype=torch.float64))


def named_convolutions(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's Conv2d layers in registration (for nn.Sequential: forward) order, named
    as the paper numbers them: ``conv1 [0]`` is conv1, module ``0``."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return [(f"conv{i} [{name}]", m) for i, (name, m) in enumerate(convs, start=1)]


@dataclass
class PairingStats:
    layer: str
    filters: int
    filter_dim: int
    learned_mean: float
    learned_std: float
    random_mean: float
    random_std: float
    # The same layer at the network's initialization, when known: learned filters that
    # barely moved from their Gaussian start pair like random ones whatever the activation.
    init_mean: float | None = None
    change_from_init: float | None = None  # ||W - W0|| / ||W0||


def pairing_report(
    model: nn.Module, seed: int = 0, initial: nn.Module | None = None
) -> tuple[list[PairingStats], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per conv layer: mean and std of mu^w (learned) and mu^r (Gaussian, pooled over
    :data:`RANDOM_DRAWS` draws), and the raw cosines for the histograms; with ``initial``
    (the model before training) also mu at initialization and how far the weights moved."""
    stats, cosines = [], {}
    initial_convs = dict(named_convolutions(initial)) if initial is not None else {}
    for name, conv in named_convolutions(model):
        if conv.weight.shape[0] < 2:
            continue
        learned = pairing_cosines(conv.weight)
        random = torch.cat(
            [random_pairing_cosines(conv.weight.shape, seed + d) for d in range(RANDOM_DRAWS)]
        )
        cosines[name] = (learned, random)
        stats.append(
            PairingStats(
                name,
                conv.weight.shape[0],
                conv.weight[0].numel(),
                learned.mean().item(),
                learned.std().item(),
                random.mean().item(),
                random.std().item(),
            )
        )
        if name in initial_convs:
            start = initial_convs[name].weight.detach()
            stats[-1].init_mean = pairing_cosines(start).mean().item()
            change = (conv.weight.detach() - start).norm() / start.norm()
            stats[-1].change_from_init = change.item()
    return stats, cosines


def plot_pairing_histograms(
    cosines: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str = ""
) -> None:
    """Figures 2/3: one panel per conv layer, mu^w in blue, mu^r in red (densities, as the
    random baseline pools several draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(cosines))
    rows = math.ceil(len(cosines) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False, sharex=True
    )
    bins = torch.linspace(-1, 1, 41).tolist()
    for axis, (name, (learned, random)) in zip(axes.flat, cosines.items(), strict=False):
        # Random filled, learned as an outline on top: both stay visible where they overlap.
        axis.hist(
            random.numpy(), bins=bins, density=True, color="red", alpha=0.4,
            label="random Gaussian filters (mu^r)",
        )  # fmt: skip
        axis.hist(
            learned.numpy(), bins=bins, density=True, color="blue", histtype="step",
            linewidth=1.5, label="learned filters (mu^w)",
        )  # fmt: skip
        axis.set_title(f"{name}, K={len(learned)} filters", fontsize=9)
    for axis in axes.flat[len(cosines) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.supxlabel(
        "pairing cosine mu_i = min over j != i of <phi_i, phi_j>, phi: the layer's filters "
        "scaled to unit norm (-1: filter i has an exact opposite)",
        fontsize=9,
    )
    figure.supylabel("density (fraction of filters per unit of cosine)", fontsize=9)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- Reconstruction (Proposition 2.1, Algorithm 1) ---------------------------------------

Activation = Literal["crelu", "relu"]


def _check_conv(conv: nn.Conv2d) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            "reconstruction needs numeric zero padding (so conv_transpose2d is the exact "
            f"adjoint); got padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )


def _preactivation(conv: nn.Conv2d, features: torch.Tensor, activation: Activation) -> torch.Tensor:
    """W * x from the features after ``activation``: exact for CReLU (z = pos - neg), only
    its positive part for ReLU (z_hat = relu(z)). The bias is removed."""
    if features.dim() != 4:
        raise ValueError(f"expected features (N, C, H, W), got shape {tuple(features.shape)}")
    channels = features.shape[1]
    if activation == "crelu":
        if channels != 2 * conv.out_channels:
            raise ValueError(
                f"CReLU features of a conv with {conv.out_channels} filters have "
                f"{2 * conv.out_channels} channels, got {channels}"
            )
        positive, negative = features.split(conv.out_channels, dim=1)
        z = positive - negative
    elif activation == "relu":
        if channels != conv.out_channels:
            raise ValueError(
                f"ReLU features of a conv with {conv.out_channels} filters have "
                f"{conv.out_channels} channels, got {channels}"
            )
        z = features
    else:
        raise ValueError(f"activation must be 'crelu' or 'relu', got {activation!r}")
    if conv.bias is not None:
        z = z - conv.bias.detach().to(z.dtype).view(1, -1, 1, 1)
    return z


def _conv_operator(conv: nn.Conv2d, input_size: tuple[int, int], dtype: torch.dtype):
    """x -> W * x (no bias) and its exact adjoint, for inputs of spatial size input_size."""
    weight = conv.weight.detach().to(dtype)
    options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, groups=conv.groups, **options)

    output_size = forward(torch.zeros(1, conv.in_channels, *input_size, dtype=dtype)).shape[-2:]
    # conv2d drops the rows/columns that a stride does not reach; output_padding restores
    # them in the transpose, so the adjoint maps back onto exactly input_size.
    output_padding = tuple(
        size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, out, s, p, d, k in zip(
            input_size,
            output_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.kernel_size,
            strict=True,
        )
    )

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            y, weight, output_padding=output_padding, groups=conv.groups, **options
        )

    return forward, adjoint, tuple(output_size)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """Sum of squares per sample, shaped to broadcast over (N, C, H, W)."""
    return values.flatten(1).pow(2).sum(1).view(-1, 1, 1, 1)


@dataclass
class SolveInfo:
    iterations: int
    relative_residual: float  # ||A^T (A x - b)|| / ||A^T b||, worst sample


def least_squares_conv(
    conv: nn.Conv2d,
    target: torch.Tensor,
    input_size: tuple[int, int],
    method: Literal["cg", "lstsq"] = "cg",
    max_iter: int = 500,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, SolveInfo]:
    """Minimum-norm x minimizing ||W * x - target|| (no bias), per sample.

    ``"cg"``: conjugate gradients on the normal equations (CGLS) with conv_transpose2d as
    A^T; started at 0, its iterates stay in range(A^T), so it converges to the minimum-norm
    solution, the x' of Proposition 2.1. ``"lstsq"``: builds A densely and solves exactly
    (for small problems: A has C*H*W columns)."""
    _check_conv(conv)
    forward, adjoint, output_size = _conv_operator(conv, input_size, target.dtype)
    if target.shape[1:] != (conv.out_channels, *output_size):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the conv's output "
            f"(N, {conv.out_channels}, {output_size[0]}, {output_size[1]}) for input {input_size}"
        )
    shape = (conv.in_channels, *input_size)
    if method == "lstsq":
        size = math.prod(shape)
        if size > LSTSQ_MAX_UNKNOWNS:
            raise ValueError(
                f"method='lstsq' builds a dense matrix with {size} columns (limit "
                f"{LSTSQ_MAX_UNKNOWNS}); use method='cg' for inputs this large"
            )
        basis = torch.eye(size, dtype=target.dtype).view(size, *shape)
        matrix = forward(basis).flatten(1).T  # column i: the conv of basis vector i
        solution = torch.linalg.lstsq(matrix, target.flatten(1).T, driver="gelsd").solution
        x = solution.T.reshape(-1, *shape)
        return x, SolveInfo(0, _normal_residual(forward, adjoint, x, target))
    if method != "cg":
        raise ValueError(f"method must be 'cg' or 'lstsq', got {method!r}")

    # CGLS: CG on A^T A x = A^T b, one independent solve per sample (per-sample scalars).
    x = torch.zeros(target.shape[0], *shape, dtype=target.dtype)
    residual = target.clone()  # b - A x
    gradient = adjoint(residual)  # A^T (b - A x)
    direction = gradient.clone()
    gamma = _per_sample(gradient)
    stop = tol**2 * gamma
    tiny = torch.finfo(target.dtype).tiny  # a converged sample has gamma = 0: a zero step
    iterations = 0
    while iterations < max_iter and not bool((gamma <= stop).all()):
        iterations += 1
        image = forward(direction)
        alpha = gamma / _per_sample(image).clamp_min(tiny)
        x += alpha * direction
        residual -= alpha * image
        gradient = adjoint(residual)
        new_gamma = _per_sample(gradient)
        direction = gradient + new_gamma / gamma.clamp_min(tiny) * direction
        gamma = new_gamma
    return x, SolveInfo(iterations, _normal_residual(forward, adjoint, x, target))


def _normal_residual(forward, adjoint, x: torch.Tensor, target: torch.Tensor) -> float:
    rhs = _per_sample(adjoint(target)).sqrt()
    residual = _per_sample(adjoint(forward(x) - target)).sqrt()
    return (residual / rhs.clamp_min(torch.finfo(target.dtype).tiny)).max().item()


def reconstruct_from_crelu(
    conv: nn.Conv2d,
    features: torch.Tensor,
    input_size: tuple[int, int] | None = None,
    method: Literal["cg", "lstsq"] = "cg",
    max_iter: int = 500,
) -> torch.Tensor:
    """Algorithm 1: the input x' (the part spanned by the filters' shifts) from
    ``features = cat([relu(z), relu(-z)], 1)``, z = conv(x); no learning involved. Exact
    (to solver precision) when the conv is injective, e.g. its filters span the patches.

    ``input_size`` defaults to the size a stride-1 conv maps onto the features' size."""
    return _reconstruct(conv, features, "crelu", input_size, method, max_iter)


def reconstruct_from_relu(
    conv: nn.Conv2d,
    features: torch.Tensor,
    input_size: tuple[int, int] | None = None,
    method: Literal["cg", "lstsq"] = "cg",
    max_iter: int = 500,
) -> torch.Tensor:
    """The same solve on ReLU features ``relu(z)``, taking z_hat = relu(z): the comparison
    the paper's argument rests on. z is lost where negative, so it cannot be exact."""
    return _reconstruct(conv, features, "relu", input_size, method, max_iter)


def _reconstruct(
    conv: nn.Conv2d,
    features: torch.Tensor,
    activation: Activation,
    input_size: tuple[int, int] | None,
    method: Literal["cg", "lstsq"],
    max_iter: int,
) -> torch.Tensor:
    _check_conv(conv)
    z = _preactivation(conv, features, activation)
    if input_size is None:
        input_size = _stride1_input_size(conv, tuple(z.shape[-2:]))
    x, _ = least_squares_conv(conv, z, input_size, method=method, max_iter=max_iter)
    return x


def _stride1_input_size(conv: nn.Conv2d, output_size: tuple[int, int]) -> tuple[int, int]:
    if conv.stride != (1, 1):
        raise ValueError("a strided conv's input size is ambiguous: pass input_size")
    return tuple(
        out - 2 * p + d * (k - 1)
        for out, p, d, k in zip(
            output_size, conv.padding, conv.dilation, conv.kernel_size, strict=True
        )
    )


def invertible_stack(model: nn.Module) -> tuple[list[nn.Conv2d], Activation]:
    """The model's leading conv -> activation pairs (all ReLU or all CReLU over channels):
    the layers Algorithm 1 inverts. It stops at the first other layer (e.g. max-pooling,
    which discards where the maximum was)."""
    layers = list(model.children()) if isinstance(model, nn.Sequential) else []
    stack: list[nn.Conv2d] = []
    kinds: list[Activation] = []
    for conv, activation in zip(layers[0::2], layers[1::2], strict=False):
        if isinstance(activation, CReLU) and activation.dim in (1, -3):
            kind: Activation = "crelu"
        elif isinstance(activation, nn.ReLU):
            kind = "relu"
        else:
            break
        if not isinstance(conv, nn.Conv2d) or (kinds and kind != kinds[0]):
            break
        stack.append(conv)
        kinds.append(kind)
    if not stack:
        raise ValueError("the model does not start with conv -> ReLU/CReLU layers")
    return stack, kinds[0]


def stack_features(
    stack: list[nn.Conv2d], activation: Activation, image: torch.Tensor
) -> list[torch.Tensor]:
    """The features after each conv + activation of the stack, in float64."""
    act = (lambda z: torch.cat([F.relu(z), F.relu(-z)], 1)) if activation == "crelu" else F.relu
    features, x = [], image.double()
    for conv in stack:
        x = act(
            F.conv2d(
                x,
                conv.weight.detach().double(),
                None if conv.bias is None else conv.bias.detach().double(),
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )
        )
        features.append(x)
    return features


def reconstruct_through_stack(
    stack: list[nn.Conv2d],
    features: torch.Tensor,
    input_size: tuple[int, int],
    activation: Activation = "crelu",
    max_iter: int = 500,
) -> torch.Tensor:
    """Figure 5: inverts conv+activation layers top-down. Each layer's solve gives an
    estimate of the layer below's features, which is inverted the same way (for CReLU, its
    pos - neg is that layer's pre-activation; for ReLU the estimate stands in for relu(z)).
    ``input_size`` is the image's size."""
    return _invert_stack(stack, features, input_size, activation, max_iter)[0]


def _invert_stack(
    stack: list[nn.Conv2d],
    features: torch.Tensor,
    input_size: tuple[int, int],
    activation: Activation,
    max_iter: int,
) -> tuple[torch.Tensor, list[SolveInfo]]:
    """:func:`reconstruct_through_stack`, also returning each solve's info, top layer first."""
    sizes = [input_size]
    for conv in stack[:-1]:  # spatial size entering each conv
        _, _, size = _conv_operator(conv, sizes[-1], torch.float64)
        sizes.append(size)
    x, infos = features, []
    for conv, size in zip(reversed(stack), reversed(sizes), strict=True):
        z = _preactivation(conv, x, activation)
        x, info = least_squares_conv(conv, z, size, max_iter=max_iter)
        infos.append(info)
    return x, infos


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return ((estimate - target).norm() / target.norm()).item()


def sample_photograph(size: int = 96, channels: int = 1) -> torch.Tensor:
    """scikit-learn's china.jpg (a real photograph shipped with it), center-cropped square,
    resized to size x size, standardized; shape (1, channels, size, size), float64."""
    from sklearn.datasets import load_sample_image

    photo = torch.tensor(load_sample_image("china.jpg"), dtype=torch.float64).permute(2, 0, 1) / 255
    side = min(photo.shape[-2:])
    top, left = (photo.shape[1] - side) // 2, (photo.shape[2] - side) // 2
    photo = photo[:, top : top + side, left : left + side].unsqueeze(0)
    photo = F.interpolate(photo, size=(size, size), mode="area")
    if channels == 1:
        photo = (photo * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).double()).sum(
            1, keepdim=True
        )
    elif channels != 3:
        raise ValueError(f"the photograph has 1 or 3 channels, not {channels}")
    return (photo - photo.mean()) / photo.std()


@dataclass
class ReconstructionResult:
    depth: int  # features of conv1..conv{depth}
    activation: str
    relative_error: float
    solves: list[SolveInfo]  # CG per layer, top layer first


def reconstruction_by_depth(
    stack: list[nn.Conv2d], activation: Activation, image: torch.Tensor, max_iter: int = 500
) -> tuple[list[ReconstructionResult], list[torch.Tensor]]:
    """The image reconstructed from the features of conv1, conv1-2, ... (Figure 5)."""
    from tqdm import tqdm

    features = stack_features(stack, activation, image)
    results, images = [], []
    for depth in tqdm(range(1, len(stack) + 1), desc=f"reconstruct ({activation})"):
        estimate, solves = _invert_stack(
            stack[:depth], features[depth - 1], tuple(image.shape[-2:]), activation, max_iter
        )
        error = relative_error(estimate, image)
        results.append(ReconstructionResult(depth, activation, error, solves))
        images.append(estimate)
    return results, images


def plot_reconstructions(
    image: torch.Tensor, rows: dict[str, list[tuple[str, torch.Tensor]]], path: Path
) -> None:
    """The input image, then one row per label of (title, reconstruction) panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max(len(panels) for panels in rows.values())
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(2.2 * columns, 2.8 * len(rows)), squeeze=False
    )
    for row, (label, panels) in zip(axes, rows.items(), strict=True):
        row[0].imshow(_displayable(image, image), cmap="gray", vmin=0, vmax=1)
        row[0].set_title(f"{label}\ninput", fontsize=8)
        for axis, (title, picture) in zip(row[1:], panels, strict=False):
            axis.imshow(_displayable(picture, image), cmap="gray", vmin=0, vmax=1)
            axis.set_title(f"{title}\nrel. err {relative_error(picture, image):.3g}", fontsize=8)
        for axis in row:
            axis.axis("off")
    figure.suptitle(
        "the input rebuilt from features by least squares, no learning; "
        "rel. err = ||x_hat - x|| / ||x||",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _displayable(picture: torch.Tensor, reference: torch.Tensor):
    """(1, C, H, W) -> HxW(x3) in [0, 1], on the reference's intensity scale so that a
    reconstruction's lost contrast shows."""
    low, high = reference.min(), reference.max()
    scaled = ((picture[0] - low) / (high - low)).clamp(0, 1)
    return scaled[0].numpy() if scaled.shape[0] == 1 else scaled.permute(1, 2, 0).numpy()


# --- Pair correlations (Table 6) ---------------------------------------------------------


@dataclass
class PairCorrelations:
    pair_mean: float
    pair_std: float
    non_pair_mean: float
    non_pair_std: float


def pair_correlations(next_conv_weight: torch.Tensor, absolute: bool = False) -> PairCorrelations:
    """Pearson correlation between outgoing weight vectors (``next_weight[:, i].flatten()``)
    of input channels i of the conv after a CReLU of C channels (2C inputs: channel c's
    positive half is input c, its negative half c + C). "pair": (c, c + C) for each c;
    "non-pair": every other unordered pair of distinct inputs. ``absolute``: of |corr|
    (Table 6's non-pair means are positive, which suggests magnitudes)."""
    if next_conv_weight.dim() != 4:
        raise ValueError(
            f"expected a conv weight (K, 2C, kh, kw), got shape {tuple(next_conv_weight.shape)}"
        )
    inputs = next_conv_weight.shape[1]
    if inputs % 2 or inputs < 4:
        raise ValueError(
            f"the conv after a CReLU has an even number (>= 4) of input channels, got {inputs}"
        )
    half = inputs // 2
    outgoing = next_conv_weight.detach().double().transpose(0, 1).flatten(1)  # (2C, K*kh*kw)
    centered = outgoing - outgoing.mean(dim=1, keepdim=True)
    norms = centered.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("an input channel's outgoing weights are constant: correlation undefined")
    unit = centered / norms
    correlation = unit @ unit.T
    if absolute:
        correlation = correlation.abs()
    channel = torch.arange(half)
    pair = correlation[channel, channel + half]
    upper = torch.triu(torch.ones(inputs, inputs, dtype=torch.bool), diagonal=1)
    upper[channel, channel + half] = False
    non_pair = correlation[upper]
    return PairCorrelations(
        pair.mean().item(), pair.std().item(), non_pair.mean().item(), non_pair.std().item()
    )


def crelu_successors(model: nn.Module) -> list[tuple[str, str, nn.Conv2d]]:
    """(conv, next conv, next conv module) for each conv followed by a CReLU over channels;
    layers in between (pooling, dropout) act per channel and keep the pairing."""
    convs = {id(m): name for name, m in named_convolutions(model)}
    found, previous, pending = [], None, None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if pending is not None and module.in_channels == 2 * pending.out_channels:
                found.append((convs[id(pending)], convs[id(module)], module))
            pending, previous = None, module
        elif isinstance(module, CReLU) and module.dim in (1, -3) and previous is not None:
            pending = previous
    return found


# --- Loading a model, the report, the command --------------------------------------------


def load_model(checkpoint: Path) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """The model a ``python -m crelu_ext train --checkpoint`` run saved, the same model at
    its initialization (train seeds torch with --seed right before building it), and the
    run's metrics."""
    from .train import model_options, read_checkpoint

    state = read_checkpoint(checkpoint)  # refuses anything but tensors and plain data
    try:
        config = state["metrics"]["config"]
        weights = state["runs"][0]["model"]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"cannot read a training checkpoint from {checkpoint}: {error}") from None
    options = model_options(Namespace(**config))
    if config["model"] == "convpool_cnn_c":
        first_conv = next(w for w in weights.values() if w.dim() == 4)
        options["in_channels"] = first_conv.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        initial = MODELS[config["model"]](
            num_classes=NUM_CLASSES[config["dataset"]], backend="reference", **options
        )
    model = copy.deepcopy(initial)
    model.load_state_dict(weights)
    return model.eval(), initial.eval(), state["metrics"]


def analyze(
    model: nn.Module,
    out: Path,
    image_size: int = 96,
    max_iter: int = 300,
    seed: int = 0,
    title: str = "",
    initial: nn.Module | None = None,
) -> dict[str, Any]:
    """Writes pairing.png, reconstruction.png (when the model starts with conv ->
    ReLU/CReLU layers) and analysis.json into ``out``; returns the numbers (see
    :func:`write_report` for the markdown). ``initial``: the model before training, for the
    pairing table."""
    out.mkdir(parents=True, exist_ok=True)
    stats, cosines = pairing_report(model, seed, initial)
    plot_pairing_histograms(cosines, out / "pairing.png", title)

    try:
        stack, activation = invertible_stack(model)
    except ValueError:
        reconstruction = None  # e.g. AVR, or batch norm between conv and activation
    else:
        reconstruction = _reconstruction_figure(stack, activation, image_size, max_iter, out)
    correlations = {
        f"{name} -> {next_name}": asdict(pair_correlations(conv.weight))
        | {"abs_" + k: v for k, v in asdict(pair_correlations(conv.weight, True)).items()}
        for name, next_name, conv in crelu_successors(model)
    }
    numbers = {
        "pairing": [asdict(s) for s in stats],
        "reconstruction": reconstruction,
        "pair_correlations": correlations,
    }
    (out / "analysis.json").write_text(json.dumps(numbers, indent=1) + "\n")
    return numbers


def _reconstruction_figure(
    stack: list[nn.Conv2d], activation: Activation, image_size: int, max_iter: int, out: Path
) -> dict[str, Any]:
    """reconstruction.png: the photograph from the stack's features, and conv1 alone read
    through CReLU and through ReLU; returns the errors."""
    image = sample_photograph(image_size, stack[0].in_channels)
    results, images = reconstruction_by_depth(stack, activation, image, max_iter)
    first_conv_output = stack_features(stack[:1], "crelu", image)[0]
    # The same conv1 filters read through CReLU and through ReLU: the direct comparison of
    # feature types (the positive half of the CReLU features is the ReLU features).
    conv1_crelu = reconstruct_from_crelu(
        stack[0], first_conv_output, tuple(image.shape[-2:]), max_iter=max_iter
    )
    conv1_relu = reconstruct_from_relu(
        stack[0],
        first_conv_output[:, : stack[0].out_channels],
        tuple(image.shape[-2:]),
        max_iter=max_iter,
    )
    rows = {
        f"{activation} features, top-down": [
            (f"from conv1-{d + 1}" if d else "from conv1", im) for d, im in enumerate(images)
        ],
        "conv1 alone": [("CReLU features", conv1_crelu), ("ReLU features", conv1_relu)],
    }
    plot_reconstructions(image, rows, out / "reconstruction.png")

    return {
        "activation": activation,
        "image": f"china.jpg, {image_size}x{image_size}, {image.shape[1]} channel(s)",
        "by_depth": [asdict(r) for r in results],
        "conv1_crelu_features": relative_error(conv1_crelu, image),
        "conv1_relu_features": relative_error(conv1_relu, image),
    }


def write_report(numbers: dict[str, Any], path: Path, heading: str) -> None:
    lines = [f"# {heading}", "", "## Pairing (Section 2.1, Figures 2/3)", ""]
    lines += [
        "mu_i = min_j <phi_i, phi_j> over unit-norm filters; random: Gaussian filters of the "
        f"same shape, {RANDOM_DRAWS} draws pooled. ![pairing](pairing.png)",
        "",
        "| layer | K | filter dim | mu^w (learned) | mu^r (random) | mu at init "
        "| \\|W - W0\\| / \\|W0\\| |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in numbers["pairing"]:
        init = "n/a" if s["init_mean"] is None else f"{s['init_mean']:.3f}"
        change = "n/a" if s["change_from_init"] is None else f"{s['change_from_init']:.2f}"
        lines.append(
            f"| {s['layer']} | {s['filters']} | {s['filter_dim']} | "
            f"{s['learned_mean']:.3f} ± {s['learned_std']:.3f} | "
            f"{s['random_mean']:.3f} ± {s['random_std']:.3f} | {init} | {change} |"
        )
    lines += ["", "## Reconstruction (Proposition 2.1, Algorithm 1, Figure 5)", ""]
    recon = numbers["reconstruction"]
    if recon is None:
        lines.append("Skipped: the model does not start with conv -> ReLU/CReLU layers.")
    else:
        lines += _reconstruction_lines(recon)
    if numbers["pair_correlations"]:
        lines += ["", "## Pair correlations (Table 6)", ""]
        lines += [
            "Pearson correlation of outgoing weights; signed, and of absolute values.",
            "",
            "| CReLU after -> next conv | pair | non-pair | abs pair | abs non-pair |",
            "|---|---|---|---|---|",
        ]
        for name, c in numbers["pair_correlations"].items():
            lines.append(
                f"| {name} | {c['pair_mean']:.3f} ± {c['pair_std']:.3f} | "
                f"{c['non_pair_mean']:.3f} ± {c['non_pair_std']:.3f} | "
                f"{c['abs_pair_mean']:.3f} ± {c['abs_pair_std']:.3f} | "
                f"{c['abs_non_pair_mean']:.3f} ± {c['abs_non_pair_std']:.3f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def _reconstruction_lines(recon: dict[str, Any]) -> list[str]:
    lines = [
        f"Image: {recon['image']}. Linear least squares (CG on the normal equations), no "
        "learning; relative error ||x_hat - x|| / ||x||. ![reconstruction](reconstruction.png)",
        "",
        f"| {recon['activation']} features of | relative error | CG iterations / "
        "normal-equation residual, per layer from the top |",
        "|---|---|---|",
    ]
    for r in recon["by_depth"]:
        solves = ", ".join(f"{s['iterations']} / {s['relative_residual']:.1e}" for s in r["solves"])
        lines.append(f"| conv{r['depth']} | {r['relative_error']:.4g} | {solves} |")
    lines += [
        "",
        "Same conv1 filters, two feature types: CReLU "
        f"{recon['conv1_crelu_features']:.4g}, ReLU {recon['conv1_relu_features']:.4g}.",
    ]
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crelu_ext analyze",
        description="Pairing histograms, reconstruction and pair correlations of a trained "
        "network: from --checkpoint, or trained first with the given budget.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for figures and report")
    parser.add_argument("--checkpoint", type=Path, help="a `python -m crelu_ext train` checkpoint")
    train = parser.add_argument_group("training first (without --checkpoint)")
    train.add_argument("--model", choices=list(MODELS), default="convpool_cnn_c")
    train.add_argument("--activation", choices=ACTIVATIONS, default="crelu", help="convpool_cnn_c")
    train.add_argument("--width", type=float, default=0.25, help="convpool_cnn_c")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int)
    budget.add_argument("--steps", type=int)
    train.add_argument("--lr", type=float, help="default: train's for the model and activation")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96, help="photograph side, pixels")
    parser.add_argument("--max-iter", type=int, default=300, help="CG iterations per layer")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    has_budget = args.epochs is not None or args.steps is not None
    if (checkpoint is not None) == has_budget:
        parser.error("give either --checkpoint or a training budget (--epochs or --steps)")
    if checkpoint is None:
        from . import train

        checkpoint = args.out / "checkpoint.pt"
        budget = ["--epochs", str(args.epochs)] if args.epochs else ["--steps", str(args.steps)]
        shape = ["--activation", args.activation, "--width", str(args.width)]
        train.main(
            [
                *("--model", args.model, *(shape if args.model == "convpool_cnn_c" else [])),
                *(["--lr", str(args.lr)] if args.lr is not None else []),
                *("--batch-size", str(args.batch_size)),
                *("--seed", str(args.seed), *budget, "--checkpoint", str(checkpoint)),
                *("--metrics-out", str(args.out / "train_metrics.json")),
            ]
        )
    try:
        model, initial, metrics = load_model(checkpoint)
        config = metrics["config"]
        keys = ("activation", "width", "crelu", "halve", "seed")
        options = [f"{key} {config[key]}" for key in keys if config.get(key) is not None]
        heading = (
            f"{config['model']} {', '.join(options)}; {config['dataset']}: test accuracy "
            f"{metrics['epochs'][-1]['test_accuracy']:.4f}"
        )
        numbers = analyze(
            model, args.out, args.image_size, args.max_iter, args.seed, heading, initial
        )
    except ValueError as error:
        parser.error(str(error))
    write_report(numbers, args.out / "report.md", heading)
    written = ["report.md", "pairing.png"]
    written += ["reconstruction.png"] if numbers["reconstruction"] is not None else []
    written += ["analysis.json"]
    written += ["checkpoint.pt", "train_metrics.json"] if args.checkpoint is None else []
    print(f"wrote {len(written)} files to {args.out}: {', '.join(written)}")
