"""Errors that core_clip raises for bad input. All are ``ValueError`` subclasses so callers can catch one type,
and the CLI turns them into exit code 2 with a single line."""


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
