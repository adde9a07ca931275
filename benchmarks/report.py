"""Printing benchmark tables: every benchmark prints one and writes the same rows as JSON."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Column = tuple[str, str, str]  # (header, row key, format spec such as ">8.2f")


def print_table(title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> None:
    texts = [
        ["-" if row.get(key) is None else format(row[key], spec) for _, key, spec in columns]
        for row in rows
    ]
    widths = [max([len(h), 8, *(len(t[i]) for t in texts)]) for i, (h, _, _) in enumerate(columns)]
    # A column whose format aligns left ("<") is left-aligned, its header too.
    left = [spec.startswith("<") for _, _, spec in columns]

    def line(cells: Sequence[str]) -> str:
        aligned = zip(cells, widths, left, strict=True)
        return "  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in aligned)

    print(f"\n{title}")
    print(line([h for h, _, _ in columns]))
    for cells in texts:
        print(line(cells))
