"""``python -m crelu_ext train``: train the paper's networks, check them against the reference.

    python -m crelu_ext train --model convpool_cnn_c --activation crelu --width 0.5 --epochs 5
    python -m crelu_ext train --steps 20 --check-parity          # native vs reference, bitwise
    torchrun --nproc-per-node 2 -m crelu_ext train --steps 20    # DistributedDataParallel
    python -m crelu_ext train --benchmark-step --model all_cnn_b --crelu 1,2,3,4

Training is SGD with momentum 0.9 on data held in memory (:mod:`crelu_ext.data`): the
learning rate warms up linearly over the first ``--lr-warmup`` of the steps, then decays
along a cosine to zero, and the gradient's norm is clipped to ``--clip-grad-norm``. The
default ``--lr`` depends on the model and activation (:data:`DEFAULT_LR`). A loss that is
not finite stops the run with exit status 1. Everything random (initialization, data order,
flips, dropout) comes from ``--seed``, so two runs with the same flags take the same steps.

``--check-parity`` trains the ``--backend`` model and a ``reference`` model side by side:
same initialization, same batches, and each with its own copy of the dropout RNG stream.
Our op is bitwise equal to the reference forward and backward, so the per-step losses and
the weights must stay bitwise equal (a NaN matches only a NaN with the same bits); the
first step where they do not is reported, and the command exits with status 1. On CUDA the
check enables deterministic algorithms.
"""

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .._memory import peak_memory, saved_bytes
from ..functional import BACKENDS, select_backend
from ..nn import CReLU
from .data import DATASETS, ImageDataset, load_dataset, random_hflip
from .models import ACTIVATIONS, MODELS, count_parameters

EVAL_BATCH_SIZE = 256

# The default peak learning rate per model (and, for ConvPool-CNN-C, per activation), for
# SGD with momentum 0.9, batch 64, the warm-up and the clipping below. ConvPool-CNN-C's
# were measured on the digits (benchmarks/results/training/README.md): all 5 seeds of each
# activation train; AVR stayed at chance at 0.05 where 0.02 learned. All-CNN-B's and the
# VGG's are untuned guesses: a step of either takes ~10 s on a CPU.
DEFAULT_LR = {
    ("convpool_cnn_c", "relu"): 0.05,
    ("convpool_cnn_c", "crelu"): 0.05,
    ("convpool_cnn_c", "avr"): 0.02,
    ("all_cnn_b", None): 0.02,
    ("vgg_cifar", None): 0.05,
}


