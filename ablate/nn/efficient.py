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
  activations of the conv it replaces. ``sru_cru`` can instead rerun only the SRU and the CRU's
  squeezes (element-wise work and two 1x1 convs), so that neither the SRU's output nor the squeezed
  inputs are kept (``recompute_sru``). Which layers do which is ``SCConvConfig.recompute``: by default
  planned per layer from measured cost (``ablate.nn.recompute_plan``), else whole bodies of inputs >= 1 MiB.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ablate.nn.efficient_cru import EfficientCRU, FuseFunction
from ablate.nn.efficient_sru import EfficientSRU, SRUFunction

__all__ = [
    "EfficientCRU", "EfficientSRU", "FuseFunction", "RECOMPUTE_MIN_BYTES", "SRUFunction", "recompute",
    "recomputed_placeholders", "sru_cru",
]

#: The ``size`` policy (and ``auto`` before a plan): inputs at least this large (bytes, whole batch) are
#: recomputed in backward rather than kept. Below it the saved tensors are small and the rerun's fixed
#: per-operation cost dominates (measured on CPU: DenseNet-121's 7x7 and 3x3 layers at batch 16 run 1.5x
#: faster without it).
RECOMPUTE_MIN_BYTES = 1 << 20


def sru_cru(sru, cru, x: Tensor, recompute_sru: bool = False) -> Tensor:
    """CRU(SRU(x)); with ``alpha = 1/2`` the SRU's output halves go to the CRU as its two inputs.

    ``recompute_sru``: keep neither the SRU's output nor the CRU's squeezed inputs for backward (the
    squeezes keep the former, the GWC, PWC1 and fuse the latter); backward recomputes them from ``x``, which
    the SRU keeps anyway, once for all. The SRU's output is the size of ``x``, the squeezed inputs half of
    it, and recomputing them is the SRU's element-wise forward and two 1x1 convs, where rerunning the whole
    body also reruns the grouped 3x3 conv and the fuse, with a graph. What stays kept is Y1 (the GWC and
    PWC1's sum, for the fuse's backward). Eager only: under ``torch.compile`` the compiler chooses.
    """
    halved = cru.up == cru.low

    def cru_inputs(out: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        return out if halved else cru.split(out[0])

    out = sru.forward_halves(x) if halved else (sru(x),)
    if not (recompute_sru and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return cru.forward_split(*cru_inputs(out))
    state = _autocast_state(x)

    def again() -> tuple[Tensor, ...]:
        with _autocast(state), torch.no_grad():
            fresh = sru.output_again(x, halved)
            return fresh + cru.squeezed(*cru_inputs(fresh))

    recomputed = _RecomputedInBackward(again)
    with recomputed.hooks(out):
        squeezed = cru.squeezed(*cru_inputs(out))
    with recomputed.hooks(out + squeezed):
        return cru.from_squeezed(*squeezed)


def _autocast_state(x: Tensor) -> tuple[str, bool, torch.dtype]:
    """The autocast in force for ``x``'s device, to rerun a forward in backward under the same."""
    device_type = x.device.type
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(state: tuple[str, bool, torch.dtype]) -> torch.autocast:
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


_placeholders = threading.local()


@contextmanager
def recomputed_placeholders() -> Iterator[None]:
    """While active, a saved tensor that ``sru_cru(recompute_sru=True)`` recomputes in backward reads as a
    placeholder on the ``meta`` device (its shape and dtype, no data) instead of being recomputed: so that
    counting what autograd keeps (``ablate.profile.saved_activation_bytes``) counts what it keeps, not what
    backward will rebuild."""
    before = getattr(_placeholders, "active", False)
    _placeholders.active = True
    try:
        yield
    finally:
        _placeholders.active = before


class _RecomputedInBackward:
    """Saved-tensor hooks under which a tensor saved for backward that lies in the storage of one of the
    tensors given to ``hooks`` is not kept: the backward gets the same view of the matching tensor of
    ``again()`` (the same tensors in the same order, recomputed), computed once for all of them and dropped
    after the last (again if a retained graph runs backward once more). Other saved tensors pass through.
    Nothing here holds a reference to the tensors given."""

    def __init__(self, again: Callable[[], tuple[Tensor, ...]]) -> None:
        self.again = again
        self.packed = 0
        self.cache: tuple[Tensor, ...] | None = None
        self.left = 0

    def hooks(self, kept: tuple[Tensor, ...]) -> torch.autograd.graph.saved_tensors_hooks:
        index = {t.untyped_storage().data_ptr(): i for i, t in enumerate(kept) if t.numel()}

        def pack(t: Tensor):
            i = index.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided and t.numel() else None
            if i is None:
                return t
            self.packed += 1
            return i, t.shape, t.stride(), t.storage_offset(), t.dtype

        return torch.autograd.graph.saved_tensors_hooks(pack, self._unpack)

    def _unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        i, shape, stride, offset, dtype = packed
        if getattr(_placeholders, "active", False):
            return torch.empty(shape, dtype=dtype, device="meta")
        if self.cache is None:
            self.cache, self.left = self.again(), self.packed
        out = self.cache[i].as_strided(shape, stride, offset)
        self.left -= 1
        if self.left == 0:
            self.cache = None
        return out


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
    return _Recomputed.apply(body, _autocast_state(x), x, *params)


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
        with torch.enable_grad(), _autocast(ctx.autocast):
            out = ctx.body(x)
        inputs = [x, *params] if x.requires_grad else params
        grads = list(torch.autograd.grad(out, inputs, g, allow_unused=True))
        dx = grads.pop(0) if x.requires_grad else None
        return (None, None, dx, *grads)
