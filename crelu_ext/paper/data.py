"""Image classification data for training: in memory, normalized, as torch tensors.

- ``digits``: scikit-learn's handwritten digits (1797 8x8 images that ship inside the
  package, so it works offline), upsampled to 32x32; a fixed stratified 80/20 split.
- ``cifar10`` / ``cifar100``: from a local folder in the official Python pickle format
  (``cifar-10-batches-py/``: ``data_batch_1..5``, ``test_batch``; ``cifar-100-python/``:
  ``train``, ``test``).

As in the paper (Section 3.1), images are normalized with the training set's per-channel
mean and standard deviation, and :func:`random_hflip` gives the flip augmentation.

CIFAR files are pickles, and unpickling can run any code the file names, so they are read
by :class:`CifarUnpickler`, which builds only what the official files hold.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np  # imported where used: `python -m crelu_ext train --help` needs none

DATASETS = ("digits", "cifar10", "cifar100")

CIFAR_LAYOUT = {
    # dataset: (folder inside --data-dir, training files, test file, label key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels"),
}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class ImageDataset:
    """Normalized float32 images, shape (N, C, 32, 32), and int64 labels."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    # Mirror images as augmentation? Right for photos (CIFAR), wrong for digits: a
    # mirrored 3 or 7 is no longer that digit.
    hflip: bool

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageDataset:
    """Loads ``name`` (one of :data:`DATASETS`); CIFAR needs ``data_dir``."""
    if name == "digits":
        return load_digits()
    if name in CIFAR_LAYOUT:
        if data_dir is None:
            folder = CIFAR_LAYOUT[name][0]
            raise ValueError(f"{name} needs a data folder (--data-dir) holding {folder}/")
        return load_cifar(name, data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")


def load_digits() -> ImageDataset:
    import numpy as np
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)  # (1797, 1, 8, 8)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=digits.target
    )
    train_index, test_index = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return _normalized(
        "digits",
        images[train_index],
        labels[train_index],
        images[test_index],
        labels[test_index],
        num_classes=10,
        hflip=False,
    )


def load_cifar(name: str, data_dir: str | Path) -> ImageDataset:
    """CIFAR-10/100 from ``data_dir`` or ``data_dir/<official folder name>``."""
    folder_name, train_files, test_file, label_key = CIFAR_LAYOUT[name]
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{name}: the data folder {data_dir} does not exist"
            if not data_dir.exists()
            else f"{name}: {data_dir} is not a folder; --data-dir takes the folder that "
            f"holds {folder_name}/"
        )
    folder = data_dir / folder_name if (data_dir / folder_name).is_dir() else data_dir
    missing = [f for f in [*train_files, test_file] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: {folder} lacks {missing}; --data-dir must hold the official Python "
            f"version ({folder_name}/ with {', '.join([*train_files, test_file])})"
        )
    train = [_read_cifar_file(folder / f, label_key) for f in train_files]
    train_images = torch.cat([images for images, _ in train])
    train_labels = torch.cat([labels for _, labels in train])
    test_images, test_labels = _read_cifar_file(folder / test_file, label_key)
    num_classes = CIFAR_CLASSES[name]
    for path, labels in [(folder, train_labels), (folder / test_file, test_labels)]:
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise ValueError(f"{name}: corrupt data in {path}: labels outside 0..{num_classes - 1}")
    return _normalized(
        name,
        train_images.float(),
        train_labels,
        test_images.float(),
        test_labels,
        num_classes=num_classes,
        hflip=True,
    )


class UnsafePickle(pickle.UnpicklingError):
    """A pickle asked for something an official CIFAR file never holds."""


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR files hold: dicts, lists, bytes, strings,
    numbers, and numpy arrays of numbers. Any other class or function the stream names is
    refused before anything calls it, so nothing in the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY  # only as _reconstruct's first argument: it is not callable
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _reconstruct_array
        raise UnsafePickle(f"it names {module}.{name}")


def _numeric_dtype(*args: Any) -> "np.dtype":
    import numpy as np

    dtype = np.dtype(*args)
    if dtype.kind not in "biuf":
        raise UnsafePickle(f"it holds a numpy array of {dtype}, not of numbers")
    return dtype


_NDARRAY = "numpy.ndarray"


def _reconstruct_array(subtype: Any, shape: Any, dtype: Any) -> "np.ndarray":
    """numpy's ``_reconstruct`` (an empty array that the pickle then fills), for plain
    arrays of numbers only."""
    import numpy as np

    if subtype is not _NDARRAY:
        raise UnsafePickle(f"it reconstructs an array of type {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, _numeric_dtype(dtype))


def _check_plain(value: Any) -> None:
    """Raises :class:`UnsafePickle` unless ``value`` is plain data and arrays of numbers
    (a dtype's pickled state could still have turned it into something else)."""
    import numpy as np

    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key)
            _check_plain(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item)
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject or value.dtype.kind not in "biuf":
            raise UnsafePickle(f"it holds a numpy array of {value.dtype}, not of numbers")
    elif not isinstance(value, (bytes, str, int, float, type(None))):
        raise UnsafePickle(f"it holds a {type(value).__name__}")


def _read_cifar_file(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch: ``data`` is uint8 (N, 3072), each row R, G, B planes of 32x32."""
    import numpy as np

    try:
        with open(path, "rb") as file:
            batch = CifarUnpickler(file, encoding="bytes").load()
        _check_plain(batch)
    except UnsafePickle as refusal:
        raise ValueError(
            f"refusing CIFAR file {path}: {refusal}, which the official CIFAR files never "
            "hold (only dicts, lists, bytes, strings, numbers and numpy arrays of numbers); "
            "nothing in it was run"
        ) from None
    except Exception as error:
        raise ValueError(
            f"corrupt CIFAR file {path}: not a readable pickle ({type(error).__name__}: {error})"
        ) from error
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as error:
        raise ValueError(
            f"corrupt CIFAR file {path}: expected a pickled dict with b'data' and "
            f"{label_key!r} ({type(error).__name__}: {error})"
        ) from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"corrupt CIFAR file {path}: data has shape {data.shape} and there are "
            f"{labels.size} labels; expected (N, 3072) and N labels"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _normalized(name, train_images, train_labels, test_images, test_labels, **kwargs):
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True)
    return ImageDataset(
        name,
        (train_images - mean) / std,
        train_labels,
        (test_images - mean) / std,
        test_labels,
        **kwargs,
    )


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirrors each image of a (N, C, H, W) batch left-right with probability 1/2.

    ``generator`` (on the CPU) alone decides which, so a seeded run flips the same images."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    flip = flip.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)