# ConvPool-CNN-C's dropout after each max-pool, when --dropout is not given: Springenberg
# et al.'s 0.5 kept every narrow network on the digits at chance for epochs (measured; see
# benchmarks/results/training/README.md), and the CReLU paper tunes this rate per model.
DEFAULT_DROPOUT = 0.0


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite."""


def parse_crelu_layers(text: str) -> str | tuple[int, ...]:
    """``"all"`` or comma-separated 1-based convolution numbers, e.g. ``"1,3,5"``."""
    if text == "all":
        return "all"
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--crelu takes 'all' or layer numbers like 1,3,5, not {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crelu_ext train",
        description="Train the CReLU paper's networks; --check-parity validates a backend "
        "against the reference composition, bit for bit.",
    )
    parser.add_argument("--model", choices=list(MODELS), default="convpool_cnn_c")
    parser.add_argument(
        "--activation", choices=ACTIVATIONS, help="convpool_cnn_c: after conv1-8 (default relu)"
    )
    parser.add_argument("--width", type=float, help="convpool_cnn_c: filter multiplier")
    parser.add_argument(
        "--dropout",
        type=float,
        help=f"convpool_cnn_c: rate after each max-pool (default {DEFAULT_DROPOUT})",
    )
    parser.add_argument(
        "--crelu",
        type=parse_crelu_layers,
        help="all_cnn_b, vgg_cifar: convolutions followed by CReLU, e.g. 1,3,5 or all",
    )
    parser.add_argument(
        "--halve",
        action=argparse.BooleanOptionalAction,
        help="all_cnn_b, vgg_cifar: halve the filters of the CReLU convolutions",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--data-dir", type=Path, help="folder holding the CIFAR pickles")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="passes over the training set (default 1)")
    budget.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument(
        "--lr", type=float, help="peak learning rate (default: per model and activation)"
    )
    parser.add_argument(
        "--lr-warmup",
        type=float,
        default=0.1,
        help="fraction of the steps over which the learning rate rises linearly (default 0.1)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="after the warm-up: cosine decay to zero (default), or constant",
    )
    parser.add_argument(
        "--clip-grad-norm",
        type=float,
        default=2.0,
        help="clip the gradient's total norm to this (default 2; 0 turns clipping off)",
    )
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default="auto")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--metrics-out", type=Path, help="write the metrics here as JSON")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="saved after every epoch and at the end; resumed from when it exists",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check-parity",
        action="store_true",
        help="train with --backend and with reference side by side; fail on any difference",
    )
    mode.add_argument(
        "--benchmark-step",
        action="store_true",
        help="time training steps and measure activation memory: --backend, the reference "
        "and torch.compile of the reference model",
    )
    parser.add_argument("--warmup", type=int, default=3, help="--benchmark-step: untimed steps")
    parser.add_argument("--repeats", type=int, default=10, help="--benchmark-step: timed steps")
    return parser


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The builder's keyword arguments that the flags set; flags for another model are errors."""
    per_model = {
        "convpool_cnn_c": {
            "activation": args.activation,
            "width": args.width,
            "dropout": args.dropout,
        },
        "all_cnn_b": {"crelu": args.crelu, "halve": args.halve},
        "vgg_cifar": {"crelu": args.crelu, "halve": args.halve},
    }
    foreign = {name for options in per_model.values() for name in options}
    foreign -= set(per_model[args.model])
    given = [f"--{name}" for name in sorted(foreign) if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} does not apply to --model {args.model}")
    return {name: value for name, value in per_model[args.model].items() if value is not None}


def default_lr(model: str, activation: str | None) -> float:
    """The :data:`DEFAULT_LR` entry for ``model`` (ConvPool-CNN-C: and ``activation``)."""
    if model == "convpool_cnn_c":
        return DEFAULT_LR[(model, activation or "relu")]
    return DEFAULT_LR[(model, None)]


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The multiple of the peak learning rate used by 0-based ``step``: a linear warm-up
    to 1 over ``warmup_steps``, then 1 (``"constant"``) or a cosine decay towards 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_model(
    name: str, options: dict[str, Any], dataset: ImageDataset, backend: str
) -> nn.Module:
    if name == "convpool_cnn_c":
        options = {**options, "in_channels": dataset.in_channels}
    return MODELS[name](num_classes=dataset.num_classes, backend=backend, **options)


def as_rgb(dataset: ImageDataset) -> ImageDataset:
    """All-CNN-B and the VGG take three channels: grey images are repeated into them."""
    if dataset.in_channels == 3:
        return dataset
    dataset.train_images = dataset.train_images.expand(-1, 3, -1, -1).contiguous()
    dataset.test_images = dataset.test_images.expand(-1, 3, -1, -1).contiguous()
    return dataset


@dataclass
class Distributed:
    """This process's place in a torchrun job (world_size 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str | None) -> tuple[Distributed, torch.device]:
    """Joins the torchrun job if there is one (gloo on CPU, NCCL on GPU); picks the device."""
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank), device


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _own_rng(device: torch.device):
    """A context in which the device's default generator may be changed without leaking."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device], device_type="cuda")
    return torch.random.fork_rng(devices=[])


