"""The single ChangeScribe model-file format: ``NAME.safetensors`` (weights) + ``NAME.json`` (card).

The card says what the weights are (architecture + full config), how to feed them (InputSpec), how to
decode captions (vocabulary), where they came from, and the sha256 of the weights file. Pickled
checkpoints (``.pt``/``.pth``/...) are refused: unpickling can run arbitrary code, and model files are
meant to be shared. Importing this module needs only the standard library, so the QGIS UI can list
and show cards without torch; torch is imported by :func:`save_model_file` / :func:`read_weights`. Building a
model from a card is :mod:`.model_loading`'s (the one place models are assembled).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .model_api import InputSpec
    from .vocabulary import Vocabulary

FORMAT = "changescribe-model/1"
CARD_SUFFIX, WEIGHTS_SUFFIX = ".json", ".safetensors"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "resources" / "models"


class ModelFileError(ModelError):
    """A model file that cannot be used (missing, tampered, pickled, unknown architecture, ...)."""


def _pickle_refusal(path: Path) -> ModelFileError:
    return ModelFileError(f"{path}: pickled checkpoints are refused because unpickling can run arbitrary "
                          "code; export the weights to a ChangeScribe model file (.safetensors + .json card) "
                          "with changescribe.core.model_file.save_model_file")


def _looks_pickled(path: Path) -> bool:
    """Pickle protocol 2+ starts with 0x80; torch.save's zip container with 'PK'."""
    try:
        with path.open("rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK"


def _check_safetensors(path: Path) -> None:
    """Cheap structural check: 8-byte little-endian header length, then a JSON object."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise ModelFileError(f"{path}: too short to be a safetensors file")
    # pickles start 0x80 / 'PK' and then never decode to a plausible header length followed by '{'
    (n,) = struct.unpack("<Q", head[:8])
    if n + 8 > size or head[8:9] != b"{":
        if _looks_pickled(path):
            raise _pickle_refusal(path)
        raise ModelFileError(f"{path}: not a safetensors file")


def card_path(path: str | Path) -> Path:
    """``x`` / ``x.json`` / ``x.safetensors`` -> ``x.json``; pickled checkpoints raise."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(p)
    if p.suffix == CARD_SUFFIX:
        return p
    if p.suffix == WEIGHTS_SUFFIX:
        return p.with_suffix(CARD_SUFFIX)
    return p.with_name(p.name + CARD_SUFFIX)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and check a model card (stdlib only). Adds ``_card_path`` and ``_weights_path``."""
    cp = card_path(path)
    if not cp.is_file():
        raise ModelFileError(f"model card {cp} not found")
    if _looks_pickled(cp):
        raise _pickle_refusal(cp)
    try:
        card = json.loads(cp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cp}: not a JSON model card ({e})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelFileError(f"{cp}: not a ChangeScribe model card (expected format {FORMAT!r})")
    for key in ("name", "architecture", "config", "input", "sha256"):
        if key not in card:
            raise ModelFileError(f"{cp}: card lacks {key!r}")
    # a bare file name next to the card: a card cannot point elsewhere on disk
    weights = cp.parent / Path(str(card.get("weights") or cp.with_suffix(WEIGHTS_SUFFIX).name)).name
    card["_card_path"], card["_weights_path"] = str(cp), str(weights)
    return card


def save_model_file(path: str | Path, module: "nn.Module", architecture: str, config: Any,
                    input_spec: "InputSpec", vocabulary: "Vocabulary | None" = None, **card_fields: Any) -> Path:
    """Write ``NAME.safetensors`` + ``NAME.json``; returns the card path.

    ``card_fields`` may set name, version, training_data, metrics, licence, description (any JSON value).
    """
    import torch
    from safetensors.torch import save_file

    from .models.registry import config_to_dict, get_entry

    get_entry(architecture)  # fail before writing anything
    cp = card_path(path)
    wp = cp.with_suffix(WEIGHTS_SUFFIX)
    cp.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in module.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        state[k] = t
    save_file(state, str(wp), metadata={"format": FORMAT, "architecture": architecture})
    card = {
        "format": FORMAT,
        "name": card_fields.pop("name", cp.stem),
        "architecture": architecture,
        "config": config_to_dict(config),
        "input": input_spec.to_dict(),
        "vocabulary": vocabulary.to_dict() if vocabulary is not None else None,
        "version": str(card_fields.pop("version", "0")),
        "training_data": card_fields.pop("training_data", None),
        "metrics": card_fields.pop("metrics", {}),
        "licence": card_fields.pop("licence", None),
        "created": card_fields.pop("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        "weights": wp.name,
        "sha256": sha256_file(wp),
        **card_fields,
    }
    tmp = cp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    tmp.replace(cp)
    return cp


def read_weights(card: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The tensors of a card's weights file, after checking it is safetensors and matches the card's sha256
    (never unpickles). Building the model they belong to is :func:`~.model_loading.load_model_file`'s job."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wp = Path(card["_weights_path"])
    if wp.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(wp)
    if not wp.is_file():
        raise ModelFileError(f"weights file {wp} not found (named by {card['_card_path']})")
    _check_safetensors(wp)
    digest = sha256_file(wp)
    if digest != card["sha256"]:
        raise ModelFileError(f"{wp}: sha256 {digest} does not match the card ({card['sha256']}); "
                             "the file is corrupt or was modified")
    try:
        return load_file(str(wp), device="cpu")
    except SafetensorError as e:
        raise ModelFileError(f"{wp}: not readable as safetensors: {e}") from None


def find_cards(search_dirs: Iterable[str | Path] | None = None) -> list[Path]:
    """Every ChangeScribe card (``*.json`` with the right format) in the given folders."""
    out = []
    for d in (search_dirs if search_dirs is not None else [DEFAULT_MODEL_DIR]):
        for p in sorted(Path(d).glob("*" + CARD_SUFFIX)):
            try:
                read_card(p)
            except ModelFileError:
                continue
            out.append(p)
    return out


def resolve_model(name_or_path: str | Path, search_dirs: Iterable[str | Path] | None = None) -> Path:
    """A model name (card ``name`` or file stem, looked up in ``search_dirs``; default: the plugin's
    resources/models) or a path -> the card path."""
    p = Path(name_or_path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(p)
    if p.exists() or p.suffix in (CARD_SUFFIX, WEIGHTS_SUFFIX) or len(p.parts) > 1:
        cp = card_path(p)
        if not cp.is_file():
            raise ModelFileError(f"model card {cp} not found")
        return cp
    dirs = list(search_dirs) if search_dirs is not None else [DEFAULT_MODEL_DIR]
    cards = find_cards(dirs)
    for cp in cards:
        if cp.stem == str(name_or_path) or read_card(cp)["name"] == str(name_or_path):
            return cp
    names = sorted(read_card(c)["name"] for c in cards)
    raise ModelFileError(f"no model named {str(name_or_path)!r} in {[str(d) for d in dirs]}; "
                         f"available: {names or 'none'}")
