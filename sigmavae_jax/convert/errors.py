"""The converter's error and warning types, and the listing format its errors share."""

from __future__ import annotations

from collections.abc import Iterable

LISTING_LIMIT = 20


class ConversionError(ValueError):
    """The source cannot be converted: unreadable, ambiguous, or not the expected model."""


class ConversionWarning(UserWarning):
    """Something the user should know about a conversion that still went through."""


def listing(title: str, lines: Iterable[str], limit: int = LISTING_LIMIT) -> list[str]:
    """`title` with its count, then up to `limit` indented lines and "... and N more".

    The same shape as `api.check_params` uses, so every key problem reads alike.
    """
    lines = list(lines)
    if not lines:
        return []
    out = [f"  {len(lines)} {title}:"] + [f"    {line}" for line in lines[:limit]]
    if len(lines) > limit:
        out.append(f"    ... and {len(lines) - limit} more")
    return out


def shape_str(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))
