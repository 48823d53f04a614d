"""Aligned plain-text tables for the terminal (profile, bench, study status)."""

from __future__ import annotations

from typing import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right_from: int | None = None) -> str:
    """Rows of cells under ``headers``, a dashed rule below the header; columns from ``right_from`` on are
    right-aligned (numbers)."""
    right_from = len(headers) if right_from is None else right_from
    widths = [max(len(str(cells[i])) for cells in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(str(c).rjust(w) if i >= right_from else str(c).ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        for cells in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
