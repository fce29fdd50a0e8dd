"""The converter's error and warning types, and how it prints shapes and key problems."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Key problems are summarised on the one error line: the first few of each kind name the
# pattern (a wrong file, a prefix, a variant) without burying the message in hundreds of keys.
KEY_EXAMPLES = 3


class ConversionError(ValueError):
    """The source cannot be converted: unreadable, ambiguous, or not the expected model."""


class SourceNotFoundError(ConversionError, FileNotFoundError):
    """A file or folder to convert does not exist. Also a FileNotFoundError, so that callers
    catching either type keep working."""


class ConversionWarning(UserWarning):
    """Something the user should know about a conversion that still went through."""


def shape_str(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


def key_summary(problems: Sequence[tuple[str, Sequence[str]]], limit: int = KEY_EXAMPLES) -> str:
    """`(title, items)` pairs as ONE line: "2 missing keys: a, b; 40 unexpected keys: c, d, e
    and 37 more". Kinds without items are left out; "" when there are none."""
    parts = []
    for title, items in problems:
        if not items:
            continue
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)
