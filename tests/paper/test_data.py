"""Data: the built-in digits, CIFAR in the official pickle format, flips, bad folders."""

import pickle

import numpy as np
import pytest
import torch

from crelu_ext.paper.data import load_dataset, random_hflip


def test_digits_are_32x32_normalized_and_split_the_same_way_every_time():
    digits = load_dataset("digits")
    assert digits.train_images.shape == (1437, 1, 32, 32)
    assert digits.test_images.shape == (360, 1, 32, 32)
    assert digits.num_classes == 10 and digits.in_channels == 1 and not digits.hflip
    assert set(digits.train_labels.tolist()) == set(range(10))
    assert digits.train_images.mean().abs() < 1e-5
    assert digits.train_images.std() == pytest.approx(1.0, abs=1e-4)
    again = load_dataset("digits")
    assert torch.equal(digits.train_images, again.train_images)
    assert torch.equal(digits.test_labels, again.test_labels)


def _write_cifar_file(path, data: np.ndarray, labels: list[int], label_key: bytes) -> None:
    batch = {b"batch_label": b"test", label_key: labels, b"data": data, b"filenames": []}
    with open(path, "wb") as file:
        pickle.dump(batch, file)


def _fake_cifar(root, name: str, per_file: int = 4, seed: int = 0) -> np.ndarray:
    """Writes a tiny dataset in the official layout; returns all raw rows, training first."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, key, classes = "cifar-10-batches-py", b"labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, key, classes = "cifar-100-python", b"fine_labels", 100
        files = ["train", "test"]
    (root / folder).mkdir(parents=True)
    rows = []
    for file_name in files:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=per_file).tolist()
        _write_cifar_file(root / folder / file_name, data, labels, key)
        rows.append(data)
    return np.concatenate(rows)


def _normalized_like_loader(rows: np.ndarray, train_count: int) -> torch.Tensor:
    images = torch.from_numpy(rows).float().reshape(-1, 3, 32, 32)  # R, G, B planes
    mean = images[:train_count].mean(dim=(0, 2, 3), keepdim=True)
    std = images[:train_count].std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std


@pytest.mark.parametrize(
    ("name", "train_count", "classes"), [("cifar10", 20, 10), ("cifar100", 4, 100)]
)
def test_cifar_loads_the_official_pickle_format(tmp_path, name, train_count, classes):
    rows = _fake_cifar(tmp_path, name)
    dataset = load_dataset(name, tmp_path)
    expected = _normalized_like_loader(rows, train_count)
    assert torch.equal(dataset.train_images, expected[:train_count])
    assert torch.equal(dataset.test_images, expected[train_count:])
    assert dataset.train_labels.dtype == torch.int64 and len(dataset.test_labels) == 4
    assert dataset.num_classes == classes and dataset.in_channels == 3 and dataset.hflip


def test_cifar_data_dir_may_be_the_official_folder_itself(tmp_path):
    _fake_cifar(tmp_path, "cifar10")
    inside = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert torch.equal(inside.train_images, load_dataset("cifar10", tmp_path).train_images)


def test_missing_cifar_folder_names_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the data folder .*nowhere does not exist$"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "file").touch()
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_dataset("cifar10", tmp_path / "file")
    with pytest.raises(ValueError, match="needs a data folder"):
        load_dataset("cifar100")


def test_corrupt_cifar_files_raise_clear_errors(tmp_path):
    _fake_cifar(tmp_path, "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"corrupt CIFAR file .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    _write_cifar_file(batch, np.zeros((4, 100), np.uint8), [0] * 4, b"labels")
    with pytest.raises(ValueError, match=r"corrupt CIFAR file .*\(4, 100\)"):
        load_dataset("cifar10", tmp_path)
    _write_cifar_file(batch, np.zeros((4, 3072), np.uint8), [0, 1, 2, 10], b"labels")
    with pytest.raises(ValueError, match=r"labels outside 0\.\.9"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_random_hflip_mirrors_some_images_and_is_seeded():
    images = torch.randn(64, 3, 4, 4)
    flipped = random_hflip(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images, strict=True)]
    unchanged = [torch.equal(f, i) for f, i in zip(flipped, images, strict=True)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 10 < sum(mirrored) < 54
    assert torch.equal(flipped, random_hflip(images, torch.Generator().manual_seed(0)))
