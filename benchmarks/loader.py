"""Images/s of the real Food-101 and CIFAR-100 input pipelines beside the model's training throughput.

Writes a synthetic tree in each dataset's on-disk format (the layouts of the test builders in
tests/test_data.py; Food-101 photos re-drawn at their real size, up to 512 px, with smooth content
that compresses like a photo), then reads it through ``build_datasets`` and ``make_loaders`` exactly
as training does, per loader worker count and decode path. The model's side is ``ablate bench``'s
step (forward, backward, SGD) of the efficient SCConv variant at the same batch and image size.
``ratio`` = loader images/s / training images/s: the pipeline keeps the device busy when it is >= 1.2.
On CUDA it also trains on the loader's batches for an epoch: end-to-end images/s and the GPU's mean
utilisation (NVML) over those steps, for each decode path.

    python benchmarks/loader.py [--datasets food101 cifar100] [--workers 0 1 2] [--batch-size 32]
                                [--images 256] [--image-size N] [--backbone resnet50] [--decode cpu gpu]
                                [--device auto] [--amp] [--format table|json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: Food-101's photos are at most 512 px on their longer side; these sizes mix both orientations.
FOOD_SIZES = ((512, 384), (384, 512), (512, 512), (512, 341))


def write_food101(root: Path, n_images: int) -> None:
    """A Food-101 tree (test builder's layout) whose JPEGs are redrawn at Food-101's sizes."""
    from PIL import Image
    from test_data import FOOD_CLASSES, write_fake_food101

    per_class = max(1, n_images // len(FOOD_CLASSES))
    write_fake_food101(root, n_train=per_class, n_test=1)
    rng = np.random.default_rng(0)
    for i, path in enumerate(sorted((root / "food-101" / "images").rglob("*.jpg"))):
        w, h = FOOD_SIZES[i % len(FOOD_SIZES)]
        # Low-resolution noise upsampled: smooth regions and edges, a photo-like JPEG size (~50-100 kB).
        coarse = rng.integers(0, 256, size=(h // 32, w // 32, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        image.save(path, "JPEG", quality=90)


def write_cifar100(root: Path, n_images: int) -> None:
    from test_data import write_fake_cifar100

    write_fake_cifar100(root, n_train=n_images, n_test=10)


WRITERS = {"food101": write_food101, "cifar100": write_cifar100}


def loader_rate(dataset: str, root: Path, workers: int, decode: str, batch_size: int, image_size: int | None,
                device) -> tuple[float, int]:
    """(images/s over one epoch after its first batch, the image size) of the training loader."""
    import torch

    from ablate.config import DataConfig
    from ablate.data import build_datasets, make_loaders

    cfg = DataConfig(dataset=dataset, data_root=str(root), image_size=image_size, decode=decode,
                     num_workers=workers).resolved()
    bundle = build_datasets(cfg)
    train, _ = make_loaders(bundle, batch_size, seed=0, num_workers=workers, pin_memory=device.type == "cuda",
                            device=device)
    seen, start = 0, None
    for x, _ in train:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if start is None:  # the first batch pays for starting the workers
            start = time.perf_counter()
            continue
        seen += x.shape[0]
    elapsed = time.perf_counter() - start
    return seen / elapsed, cfg.image_size


def end_to_end(dataset: str, root: Path, workers: int, decode: str, batch_size: int, image_size: int,
               backbone: str, device, amp: bool) -> tuple[float, float]:
    """(images/s, mean GPU utilisation %) of one epoch of training steps fed by the real loader (CUDA)."""
    import torch

    from ablate.config import DataConfig, ModelConfig, SCConvConfig
    from ablate.data import build_datasets, make_loaders
    from ablate.models import build_model

    bundle = build_datasets(DataConfig(dataset=dataset, data_root=str(root), image_size=image_size, decode=decode,
                                       num_workers=workers))
    train, _ = make_loaders(bundle, batch_size, seed=0, num_workers=workers, pin_memory=True, device=device)
    model = build_model(ModelConfig(backbone, num_classes=bundle.num_classes, scconv=SCConvConfig(impl="efficient")),
                        seed=0).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, start, busy = 0, None, []
    for x, y in train:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if start is None:  # workers starting, cuDNN choosing its kernels
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            continue
        seen += x.shape[0]
        busy.append(torch.cuda.utilization(device))
    torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start), float(np.mean(busy)) if busy else float("nan")


def training_rate(backbone: str, batch_size: int, image_size: int, device, amp: bool) -> float:
    """Training images/s of the efficient SCConv variant: ``ablate bench``'s step, in this process."""
    import statistics

    from ablate.bench import BenchConfig, measure

    cfg = BenchConfig(backbone=backbone, batch_size=batch_size, image_size=image_size, device=device.type, steps=3,
                      warmup=1, repeats=1, amp=amp, impls=("baseline", "efficient"),
                      channels_last=device.type == "cuda").resolved()
    return batch_size / statistics.median(measure(cfg, "efficient")["step_times"])


def main(argv: list[str] | None = None) -> int:
    import torch

    from ablate.data.datasets import sharing_problem
    from ablate.device import available_cpus, resolve_device
    from ablate.table import format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=tuple(WRITERS), default=list(WRITERS))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--decode", nargs="+", choices=("cpu", "gpu"), default=["cpu"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="training images in each synthetic tree")
    p.add_argument("--image-size", type=int, default=None, help="default: each dataset's recipe size")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model's steps (CUDA)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if "gpu" in args.decode and device.type != "cuda":
        print("loader: --decode gpu needs CUDA (nvJPEG); this machine has none", file=sys.stderr)
        return 2

    if any(w > 0 for w in args.workers) and (problem := sharing_problem()) is not None:
        print(f"loader: worker processes cannot share batches with this process here ({problem}), so every "
              f"worker count would load in process; measure with --workers 0", file=sys.stderr)
        return 2

    rows, model_rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            root = Path(tmp, dataset)
            WRITERS[dataset](root, args.images)
            for decode in args.decode:
                if decode == "gpu" and dataset != "food101":
                    continue  # CIFAR-100 is stored as arrays, not JPEG files
                for workers in args.workers:
                    rate, size = loader_rate(dataset, root, workers, decode, args.batch_size, args.image_size, device)
                    if size not in model_rates:
                        model_rates[size] = training_rate(args.backbone, args.batch_size, size, device, args.amp)
                    e2e, util = float("nan"), float("nan")
                    if device.type == "cuda":
                        e2e, util = end_to_end(dataset, root, workers, decode, args.batch_size, size, args.backbone,
                                               device, args.amp)
                    rows.append({"dataset": dataset, "decode": decode, "workers": workers, "image_size": size,
                                 "batch_size": args.batch_size, "loader_images_s": rate,
                                 "train_images_s": model_rates[size], "ratio": rate / model_rates[size],
                                 "end_to_end_images_s": e2e, "gpu_utilisation": util,
                                 "backbone": args.backbone, "device": device.type, "cores": available_cpus(),
                                 "load_average": os.getloadavg()[0]})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["dataset", "decode", "workers", "image", "batch", "loader img/s", "train img/s", "ratio",
               "end-to-end img/s", "GPU util %"]
    body = [[r["dataset"], r["decode"], str(r["workers"]), str(r["image_size"]), str(r["batch_size"]),
             f"{r['loader_images_s']:.0f}", f"{r['train_images_s']:.1f}", f"{r['ratio']:.2f}",
             _number(r["end_to_end_images_s"], "{:.0f}"), _number(r["gpu_utilisation"], "{:.0f}")] for r in rows]
    print(format_table(headers, body, right_from=5))
    print(f"{args.backbone} efficient SCConv on {device.type}; {available_cpus()} cores for this process; "
          f"load average {os.getloadavg()[0]:.2f} (torch {torch.__version__})")
    return 0


def _number(value: float, fmt: str) -> str:
    return "-" if value != value else fmt.format(value)  # NaN: not measured (no CUDA)


if __name__ == "__main__":
    sys.exit(main())
