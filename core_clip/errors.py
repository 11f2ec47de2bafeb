"""Errors that core_clip raises for bad input. All are ``ValueError`` subclasses so callers can catch one type,
and the CLI turns them into exit code 2 with a single line."""
from __future__ import annotations

import math
from typing import Any, Sequence


class CoreClipError(ValueError):
    """Base class: the message names the problem and, where there is one, the fix."""


class ModelNotFoundError(CoreClipError):
    """A model name is neither a shipped model, an open_clip architecture, a pretrained tag nor a path."""


class WeightsUnavailableError(CoreClipError):
    """Pretrained weights are not cached locally and cannot be downloaded (e.g. offline)."""


class CheckpointError(CoreClipError):
    """A checkpoint is unreadable, unsafe to unpickle, or does not match its architecture."""


class ImageReadError(CoreClipError):
    """An image file is missing or cannot be decoded."""


class DataError(CoreClipError):
    """A dataset (CSV, folder) is malformed: missing files, empty captions, wrong columns."""


def check_ranges(cfg: Any, error: type[CoreClipError] = CoreClipError, *, at_least_one: Sequence[str] = (),
                 positive: Sequence[str] = (), non_negative: Sequence[str] = ()) -> None:
    """Raise ``error`` naming the first numeric field of the config ``cfg`` (as its ``--flag``) out of range: each of
    ``at_least_one`` must be >= 1, of ``positive`` > 0, of ``non_negative`` >= 0; NaN and infinity never are."""
    rules = ((at_least_one, lambda v: v >= 1, ">= 1"), (positive, lambda v: v > 0, "> 0"),
             (non_negative, lambda v: v >= 0, ">= 0"))
    for names, in_range, what in rules:
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and in_range(value)):
                raise error(f"--{name.replace('_', '-')} must be {what}, got {value}")
