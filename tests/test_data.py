"""Datasets, loaders and probes: digits in memory, and tiny fake CIFAR-100 / Food-101 / image-folder trees
written in the real on-disk formats and read through torchvision's own loaders."""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
from pathlib import Path

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T

from ablate.config import ConfigError, DataConfig
from ablate.data import DataBundle, build_datasets, check_available, make_loaders, probe_batch
from ablate.data.datasets import noisy_labels
from ablate.data import stats as stats_mod
from ablate.data.stats import cache_path, channel_moments
from ablate.data.transforms import build_transform

# -- fake trees in the real formats --------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the real CIFAR pickles (made with Python 2) hold them:
    torchvision reads them with ``encoding='latin1'`` (str keys), ``encoding='bytes'`` gives b'data'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def write_fake_cifar100(root: Path, n_train: int = 30, n_test: int = 12) -> dict:
    """``cifar-100-python/{train,test,meta}`` with the real keys; returns the arrays written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        _dump_py2(
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": data,
            },
            folder / split,
        )
        out[split] = (data, fine)
    names = [f"class_{i:02d}".encode() for i in range(100)]
    coarse = [f"super_{i}".encode() for i in range(20)]
    _dump_py2({b"fine_label_names": names, b"coarse_label_names": coarse}, folder / "meta")
    return out


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "caesar_salad"]


def _write_jpeg(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, "JPEG")


def write_fake_food101(root: Path, n_train: int = 4, n_test: int = 2) -> dict[str, dict[str, list[str]]]:
    """``food-101/images/<class>/<id>.jpg`` and ``meta/{classes.txt,train.json,test.json}``."""
    base = root / "food-101"
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    image_id = 0
    for c in FOOD_CLASSES:
        for split, n in (("train", n_train), ("test", n_test)):
            meta[split][c] = []
            for _ in range(n):
                image_id += 1
                mode = "L" if image_id == 1 else "RGB"  # one grey photo: the loader must give RGB
                _write_jpeg(base / "images" / c / f"{image_id}.jpg", (40 + 4 * (image_id % 3), 36), image_id, mode)
                meta[split][c].append(f"{c}/{image_id}")
    (base / "meta").mkdir()
    (base / "meta" / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    return meta


def write_image_folder(root: Path, train_classes: list[str], val_classes: list[str], per_class: int = 2) -> None:
    for s, (split, classes) in enumerate((("train", train_classes), ("val", val_classes))):
        for k, c in enumerate(classes):
            for i in range(per_class):
                _write_jpeg(root / split / c / f"{i}.jpg", (30, 34), 1000 * s + 10 * k + i)


# -- digits ---------------------------------------------------------------------------------------


#: The easy task the digits were before they defaulted to 8x8 with label noise and 500 training images.
OLD_DIGITS = {"image_size": 32, "label_noise": 0.0, "train_size": 1437}


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_datasets(DataConfig(**OLD_DIGITS))


def test_digits_counts_shapes_and_classes(digits):
    assert len(digits.train) + len(digits.val) == 1797
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert digits.num_classes == 10 and digits.classes == [str(i) for i in range(10)]


def test_digits_split_is_stratified(digits):
    train_counts = torch.bincount(digits.train.tensors[1], minlength=10)
    val_counts = torch.bincount(digits.val.tensors[1], minlength=10)
    share = val_counts.float() / (train_counts + val_counts).float()
    assert torch.all((share - 0.2).abs() < 0.01), share


def test_digits_normalised_with_train_stats(digits):
    train_x = digits.train.tensors[0]
    assert abs(train_x.mean().item()) < 1e-4 and abs(train_x.std().item() - 1) < 1e-3
    assert torch.equal(train_x[:, 0], train_x[:, 2])  # grey shown as three equal channels
    # Raw pixels were v/16 in [0, 1]; the stored mean/std map them back into that range.
    raw = train_x * digits.std[0] + digits.mean[0]
    assert raw.min().item() >= -1e-5 and raw.max().item() <= 1 + 1e-5
    assert 0.2 < digits.mean[0] < 0.4 and len(digits.mean) == len(digits.std) == 3


def test_digits_deterministic_and_sized(digits):
    again = build_datasets(DataConfig(data_root="/nonexistent/never-read", **OLD_DIGITS))
    for a, b in ((digits.train, again.train), (digits.val, again.val)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    small = build_datasets(DataConfig(**{**OLD_DIGITS, "image_size": 12}))
    assert small.val[0][0].shape == (3, 12, 12)
    assert torch.equal(small.val.tensors[1], digits.val.tensors[1])  # same validation images at any size


@pytest.fixture(scope="module")
def hard_digits() -> DataBundle:
    return build_datasets(DataConfig())


def test_digits_default_is_native_8x8_noisy_and_small(hard_digits, digits):
    x, _ = hard_digits.train[0]
    assert x.shape == (3, 8, 8)  # native resolution: no upsampling
    assert (len(hard_digits.train), len(hard_digits.val)) == (500, 360)
    # The same validation images as the clean split, about a fifth of them relabelled to another class.
    noisy = hard_digits.val.tensors[1] != digits.val.tensors[1]
    assert 0.15 < noisy.float().mean().item() < 0.25
    train_counts = torch.bincount(hard_digits.train.tensors[1], minlength=10)
    assert train_counts.min().item() >= 30  # every class is still there after subsetting and relabelling


def test_digits_noise_and_subset_are_fixed_whatever_the_run():
    a, b = build_datasets(DataConfig()), build_datasets(DataConfig())
    for x, y in ((a.train, b.train), (a.val, b.val)):
        assert torch.equal(x.tensors[0], y.tensors[0]) and torch.equal(x.tensors[1], y.tensors[1])


def test_noisy_labels_swap_an_exact_share_for_other_classes():
    labels = np.arange(1000) % 10
    out = noisy_labels(labels, 10, 0.2, seed=0)
    changed = out != labels
    assert changed.sum() == 200 and np.all((out >= 0) & (out < 10))
    assert np.array_equal(out, noisy_labels(labels, 10, 0.2, seed=0))
    assert not np.array_equal(out, noisy_labels(labels, 10, 0.2, seed=1))
    assert np.array_equal(noisy_labels(labels, 10, 0.0, seed=0), labels)
    # The new class is uniform over the nine others: no class is favoured.
    assert np.bincount((out[changed] - labels[changed]) % 10, minlength=10)[0] == 0


@pytest.mark.parametrize(("values", "field"), [
    ({"label_noise": 1.0}, "label_noise"), ({"label_noise": -0.1}, "label_noise"),
    ({"dataset": "cifar100", "label_noise": 0.2}, "label_noise"), ({"train_size": 5}, "train_size"),
    ({"dataset": "food101", "train_size": 100}, "train_size"),
])
def test_digits_only_fields_are_checked(values, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**values)


def test_train_size_beyond_the_split_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train_size=2000 .* \[10, 1437\]"):
        build_datasets(DataConfig(train_size=2000))


# -- loaders and probes --------------------------------------------------------------------------


def _index_bundle(n: int = 50) -> DataBundle:
    ds = TensorDataset(torch.arange(n), torch.arange(n) % 5)
    return DataBundle(ds, ds, 5, list("abcde"), (0.0,), (1.0,))


def _order(loader) -> list[int]:
    return torch.cat([x for x, _ in loader]).tolist()


def test_make_loaders_seeded_order():
    bundle = _index_bundle()
    a_train, a_val = make_loaders(bundle, batch_size=16, seed=3)
    b_train, _ = make_loaders(bundle, batch_size=16, seed=3)
    c_train, _ = make_loaders(bundle, batch_size=16, seed=4)
    assert _order(a_train) == _order(b_train)
    assert _order(a_train) != _order(c_train)
    assert sorted(_order(a_train)) == list(range(50))
    assert _order(a_val) == list(range(50))
    assert [len(x) for x, _ in a_val] == [16, 16, 16, 2]  # drop_last=False
    assert _order(a_train) != _order(a_train)  # a new order each epoch, from the same generator


class _RandomItems(Dataset):
    """Each item draws from torch and numpy, as augmentations in worker processes do."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return torch.rand(1), torch.tensor(np.random.rand())


