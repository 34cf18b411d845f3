"""Errors a user can act on.

Every failure caused by the user's input (a bad model file, an unsupported architecture, a
prompt that does not fit) is a `LaminaError`, so the CLI can print one line and exit 2
instead of a stack trace.
"""


class LaminaError(Exception):
    """Base class for errors whose message is meant for the user."""


class ModelLoadError(LaminaError):
    """A model file or folder is missing, truncated, corrupt or inconsistent."""


class UnsupportedModelError(LaminaError):
    """The model uses an architecture or feature lamina does not implement."""


class ContextLengthError(LaminaError):
    """A prompt does not fit in the model's context window."""
