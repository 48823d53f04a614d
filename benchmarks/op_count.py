"""Operations per training step of SCConv: the count that sets its time on a GPU, measured on any machine.

On an H200 the eager efficient SCConv took 3.6-3.8x the baseline's step and more than the reference
(benchmarks/README.md, "GPU check"): at the study's sizes a GPU finishes each of the SCConv's small
operations faster than the host can launch the next, so the step costs about a fixed time per operation.
This script counts the ATen operations (``ablate.profile.count_ops``: views and allocations left out)
that one forward + backward dispatches, which is deterministic and needs no GPU:

- per SCConv layer (64 -> 64 channels), for each gate mode and attention of the presets and more:
  the reference, and the efficient implementation keeping and recomputing its body;
- per training step of ResNet-50 and DenseNet-121: baseline, reference, efficient.

Each twice: on the CPU's code path (NCHW inputs), and on the GPU's (channels_last inputs, with the
efficient implementation's CUDA branches taken: the GroupNorm statistics from a grouped view and the
GroupNorm backward kernel; the 1x1 convs stay convs on channels_last inputs).

    python benchmarks/op_count.py [--models resnet50,densenet121] [--no-models]
"""

from __future__ import annotations

import argparse
import sys

import torch

from ablate.config import ModelConfig, SCConvConfig
from ablate.models import build_model, list_models
from ablate.nn import SCConv
from ablate.nn.efficient_sru import code_path
from ablate.profile import count_ops
from ablate.table import format_table

#: (gate mode, attention) pairs: the two presets' (paper, reference) and the other two gate modes.
GATES = (("binary", "pairwise"), ("reference", "global"), ("soft", "global"), ("ste", "pairwise"))
#: (name, impl, recompute) per SCConv implementation.
IMPLS = (("reference", "reference", "never"), ("efficient keep", "efficient", "never"),
         ("efficient recompute", "efficient", "always"))
PATHS = ("cpu", "gpu")


def step_ops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Operations of one forward + backward of ``model`` on ``x`` (after one untimed step)."""
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.backward(torch.ones_like(out))

    step()
    return sum(count_ops(step).values())


def layer_rows() -> list[list[str]]:
    rows = []
    for gate_mode, attention in GATES:
        counts = {}
        for path in PATHS:
            with code_path(path) as fmt:
                for name, impl, recompute in IMPLS:
                    torch.manual_seed(0)
                    layer = SCConv(64, 64, 1, SCConvConfig(impl=impl, recompute=recompute, gate_mode=gate_mode,
                                                           attention=attention)).to(memory_format=fmt)
                    x = torch.randn(4, 64, 14, 14).contiguous(memory_format=fmt).requires_grad_(True)
                    counts[path, name] = step_ops(layer, x)
        for path in PATHS:
            ref = counts[path, "reference"]
            rows.append([f"{gate_mode} / {attention}", path] +
                        [f"{counts[path, name]} ({counts[path, name] / ref:.2f}x)" if name != "reference" else str(ref)
                         for name, _, _ in IMPLS])
    return rows


def model_rows(backbones: list[str]) -> list[list[str]]:
    rows = []
    for backbone in backbones:
        for path in PATHS:
            with code_path(path) as fmt:
                counts = {}
                for name, order, impl, recompute in (("baseline", "none", "reference", "never"),
                                                     ("reference", "sru_cru", "reference", "never"),
                                                     ("efficient keep", "sru_cru", "efficient", "never"),
                                                     ("efficient recompute", "sru_cru", "efficient", "always")):
                    cfg = ModelConfig(backbone=backbone, num_classes=10,
                                      scconv=SCConvConfig(order=order, impl=impl, recompute=recompute))
                    model = build_model(cfg, seed=0).train().to(memory_format=fmt)
                    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
                    counts[name] = step_ops(model, x)
            base = counts["baseline"]
            rows.append([backbone, path, str(base)] +
                        [f"{n} ({n / base:.2f}x)" for name, n in counts.items() if name != "baseline"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,densenet121", help="comma-separated backbones for the step table")
    p.add_argument("--no-models", action="store_true", help="only the per-layer table")
    args = p.parse_args(argv)
    backbones = [b.strip() for b in args.models.split(",") if b.strip()]
    bad = [b for b in backbones if b not in list_models()]
    if bad:
        print(f"op_count: --models {bad[0]!r} is not a backbone; accepted: {', '.join(list_models())}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    print("operations per forward + backward of one SCConv (64 -> 64 channels); ratio to the reference")
    print(format_table(["gate / attention", "path"] + [name for name, _, _ in IMPLS], layer_rows()))
    if not args.no_models:
        print("\noperations per training step (forward + backward); ratio to the baseline")
        print(format_table(["backbone", "path", "baseline", "reference", "efficient keep", "efficient recompute"],
                    model_rows(backbones)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
