"""Training: bitwise parity with the reference, seeding, checkpoints, two-process DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch

import crelu_ext
from crelu_ext import backends, reference, train

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


def test_parity_check_reports_the_first_difference(tmp_path, monkeypatch):
    # A backend off by one part in 10^6 must be caught at the first step.
    def slightly_wrong(x, dim):
        return reference.crelu(x, dim) * 1.000001

    monkeypatch.setitem(backends._IMPLEMENTATIONS, "native", slightly_wrong)
    with pytest.raises(SystemExit, match=r"first differ in (loss|weights) at step 1"):
        run_training(tmp_path, "--steps", "2", "--backend", "native", "--check-parity")


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


def test_resumed_training_takes_the_same_steps(tmp_path):
    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    whole = run_training(tmp_path, "--steps", "4", "--checkpoint", str(straight), name="whole")
    run_training(tmp_path, "--steps", "2", "--checkpoint", str(resumed), name="half")
    continued = run_training(tmp_path, "--steps", "4", "--checkpoint", str(resumed), name="rest")
    assert continued["step_losses"] == whole["step_losses"]
    weights = [torch.load(p, weights_only=False)["runs"][0]["model"] for p in (straight, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


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
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "lacks"),
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
        model = crelu_ext.models.convpool_cnn_c(activation="crelu", width=0.25, backend=backend)
        args = train.build_parser().parse_args([])
        run = train.TrainingRun(model, args, torch.device("cpu"), train.Distributed())
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
