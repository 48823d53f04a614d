"""Where a training step's time goes: the operations of the baseline and the SCConv step side by side.

``ablate bench`` says how long a step takes; this says on what. For each implementation it builds
``ablate bench``'s training step on the CPU (``ablate.bench.training_step``), runs ``--warmup``
steps (with ``--compile``: inductor compiles in the first), then profiles ``--steps`` more with
``torch.profiler`` and prints the self CPU time per step of the operations that cost most, one column per
implementation, and the convolution work (convs, their backward, and the CRU's 1x1 convs run as batched
products) apart from the rest.

    python benchmarks/step_profile.py [--backbone densenet121] [--impls baseline,efficient] [--compile]
                                      [--recompute never] [--threads 2] [--top 20]

The implementations run one after the other in this process, not interleaved: a profile for finding
where the time is, not a time ratio (``ablate bench`` measures those). The profiler's own cost inflates
every figure, most for the step with more operations. With ``--compile`` the generated kernels show as
``graph_..._cpp_fused_...`` (inductor's kernel profiling is switched on, which changes the generated code,
so the first compilation misses inductor's cache) and the convs and matrix products as the ATen calls
they stay.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ablate.bench import IMPLS, BenchConfig, training_step
from ablate.errors import ConfigError, check
from ablate.table import format_table

#: The ATen operations that are convolution work: what SCConv saves MACs on.
CONV_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::bmm", "aten::_convolution",
            "aten::cudnn_convolution", "aten::convolution_overrideable")


def profile_step(cfg: BenchConfig, impl: str, policy: str) -> dict[str, float]:
    """Self CPU ms per step of every operation of ``impl``'s training step (``ablate bench``'s), by name."""
    _, _, _, step = training_step(cfg, impl, policy)
    for _ in range(cfg.warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(cfg.steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / cfg.steps for e in prof.key_averages()}


def summary_rows(profiles: dict[str, dict[str, float]], top: int) -> list[list[str]]:
    """The ``top`` costliest operations (by their largest cost over the implementations), then the
    convolution work, the rest and the total, in ms per step."""
    names = sorted({n for p in profiles.values() for n in p}, key=lambda n: -max(p.get(n, 0.0) for p in profiles.values()))
    rows = [[n[:60]] + [f"{p.get(n, 0.0):.1f}" for p in profiles.values()] for n in names[:top]]
    conv = {impl: sum(p.get(n, 0.0) for n in CONV_OPS) for impl, p in profiles.items()}
    total = {impl: sum(p.values()) for impl, p in profiles.items()}
    rows.append(["convolution work (convs, backward, bmm)"] + [f"{conv[i]:.1f}" for i in profiles])
    rows.append(["everything else"] + [f"{total[i] - conv[i]:.1f}" for i in profiles])
    rows.append(["total self CPU"] + [f"{total[i]:.1f}" for i in profiles])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="densenet121", help="registered backbone (default densenet121)")
    p.add_argument("--impls", default="baseline,efficient", help="comma-separated, among " + ", ".join(IMPLS))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor); minutes on a CPU")
    p.add_argument("--recompute", default="never", help="the efficient SCConv's scconv.recompute (default never)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (default 3)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--top", type=int, default=20, help="operations listed (default 20)")
    args = p.parse_args(argv)
    impls = tuple(dict.fromkeys(i.strip() for i in args.impls.split(",") if i.strip()))
    try:
        check("impls", args.impls, bool(impls), "names among " + ", ".join(IMPLS))
        cfg = BenchConfig(backbone=args.backbone, batch_size=args.batch_size, image_size=args.image_size, device="cpu",
                          steps=args.steps, warmup=args.warmup, compile=args.compile, threads=args.threads,
                          impls=("baseline", *impls) if "baseline" not in impls else impls,  # checks the names
                          recompute=(args.recompute,)).resolved()  # resolved: checks the backbone
        check("top", args.top, args.top >= 1, "an integer >= 1")
    except ConfigError as e:
        print(f"step_profile: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name the generated kernels in the profile
    profiles = {}
    for impl in impls:
        print(f"step_profile: {args.backbone} {impl}{', compiling first' if args.compile else ''}", file=sys.stderr)
        profiles[impl] = profile_step(cfg, impl, args.recompute)
    print(f"{args.backbone}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
          f"{'compiled' if args.compile else 'eager'}, recompute {args.recompute}: self CPU ms per training step")
    print(format_table(["operation", *profiles], summary_rows(profiles, args.top), right_from=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
