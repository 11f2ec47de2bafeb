"""clipguide's errors. All are ``ValueError`` subclasses (through core_clip's), so the CLI turns them into exit 2."""
from core_clip.errors import CoreClipError


class ClipguideError(CoreClipError):
    """Bad input to clipguide: the message names the problem."""


class PromptError(ClipguideError):
    """A prompt string or prompt item that cannot be parsed or used; the message names the item."""


class UnknownNameError(ClipguideError):
    """A loss, cutout scheme or generator name that no registry holds; the message lists the known names."""


class GuidanceError(ClipguideError):
    """Guidance cannot go on, e.g. a NaN or infinite loss or gradient; the message names the step."""
