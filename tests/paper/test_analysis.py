"""crelu_ext.paper.analysis: pairing cosines, reconstruction (Prop. 2.1), pair correlations, CLI."""

import json

import pytest
import torch
from torch import nn

from crelu_ext.__main__ import COMMANDS
from crelu_ext.paper import analysis


def crelu_features(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return analysis.stack_features([conv], "crelu", x)[0]


def test_planted_opposite_pairs_give_minus_one():
    generator = torch.Generator().manual_seed(0)
    filters = torch.randn(5, 3, 3, 3, generator=generator)
    mu = analysis.pairing_cosines(torch.cat([filters, -2.5 * filters]))
    torch.testing.assert_close(mu, torch.full((10,), -1.0, dtype=torch.float64))


def test_random_filters_pair_slightly_below_zero():
    # Many filters of high dimension: the most opposite of 63 random directions in R^3200.
    mu = analysis.random_pairing_cosines((64, 128, 5, 5), seed=0)
    assert mu.shape == (64,)
    assert -0.15 < mu.mean().item() < -0.02
    assert mu.std().item() < 0.03


def test_pairing_rejects_bad_weights():
    with pytest.raises(ValueError, match="conv weight"):
        analysis.pairing_cosines(torch.randn(4, 9))
    with pytest.raises(ValueError, match="all zeros"):
        analysis.pairing_cosines(torch.zeros(3, 1, 3, 3))


@pytest.mark.parametrize("method", ["cg", "lstsq"])
def test_crelu_features_reconstruct_exactly(method):
    # 16 filters of dimension 2*3*3=18 would not span; 24 do (overcomplete), so conv is
    # injective and Prop. 2.1's x' is x itself.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 24, 3, padding=1).double()
    x = torch.randn(2, 2, 10, 9, dtype=torch.float64)
    estimate = analysis.reconstruct_from_crelu(conv, crelu_features(conv, x), method=method)
    assert analysis.relative_error(estimate, x) < 1e-4
    relu = analysis.reconstruct_from_relu(conv, crelu_features(conv, x)[:, :24], method=method)
    assert analysis.relative_error(relu, x) > 0.1


@pytest.mark.parametrize(("stride", "padding", "size"), [(2, 1, (11, 12)), (3, 0, (13, 10))])
def test_adjoint_is_exact_for_strided_convs(stride, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding).double()
    forward, adjoint, output_size = analysis._conv_operator(conv, size, torch.float64)
    u = torch.randn(2, 3, *size, dtype=torch.float64)
    v = torch.randn(2, 5, *output_size, dtype=torch.float64)
    torch.testing.assert_close((forward(u) * v).sum(), (u * adjoint(v)).sum())


def test_strided_overcomplete_conv_reconstructs():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 24, 4, stride=2, padding=1).double()
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    estimate = analysis.reconstruct_from_crelu(conv, crelu_features(conv, x), input_size=(10, 10))
    assert analysis.relative_error(estimate, x) < 1e-4


def test_undercomplete_conv_recovers_the_spanned_part():
    # Prop. 2.1: only x' (the part in the range of the filters' shifts) comes back; CG from
    # 0 gives the minimum-norm solution, which an exact lstsq solve confirms. Fewer output
    # than input channels: 2*36 equations for 4*36 unknowns.
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 2, 3, padding=1).double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    features = crelu_features(conv, x)
    cg = analysis.reconstruct_from_crelu(conv, features, max_iter=2000)
    exact = analysis.reconstruct_from_crelu(conv, features, method="lstsq")
    assert analysis.relative_error(cg, exact) < 1e-6
    assert analysis.relative_error(exact, x) > 0.1


def test_stack_of_two_layers_reconstructs_top_down():
    torch.manual_seed(0)
    stack = [nn.Conv2d(1, 12, 3, padding=1).double(), nn.Conv2d(24, 48, 3, padding=1).double()]
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    features = analysis.stack_features(stack, "crelu", x)[-1]
    estimate = analysis.reconstruct_through_stack(stack, features, (8, 8), max_iter=2000)
    assert analysis.relative_error(estimate, x) < 1e-4


def test_reconstruction_rejects_wrong_channel_count():
    conv = nn.Conv2d(1, 8, 3, padding=1)
    with pytest.raises(ValueError, match="16 channels, got 8"):
        analysis.reconstruct_from_crelu(conv, torch.zeros(1, 8, 5, 5))
    with pytest.raises(ValueError, match="padding"):
        analysis.reconstruct_from_crelu(
            nn.Conv2d(1, 8, 3, padding="same"), torch.zeros(1, 16, 5, 5)
        )


