"""Efficient SCConv (``SCConvConfig.impl = "efficient"``): the reference's function, far less memory.

The reference code (sru.py, cru.py, scconv.py) stays the readable definition. The efficient
implementation has the same submodules, parameters and state-dict keys and computes the same
outputs and gradients (tests/test_efficient.py). What it changes, each measured (benchmarks/README.md):

- ``EfficientSRU`` (efficient_sru.py): one autograd Function that keeps only its input.
- ``EfficientCRU`` (efficient_cru.py): the attention fuse as one Function; Y2 is never concatenated.
- ``sru_cru`` with ``alpha = 1/2``: the SRU's output halves are exactly the CRU's two inputs, so
  they are written as two tensors: no concatenation and no copies of split views for the convs.
- Orders with a CRU, on large inputs, keep only the SCConv's input and rerun the body in backward
  (the CRU costs about a fifth of the replaced conv's MACs). Without it an SCConv keeps several
  times the activations of the conv it replaces, which is where the study's extra memory went.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ablate.nn.efficient_cru import EfficientCRU, FuseFunction
from ablate.nn.efficient_sru import EfficientSRU, SRUFunction

__all__ = ["EfficientCRU", "EfficientSRU", "FuseFunction", "RECOMPUTE_MIN_BYTES", "SRUFunction", "scconv_forward"]

#: Inputs at least this large (bytes, whole batch) are recomputed in backward rather than kept.
#: Below it the saved tensors are small and the rerun's fixed per-operation cost dominates
#: (measured on CPU: DenseNet-121's 7x7 and 3x3 layers at batch 16 run 1.5x faster without it).
RECOMPUTE_MIN_BYTES = 1 << 20


def scconv_forward(module, x: Tensor) -> Tensor:
    """Forward of an efficient ``SCConv`` (any order)."""
    if module.order == "none":
        return module.conv(x)
    if module.order == "sru":
        return module.conv(module.sru(x))
    params = [p for p in module.parameters() if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
    if not needs_grad or x.numel() * x.element_size() < RECOMPUTE_MIN_BYTES:
        return _body(module, x)
    if torch.compiler.is_compiling():
        # The traceable form; the compiler then decides what of the body to recompute.
        return checkpoint(_body, module, x, use_reentrant=False)
    device_type = x.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    return _Recomputed.apply(module, autocast, x, *params)


class _Recomputed(torch.autograd.Function):
    """Runs the SCConv body without a graph, keeps only its input, and reruns it with a graph in backward.

    Cheaper than ``torch.utils.checkpoint``: no saved-tensor hooks, and the first run builds no graph.
    """

    @staticmethod
    def forward(ctx, module, autocast, x, *params):
        ctx.module, ctx.autocast = module, autocast
        ctx.save_for_backward(x, *params)
        return _body(module, x)

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[2])
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out = _body(ctx.module, x)
        inputs = [x, *params] if x.requires_grad else params
        grads = list(torch.autograd.grad(out, inputs, g, allow_unused=True))
        dx = grads.pop(0) if x.requires_grad else None
        return (None, None, dx, *grads)


def _body(module, x: Tensor) -> Tensor:
    """The orders with a CRU, from the (pooled) input."""
    x = module.pool(x)
    order, cru = module.order, module.cru
    if order == "cru":
        return cru(x)
    if order == "sru_cru":
        if cru.up == cru.low:  # the SRU's halves are the CRU's two inputs
            return cru.forward_split(*module.sru.forward_halves(x))
        return cru(module.sru(x))
    if order == "cru_sru":
        return module.sru(cru(x))
    return cru(x) + module.sru(x)  # parallel
