"""SCConv: the SRU and CRU composed in one of six orders, as a drop-in for a 3x3 convolution.

Definition: docs/scconv.md, section "Composition". ``validate_scconv`` holds every construction rule,
so a bad configuration fails before any module is built or swapped. The order is dispatched here once
for both implementations; ``ablate.nn.efficient`` supplies only what the efficient one does differently.
"""

from __future__ import annotations

from torch import Tensor, nn

from ablate.config import ORDERS, SCConvConfig
from ablate.nn import efficient
from ablate.nn.cru import CRU, check_cru
from ablate.nn.sru import SRU, check_sru, layer_config_error

#: Orders whose 3x3 conv is the original one (the SRU, when present, runs before it).
CONV_ORDERS = ("none", "sru")
#: What an efficient SCConv with a CRU recomputes in backward rather than keeps: nothing, the SRU's output and
#: the CRU's squeezed inputs (order ``sru_cru``; the others have nothing to rerun short of the body, and keep),
#: or the whole body.
RECOMPUTE_MODES = ("keep", "sru", "body")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate_scconv(
    in_channels: int, out_channels: int, stride: int, config: SCConvConfig, where: str = "SCConv"
) -> None:
    """Raise a one-line ConfigError, naming ``where``, for the first spec rule this SCConv would break."""
    cfg = config.resolved()
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stride", stride)):
        if not _is_count(value):
            raise layer_config_error(where, name, value, "accepted: an integer >= 1")
    order = cfg.order
    if order == "parallel" and in_channels != out_channels:
        accepted = ", ".join(o for o in ORDERS if o != "parallel")
        raise layer_config_error(
            where, "scconv.order", order,
            f"CRU(X) + SRU(X) needs in_channels == out_channels, got {in_channels} -> {out_channels}; accepted: {accepted}",
        )
    if order in ("sru", "sru_cru", "parallel"):
        check_sru(in_channels, cfg, where, "in_channels")
    if order == "cru_sru":
        check_sru(out_channels, cfg, where, "out_channels")
    if order not in CONV_ORDERS:
        check_cru(in_channels, out_channels, cfg, where)


class SCConv(nn.Module):
    """Drop-in for a 3x3 conv ``in_channels -> out_channels`` with ``stride``; ``config.order`` picks the variant.

    ``conv`` is the conv being replaced; orders ``none`` and ``sru`` keep it (and its weights).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        config: SCConvConfig = SCConvConfig(),
        conv: nn.Conv2d | None = None,
    ) -> None:
        super().__init__()
        config = config.resolved()
        validate_scconv(in_channels, out_channels, stride, config)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.order = config.order
        self.config = config
        #: What this layer recomputes in backward under ``recompute = "auto"`` (one of RECOMPUTE_MODES): set by
        #: ``ablate.nn.recompute_plan.plan_recompute``; None until planned (the ``size`` rule meanwhile).
        self.planned_recompute: str | None = None
        # impl "efficient" computes the same function with the same submodules and state-dict keys.
        sru_type, cru_type = (efficient.EfficientSRU, efficient.EfficientCRU) if config.impl == "efficient" else (SRU, CRU)
        # Submodules are registered in the order the forward applies them, so that model order
        # (named_modules, iter_gates) follows the data flow.
        if self.order in CONV_ORDERS:
            if self.order == "sru":
                self.sru = sru_type(in_channels, config)
            self.conv = conv if conv is not None else _default_conv(in_channels, out_channels, stride)
            _check_conv(self.conv, in_channels, out_channels, stride)
            return
        # The CRU has no stride; pooling first gives the replaced conv's output size ceil(H / s).
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        if self.order == "sru_cru":
            self.sru = sru_type(in_channels, config)
        self.cru = cru_type(in_channels, out_channels, config)
        if self.order in ("cru_sru", "parallel"):
            self.sru = sru_type(out_channels, config)

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "none":
            return self.conv(x)
        if self.order == "sru":
            return self.conv(self.sru(x))
        if self.config.impl == "efficient":  # may keep only x and rerun the body (or the SRU) in backward
            mode = self.recompute_choice()
            if mode == "sru" and mode in self.recompute_modes:
                return self.body(x, recompute_sru=True)
            return efficient.recompute(self.body, x, self.parameters(), None if mode is None else mode == "body")
        return self.body(x)

    @property
    def plannable(self) -> bool:
        """Whether ``plan_recompute`` decides this layer: efficient, an order with a CRU, policy ``auto``."""
        return self.config.impl == "efficient" and self.order not in CONV_ORDERS and self.config.recompute == "auto"

    @property
    def recompute_modes(self) -> tuple[str, ...]:
        """The RECOMPUTE_MODES this layer has (``sru`` only for ``sru_cru``; the others keep in its place)."""
        return RECOMPUTE_MODES if self.order == "sru_cru" else tuple(m for m in RECOMPUTE_MODES if m != "sru")

    def recompute_choice(self) -> str | None:
        """What to recompute in backward, one of RECOMPUTE_MODES; None: the whole body when the input is large
        (``size``)."""
        policy = self.config.recompute
        if policy == "auto":
            return self.planned_recompute
        return {"always": "body", "never": "keep", "sru": "sru"}.get(policy)

    def body(self, x: Tensor, recompute_sru: bool = False) -> Tensor:
        """The orders with a CRU: pool to the output size, then compose the SRU and the CRU; with
        ``recompute_sru`` (efficient ``sru_cru``), the SRU's output and the squeezed inputs are recomputed for the
        CRU's backward."""
        x = self.pool(x)
        if self.order == "cru":
            return self.cru(x)
        if self.order == "sru_cru":
            if self.config.impl == "efficient":
                return efficient.sru_cru(self.sru, self.cru, x, recompute_sru)
            return self.cru(self.sru(x))
        if self.order == "cru_sru":
            return self.sru(self.cru(x))
        return self.cru(x) + self.sru(x)  # parallel

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}, order={self.order!r}"


def _default_conv(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _check_conv(conv: nn.Conv2d, in_channels: int, out_channels: int, stride: int) -> None:
    """The conv handed in must be the one this SCConv stands for (a programming error otherwise)."""
    if (conv.in_channels, conv.out_channels, tuple(conv.stride)) != (in_channels, out_channels, (stride, stride)):
        raise ValueError(
            f"conv {conv} does not match SCConv({in_channels} -> {out_channels}, stride={stride})"
        )