class TrainingRun:
    """A model, its optimizer, and the RNG stream its dropout draws from.

    Each run keeps its own stream (swapped in around each step), so two runs trained side
    by side draw exactly the dropout masks they would draw alone."""

    def __init__(
        self,
        model: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
        distributed: Distributed,
        total_steps: int,
    ) -> None:
        self.module = model.to(device)
        self.device = device
        self.distributed = distributed
        self.model = model
        if distributed.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
        warmup_steps = round(args.lr_warmup * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: learning_rate_factor(step, warmup_steps, total_steps, args.lr_schedule),
        )
        self.clip_grad_norm = args.clip_grad_norm
        self.bf16 = args.bf16
        with _own_rng(device):
            # Ranks draw different dropout masks, as independent workers would.
            torch.manual_seed(args.seed + distributed.rank)
            self.rng_state = _rng_state(device)

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def learning_rate(self) -> float:
        """The learning rate of the next step."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One SGD step; returns the batch loss (a float32 scalar on the CPU), averaged
        over all processes."""
        self.model.train()
        with _own_rng(self.device):
            _set_rng_state(self.device, self.rng_state)
            with self.autocast():
                loss = F.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip_grad_norm:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.rng_state = _rng_state(self.device)
        loss = loss.detach().float()
        if self.distributed.enabled:
            dist.all_reduce(loss)
            loss /= self.distributed.world_size
        return loss.cpu()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.module.eval()
        correct = 0
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            batch = images[start : start + EVAL_BATCH_SIZE].to(self.device)
            with self.autocast():
                predicted = self.module(batch).argmax(dim=1)
            correct += int((predicted.cpu() == labels[start : start + EVAL_BATCH_SIZE]).sum())
        return correct / len(labels)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_state": self.rng_state.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng_state = state["rng_state"]

    def parameters_equal(self, other: "TrainingRun") -> bool:
        """Bitwise equality of all parameters and buffers (BatchNorm statistics)."""
        mine, theirs = self.module.state_dict(), other.module.state_dict()
        return all(same_bits(mine[name], theirs[name]) for name in mine)

    def in_sync_across_processes(self) -> bool:
        """Whether every process holds rank 0's parameters, bit for bit (DDP's promise)."""
        in_sync = torch.ones((), device=self.device)
        for tensor in self.module.state_dict().values():
            rank0 = tensor.clone()
            dist.broadcast(rank0, src=0)
            if not same_bits(rank0, tensor):
                in_sync.zero_()
        dist.all_reduce(in_sync, op=dist.ReduceOp.MIN)
        return bool(in_sync.item())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: a NaN matches a NaN with the same bits, never a number, and -0.0
    does not match 0.0 (``torch.equal`` says NaN != NaN and -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        as_integers = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(as_integers), b.view(as_integers)
    return torch.equal(a, b)


def epoch_batches(
    num_examples: int, batch_size: int, epoch: int, seed: int, distributed: Distributed
) -> list[torch.Tensor]:
    """This process's batches of example indices for ``epoch``: a seeded shuffle, split
    between processes; the last incomplete batch is dropped."""
    sampler = DistributedSampler(
        range(num_examples),
        num_replicas=distributed.world_size,
        rank=distributed.rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler))
    full = len(indices) // batch_size * batch_size
    return list(indices[:full].view(-1, batch_size).unbind())


