"""Whether ``torch.compile`` gives a model's efficient SCConvs the function they have in eager mode, on this device.

On an H200 (torch 2.11), inductor gave one efficient SCConv a wrong input gradient, off by its whole norm,
while the output and the parameter gradients were right; every case passes on the CPU (benchmarks/README.md,
"GPU check"). So before a compiled training run on CUDA trusts its gradients, it checks: each distinct efficient
SCConv of the model (its configuration, and whether it keeps its input's channel count), kept and recomputed,
compiled the way training compiles, against the same layer in eager mode (which tests/test_efficient.py and
``benchmarks/equivalence.py`` hold to the reference), on a small input on the training device, in float32.

A case passes when every relative error (output, input gradient, each parameter gradient) is at most
``BOUND``: the failure seen was 1.0, while TF32 convolutions on a GPU differ from float32 by about 1e-3.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ablate.nn.scconv import CONV_ORDERS, SCConv

#: The largest relative error a compiled case may have.
BOUND = 1e-2
#: Side and batch of the check's input: small, so that the check costs its compilations and not its arithmetic.
SIDE, BATCH = 8, 2


@dataclass(frozen=True)
class CaseResult:
    """One compiled case: its name and the relative error of each quantity (``inf`` for a missing gradient)."""

    name: str
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, float]:
        """The quantity with the largest error (a NaN counts as the largest)."""
        return max(self.errors.items(), key=lambda kv: math.inf if math.isnan(kv[1]) else kv[1])

    @property
    def passed(self) -> bool:
        return all(e <= BOUND for e in self.errors.values())  # a NaN fails

    def describe(self) -> str:
        quantity, error = self.worst
        return f"{self.name}: {quantity} off by {error:.1e} of its norm"


def cases(model: nn.Module) -> list[tuple[str, SCConv, bool]]:
    """(name, layer, recompute) for each distinct efficient SCConv of ``model``, kept and (orders with a CRU,
    unless its policy is ``never``) recomputed; the first layer of each kind stands for the rest."""
    seen, out = set(), []
    for name, module in model.named_modules():
        if not isinstance(module, SCConv) or module.config.impl != "efficient":
            continue
        kind = (module.config, module.in_channels == module.out_channels)
        if kind in seen:
            continue
        seen.add(kind)
        out.append((f"{name} ({module.order}) kept", module, False))
        if module.order not in CONV_ORDERS and module.config.recompute != "never":
            out.append((f"{name} ({module.order}) recomputed", module, True))
    return out


def forward_backward(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, call: Callable | None = None,
                     amp: bool = False) -> list:
    """Output, input gradient and parameter gradients (None where autograd gives none) of one step of ``call``
    (default: ``layer`` itself) on a leaf copy of ``x``, under bf16 autocast with ``amp``."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        y = (layer if call is None else call)(x)
    y.backward(upstream.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """|got - want| / |want| in float64 (the absolute difference where ``want`` is zero); 0 where both are None,
    ``inf`` where one is."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else math.inf
    got, want = got.double(), want.double()
    norm = float(want.norm())
    diff = float((got - want).norm())
    return diff / norm if norm > 0 else diff


def check_case(layer: SCConv, recompute: bool, device: torch.device, channels_last: bool,
               compile_fn: Callable | None = None, name: str = "") -> CaseResult:
    """Compile a copy of ``layer`` with ``compile_fn`` (default ``torch.compile``) and compare one forward + backward
    with another copy in eager mode, both on ``device`` and recomputing (or keeping) as told.

    Resets dynamo's caches first: the copies share their classes' code, and past dynamo's recompile limit a
    compiled call would quietly run eager and pass. Run it before the model's own compiled step."""
    torch._dynamo.reset()
    eager = copy.deepcopy(layer).to(device=device, dtype=torch.float32).train()
    eager.config = replace(eager.config, recompute="auto")  # so that planned_recompute decides
    eager.planned_recompute = "body" if recompute else "keep"
    compiled_layer = copy.deepcopy(eager)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, layer.in_channels, SIDE, SIDE, generator=generator).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        shape = eager(x).shape
    upstream = torch.randn(shape, generator=generator).to(device)
    want = forward_backward(eager, x, upstream)
    got = forward_backward(compiled_layer, x, upstream, (compile_fn or torch.compile)(compiled_layer))
    names = ["output", "input gradient"] + [f"gradient of {n}" for n, _ in compiled_layer.named_parameters()]
    return CaseResult(name, {n: relative_error(g, w) for n, g, w in zip(names, got, want)})


def check_compiled_scconvs(model: nn.Module, device: torch.device, channels_last: bool,
                           compile_fn: Callable | None = None) -> list[CaseResult]:
    """Every case of ``cases(model)``, checked on ``device``; the model itself is left untouched."""
    return [check_case(layer, recompute, device, channels_last, compile_fn, name)
            for name, layer, recompute in cases(model)]


def main(argv: list[str] | None = None) -> int:
    """``python -m ablate.nn.compile_check``: the check a compiled training run makes, for one backbone's SCConvs."""
    import argparse
    import sys

    from ablate.config import ConfigError, ModelConfig, SCConvConfig
    from ablate.models import build_model, list_models

    p = argparse.ArgumentParser(description="Check torch.compile'd efficient SCConvs against eager mode on a device "
                                            "(what compiled training on CUDA checks before its first step).")
    p.add_argument("--backbone", default="resnet50", help=f"one of {', '.join(list_models())} (default resnet50)")
    p.add_argument("--order", default="sru_cru", help="scconv.order (default sru_cru)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--nchw", action="store_true", help="NCHW inputs (default: channels_last, as CUDA training)")
    args = p.parse_args(argv)
    if args.backbone not in list_models():
        print(f"compile_check: --backbone {args.backbone!r} is not a backbone; accepted: {', '.join(list_models())}",
              file=sys.stderr)
        return 2
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        print(f"compile_check: --device {args.device!r} is not available here; accepted: cpu"
              + (", cuda" if torch.cuda.is_available() else ""), file=sys.stderr)
        return 2
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.backend not in backends:
        print(f"compile_check: --backend {args.backend!r} is not a torch.compile backend; accepted: "
              f"{', '.join(backends)}", file=sys.stderr)
        return 2
    try:
        model = build_model(ModelConfig(backbone=args.backbone, scconv=SCConvConfig(order=args.order,
                                                                                    impl="efficient")), seed=0)
    except ConfigError as exc:
        print(f"compile_check: {exc}", file=sys.stderr)
        return 2
    if not cases(model):
        print(f"compile_check: --order {args.order!r} leaves no efficient SCConv to check; accepted: an order with an "
              "SRU or a CRU", file=sys.stderr)
        return 2
    results = check_compiled_scconvs(model, torch.device(args.device), not args.nchw,
                                     lambda m: torch.compile(m, backend=args.backend))
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.describe()}", flush=True)
    print(f"{sum(r.passed for r in results)} of {len(results)} cases within {BOUND:g}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
