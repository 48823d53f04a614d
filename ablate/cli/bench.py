"""`ablate bench`: train-step time and peak memory of the baseline, reference and efficient SCConv."""

from __future__ import annotations

import argparse
import json
import sys

from ablate.bench import DEVICES, IMPLS, BenchConfig, BenchError, format_table, run_bench
from ablate.cli.common import EXIT_FAILURE, choices_type

FORMATS = ("table", "json")


def register(sub) -> None:
    """Add the ``bench`` command to the ``ablate`` parser."""
    p = sub.add_parser(
        "bench", help="train-step time, peak memory and saved activations: baseline vs reference vs efficient SCConv",
        description="Time training steps (forward, backward, SGD) of the baseline (order none) and of SCConv "
                    "(order sru_cru) in its reference and efficient implementations, each in its own "
                    "subprocess, in interleaved rounds. Step time: median over timed steps; peak memory: the "
                    "CUDA allocator's peak, or on CPU the peak resident set during the timed steps (max over "
                    "rounds); saved activations: what autograd keeps from a forward for its backward "
                    "(parameters and runtime left out, the same measure eager and compiled); ratios against "
                    "the baseline, with the MAC ratio beside them.")
    p.add_argument("--backbone", required=True, help="resnet20, resnet56, resnet50, densenet121")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--image-size", type=int, default=112, help="input side in pixels (default 112)")
    p.add_argument("--device", type=choices_type("device", DEVICES), default="auto",
                   help="auto (default: CUDA when available), cpu or cuda")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor, CPU or CUDA); the warm-up's compile time is its own "
                        "column, never in the step time (on a CPU a compile takes minutes)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="on CUDA keep NCHW (default: channels_last, as training does)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    p.add_argument("--impls", type=_impls_type, default=tuple(IMPLS),
                   help="comma list of baseline, reference, efficient (default: all three)")
    p.add_argument("--recompute", type=_recompute_type, default=("auto",),
                   help="the efficient SCConv's scconv.recompute, or a comma list for one efficient row each in "
                        "the same rounds: auto (default: each round plans what each layer recomputes in "
                        "backward from measured cost; the recomputed column counts bodies+SRUs/layers), "
                        "size (bodies of inputs >= 1 MiB), always (bodies), never, sru (the SRU and the CRU's squeezes)")
    p.add_argument("--format", type=choices_type("format", FORMATS), default="table", help="table or json")
    p.set_defaults(func=cmd_bench)


def _recompute_type(value: str) -> tuple[str, ...]:
    """The comma list as a tuple; BenchConfig checks the policies and names the bad value."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _impls_type(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in IMPLS]
    if bad or "baseline" not in names:
        raise argparse.ArgumentTypeError(
            f"impls={value!r} is not valid; accepted: a comma list of {', '.join(IMPLS)} including baseline")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print its rows; 1 when a measuring run failed."""
    cfg = BenchConfig(backbone=args.backbone, batch_size=args.batch_size, image_size=args.image_size,
                      device=args.device, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                      amp=args.amp, compile=args.compile, channels_last=args.channels_last,
                      threads=args.threads, impls=args.impls, recompute=args.recompute)
    try:
        rows = run_bench(cfg, progress=sys.stderr)
    except BenchError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(rows, indent=2) if args.format == "json" else format_table(rows))
    return 0
