"""Errors a user can act on.

Everything the pipeline raises on purpose derives from :class:`ChangeScribeError` and carries a one-line,
human-readable message, so the CLI, the processing algorithm and the dock can show it as is instead of a
traceback. Each class has a stable ``kind`` (``input``, ``model``, ``oom``, ...): the worker sends it with the
message, :func:`error_for_kind` turns it back into the same class on the other side, and callers branch on the
class, never on the message's text.
"""

from __future__ import annotations


class ChangeScribeError(Exception):
    """Base class: a problem the user can fix (bad input, missing model, cancelled run)."""

    kind = "error"


class InputError(ChangeScribeError):
    """An input raster is missing, unreadable, not georeferenced, or does not fit the model; or an option is out
    of range."""

    kind = "input"


class StaleProbabilityError(InputError):
    """A probability raster given for re-use was made for another grid, or cannot be read: run inference again."""

    kind = "stale-probability"


class ModelError(ChangeScribeError):
    """A model name or file could not be resolved, verified or loaded."""

    kind = "model"


class PairingError(ModelError, ValueError):
    """A detector and a captioner that cannot be paired (:func:`changescribe.core.models.pairing.check_pairing`).

    A ``ValueError`` too, so a training config that names such a pair is reported like any other bad config."""


class OutOfDeviceMemory(ChangeScribeError):
    """The device ran out of memory even at one tile (or one caption) per batch."""

    kind = "oom"


class DependencyError(ChangeScribeError):
    """A library ChangeScribe needs (PyTorch, rasterio, ...) cannot be imported in this Python."""

    kind = "dependency"


class Cancelled(ChangeScribeError):
    """The user cancelled the run; nothing was written."""

    kind = "cancelled"


ERROR_CLASSES: tuple[type[ChangeScribeError], ...] = (
    ChangeScribeError, InputError, StaleProbabilityError, ModelError, OutOfDeviceMemory, DependencyError, Cancelled)


def error_for_kind(kind: str, message: str) -> ChangeScribeError:
    """The error class a ``kind`` names (from a worker's error event), carrying ``message``.

    An unknown kind (``internal``, ``job``) stays a :class:`ChangeScribeError` whose ``kind`` is that name.
    """
    for cls in ERROR_CLASSES:
        if cls.kind == kind:
            return cls(message)
    err = ChangeScribeError(message)
    err.kind = kind
    return err
