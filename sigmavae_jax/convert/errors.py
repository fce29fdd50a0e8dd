"""The converter's error and warning types, and how it prints shapes."""

from __future__ import annotations

from collections.abc import Iterable


class ConversionError(ValueError):
    """The source cannot be converted: unreadable, ambiguous, or not the expected model."""


class SourceNotFoundError(ConversionError, FileNotFoundError):
    """A file or folder to convert does not exist. Also a FileNotFoundError, so that callers
    catching either type keep working."""


class ConversionWarning(UserWarning):
    """Something the user should know about a conversion that still went through."""


def shape_str(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))
