"""Efficient CRU: the attention fuse as one autograd Function, and Y2 never concatenated.

Same parameters, outputs, gradients and probes as ``ablate.nn.cru.CRU`` (the readable definition).
``Y = a * Y1 + b * Y2`` is written in two passes; its backward needs only Y1, the pieces of Y2 and
the (N, C_out) weights, with the softmax backward in closed form. ``Y2 = cat(PWC2(Xlow), Xlow)`` is
kept as its two pieces, each weighed where it lies in the output. Where their weights are small the
1x1 convs run as batched matrix products (``pointwise``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ablate.nn.cru import CRU
from ablate.nn.efficient_sru import Probe


class FuseFunction(torch.autograd.Function):
    """Y = a * Y1 + b * Y2, (a, b) the attention weights of GAP(Y1) and GAP(Y2); Y2 given as channel pieces.
    ``probe``, when given, receives the weights as ``CRU`` keeps them."""

    @staticmethod
    def forward(ctx, mode, probe, y1, *y2_pieces):
        s1 = y1.mean(dim=(2, 3))
        s2 = _cat([p.mean(dim=(2, 3)) for p in y2_pieces])
        a, b = _attention(mode, s1, s2)
        n, c = a.shape
        out = y1 * a.view(n, c, 1, 1)
        for piece, out_piece, b_piece in _pieces(out, b, y2_pieces):
            out_piece.addcmul_(piece, b_piece.reshape(n, -1, 1, 1))
        if probe is not None:
            probe.last_beta = a if mode == "pairwise" else torch.cat([a, b], dim=1)
        ctx.save_for_backward(y1, a, b, *y2_pieces)
        ctx.mode = mode
        return out

    @staticmethod
    def backward(ctx, g):
        y1, a, b, *y2_pieces = ctx.saved_tensors
        split = _pieces(g, b, y2_pieces)
        # dL/d(weight) per (sample, channel) is the sum over H, W of g * Y; GAP's backward then spreads ds / (H * W)
        # over every position, so the mean over H, W is both in one operation.
        da = _channel_mean(g, y1)
        db = _cat([_channel_mean(g_piece, piece) for piece, g_piece, _ in split])
        ds1, ds2 = _attention_backward(ctx.mode, a, b, da, db)
        grads = [_input_grad(g, a, ds1, y1)]
        start = 0
        for piece, g_piece, b_piece in split:
            stop = start + piece.shape[1]
            grads.append(_input_grad(g_piece, b_piece, ds2[:, start:stop], piece))
            start = stop
        return (None, None, *grads)


def _cat(parts: list[Tensor]) -> Tensor:
    """Concatenate along channels; a single part as it is (``cat`` would copy it)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _attention(mode: str, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """Fuse weights (a, b), each (N, C_out): ``CRU.attention``'s softmax."""
    if mode == "pairwise":
        # A softmax over two values is a sigmoid of their difference: two operations instead of five.
        a = torch.sigmoid(s1 - s2)
        return a, 1 - a
    weights = torch.softmax(torch.cat([s1, s2], dim=1), dim=1)
    return weights[:, : s1.shape[1]], weights[:, s1.shape[1] :]


def _attention_backward(mode: str, a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax backward, ds = w * (dw - sum(w * dw)) over the softmax's axis."""
    if mode == "pairwise":
        # With b = 1 - a: ds1 = a * b * (da - db) = -ds2.
        ds1 = (da - db).mul_(a * b)
        return ds1, -ds1
    w, dw = torch.cat([a, b], dim=1), torch.cat([da, db], dim=1)
    ds = w * (dw - (w * dw).sum(dim=1, keepdim=True))
    return ds[:, : a.shape[1]], ds[:, a.shape[1] :]


def _channel_mean(g: Tensor, y: Tensor) -> Tensor:
    """Mean over H, W of g * y, per (sample, channel)."""
    return (g * y).mean(dim=(2, 3))


def _input_grad(g: Tensor, weight: Tensor, pooled: Tensor, like: Tensor) -> Tensor:
    """g * weight + pooled, both (N, C) broadcast over H, W; laid out and typed like the input ``like``."""
    n, c = weight.shape
    return torch.addcmul(pooled.view(n, c, 1, 1), g, weight.reshape(n, c, 1, 1)).to(like.dtype)


def _pieces(t: Tensor, weights: Tensor, pieces) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(piece, the channel slice of ``t`` it sits in, its slice of ``weights``) for each piece of Y2."""
    out, start = [], 0
    for piece in pieces:
        stop = start + piece.shape[1]
        out.append((piece, t[:, start:stop], weights[:, start:stop]))
        start = stop
    return out


#: ``pointwise`` runs a 1x1 conv as a batched matrix product when its weight has at most this many
#: elements. Forward + backward, 2 threads, batch 16 (benchmarks/README.md): oneDNN's 1x1 conv costs a
#: fixed ~0.14 ms forward and ~0.26 ms backward per call, and its backward is slow for few channels; the
#: product takes 0.34-0.90x of the conv's time from 3x3 to 56x56 maps with weights up to 128 x 64. Its
#: backward sums one weight gradient per sample, so with larger weights on small maps it loses (256 x 128
#: at 4x4: 1.24x; 512 x 256: 1.71x).
POINTWISE_BMM_MAX_WEIGHT = 8192


def pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)``; for a 1x1 conv, as one matrix product per sample,
    ``weight @ x.view(N, C, H * W)``, where ``pointwise_as_bmm`` says so, else as the conv. Same function;
    the sums may round differently."""
    if not pointwise_as_bmm(conv, x):
        return conv(x)
    n, c, h, w = x.shape
    weight = conv.weight.reshape(1, conv.out_channels, c).expand(n, -1, -1)
    return torch.bmm(weight, x.view(n, c, h * w)).view(n, -1, h, w)


def pointwise_as_bmm(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``pointwise`` runs ``conv(x)`` as a batched matrix product: a plain 1x1 conv (stride 1, no
    padding, groups or bias) with a small weight, and each map's rows following one another in ``x`` (NCHW
    or a channel slice of it; not channels_last)."""
    plain = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
    plain = plain and conv.groups == 1 and conv.bias is None
    small = conv.weight.numel() <= POINTWISE_BMM_MAX_WEIGHT
    return plain and small and x.stride(3) == 1 and x.stride(2) == x.shape[3]


class EfficientCRU(CRU):
    """The CRU with ``FuseFunction``; same parameters, outputs, gradients and probes as ``CRU``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_split(*self.split(x))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The upper and lower inputs (views of ``x``)."""
        return tuple(torch.split(x, [self.up, self.low], dim=1))

    def forward_split(self, x_up: Tensor, x_low: Tensor) -> Tensor:
        """The CRU of its upper and lower inputs given as separate tensors."""
        return self.from_squeezed(*self.squeezed(x_up, x_low))

    def squeezed(self, x_up: Tensor, x_low: Tensor) -> tuple[Tensor, Tensor]:
        """The squeezed upper and lower inputs."""
        return pointwise(self.squeeze1, x_up), pointwise(self.squeeze2, x_low)

    def from_squeezed(self, x_up: Tensor, x_low: Tensor) -> Tensor:
        """The CRU given its squeezed inputs: Y1 = GWC + PWC1 of the upper, Y2 from the lower, and the fuse."""
        # In place: a conv's backward does not need its output.
        y1 = self.gwc(x_up).add_(pointwise(self.pwc1, x_up))
        pieces = (x_low[:, : self.out_channels],) if self.pwc2 is None else (pointwise(self.pwc2, x_low), x_low)
        probe = Probe() if self.keep_stats else None
        out = FuseFunction.apply(self.attention_mode, probe, y1, *pieces)
        if probe is not None:
            self.last_beta = probe.last_beta.detach()
        return out
