"""``python -m crelu_ext train``: train the paper's networks, check them against the reference.

    python -m crelu_ext train --model convpool_cnn_c --activation crelu --width 0.5 --epochs 5
    python -m crelu_ext train --steps 20 --check-parity          # native vs reference, bitwise
    torchrun --nproc-per-node 2 -m crelu_ext train --steps 20    # DistributedDataParallel
    python -m crelu_ext train --benchmark-step --model all_cnn_b --crelu 1,2,3,4

Training is SGD with momentum 0.9 and a constant learning rate, on data held in memory
(:mod:`crelu_ext.data`). Everything random (initialization, data order, flips, dropout)
comes from ``--seed``, so two runs with the same flags take the same steps.

``--check-parity`` trains the ``--backend`` model and a ``reference`` model side by side:
same initialization, same batches, and each with its own copy of the dropout RNG stream.
Our op is bitwise equal to the reference forward and backward, so the per-step losses and
the weights must stay bitwise equal; the first step where they do not is reported, and the
command exits with status 1. On CUDA the check enables deterministic algorithms.
"""

import argparse
import json
import os
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
from tqdm import tqdm

from .backends import BACKENDS, select_backend
from .bench import peak_memory, saved_bytes
from .data import DATASETS, ImageDataset, load_dataset, random_hflip
from .models import ACTIVATIONS, MODELS, count_parameters
from .nn import CReLU

EVAL_BATCH_SIZE = 256


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
    parser.add_argument("--lr", type=float, default=0.01)
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
        "convpool_cnn_c": {"activation": args.activation, "width": args.width},
        "all_cnn_b": {"crelu": args.crelu, "halve": args.halve},
        "vgg_cifar": {"crelu": args.crelu, "halve": args.halve},
    }
    foreign = {name for options in per_model.values() for name in options}
    foreign -= set(per_model[args.model])
    given = [f"--{name}" for name in sorted(foreign) if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} does not apply to --model {args.model}")
    return {name: value for name, value in per_model[args.model].items() if value is not None}


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
        self.bf16 = args.bf16
        with _own_rng(device):
            # Ranks draw different dropout masks, as independent workers would.
            torch.manual_seed(args.seed + distributed.rank)
            self.rng_state = _rng_state(device)

    def autocast(self):
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One SGD step; returns the batch loss, averaged over all processes."""
        self.model.train()
        with _own_rng(self.device):
            _set_rng_state(self.device, self.rng_state)
            with self.autocast():
                loss = F.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.rng_state = _rng_state(self.device)
        loss = loss.detach().float()
        if self.distributed.enabled:
            dist.all_reduce(loss)
            loss /= self.distributed.world_size
        return loss.item()

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
            "rng_state": self.rng_state.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng_state = state["rng_state"]

    def parameters_equal(self, other: "TrainingRun") -> bool:
        """Bitwise equality of all parameters and buffers (BatchNorm statistics)."""
        mine, theirs = self.module.state_dict(), other.module.state_dict()
        return all(torch.equal(mine[name], theirs[name]) for name in mine)

    def in_sync_across_processes(self) -> bool:
        """Whether every process holds rank 0's parameters, bit for bit (DDP's promise)."""
        in_sync = torch.ones((), device=self.device)
        for tensor in self.module.state_dict().values():
            rank0 = tensor.clone()
            dist.broadcast(rank0, src=0)
            if not torch.equal(rank0, tensor):
                in_sync.zero_()
        dist.all_reduce(in_sync, op=dist.ReduceOp.MIN)
        return bool(in_sync.item())


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
    keys = ["model", "activation", "width", "crelu", "halve", "dataset", "batch_size", "lr"]
    keys += ["weight_decay", "seed", "check_parity"]
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
    backends = [backend, "reference"] if args.check_parity else [backend]
    runs = []
    for run_backend in backends:
        with _own_rng(device):
            torch.manual_seed(args.seed)  # equal initial weights for every backend and rank
            model = build_model(args.model, options, dataset, run_backend)
        runs.append(TrainingRun(model, args, device, distributed))
    if args.check_parity and not any(isinstance(m, CReLU) for m in runs[0].module.modules()):
        raise ValueError(
            "--check-parity needs a model with CReLU: add --activation crelu or --crelu"
        )

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

    flip_generator = torch.Generator().manual_seed(args.seed + distributed.rank)
    metrics: dict[str, Any] = {
        "config": _checkpoint_config(args),
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

        losses = [run.step(images, labels) for run in runs]
        metrics["step_losses"].append(losses[0])
        progress.set_postfix(loss=f"{losses[0]:.4f}")
        if args.check_parity:
            metrics["reference_step_losses"].append(losses[1])
            _record_first_difference(metrics["parity"], step + 1, losses, runs)

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
    parity: dict[str, Any], step: int, losses: list[float], runs: list[TrainingRun]
) -> None:
    if parity["first_difference"] is not None:
        return
    # `==` on the floats: bitwise, since a float32 loss converts to a Python float exactly.
    if losses[0] != losses[1]:
        parity["first_difference"] = {"step": step, "in": "loss", "losses": losses}
    elif not runs[0].parameters_equal(runs[1]):
        parity["first_difference"] = {"step": step, "in": "weights"}


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


def load_checkpoint(
    path: Path,
    args: argparse.Namespace,
    runs: list[TrainingRun],
    flip_generator: torch.Generator,
    metrics: dict[str, Any],
    distributed: Distributed,
) -> int:
    """Restores a checkpoint into ``runs``; returns the step to continue from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
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
        run = TrainingRun(model, args, device, Distributed())
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
    try:
        metrics = benchmark_step(args) if args.benchmark_step else train(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
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