def configure_determinism(device: torch.device) -> None:
    """CPU kernels here are deterministic already; CUDA needs deterministic algorithms
    (and cuBLAS a fixed workspace) for two equal runs to take equal steps."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _checkpoint_config(args: argparse.Namespace) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint."""
    keys = ["model", "activation", "width", "dropout", "crelu", "halve", "dataset"]
    keys += ["batch_size", "lr"]
    keys += ["lr_warmup", "lr_schedule", "clip_grad_norm", "weight_decay", "seed", "check_parity"]
    config = {key: getattr(args, key) for key in keys}
    config["crelu"] = list(config["crelu"]) if isinstance(args.crelu, tuple) else args.crelu
    return config


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Trains as ``args`` say; returns the metrics (see :func:`main`)."""
    distributed, device = setup_distributed(args.device)
    backend = select_backend(args.backend, device)
    if args.check_parity:
        configure_determinism(device)
    dataset = load_dataset(args.dataset, args.data_dir)
    if args.model != "convpool_cnn_c":
        dataset = as_rgb(dataset)
    options = model_options(args)
    batches_per_epoch = len(
        epoch_batches(len(dataset.train_labels), args.batch_size, 0, args.seed, distributed)
    )
    if batches_per_epoch == 0:
        raise ValueError(
            f"--batch-size {args.batch_size} is larger than the {len(dataset.train_labels)} "
            f"training examples split over {distributed.world_size} process(es)"
        )
    total_steps = args.steps if args.steps is not None else (args.epochs or 1) * batches_per_epoch
    if total_steps < 1:
        raise ValueError("--steps and --epochs must be at least 1")

    backends = [backend, "reference"] if args.check_parity else [backend]
    runs = []
    for run_backend in backends:
        with _own_rng(device):
            torch.manual_seed(args.seed)  # equal initial weights for every backend and rank
            model = build_model(args.model, options, dataset, run_backend)
        runs.append(TrainingRun(model, args, device, distributed, total_steps))
    if args.check_parity and not any(isinstance(m, CReLU) for m in runs[0].module.modules()):
        raise ValueError(
            "--check-parity needs a model with CReLU: add --activation crelu or --crelu"
        )

    flip_generator = torch.Generator().manual_seed(args.seed + distributed.rank)
    metrics: dict[str, Any] = {
        # The schedule depends on the budget, so a resumed run must keep it.
        "config": {**_checkpoint_config(args), "total_steps": total_steps},
        "backend": backend,
        "device": str(device),
        "world_size": distributed.world_size,
        "num_parameters": count_parameters(runs[0].module),
        "step_losses": [],
        "epochs": [],
    }
    if args.check_parity:
        metrics["reference_step_losses"] = []
        metrics["parity"] = {"backend": backend, "against": "reference", "first_difference": None}
    start_step = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        start_step = load_checkpoint(
            args.checkpoint, args, runs, flip_generator, metrics, distributed
        )

    from tqdm import tqdm

    progress = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc=f"{args.model} {backend}",
        disable=distributed.rank != 0,
    )
    batches: list[torch.Tensor] = []
    for step in progress:
        epoch, batch_in_epoch = divmod(step, batches_per_epoch)
        if batch_in_epoch == 0 or not batches:
            batches = epoch_batches(
                len(dataset.train_labels), args.batch_size, epoch, args.seed, distributed
            )
        index = batches[batch_in_epoch]
        images = dataset.train_images[index]
        if dataset.hflip:
            images = random_hflip(images, flip_generator)
        images, labels = images.to(device), dataset.train_labels[index].to(device)

        learning_rate = runs[0].learning_rate
        loss_tensors = [run.step(images, labels) for run in runs]
        losses = [loss.item() for loss in loss_tensors]
        metrics["step_losses"].append(losses[0])
        progress.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{learning_rate:.3g}")
        if args.check_parity:
            metrics["reference_step_losses"].append(losses[1])
            _record_first_difference(metrics["parity"], step + 1, loss_tensors, runs)
        if not all(math.isfinite(loss) for loss in losses):
            progress.close()
            raise TrainingDiverged(
                f"training diverged: the loss is {losses[0]} at step {step + 1} of "
                f"{total_steps} (learning rate {learning_rate:.3g}). Try a smaller --lr "
                f"(this run's is {args.lr:g}), a longer --lr-warmup or a smaller "
                "--clip-grad-norm."
            )

        epoch_done = batch_in_epoch == batches_per_epoch - 1
        if epoch_done or step + 1 == total_steps:
            accuracy = runs[0].accuracy(dataset.test_images, dataset.test_labels)
            metrics["epochs"].append(
                {"epoch": epoch + 1, "step": step + 1, "test_accuracy": accuracy}
            )
            progress.write(f"epoch {epoch + 1} step {step + 1}: test accuracy {accuracy:.4f}")
            if args.checkpoint is not None:
                save_checkpoint(
                    args.checkpoint, step + 1, runs, flip_generator, metrics, distributed
                )
    progress.close()

    metrics["test_accuracy"] = metrics["epochs"][-1]["test_accuracy"]
    if args.check_parity:
        parity = metrics["parity"]
        parity["steps"] = total_steps
        parity["identical"] = parity["first_difference"] is None
    if distributed.enabled:
        metrics["ranks_in_sync"] = all(run.in_sync_across_processes() for run in runs)
    return metrics


def _record_first_difference(
    parity: dict[str, Any], step: int, losses: list[torch.Tensor], runs: list[TrainingRun]
) -> None:
    if parity["first_difference"] is not None:
        return
    if not same_bits(losses[0], losses[1]):
        parity["first_difference"] = {
            "step": step,
            "in": "loss",
            "losses": [loss.item() for loss in losses],
        }
    elif not runs[0].parameters_equal(runs[1]):
        parity["first_difference"] = {"step": step, "in": "weights"}


CHECKPOINT_KEYS = {"step", "world_size", "runs", "rng_states_per_rank", "metrics"}


def save_checkpoint(
    path: Path,
    step: int,
    runs: list[TrainingRun],
    flip_generator: torch.Generator,
    metrics: dict[str, Any],
    distributed: Distributed,
) -> None:
    """Rank 0 writes everything a resumed run needs to take the same steps, including
    every rank's RNG states (ranks draw different dropout masks and flips)."""
    rng_states = [[run.rng_state.cpu() for run in runs], flip_generator.get_state()]
    if distributed.enabled:
        gathered: list[Any] = [None] * distributed.world_size
        dist.all_gather_object(gathered, rng_states)
    else:
        gathered = [rng_states]
    if distributed.rank != 0:
        return
    state = {
        "step": step,
        "world_size": distributed.world_size,
        "runs": [run.state_dict() for run in runs],
        "rng_states_per_rank": gathered,
        "metrics": metrics,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)  # a crash mid-save must not destroy the last good checkpoint


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, read with ``torch.load(weights_only=True)``: tensors and
    plain containers of numbers and strings only, so a file from someone else cannot run
    code while it is read; anything else is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(
            f"refusing checkpoint {path}: it holds more than tensors and plain containers "
            f"of numbers and strings, so it is not one that `train` saved; nothing in it "
            f"was run ({first_line})"
        ) from None
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or not state.keys() >= CHECKPOINT_KEYS:
        raise ValueError(
            f"{path} is not a `python -m crelu_ext train` checkpoint: expected a dict "
            f"with {sorted(CHECKPOINT_KEYS)}"
        )
    return state


