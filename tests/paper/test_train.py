"""Training: it learns with the defaults, stops on a non-finite loss, keeps bitwise parity
with the reference, seeds, checkpoints (read safely), two-process DDP."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import crelu_ext
from crelu_ext import _native, reference
from crelu_ext import functional as backends
from crelu_ext.paper import data, train

needs_native = pytest.mark.skipif(
    "native" not in crelu_ext.available_backends("cpu"), reason="native CPU kernels not built"
)
TINY = ["--activation", "crelu", "--width", "0.25", "--batch-size", "8", "--device", "cpu"]


def run_training(tmp_path, *flags: str, name: str = "metrics") -> dict:
    path = tmp_path / f"{name}.json"
    train.main([*TINY, *flags, "--metrics-out", str(path)])
    return json.loads(path.read_text())


@needs_native
def test_native_trains_bitwise_like_the_reference(tmp_path):
    metrics = run_training(tmp_path, "--steps", "4", "--backend", "native", "--check-parity")
    assert metrics["backend"] == "native"
    assert metrics["parity"]["identical"] and metrics["parity"]["first_difference"] is None
    assert len(metrics["step_losses"]) == 4
    assert metrics["step_losses"] == metrics["reference_step_losses"]
    assert 0 <= metrics["test_accuracy"] <= 1


def test_parity_check_reports_the_first_difference(tmp_path):
    # A backend off by one part in 10^6 must be caught at the first step.
    def slightly_wrong(x, dim):
        return reference.crelu(x, dim) * 1.000001

    backends.register_backend("native", slightly_wrong, _native.native_available)
    try:
        with pytest.raises(SystemExit, match=r"first differ in (loss|weights) at step 1"):
            run_training(tmp_path, "--steps", "2", "--backend", "native", "--check-parity")
    finally:
        backends.register_backend(
            "native",
            _native.crelu,
            _native.native_available,
            eager_implementation=_native.crelu_through_binding,
        )


def test_vgg_with_batch_norm_keeps_parity(tmp_path):
    # BatchNorm statistics are compared too; digits are repeated into three channels.
    flags = ["--model", "vgg_cifar", "--crelu", "1", "--steps", "1", "--batch-size", "8"]
    train.main([*flags, "--device", "cpu", "--check-parity", "--metrics-out", str(tmp_path / "m")])
    assert json.loads((tmp_path / "m").read_text())["parity"]["identical"]


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    first = run_training(tmp_path, "--steps", "3", "--seed", "1", name="a")["step_losses"]
    again = run_training(tmp_path, "--steps", "3", "--seed", "1", name="b")["step_losses"]
    other = run_training(tmp_path, "--steps", "3", "--seed", "2", name="c")["step_losses"]
    assert first == again
    assert first != other


def test_resumed_training_takes_the_same_steps(tmp_path, monkeypatch):
    # 1437 digits at batch 512: 2 steps an epoch, a checkpoint after each. The interrupted
    # run stops during step 3, so it resumes from step 2 with the learning rate schedule
    # of the whole 4-step run.
    flags = ["--epochs", "2", "--batch-size", "512"]
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    whole = run_training(tmp_path, *flags, "--checkpoint", str(straight), name="whole")
    step = train.TrainingRun.step
    calls = []

    def interrupted_in_step_3(run, images, labels):
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(run, images, labels)

    monkeypatch.setattr(train.TrainingRun, "step", interrupted_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_training(tmp_path, *flags, "--checkpoint", str(resumed), name="interrupted")
    monkeypatch.setattr(train.TrainingRun, "step", step)
    continued = run_training(tmp_path, *flags, "--checkpoint", str(resumed), name="rest")
    assert continued["step_losses"] == whole["step_losses"]
    weights = [torch.load(p, weights_only=True)["runs"][0]["model"] for p in (straight, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_resumed_run_with_another_budget_is_refused(tmp_path, capsys):
    # The learning rate schedule spans the whole budget.
    checkpoint = str(tmp_path / "run.pt")
    run_training(tmp_path, "--steps", "2", "--checkpoint", checkpoint)
    with pytest.raises(SystemExit):
        run_training(tmp_path, "--steps", "4", "--checkpoint", checkpoint)
    assert "total_steps" in capsys.readouterr().err


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    factors = [train.learning_rate_factor(step, 2, 6, "cosine") for step in range(6)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[2:] == sorted(factors[2:], reverse=True) and factors[-1] > 0
    assert train.learning_rate_factor(3, 2, 6, "cosine") == pytest.approx(0.5 + 0.5 * 0.5**0.5)
    assert [train.learning_rate_factor(s, 2, 6, "constant") for s in range(4)] == [0.5, 1, 1, 1]


def test_runs_record_the_schedule_they_followed(tmp_path):
    metrics = run_training(tmp_path, "--steps", "1", "--lr", "0.04")
    assert metrics["config"]["lr"] == 0.04 and metrics["config"]["total_steps"] == 1
    assert metrics["config"]["lr_warmup"] == 0.1 and metrics["config"]["lr_schedule"] == "cosine"


def test_a_checkpoint_from_another_run_is_refused(tmp_path, capsys):
    checkpoint = str(tmp_path / "run.pt")
    run_training(tmp_path, "--steps", "1", "--checkpoint", checkpoint)
    with pytest.raises(SystemExit):
        run_training(tmp_path, "--steps", "2", "--checkpoint", checkpoint, "--lr", "0.5")
    assert "different run" in capsys.readouterr().err


def test_epochs_record_test_accuracy_after_each(tmp_path):
    # 1437 digits at batch 512 make 2 steps an epoch.
    metrics = run_training(tmp_path, "--epochs", "2", "--batch-size", "512")
    assert len(metrics["step_losses"]) == 4
    assert [(e["epoch"], e["step"]) for e in metrics["epochs"]] == [(1, 2), (2, 4)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "all_cnn_b", "--activation", "crelu"], "--activation does not apply"),
        (["--activation", "relu", "--check-parity"], "needs a model with CReLU"),
        (["--crelu", "1,x"], "--crelu takes 'all' or layer numbers"),
        (["--batch-size", "4096"], "larger than the 1437 training examples"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "/nonexistent does not exist"),
        (["--lr-warmup", "1"], "--lr-warmup is a fraction"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.main(["--steps", "1", "--device", "cpu", *flags])
    assert message in capsys.readouterr().err


def test_native_saves_less_for_backward_than_the_reference():
    saved = {}
    for backend in crelu_ext.available_backends("cpu"):
        torch.manual_seed(0)
        model = crelu_ext.paper.models.convpool_cnn_c(
            activation="crelu", width=0.25, backend=backend
        )
        args = train.build_parser().parse_args(["--lr", "0.01"])
        run = train.TrainingRun(model, args, torch.device("cpu"), train.Distributed(), 2)
        images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
        saved[backend] = train._saved_activation_bytes(run, images, labels)
    if "native" in saved:
        assert saved["native"] < saved["reference"]
    assert saved["reference"] > 4 * 3 * 32 * 32 * 4  # more than the input image alone


def test_two_process_ddp_run_keeps_ranks_in_sync(tmp_path):
    metrics_path = tmp_path / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "crelu_ext", "train", *TINY, "--steps", "3",
               "--metrics-out", str(metrics_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(metrics_path.read_text())
    assert metrics["world_size"] == 2
    assert metrics["ranks_in_sync"]
    assert len(metrics["step_losses"]) == 3


# Each activation with the default recipe, seed 0: 40 steps of batch 64 at width 0.125. A
# run that diverges, or stays at chance (loss ln 10 = 2.30), fails. Measured last-8 mean
# over first-8 mean: relu 1.78 / 2.30, crelu 2.12 / 2.57, avr 2.24 / 2.34 (AVR learns
# slowest; All-CNN-B and the VGG take ~10 s a step on a CPU, too slow for CI).
@pytest.mark.parametrize("activation", crelu_ext.paper.models.ACTIVATIONS)
def test_the_default_recipe_lowers_the_loss(tmp_path, activation):
    path = tmp_path / "metrics.json"
    flags = ["--activation", activation, "--width", "0.125", "--steps", "40"]
    train.main([*flags, "--device", "cpu", "--metrics-out", str(path)])
    losses = json.loads(path.read_text())["step_losses"]
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.05 and last < 2.28


def _digits_with_nan_images(name, data_dir=None):
    dataset = data.load_dataset(name, data_dir)
    dataset.train_images = torch.full_like(dataset.train_images, float("nan"))
    return dataset


def test_a_non_finite_loss_stops_training_with_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_dataset", _digits_with_nan_images)
    with pytest.raises(SystemExit) as stop:
        run_training(tmp_path, "--steps", "20", "--lr", "0.03")
    message = str(stop.value.code)
    assert "training diverged: the loss is nan at step 1 of 20" in message
    assert "learning rate 0.015" in message  # the first of 2 warm-up steps: 0.03 / 2
    assert "smaller --lr (this run's is 0.03)" in message
    assert not (tmp_path / "metrics.json").exists()


def test_the_non_finite_stop_exits_non_zero_from_the_command_line():
    # Ten million times the default learning rate: the weights overflow within a few steps.
    command = [sys.executable, "-m", "crelu_ext", "train", *TINY, "--steps", "8"]
    command += ["--lr", "1e6", "--lr-warmup", "0", "--clip-grad-norm", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr


def test_parity_holds_through_nan_when_both_sides_are_nan(tmp_path, monkeypatch):
    # A NaN loss on both sides is bitwise equal; the run stops for the NaN, not for parity.
    monkeypatch.setattr(train, "load_dataset", _digits_with_nan_images)
    with pytest.raises(SystemExit) as stop:
        run_training(tmp_path, "--steps", "3", "--check-parity")
    assert "training diverged" in str(stop.value.code)
    assert "parity FAILED" not in str(stop.value.code)


def test_same_bits_compares_bits():
    nan, other_nan = torch.tensor(float("nan")), torch.tensor(float("nan")).neg()
    assert train.same_bits(nan, nan.clone())
    assert not train.same_bits(nan, torch.tensor(1.0))
    assert not train.same_bits(nan, other_nan)  # a different sign bit
    assert not train.same_bits(torch.tensor(0.0), torch.tensor(-0.0))
    assert not train.same_bits(torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64))
    assert train.same_bits(torch.arange(3), torch.arange(3))
