"""Where a training step's time goes: the operations of the baseline and the SCConv step side by side.

``ablate bench`` says how long a step takes; this says on what. For each implementation it builds the
model as ``ablate bench`` does (batch, image size, 1000 classes, SGD with momentum), runs ``--warmup``
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

from ablate.bench import IMPLS
from ablate.config import RECOMPUTE_POLICIES, ModelConfig, SCConvConfig
from ablate.models import build_model, list_models
from ablate.table import format_table

#: The ATen operations that are convolution work: what SCConv saves MACs on.
CONV_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::bmm", "aten::_convolution",
            "aten::cudnn_convolution", "aten::convolution_overrideable")


def profile_step(backbone: str, impl: str, *, compile: bool = False, recompute: str = "never",
                 batch_size: int = 16, image_size: int = 112, warmup: int = 3, steps: int = 3) -> dict[str, float]:
    """Self CPU ms per step of every operation of ``impl``'s training step, by name."""
    order, impl_name = IMPLS[impl]
    cfg = ModelConfig(backbone=backbone, num_classes=1000,
                      scconv=SCConvConfig(order=order, impl=impl_name, recompute=recompute))
    model = build_model(cfg, seed=0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_model = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    y = torch.randint(0, 1000, (batch_size,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(step_model(x), y).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


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
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    problems = [f"--backbone {args.backbone!r} is not a backbone; accepted: {', '.join(list_models())}"
                ] if args.backbone not in list_models() else []
    problems += [f"--impls {i!r} is not an implementation; accepted: {', '.join(IMPLS)}" for i in impls if i not in IMPLS]
    if not impls:
        problems.append(f"--impls {args.impls!r} names no implementation; accepted: {', '.join(IMPLS)}")
    if args.recompute not in RECOMPUTE_POLICIES:
        problems.append(f"--recompute {args.recompute!r} is not a policy; accepted: {', '.join(RECOMPUTE_POLICIES)}")
    for name in ("batch_size", "image_size", "threads", "steps", "top"):
        if getattr(args, name) < (32 if name == "image_size" else 1):
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} is too small; accepted: an integer "
                            f">= {32 if name == 'image_size' else 1}")
    if args.warmup < (1 if args.compile else 0):
        problems.append(f"--warmup {args.warmup} is too small; accepted: an integer >= {1 if args.compile else 0}")
    if problems:
        print(f"step_profile: {problems[0]}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name the generated kernels in the profile
    profiles = {}
    for impl in impls:
        print(f"step_profile: {args.backbone} {impl}{', compiling first' if args.compile else ''}", file=sys.stderr)
        profiles[impl] = profile_step(args.backbone, impl, compile=args.compile, recompute=args.recompute,
                                      batch_size=args.batch_size, image_size=args.image_size,
                                      warmup=args.warmup, steps=args.steps)
    print(f"{args.backbone}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
          f"{'compiled' if args.compile else 'eager'}, recompute {args.recompute}: self CPU ms per training step")
    print(format_table(["operation", *profiles], summary_rows(profiles, args.top), right_from=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
