"""Errors a user can act on.

Everything the pipeline raises on purpose derives from :class:`ChangeScribeError` and carries a one-line,
human-readable message, so the CLI, the processing algorithm and the dock can show it as is instead of a
traceback.
"""

from __future__ import annotations


class ChangeScribeError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, cancelled run)."""


class InputError(ChangeScribeError):
    """An input raster is missing, unreadable, not georeferenced, or does not fit the model."""


class ModelError(ChangeScribeError):
    """A model name or file could not be resolved, verified or loaded."""


class Cancelled(ChangeScribeError):
    """The user cancelled the run; nothing was written."""
