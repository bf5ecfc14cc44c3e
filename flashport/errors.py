"""User-facing errors: each names what is wrong (file, tensor, field, value).

The CLI and the server turn a `FlashportError` into a one-line message (no traceback); anything else
is a bug and keeps its traceback.
"""


class FlashportError(Exception):
    """Base class of every error caused by user input (a bad config, checkpoint, request or flag)."""


class ConfigError(FlashportError, ValueError):
    """A config.json field is missing, unknown or inconsistent."""


class CheckpointError(FlashportError):
    """A checkpoint file or tensor is missing, unexpected, mis-shaped, of the wrong dtype or corrupt."""


class RequestError(FlashportError, ValueError):
    """A prompt or sampling parameter is invalid."""
