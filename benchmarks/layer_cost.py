"""Per-layer cost of the efficient SCConv against the 3x3 conv it replaces, at DenseNet-121's shapes.

For each stage of DenseNet-121 at 112x112 (28, 14, 7 and 3 pixels; SCConv 128 -> 32, batch 16) it
times forward + backward of: the conv, the efficient SCConv keeping its activations ("keep"), the same
recomputing only its SRU and squeezes in backward ("sru"), recomputing its body ("recompute"), and the SCConv's
forward alone without a graph (what a recompute of the body runs once more). It also gives the activation
memory each keeps
(``ablate.profile.saved_activation_bytes``) and what the ``size`` rule (``scconv.recompute = "size"``:
inputs >= ``ablate.nn.efficient.RECOMPUTE_MIN_BYTES``) adds to a training step over the conv at that stage.
The default, ``auto``, plans from the same kind of measurements plus the whole step's
(``ablate.nn.recompute_plan``); ``ablate bench`` reports what it chose.

    python benchmarks/layer_cost.py [--threads 2] [--reps 60] [--rounds 2] [--batch-size 16]

Times are the median over ``--reps`` calls, the best of ``--rounds`` interleaved rounds, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ablate.config import SCConvConfig
from ablate.nn import SCConv
from ablate.nn.efficient import RECOMPUTE_MIN_BYTES
from ablate.profile import saved_activation_bytes

#: DenseNet-121 at 112x112: (side of the dense block's maps, dense layers in the block).
STAGES = ((28, 6), (14, 12), (7, 24), (3, 16))
#: (column, ``SCConv.planned_recompute``) of each timed mode.
MODES = (("keep", "keep"), ("sru", "sru"), ("recompute", "body"))


def _median_ms(call, reps: int) -> float:
    """Median ms of ``call()`` over ``reps`` calls after 5 untimed ones (oneDNN primitives, the allocator)."""
    times = []
    for i in range(reps + 5):
        start = time.perf_counter()
        call()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _train_ms(layer, x: torch.Tensor, reps: int) -> float:
    """Forward + backward of ``layer`` on a fresh leaf copy of ``x``."""
    return _median_ms(lambda: layer(x.detach().requires_grad_(True)).sum().backward(), reps)


def _forward_ms(layer, x: torch.Tensor, reps: int) -> float:
    """Forward alone, without a graph (what a recompute runs once more)."""
    with torch.no_grad():
        return _median_ms(lambda: layer(x), reps)


def _saved_mb(layer, x: torch.Tensor) -> float:
    out = layer(x.detach().requires_grad_(True))
    return saved_activation_bytes(out, layer.parameters()) / 2**20  # MiB, as `ablate bench`


def measure(side: int, batch: int, reps: int, rounds: int) -> dict:
    """One stage's row: ms of conv, keep, sru, recompute and forward alone, and the MB each mode saves."""
    torch.manual_seed(0)
    x = torch.randn(batch, 128, side, side)
    conv = torch.nn.Conv2d(128, 32, 3, padding=1, bias=False)
    layer = SCConv(128, 32, config=SCConvConfig(order="sru_cru", impl="efficient")).train()
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        runs.setdefault("conv", []).append(_train_ms(conv, x, reps))
        for name, mode in MODES:
            layer.planned_recompute = mode
            runs.setdefault(name, []).append(_train_ms(layer, x, reps))
        runs.setdefault("forward", []).append(_forward_ms(layer, x, reps))
    row = {k: min(v) for k, v in runs.items()}
    for name, mode in MODES:
        layer.planned_recompute = mode
        row[f"saved_{name}_mb"] = _saved_mb(layer, x)
    recomputed = x.numel() * x.element_size() >= RECOMPUTE_MIN_BYTES
    row.update(side=side, size_rule="recompute" if recomputed else "keep")
    row["size_over_conv_ms"] = row["recompute" if recomputed else "keep"] - row["conv"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as `ablate bench`)")
    parser.add_argument("--reps", type=int, default=60, help="timed calls per measurement (default 60)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is kept (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per call (default 16)")
    args = parser.parse_args()
    if min(args.threads, args.reps, args.rounds, args.batch_size) < 1:
        parser.error("--threads, --reps, --rounds and --batch-size must be integers >= 1")
    torch.set_num_threads(args.threads)
    print(f"SCConv 128 -> 32 vs 3x3 conv, batch {args.batch_size}, {args.threads} threads; ms per forward + backward")
    print(f"{'stage':>7} {'layers':>6} {'conv':>7} {'keep':>7} {'sru':>7} {'recomp':>7} {'fwd':>7} "
          f"{'MB keep':>8} {'MB sru':>7} {'MB recomp':>9} {'size rule':>9} {'step +ms':>8}")
    total = 0.0
    for side, layers in STAGES:
        r = measure(side, args.batch_size, args.reps, args.rounds)
        total += layers * r["size_over_conv_ms"]
        print(f"{side:>4}x{side:<2} {layers:>6} {r['conv']:>7.2f} {r['keep']:>7.2f} {r['sru']:>7.2f} "
              f"{r['recompute']:>7.2f} {r['forward']:>7.2f} {r['saved_keep_mb']:>8.2f} {r['saved_sru_mb']:>7.2f} "
              f"{r['saved_recompute_mb']:>9.2f} {r['size_rule']:>9} {layers * r['size_over_conv_ms']:>+8.0f}",
              flush=True)
    print(f"all SCConvs of DenseNet-121 under the size rule: {total:+.0f} ms per training step over the convs "
          "they replace")


if __name__ == "__main__":
    main()