def test_make_loaders_seeds_worker_processes():
    ds = _RandomItems()
    bundle = DataBundle(ds, ds, 1, ["x"], (0.0,), (1.0,))

    def draws(seed):
        train, _ = make_loaders(bundle, batch_size=4, seed=seed, num_workers=2)
        batches = list(train)
        return torch.cat([a.flatten() for a, _ in batches]), torch.cat([b.flatten() for _, b in batches])

    first_torch, first_numpy = draws(7)
    again_torch, again_numpy = draws(7)
    other_torch, other_numpy = draws(8)
    assert torch.equal(first_torch, again_torch) and torch.equal(first_numpy, again_numpy)
    assert not torch.equal(first_torch, other_torch) and not torch.equal(first_numpy, other_numpy)
    assert len(set(first_numpy.tolist())) == 8  # workers must not share numpy's state


def test_loads_in_process_where_workers_cannot_share_batches(monkeypatch, capsys):
    # Seen on a GPU virtual machine: duplicating the shared batch's file descriptor fails in every worker, the
    # workers live on, and the training process would wait for their batches forever.
    ds = _RandomItems()
    bundle = DataBundle(ds, ds, 1, ["x"], (0.0,), (1.0,))
    assert make_loaders(bundle, batch_size=4, seed=0, num_workers=2)[0].num_workers == 2

    def bad_dup(fd):
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(os, "dup", bad_dup)
    train, val = make_loaders(bundle, batch_size=4, seed=0, num_workers=2)
    assert train.num_workers == val.num_workers == 0
    assert len(list(train)) == 2  # and it loads
    err = capsys.readouterr().err
    assert "Bad file descriptor" in err and "num_workers=0" in err and len(err.strip().splitlines()) == 1


