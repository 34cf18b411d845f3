"""Errors a user can act on.

Every failure caused by the user's input (a bad model file, an unsupported architecture, a
prompt that does not fit, a parameter out of range) is a `LaminaError`, raised where the input
is checked, so the CLI can print one line and exit 2 and the server can answer with a 4xx.
Anything else is a bug in lamina and keeps its traceback (the CLI shows it; the server logs it
and answers 500).
"""


class LaminaError(Exception):
    """Base class for errors whose message is meant for the user."""


class InvalidInputError(LaminaError, ValueError):
    """A request, argument or input file has a bad value (out of range, wrong type, invalid
    text). Also a ValueError, so callers written against vLLM's API still catch it."""


class OutputPathError(LaminaError):
    """An output file or folder cannot be written (checked before any work starts)."""


class ModelLoadError(LaminaError):
    """A model file or folder is missing, truncated, corrupt or inconsistent."""


class UnsupportedModelError(LaminaError):
    """The model uses an architecture or feature lamina does not implement."""


class ContextLengthError(InvalidInputError):
    """A prompt does not fit in the model's context window."""


class EngineClosedError(LaminaError):
    """A request reached an engine after `close()` released what it runs with."""
