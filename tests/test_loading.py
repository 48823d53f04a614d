"""The input pipeline: ``num_workers = "auto"`` from the cores a run may use, and JPEG decoding on the device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from ablate.cli import main
from ablate.config import ConfigError, DataConfig, RunConfig
from ablate.data import build_datasets, make_loaders, probe_batch
from ablate.data.datasets import MAX_AUTO_WORKERS, resolve_workers
from ablate.data.gpu_decode import JpegFiles, check_decode_device
from ablate.device import CPU_SHARE_ENV, available_cpus
from test_data import write_fake_food101


class _Files(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return torch.zeros(1), i


def test_auto_workers_follow_the_cores_and_the_study_share(monkeypatch):
    monkeypatch.delenv(CPU_SHARE_ENV, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    assert available_cpus() == 6 and resolve_workers("auto", _Files()) == 6
    monkeypatch.setenv(CPU_SHARE_ENV, "2")  # one of three study workers on this machine
    assert available_cpus() == 2 and resolve_workers("auto", _Files()) == 2
    monkeypatch.setenv(CPU_SHARE_ENV, "12")  # a share never exceeds what the process may use
    assert available_cpus() == 6
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.delenv(CPU_SHARE_ENV)
    assert resolve_workers("auto", _Files()) == MAX_AUTO_WORKERS


def test_in_memory_sets_and_explicit_counts_keep_their_workers():
    assert resolve_workers("auto", TensorDataset(torch.zeros(4, 1))) == 0
    assert resolve_workers(3, TensorDataset(torch.zeros(4, 1))) == 3
    assert RunConfig().data.num_workers == "auto"
    assert RunConfig.from_dict({"num_workers": "2"}).data.num_workers == 2


@pytest.mark.parametrize("value", ["many", "-1", 1.5])
def test_bad_worker_counts_name_what_is_accepted(value):
    with pytest.raises(ConfigError, match="num_workers=.*accepted: auto or an integer >= 0"):
        RunConfig.from_dict({"num_workers": value})


def test_gpu_decode_is_refused_for_sets_not_stored_as_jpeg():
    with pytest.raises(ConfigError, match="decode='gpu' is not valid.*cifar100"):
        DataConfig(dataset="cifar100", decode="gpu")


def test_gpu_decode_is_refused_without_cuda():
    with pytest.raises(ConfigError, match=r"^decode='gpu' is not valid with device='cpu'.*accepted: decode=cpu"):
        check_decode_device("gpu", torch.device("cpu"))
    check_decode_device("cpu", torch.device("cpu"))


def test_training_with_gpu_decode_on_a_cpu_fails_in_one_line(tmp_path, tracking_uri, capsys):
    write_fake_food101(tmp_path)
    argv = ["train", "--dataset", "food101", "--data-root", str(tmp_path), "--device", "cpu",
            "--tracking-uri", tracking_uri, "--set", "decode=gpu", "--set", "image_size=32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decode='gpu'" in err


def test_device_decode_gives_the_cpu_recipe(tmp_path):
    # The same decoder runs on CUDA; on the CPU it must give what PIL and the classic transforms give.
    write_fake_food101(tmp_path)
    common = dict(dataset="food101", data_root=str(tmp_path), image_size=32, num_workers=0)
    plain = build_datasets(DataConfig(**common))
    encoded = build_datasets(DataConfig(**common, decode="gpu"))
    assert isinstance(encoded.train, JpegFiles) and (encoded.mean, encoded.std) == (plain.mean, plain.std)
    _, plain_val = make_loaders(plain, batch_size=6, seed=0, num_workers=0)
    train, val = make_loaders(encoded, batch_size=6, seed=0, num_workers=0, device="cpu")
    (x_plain, y_plain), (x_dec, y_dec) = next(iter(plain_val)), next(iter(val))
    assert x_dec.shape == x_plain.shape == (6, 3, 32, 32) and x_dec.dtype == torch.float32
    assert torch.equal(y_dec, y_plain)
    # The resize kernels differ slightly (PIL vs tensor antialiasing); the pixels agree to a few grey levels.
    assert (x_dec - x_plain).abs().mean() < 0.05
    x_train, _ = next(iter(train))
    assert x_train.shape == (6, 3, 32, 32)
    probe_x, _ = probe_batch(encoded, 4)
    assert probe_x.shape == (4, 3, 32, 32)
    torch.testing.assert_close(probe_x, probe_batch(encoded, 4)[0])


def test_study_workers_start_with_their_share_of_the_cores(monkeypatch):
    import os

    from ablate.study import workers

    seen: dict[str, str] = {}

    class Process:  # stands in for a spawned worker: records the environment it would inherit
        def __init__(self, target, args, name):
            pass

        def start(self):
            seen.update(os.environ)

    monkeypatch.delenv(CPU_SHARE_ENV, raising=False)
    workers._spawn(SimpleNamespace(Process=Process), None, "parent", 0, threads=3, gpu=None)
    assert seen[CPU_SHARE_ENV] == "3" and CPU_SHARE_ENV not in os.environ  # set for the child only