def load_checkpoint(
    path: Path,
    args: argparse.Namespace,
    runs: list[TrainingRun],
    flip_generator: torch.Generator,
    metrics: dict[str, Any],
    distributed: Distributed,
) -> int:
    """Restores a checkpoint into ``runs``; returns the step to continue from."""
    state = read_checkpoint(path)
    saved_config = state["metrics"]["config"]
    if saved_config != metrics["config"]:
        differences = {
            key: (saved_config.get(key), value)
            for key, value in metrics["config"].items()
            if saved_config.get(key) != value
        }
        raise ValueError(f"checkpoint {path} is from a different run; (saved, now): {differences}")
    if state["world_size"] != distributed.world_size:
        raise ValueError(
            f"checkpoint {path} was saved by {state['world_size']} process(es); "
            f"resume it with as many, not {distributed.world_size}"
        )
    run_rng_states, flip_state = state["rng_states_per_rank"][distributed.rank]
    for run, run_state, rng_state in zip(runs, state["runs"], run_rng_states, strict=True):
        run.load_state_dict({**run_state, "rng_state": rng_state})
    flip_generator.set_state(flip_state)
    for key in ["step_losses", "reference_step_losses", "epochs", "parity"]:
        if key in state["metrics"]:
            metrics[key] = state["metrics"][key]
    return state["step"]


