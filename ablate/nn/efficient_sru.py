"""Efficient SRU: one autograd Function that keeps only its input for the backward pass.

Same parameters, outputs, gradients and probes as ``ablate.nn.sru.SRU`` (the readable definition).
GroupNorm and the channel weights fold into one kernel, ``z = GroupNorm(x) * w`` (weight
``gamma * w``, bias ``beta * w``); the gate maps are built in place from ``z`` with exact 0/1
arithmetic and the cross reconstruction writes the output halves directly. Backward recomputes
``z`` from ``x`` (which the ReLU before an SRU keeps anyway; on a GPU's channels_last path from the
forward's per-channel coefficients, in one operation) and applies the GroupNorm backward in closed form
(on CUDA, PyTorch's kernel). The reference keeps about eight full-size tensors per SRU for its backward.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor

from ablate.nn.sru import SRU

_LOW_PRECISION = (torch.float16, torch.bfloat16)


#: Devices whose SRU backward runs PyTorch's GroupNorm backward kernel (on NCHW copies of its inputs) rather
#: than the closed form of ``_group_norm_backward``. On a GPU a training step of SCConvs is bound by the number
#: of kernels it launches (benchmarks/README.md, "GPU check": about 20 us each on an H200), and the closed form
#: is about 17 small operations; the CPU keeps the closed form, which writes into ``dx`` in place.
GROUP_NORM_BACKWARD_KERNEL_DEVICES = ("cuda",)
#: Devices whose ``native_group_norm`` takes channels_last inputs without a copy; elsewhere such inputs are
#: normalised by ``normalised_any_layout``.
GROUP_NORM_ANY_LAYOUT_DEVICES = ("cpu",)


@contextlib.contextmanager
def code_path(path: str) -> Iterator[torch.memory_format]:
    """Within it, take the branches that ``path`` ("gpu": those CUDA takes on channels_last inputs; "cpu": this
    CPU's own) takes, on any device; yields the memory format that path's inputs come in. For counting a GPU's
    operations and testing its branches on a CPU."""
    saved = (GROUP_NORM_ANY_LAYOUT_DEVICES, GROUP_NORM_BACKWARD_KERNEL_DEVICES)
    if path == "gpu":
        _set_devices((), ("cpu", "cuda"))
    try:
        yield torch.channels_last if path == "gpu" else torch.contiguous_format
    finally:
        _set_devices(*saved)


def _set_devices(any_layout: tuple[str, ...], backward_kernel: tuple[str, ...]) -> None:
    global GROUP_NORM_ANY_LAYOUT_DEVICES, GROUP_NORM_BACKWARD_KERNEL_DEVICES
    GROUP_NORM_ANY_LAYOUT_DEVICES, GROUP_NORM_BACKWARD_KERNEL_DEVICES = any_layout, backward_kernel


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last when ``t`` (or the tensor it is a channel slice of) is laid out so, else contiguous."""
    return torch.channels_last if t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1 else torch.contiguous_format


def halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """The two channel halves of ``t`` (views)."""
    return torch.chunk(t, 2, dim=1)


def normalised(x: Tensor, gamma_w: Tensor, beta_w: Tensor, groups: int, eps: float):
    """(z, mean, rstd, coefficients) with z = GroupNorm(x) * w as a new float32-or-wider tensor; mean, rstd
    per (N, G). ``coefficients``: the (a, b) of z = x * a + b where z was computed so (``normalised_any_layout``),
    else None."""
    x = _float(x)
    n, c, h, w = x.shape
    # PyTorch's own kernel (one pass for the statistics, one for z) takes any layout on the CPU, NCHW elsewhere.
    if x.device.type in GROUP_NORM_ANY_LAYOUT_DEVICES or x.is_contiguous():
        x = x.contiguous(memory_format=memory_format(x))
        return *torch.ops.aten.native_group_norm(x, gamma_w, beta_w, n, c, h * w, groups, eps), None
    return normalised_any_layout(x, gamma_w, beta_w, groups, eps)


def normalised_any_layout(x: Tensor, gamma_w: Tensor, beta_w: Tensor, groups: int, eps: float):
    """``normalised`` without a layout copy of x (channels_last on CUDA): each group's moments in one
    reduction over a view of x split into (group, channel in group), then z = x * a + b."""
    var, mean = torch.var_mean(x.unflatten(1, (groups, -1)), dim=(2, 3, 4), correction=0)
    rstd = torch.rsqrt(var.add_(eps))
    a, b = coefficients(mean, rstd, gamma_w, beta_w)
    return torch.addcmul(b, x, a), mean, rstd, (a, b)


def coefficients(mean: Tensor, rstd: Tensor, gamma_w: Tensor, beta_w: Tensor) -> tuple[Tensor, Tensor]:
    """a, b of shape (N, C, 1, 1) with GroupNorm(x) * w = x * a + b."""
    n, groups = mean.shape
    c = gamma_w.shape[0]
    a = per_channel(rstd, gamma_w.view(groups, c // groups))
    b = torch.addcmul(beta_w.view(groups, -1), mean[:, :, None], a, value=-1)
    return a.view(n, c, 1, 1), b.view(n, c, 1, 1)


def per_channel(t: Tensor, weight: Tensor) -> Tensor:
    """(N, G) per-group values times a (G, C/G) per-channel ``weight``, as (N, G, C/G): one broadcast
    product, where repeating the values to (N, C) first would cost a copy (a kernel launch on a GPU)."""
    return t[:, :, None] * weight


def _float(x: Tensor) -> Tensor:
    """``x`` in float32 where it is in a low precision, else as it is: like the reference's GroupNorm under
    autocast, statistics and z in float32, and the reference's W1 * x is float32 under autocast too."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _logit(t: float) -> float:
    return math.log(t) - math.log1p(-t)


def _step(t: Tensor, level: float, out: Tensor | None = None) -> Tensor:
    """1.0 where t > level, else 0.0, in t's dtype (float masks: bool masks are slow on the CPU)."""
    return torch.gt(t, level, out=torch.empty_like(t) if out is None else out)


class SRUFunction(torch.autograd.Function):
    """SRU of ``x`` given ``gamma * w`` and ``beta * w``, returned as its two channel halves (X11 + X22,
    X12 + X21). ``probe``, when given, receives R and the mask."""

    @staticmethod
    def forward(ctx, x, gamma_w, beta_w, groups, eps, gate_mode, threshold, probe):
        xz = _float(x)  # once, for the statistics and the gate alike
        z, mean, rstd, z_coefficients = normalised(xz, gamma_w, beta_w, groups, eps)
        if probe is not None:
            r = torch.sigmoid(z)
            probe.last_r, probe.last_mask = r, r > threshold
        # Where z = x * a + b (the GPU's channels_last path), the statistics and (a, b) are kept, (N, C) values
        # each, so that backward rebuilds z in one operation instead of seven (a kernel launch each on a GPU).
        # The kernel's path keeps x alone: on the CPU the kernel rebuilds z faster than the product.
        stats = () if z_coefficients is None else (mean, rstd, *z_coefficients)
        ctx.save_for_backward(x, gamma_w, beta_w, *stats)
        ctx.gate = (groups, eps, gate_mode, threshold)
        return _reconstruct(xz, *_weighted(xz, z, gate_mode, threshold))

    @staticmethod
    def backward(ctx, g_a, g_b):
        x, gamma_w, beta_w, *stats = ctx.saved_tensors
        groups, eps, gate_mode, threshold = ctx.gate
        xz = _float(x)
        if stats:
            mean, rstd, a, b = stats
            z = torch.addcmul(b, xz, a)  # the forward's z, bit for bit
        else:
            z, mean, rstd, _ = normalised(xz, gamma_w, beta_w, groups, eps)
        dx, dz = _gate_backward(xz, z, g_a, g_b, gate_mode, threshold)
        d_gamma_w = d_beta_w = None
        if dz is not None and x.device.type in GROUP_NORM_BACKWARD_KERNEL_DEVICES:
            n, c, h, w = xz.shape
            dx_norm, d_gamma_w, d_beta_w = torch.ops.aten.native_group_norm_backward(
                dz.contiguous(), xz.contiguous(), mean, rstd, gamma_w, n, c, h * w, groups, [True, True, True])
            dx.add_(dx_norm)
        elif dz is not None:  # the binary gate passes nothing to the GroupNorm
            d_gamma_w, d_beta_w = _group_norm_backward(xz, dz, dx, mean, rstd, gamma_w, groups)
        return _as(dx, x.dtype), d_gamma_w, d_beta_w, None, None, None, None, None


def _weighted(x: Tensor, z: Tensor, gate_mode: str, threshold: float) -> tuple[Tensor, Tensor | None]:
    """(W1 * x, W2 * x) from z, where R = sigmoid(z); z's buffer is reused. None stands for x - W1 * x."""
    if gate_mode in ("binary", "ste"):
        # R > t exactly when z > logit(t), so the hard gates' forward needs no sigmoid.
        return _step(z, _logit(threshold), out=z).mul_(x), None
    r = z.sigmoid_()
    if gate_mode == "soft":
        return r.mul_(x), None
    # reference: W1 = where(R > t, 1, R) = max(R, H) and W2 = where(R > t, 0, R) = R - R * H, H = 1[R > t].
    h = _step(r, threshold)
    v = torch.maximum(r, h).mul_(x)
    rx = r.mul_(x)
    return v, rx.addcmul_(rx, h, value=-1)


def _reconstruct(x: Tensor, v: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
    """(X11 + X22, X12 + X21) with X1 = v and X2 = w (None: x - v, never materialised)."""
    (x_a, x_b), (v_a, v_b) = halves(x), halves(v)
    if w is None:
        # x - v is exact for a 0/1 gate, so each half is the same single sum as the reference's.
        return torch.sub(x_b, v_b).add_(v_a), torch.sub(x_a, v_a).add_(v_b)
    w_a, w_b = halves(w)
    return v_a + w_b, v_b + w_a


def _gate_backward(x, z, g_a, g_b, gate_mode, threshold):
    """(dL/dx through the gate's weights, dL/dz or None) from the output halves' gradients; z's buffer is reused.

    The output is W1 * x + swap(W2 * x), swap exchanging the channel halves, so
    dL/dx = W1 * g + W2 * swap(g) and dL/dR = x * (W1' * g + W2' * swap(g)).
    """
    (x_a, x_b), pairs = halves(x), ((g_a, g_b), (g_b, g_a))  # (g, swap(g)) per half
    # Each result's halves are written straight into one tensor (``_joined``): no concatenation copy.
    dtype = torch.promote_types(x.dtype, g_a.dtype)
    if gate_mode in ("binary", "ste"):
        h = _step(z, _logit(threshold), out=z if gate_mode == "binary" else None)
        # W1 * g + (1 - W1) * swap(g), as two exact products.
        def hard(g, gs, h_h):
            return lambda out: torch.addcmul(gs, h_h, gs, value=-1, out=out).addcmul_(h_h, g)

        dx = _joined(x_a, dtype, *(hard(g, gs, h_h) for (g, gs), h_h in zip(pairs, halves(h))))
        if gate_mode == "binary":
            return dx, None
    r = z.sigmoid_()
    if gate_mode == "reference":
        # W1' = W2' = 1 - H, so dL/dR = x * (1 - H) * (g + swap(g)), and g + swap(g) is the same for both halves.
        h = _step(r, threshold)
        w1, w2 = torch.maximum(r, h), torch.addcmul(r, r, h, value=-1)
        def weighted(g, gs, w1_h, w2_h):
            return lambda out: torch.mul(w1_h, g, out=out).addcmul_(w2_h, gs)

        dx = _joined(x_a, dtype, *(weighted(g, gs, w1_h, w2_h)
                                   for (g, gs), w1_h, w2_h in zip(pairs, halves(w1), halves(w2))))
        p = g_a + g_b
        dr = _joined(x_a, dtype, lambda out: torch.mul(x_a, p, out=out), lambda out: torch.mul(x_b, p, out=out))
        dr.addcmul_(dr, h, value=-1)
    else:
        # soft and ste: W1' = 1, W2' = -1, so dL/dR = x * (g - swap(g)), whose halves are d and -d.
        d = g_a - g_b
        if gate_mode == "soft":  # W1 = R, W2 = 1 - R: dx = swap(g) + R * (g - swap(g))
            r_a, r_b = halves(r)
            dx = _joined(x_a, dtype, lambda out: torch.addcmul(g_b, r_a, d, out=out),
                         lambda out: torch.addcmul(g_a, r_b, d, value=-1, out=out))
        dr = _joined(x_a, dtype, lambda out: torch.mul(x_a, d, out=out), lambda out: torch.mul(x_b, d, out=out).neg_())
    return dx, torch.ops.aten.sigmoid_backward.grad_input(dr, r, grad_input=dr)


def _joined(like: Tensor, dtype: torch.dtype, make_a, make_b) -> Tensor:
    """cat([make_a(None), make_b(None)]) along channels; eager, each half is written into its slice of one
    tensor (``make(out)``), which saves the concatenation's copy. ``like``: a half, for shape and layout.

    Under ``torch.compile`` the concatenation stays: dynamo refuses ``out=`` views, and the compiler writes
    the halves in place itself.
    """
    if torch.compiler.is_compiling():
        return torch.cat([make_a(None), make_b(None)], dim=1)
    n, c, h, w = like.shape
    out = torch.empty((n, 2 * c, h, w), dtype=dtype, device=like.device, memory_format=memory_format(like))
    out_a, out_b = halves(out)
    make_a(out_a)
    make_b(out_b)
    return out


def _group_norm_backward(x, dz, dx, mean, rstd, gamma_w, groups):
    """Add to ``dx`` the gradient of z = GroupNorm(x) * w reaching x; return d(gamma * w) and d(beta * w).

    The GroupNorm backward in closed form over per-(sample, channel) sums, as PyTorch's own kernel
    computes it; ``mean`` and ``rstd`` are per (sample, group). ``dz`` is overwritten.
    """
    n, c = x.shape[:2]
    gamma_g = gamma_w.view(groups, c // groups)
    s1 = dz.sum(dim=(2, 3)).view(n, groups, -1)  # sum of dz
    dx.addcmul_(dz, per_channel(rstd, gamma_g).view(n, c, 1, 1))  # dz/dx at fixed statistics
    s2 = dz.mul_(x).sum(dim=(2, 3)).view(n, groups, -1)  # sum of dz * x
    mean, rstd = mean[:, :, None], rstd[:, :, None]  # per group, broadcast over its channels
    xhat_dz = (s2 - mean * s1) * rstd  # sum of dz * xhat
    count = (c // groups) * x.shape[2] * x.shape[3]
    m1 = (gamma_g * s1).sum(-1, keepdim=True) / count
    m2 = (gamma_g * xhat_dz).sum(-1, keepdim=True) / count
    # The statistics' share, -rstd * (m1 + xhat * m2), as x * c1 + c2; c1 and c2 are per group.
    c1 = -rstd * rstd * m2
    c2 = rstd * (rstd * m2 * mean - m1)
    # Channels split into (group, channel in group): a view in any layout, so c1 and c2 broadcast per group.
    per_group = (n, groups, 1, 1, 1)
    dx.unflatten(1, (groups, -1)).addcmul_(x.unflatten(1, (groups, -1)), c1.view(per_group)).add_(c2.view(per_group))
    return xhat_dz.view(n, c).sum(0), s1.view(n, c).sum(0)


class EfficientSRU(SRU):
    """The SRU computed by ``SRUFunction``; same parameters, outputs, gradients and probes as ``SRU``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.forward_halves(x), dim=1)

    def forward_halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The output's channel halves, X11 + X22 and X12 + X21, as separate tensors."""
        probe = Probe() if self.keep_stats else None
        out = self._halves(x, probe)
        if probe is not None:
            self.last_r, self.last_mask = probe.last_r.detach(), probe.last_mask
        return out

    def output_again(self, x: Tensor, halved: bool) -> tuple[Tensor, ...]:
        """The same output once more, without a graph and leaving the probes as they are (a recompute in
        backward): the two halves, or (``halved`` False) the whole output as a 1-tuple."""
        with torch.no_grad():
            out = self._halves(x, None)
        return out if halved else (torch.cat(out, dim=1),)

    def _halves(self, x: Tensor, probe: Probe | None) -> tuple[Tensor, Tensor]:
        # The binary gate has no gradient path to gamma and beta: keep them out of the graph (grads stay None).
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.gate_mode != "binary"):
            w = self.channel_weights()
            gamma_w, beta_w = self.gn.weight * w, self.gn.bias * w
        return SRUFunction.apply(x, gamma_w, beta_w, self.gn.num_groups, self.gn.eps, self.gate_mode,
                                 self.threshold, probe)


class Probe:
    """Receives what a gate probe keeps (R and mask, or fuse weights) from inside an autograd Function."""

    last_r: Tensor | None = None
    last_mask: Tensor | None = None
    last_beta: Tensor | None = None