def test_probe_batch_fixed(digits):
    x1, y1 = probe_batch(digits, 16)
    x2, y2 = probe_batch(digits, 16)
    assert x1.shape == (16, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, y3 = probe_batch(digits, 32)
    assert torch.equal(x3[:16], x1) and torch.equal(y3[:16], y1)
    assert len(set(y3.tolist())) > 3  # a permutation, not the first (class-sorted or not) rows
    assert probe_batch(digits, 10_000)[0].shape[0] == len(digits.val)


# -- CIFAR-100 -------------------------------------------------------------------------------------


def test_fake_cifar100_native_size(tmp_path):
    written = write_fake_cifar100(tmp_path)
    bundle = build_datasets(DataConfig(dataset="cifar100", data_root=str(tmp_path), image_size=32))
    assert (len(bundle.train), len(bundle.val)) == (30, 12)
    assert bundle.num_classes == 100 and bundle.classes[:2] == ["class_00", "class_01"]
    test_data, test_fine = written["test"]
    assert [bundle.val[i][1] for i in range(12)] == test_fine
    # Stats come from the whole raw train array.
    train_data = written["train"][0].reshape(-1, 3, 1024) / 255.0
    assert np.allclose(bundle.mean, train_data.mean(axis=(0, 2)), atol=1e-9)
    assert np.allclose(bundle.std, train_data.std(axis=(0, 2)), atol=1e-9)
    # Native test recipe: no resize, only normalisation of the stored pixels.
    x, _ = bundle.val[0]
    raw = torch.from_numpy(test_data[0].reshape(3, 32, 32) / 255.0).float()
    expected = (raw - torch.tensor(bundle.mean).view(3, 1, 1)) / torch.tensor(bundle.std).view(3, 1, 1)
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected, atol=1e-5)
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_fake_cifar100_resized(tmp_path):
    write_fake_cifar100(tmp_path)
    bundle = build_datasets(DataConfig(dataset="cifar100", data_root=str(tmp_path), image_size=64))
    assert bundle.train[0][0].shape == (3, 64, 64) and bundle.val[0][0].shape == (3, 64, 64)
    train_loader, _ = make_loaders(bundle, batch_size=8, seed=0)
    x, y = next(iter(train_loader))
    assert x.shape == (8, 3, 64, 64) and y.dtype == torch.long and int(y.max()) < 100


def test_cifar_recipes():
    native = build_transform("cifar100", True, 32, (0.5,) * 3, (0.25,) * 3).transforms
    assert isinstance(native[0], T.RandomCrop) and native[0].padding == 4
    assert not any(isinstance(t, T.Resize) for t in native)
    resized = build_transform("cifar100", True, 64, (0.5,) * 3, (0.25,) * 3).transforms
    assert isinstance(resized[0], T.Resize) and resized[0].size == 64
    assert isinstance(resized[1], T.RandomHorizontalFlip)
    food_test = build_transform("food101", False, 224, (0.5,) * 3, (0.25,) * 3).transforms
    assert food_test[0].size == 256 and food_test[1].size == (224, 224)
    assert build_transform("food101", False, 64, (0.5,) * 3, (0.25,) * 3).transforms[0].size == 73


# -- Food-101 and image folders ---------------------------------------------------------------------


def test_fake_food101(tmp_path):
    meta = write_fake_food101(tmp_path)
    bundle = build_datasets(DataConfig(dataset="food101", data_root=str(tmp_path), image_size=32))
    assert (len(bundle.train), len(bundle.val)) == (12, 6)
    assert bundle.num_classes == 3 and bundle.classes == sorted(FOOD_CLASSES)
    labels = sorted(bundle.val[i][1] for i in range(len(bundle.val)))
    assert labels == sorted(FOOD_CLASSES.index(c) for c, ids in meta["test"].items() for _ in ids)
    assert bundle.train[0][0].shape == (3, 32, 32) and bundle.val[0][0].shape == (3, 32, 32)
    cached = json.loads(cache_path(tmp_path, "food101").read_text())
    assert cached["num_train_images"] == 12 and cached["images_used"] == 12
    assert all(0.2 < m < 0.8 for m in cached["mean"])


