"""The exception types a user can cause (a bad value, an unusable checkpoint), and the checks that raise them
with a message naming the field, the value and what would be accepted."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable


class ConfigError(ValueError):
    """A user-caused configuration error; the message names the field, the value and what is accepted."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used (unreadable, not plain data, incomplete, another run's): it stops the
    command, also where a missing input would only be noted; the message names the checkpoint and the reason."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, accepted: tuple) -> None:
    """Raise ConfigError unless ``value`` is one of ``accepted`` (with a did-you-mean hint)."""
    if value not in accepted:
        hint = did_you_mean(str(value), [str(a) for a in accepted])
        raise ConfigError(f"{name}={value!r} is not valid{hint}; accepted: {', '.join(map(str, accepted))}")


def check(name: str, value: Any, ok: bool, accepted: str) -> None:
    """Raise ConfigError naming ``name``, ``value`` and ``accepted`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is not valid; accepted: {accepted}")


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: never record or print a database password."""
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)
