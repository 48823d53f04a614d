"""The SCConv module family (reference implementation) and the helpers that plug it into models."""

from ablate.nn.convert import convert, ineligible_reason, iter_gates, set_keep_stats
from ablate.nn.cru import CRU, check_cru
from ablate.nn.scconv import SCConv, validate_scconv
from ablate.nn.sru import ABS_NORM_EPS, SRU, check_sru

__all__ = [
    "ABS_NORM_EPS",
    "CRU",
    "SCConv",
    "SRU",
    "check_cru",
    "check_sru",
    "convert",
    "ineligible_reason",
    "iter_gates",
    "set_keep_stats",
    "validate_scconv",
]