def test_pair_correlations_on_constructed_weights():
    generator = torch.Generator().manual_seed(0)
    # 3 CReLU channels -> 6 inputs; each negative half's outgoing weights are 2x the
    # positive half's (pair corr 1), and the channels use disjoint output filters.
    positive = torch.zeros(6, 3, 3, 3, dtype=torch.float64)
    for c in range(3):
        positive[2 * c : 2 * c + 2, c] = torch.randn(
            2, 3, 3, generator=generator, dtype=torch.float64
        )
    weight = torch.cat([positive, 2 * positive], dim=1)
    corr = analysis.pair_correlations(weight)
    assert corr.pair_mean == pytest.approx(1.0)
    assert corr.pair_std == pytest.approx(0.0, abs=1e-12)
    # Pearson of two vectors with disjoint supports: -(mean products) / (norms): small, < 0.
    assert corr.non_pair_mean < 0.1
    negated = analysis.pair_correlations(torch.cat([positive, -positive], dim=1))
    assert negated.pair_mean == pytest.approx(-1.0)
    assert analysis.pair_correlations(torch.cat([positive, -positive], dim=1), True).pair_mean == (
        pytest.approx(1.0)
    )


def test_pair_correlations_rejects_odd_inputs():
    with pytest.raises(ValueError, match="even number"):
        analysis.pair_correlations(torch.randn(4, 5, 3, 3))
    with pytest.raises(ValueError, match="conv weight"):
        analysis.pair_correlations(torch.randn(4, 6))


def test_crelu_successors_skip_pooling():
    from crelu_ext.paper.models import convpool_cnn_c

    model = convpool_cnn_c(in_channels=1, activation="crelu", width=0.05)
    pairs = analysis.crelu_successors(model)
    assert [(a, b) for a, b, _ in pairs][:3] == [
        ("conv1 [0]", "conv2 [2]"),
        ("conv2 [2]", "conv3 [4]"),
        ("conv3 [4]", "conv4 [8]"),
    ]
    assert len(pairs) == 8  # conv1-8 are followed by CReLU; conv9 is the classifier


def written_files(printed: str) -> set[str]:
    """The file names of analyze's closing "wrote N files to DIR: a, b" line,
    checked against its count."""
    line = printed.strip().splitlines()[-1]
    count, _, names = line.removeprefix("wrote ").partition(" files to ")
    names = names.split(": ", 1)[1].split(", ")
    assert int(count) == len(names)
    return set(names)


def test_cli_end_to_end(tmp_path, capsys):
    assert COMMANDS["analyze"][0] == "crelu_ext.paper.analysis"
    out = tmp_path / "analysis"
    analysis.main(
        [
            *("--activation", "crelu", "--width", "0.05", "--steps", "2", "--out", str(out)),
            *("--image-size", "24", "--max-iter", "30"),
        ]
    )
    assert written_files(capsys.readouterr().out) == {p.name for p in out.iterdir()}
    for name in ["pairing.png", "reconstruction.png", "report.md", "analysis.json"]:
        assert (out / name).stat().st_size > 0
    numbers = json.loads((out / "analysis.json").read_text())
    assert [r["depth"] for r in numbers["reconstruction"]["by_depth"]] == [1, 2, 3]
    assert len(numbers["pairing"]) == 9
    # The saved checkpoint is analysed again without training.
    again = tmp_path / "again"
    analysis.main(
        ["--checkpoint", str(out / "checkpoint.pt"), "--out", str(again), "--image-size", "16"]
    )
    assert written_files(capsys.readouterr().out) == {p.name for p in again.iterdir()}
    assert "Pair correlations" in (again / "report.md").read_text()


def test_cli_needs_a_checkpoint_or_a_budget_not_both(tmp_path):
    with pytest.raises(SystemExit):
        analysis.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        analysis.main(["--out", str(tmp_path), "--checkpoint", "x.pt", "--epochs", "1"])


def test_lstsq_refuses_large_problems():
    conv = nn.Conv2d(1, 4, 3, padding=1).double()
    with pytest.raises(ValueError, match="use method='cg'"):
        analysis.reconstruct_from_crelu(conv, torch.zeros(1, 8, 70, 70).double(), method="lstsq")


def test_analyze_without_invertible_layers_still_reports_pairing(tmp_path):
    # Batch norm between conv and activation (as in the VGG): no Algorithm 1, pairing only.
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    numbers = analysis.analyze(model, tmp_path, image_size=16)
    assert numbers["reconstruction"] is None
    assert [s["layer"] for s in numbers["pairing"]] == ["conv1 [0]", "conv2 [3]"]
    analysis.write_report(numbers, tmp_path / "report.md", "no stack")
    assert "Skipped" in (tmp_path / "report.md").read_text()
