"""Finding a model by name or path: shipped models, the user's model folders, or an explicit file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .model_file import DEFAULT_MODEL_DIR, find_cards, load_model_file, read_card, resolve_model

if TYPE_CHECKING:  # listing models (the Processing parameters, the UI) must not need torch
    import torch

    from .model_api import ChangeModel

# The model the plugin, CLI and processing algorithm use unless told otherwise.
DEFAULT_MODEL = "pix4cap-synthetic"
# Extra folders (os.pathsep-separated) searched before the shipped ones; the plugin sets it from Settings.
MODEL_PATH_ENV = "CHANGESCRIBE_MODEL_PATH"


def model_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for model cards, in order: given, environment, shipped."""
    dirs = [Path(p) for p in (extra or [])]
    dirs += [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(DEFAULT_MODEL_DIR)
    return [d for d in dirs if d.is_dir()]


def load_model(name_or_path: str | os.PathLike = "default", device: str | torch.device = "cpu",
               extra_dirs: list[str | os.PathLike] | None = None) -> ChangeModel:
    """A ready-to-run :class:`ChangeModel`; unknown names and unsafe files raise ``ModelError``."""
    return load_model_file(find_model(name_or_path, extra_dirs), device=str(device))


def find_model(name_or_path: str | os.PathLike = "default", extra_dirs: list[str | os.PathLike] | None = None) -> Path:
    """The card path a model name (``default``: :data:`DEFAULT_MODEL`) or path names, without loading it."""
    name = DEFAULT_MODEL if str(name_or_path) in ("", "default") else str(name_or_path)
    return resolve_model(name, model_dirs(extra_dirs))


def installed_models(extra_dirs: list[str | os.PathLike] | None = None) -> list[dict]:
    """Cards of every model file in the model folders, first of each name wins (no torch needed)."""
    seen, cards = set(), []
    for path in find_cards(model_dirs(extra_dirs)):
        card = read_card(path)
        if card["name"] not in seen:
            seen.add(card["name"])
            cards.append({**card, "path": str(path)})
    return cards
