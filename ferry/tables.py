"""Tables of results, as aligned text for the terminal and as Markdown for report files.

Every stage prints one (export and parity the parity table, bench its grid, pipeline its
summary), so the two renderers live below all of them.
"""

from __future__ import annotations

from typing import Any, Sequence


def fmt(value: Any, spec: str, missing: str = "-") -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None (a measurement not made)."""
    return missing if value is None else format(value, spec)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, a dashed rule under the headers."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)