def test_large_sets_use_a_fixed_sample(tmp_path, monkeypatch):
    write_fake_food101(tmp_path)
    monkeypatch.setattr(stats_mod, "MAX_SAMPLE", 5)
    first = build_datasets(DataConfig(dataset="food101", data_root=str(tmp_path), image_size=32))
    cache_path(tmp_path, "food101").unlink()
    second = build_datasets(DataConfig(dataset="food101", data_root=str(tmp_path), image_size=32))
    cached = json.loads(cache_path(tmp_path, "food101").read_text())
    assert cached["images_used"] == 5 and "seed 0" in cached["method"]
    assert first.mean == second.mean and first.std == second.std


def test_image_folder(tmp_path):
    write_image_folder(tmp_path, ["cat", "dog", "owl"], ["cat", "owl"])
    bundle = build_datasets(DataConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=24))
    assert bundle.classes == ["cat", "dog", "owl"] and bundle.num_classes == 3
    assert sorted(bundle.val[i][1] for i in range(len(bundle.val))) == [0, 0, 2, 2]  # train/'s indices
    assert bundle.val[0][0].shape == (3, 24, 24) and bundle.train[0][0].shape == (3, 24, 24)


def test_image_folder_rejects_unknown_val_class(tmp_path):
    write_image_folder(tmp_path, ["cat"], ["cat", "cow"])
    with pytest.raises(ConfigError, match="cow"):
        build_datasets(DataConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=24))


def test_image_folder_without_images_is_a_config_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(ConfigError, match="imagefolder"):
        build_datasets(DataConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=24))


# -- stats cache --------------------------------------------------------------------------------------


def test_stats_cache_written_once_and_reused(tmp_path, monkeypatch):
    write_fake_cifar100(tmp_path)
    cfg = DataConfig(dataset="cifar100", data_root=str(tmp_path), image_size=32)
    build_datasets(cfg)
    path = cache_path(tmp_path, "cifar100")
    assert path == tmp_path / "scconv-ablate-stats" / "cifar100.json"
    assert [p.name for p in path.parent.iterdir()] == ["cifar100.json"]  # no temporary file left
    cached = json.loads(path.read_text())
    cached["mean"] = [0.125, 0.25, 0.375]  # a marker only the cache can supply
    path.write_text(json.dumps(cached))
    monkeypatch.setattr(stats_mod, "channel_moments", lambda chunks: pytest.fail("stats recomputed"))
    assert build_datasets(cfg).mean == (0.125, 0.25, 0.375)


def test_stats_cache_recomputed_when_stale_or_unwritable(tmp_path, monkeypatch):
    write_fake_cifar100(tmp_path)
    cfg = DataConfig(dataset="cifar100", data_root=str(tmp_path), image_size=32)
    truth = build_datasets(cfg).mean
    path = cache_path(tmp_path, "cifar100")
    stale = json.loads(path.read_text()) | {"mean": [0.0, 0.0, 0.0], "num_train_images": 999}
    path.write_text(json.dumps(stale))
    assert build_datasets(cfg).mean == truth
    path.write_text("{not json")
    assert build_datasets(cfg).mean == truth
    path.unlink()

    def refuse(*_):
        raise PermissionError("read-only")

    monkeypatch.setattr(stats_mod, "atomic_write", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build_datasets(cfg).mean == truth
    assert any("could not cache" in str(w.message) for w in caught) and not path.exists()


def test_channel_moments_chunked_equals_whole():
    x = np.random.default_rng(0).random((3, 1000))
    mean, std = channel_moments([x[:, :300], x[:, 300:]])
    assert np.allclose(mean, x.mean(axis=1)) and np.allclose(std, x.std(axis=1))


# -- missing data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset, folder", [("cifar100", "cifar-100-python"), ("food101", "food-101")])
def test_missing_dataset_names_path_and_download(tmp_path, dataset, folder):
    cfg = DataConfig(dataset=dataset, data_root=str(tmp_path))
    for call in (check_available, build_datasets):
        with pytest.raises(ConfigError) as err:
            call(cfg)
        message = str(err.value)
        assert f"'{dataset}'" in message and str(tmp_path / folder) in message and "--download" in message
        assert "\n" not in message
    check_available(DataConfig(dataset=dataset, data_root=str(tmp_path), download=True))  # the downloader's job
    assert list(tmp_path.iterdir()) == []  # the check created nothing


def test_missing_file_inside_the_tree_is_named(tmp_path):
    write_fake_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(ConfigError, match="cifar-100-python/meta"):
        check_available(DataConfig(dataset="cifar100", data_root=str(tmp_path)))


def test_missing_image_folder_and_home_expansion(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.*--data-root"):
        check_available(DataConfig(dataset="imagefolder", data_root=str(tmp_path)))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=str(tmp_path / "data" / "cifar-100-python")):
        check_available(DataConfig(dataset="cifar100", data_root="~/data"))
    check_available(DataConfig(dataset="digits", data_root="~/data"))  # embedded: nothing to find
