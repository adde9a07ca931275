"""Printing benchmark tables: every benchmark prints one and writes the same rows as JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Column = tuple[str, str, str]  # (header, row key, format spec such as ">8.2f")


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> None:
    widths = [max(len(h), 8) for h, _, _ in columns]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        cells = []
        for (_, key, spec), width in zip(columns, widths, strict=True):
            value = row.get(key)
            text = "-" if value is None else format(value, spec)
            cells.append(text.rjust(width))
        print("  ".join(cells))