def benchmark_step(args: argparse.Namespace) -> dict[str, Any]:
    """Times training steps of one model three ways: the ``--backend`` CReLU, the reference
    composition, and ``torch.compile`` of the reference model.

    Memory: on CUDA, the peak allocated during a step above what is allocated before it
    (weights, gradients, optimizer state); everywhere, the bytes of the distinct tensors
    autograd saves for the backward, parameters excluded ("activation memory")."""
    _, device = setup_distributed(args.device)
    backend = select_backend(args.backend, device)
    dataset = load_dataset(args.dataset, args.data_dir)
    if args.model != "convpool_cnn_c":
        dataset = as_rgb(dataset)
    options = model_options(args)
    index = torch.arange(args.batch_size) % len(dataset.train_labels)
    images = dataset.train_images[index].to(device)
    labels = dataset.train_labels[index].to(device)
    results = {
        "model": args.model,
        "options": _checkpoint_config(args),
        "device": str(device),
        "batch_size": args.batch_size,
        "bf16": args.bf16,
        "providers": {},
    }
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    for provider in [backend, "reference", "reference+compile"]:
        torch.manual_seed(args.seed)
        model = build_model(args.model, options, dataset, provider.removesuffix("+compile"))
        # Every step it takes: warm-up, timed, the saved-bytes and the CUDA-peak steps.
        run = TrainingRun(model, args, device, Distributed(), args.warmup + args.repeats + 2)
        if provider.endswith("+compile"):
            run.model = torch.compile(run.model)
        for _ in range(args.warmup):
            run.step(images, labels)
        times = []
        for _ in range(args.repeats):
            _synchronize(device)
            start = time.perf_counter()
            run.step(images, labels)
            _synchronize(device)
            times.append(time.perf_counter() - start)
        results["providers"][provider] = {
            "step_ms_median": 1e3 * statistics.median(times),
            "step_ms_min": 1e3 * min(times),
            "saved_activation_bytes": _saved_activation_bytes(run, images, labels),
            **_cuda_peak(run, images, labels),
        }
    return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_activation_bytes(run: TrainingRun, images: torch.Tensor, labels: torch.Tensor) -> int:
    return saved_bytes(lambda: run.step(images, labels), exclude=run.module.parameters())


def _cuda_peak(run: TrainingRun, images: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    peak = peak_memory(lambda: run.step(images, labels), run.device)
    return {} if peak is None else {"cuda_peak_bytes_above_start": peak}


def main(argv: list[str] | None = None) -> None:
    """Runs training (or the parity check, or the step benchmark) and prints a summary;
    ``--metrics-out`` gets the metrics as JSON: "step_losses" (one per optimizer step),
    "epochs" (test accuracy after each), "test_accuracy", and "parity" when checking."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = default_lr(args.model, args.activation)
    if args.dropout is None and args.model == "convpool_cnn_c":
        args.dropout = DEFAULT_DROPOUT
    if not 0 <= args.lr_warmup < 1:
        parser.error(f"--lr-warmup is a fraction of the steps in [0, 1), not {args.lr_warmup}")
    if args.clip_grad_norm < 0:
        parser.error(f"--clip-grad-norm must be >= 0 (0: no clipping), not {args.clip_grad_norm}")
    try:
        metrics = benchmark_step(args) if args.benchmark_step else train(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    except TrainingDiverged as error:
        sys.exit(str(error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    if args.metrics_out is not None and is_rank0:
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        args.metrics_out.write_text(json.dumps(metrics, indent=1) + "\n")
    if args.benchmark_step:
        print(json.dumps(metrics["providers"], indent=1))
        return
    if is_rank0:
        print(
            f"test accuracy {metrics['test_accuracy']:.4f} after {len(metrics['step_losses'])} "
            f"steps ({metrics['num_parameters']:,} parameters, backend {metrics['backend']})"
        )
    if args.check_parity:
        difference = metrics["parity"]["first_difference"]
        if difference is not None:
            sys.exit(
                f"parity FAILED: {metrics['backend']} and reference first differ in "
                f"{difference['in']} at step {difference['step']}"
            )
        if is_rank0:
            print(
                f"parity: {metrics['backend']} and reference bitwise equal "
                f"(losses and weights) over {metrics['parity']['steps']} steps"
            )
