"""The one format of every "these keys do not fit" error (params, converter, weight files)."""

from __future__ import annotations

from collections.abc import Iterable

LISTING_LIMIT = 20


def listing(title: str, lines: Iterable[str], limit: int = LISTING_LIMIT) -> list[str]:
    """`title` with its count, then up to `limit` indented lines and "... and N more";
    nothing when there are no lines."""
    lines = list(lines)
    if not lines:
        return []
    out = [f"  {len(lines)} {title}:"] + [f"    {line}" for line in lines[:limit]]
    if len(lines) > limit:
        out.append(f"    ... and {len(lines) - limit} more")
    return out
