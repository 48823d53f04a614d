"""Efficient SCConv (``SCConvConfig.impl = "efficient"``): the reference's function, far less memory.

The reference code (sru.py, cru.py, scconv.py) stays the readable definition. The efficient
implementation has the same submodules, parameters and state-dict keys and computes the same
outputs and gradients (tests/test_efficient.py). What it changes, each measured (benchmarks/README.md):

- ``EfficientSRU`` (efficient_sru.py): one autograd Function that keeps only its input.
- ``EfficientCRU`` (efficient_cru.py): the attention fuse as one Function; Y2 is never concatenated;
  1x1 convs with small weights as batched matrix products.
- ``sru_cru`` with ``alpha = 1/2``: the SRU's output halves are exactly the CRU's two inputs, so
  they are written as two tensors: no concatenation and no copies of split views for the convs.
- Orders with a CRU can keep only the SCConv's input and rerun the body in backward (the CRU costs
  about a fifth of the replaced conv's MACs). Without it an SCConv keeps several times the
  activations of the conv it replaces. Which layers do is ``SCConvConfig.recompute``: by default
  planned per layer from measured cost (``ablate.nn.recompute_plan``), else inputs >= 1 MiB.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ablate.nn.efficient_cru import EfficientCRU, FuseFunction
from ablate.nn.efficient_sru import EfficientSRU, SRUFunction

__all__ = [
    "EfficientCRU", "EfficientSRU", "FuseFunction", "RECOMPUTE_MIN_BYTES", "SRUFunction", "recompute", "sru_cru",
]

#: The ``size`` policy (and ``auto`` before a plan): inputs at least this large (bytes, whole batch) are
#: recomputed in backward rather than kept. Below it the saved tensors are small and the rerun's fixed
#: per-operation cost dominates (measured on CPU: DenseNet-121's 7x7 and 3x3 layers at batch 16 run 1.5x
#: faster without it).
RECOMPUTE_MIN_BYTES = 1 << 20


def sru_cru(sru, cru, x: Tensor) -> Tensor:
    """CRU(SRU(x)); with ``alpha = 1/2`` the SRU's output halves go to the CRU as its two inputs."""
    if cru.up == cru.low:
        return cru.forward_split(*sru.forward_halves(x))
    return cru(sru(x))


def recompute(
    body: Callable[[Tensor], Tensor], x: Tensor, params: Iterable[Tensor], choice: bool | None = None
) -> Tensor:
    """``body(x)``, keeping only ``x`` for backward and rerunning the body there when ``choice`` is True (None:
    when the input has at least RECOMPUTE_MIN_BYTES); ``params``: the body's parameters. The outputs and
    gradients are the same bit for bit either way."""
    params = [p for p in params if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
    if choice is None:
        choice = x.numel() * x.element_size() >= RECOMPUTE_MIN_BYTES
    if not needs_grad or not choice:
        return body(x)
    if torch.compiler.is_compiling():
        # The traceable form; the compiler then decides what of the body to recompute.
        return checkpoint(body, x, use_reentrant=False)
    device_type = x.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return _Recomputed.apply(body, autocast, x, *params)


class _Recomputed(torch.autograd.Function):
    """Runs the SCConv body without a graph, keeps only its input, and reruns it with a graph in backward.

    Cheaper than ``torch.utils.checkpoint``: no saved-tensor hooks, and the first run builds no graph.
    """

    @staticmethod
    def forward(ctx, body, autocast, x, *params):
        ctx.body, ctx.autocast = body, autocast
        ctx.save_for_backward(x, *params)
        return body(x)

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[2])
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out = ctx.body(x)
        inputs = [x, *params] if x.requires_grad else params
        grads = list(torch.autograd.grad(out, inputs, g, allow_unused=True))
        dx = grads.pop(0) if x.requires_grad else None
        return (None, None, dx, *grads)
