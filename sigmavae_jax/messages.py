"""Formats our one-line errors share: every "these keys do not fit" error (params, checkpoints,
the converter, weight files): one line, each kind of problem counted and its first few keys
named, enough to tell the pattern (a wrong file, a prefix, another variant) without burying the
message; and another library's exception quoted inside one of our lines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

KEY_EXAMPLES = 3


def key_summary(problems: Sequence[tuple[str, Iterable[str]]], limit: int = KEY_EXAMPLES) -> str:
    """`(title, items)` pairs as ONE line: "2 missing keys: a, b; 40 unexpected keys: c, d, e
    and 37 more". Kinds without items are left out; "" when there are none."""
    parts = []
    for title, items in problems:
        items = list(items)
        if not items:
            continue
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def one_line(error: BaseException, limit: int = 300) -> str:
    """`error` as "Type: message" on one line (whitespace runs collapsed), the message cut to
    `limit` characters; the type name stands in for an empty message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text if len(text) <= limit else text[: limit - 3] + '...'}"
