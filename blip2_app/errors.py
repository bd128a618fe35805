"""Errors whose message is written for the person using the app.

The UI turns a `UserFacingError` into `gr.Error(str(error))` and the CLI prints it on one line;
anything else is a bug and only its traceback reaches the server log.
"""


class UserFacingError(Exception):
    """Base class: `str(error)` is one complete, specific sentence (or short paragraph)."""


class ModelLoadError(UserFacingError):
    """A model could not be found, downloaded or loaded with the requested precision."""


class CheckpointUnreachableError(ModelLoadError):
    """A checkpoint is neither on disk nor in the Hugging Face cache, and cannot be downloaded.

    Raised only for the hub client's own failures (`checkpoints.hub_fetch_errors`), because
    `--fallback-model` starts on it: a bug raised as this would start the demo model instead."""


class InvalidRequestError(UserFacingError, ValueError):
    """A request parameter is outside what the app accepts (message says which and why)."""


class SettingsError(UserFacingError, ValueError):
    """A flag or environment variable has a value the app cannot use."""
