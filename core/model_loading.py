"""Model assembly, in one place: finding a model by name or path (shipped models, the user's model folders, an
explicit file), building it from its card, and pairing a captioner with a change detector.

The card format is :mod:`.model_file`'s, the architectures :mod:`.models.registry`'s and the pairing rules
:mod:`.models.pairing`'s; none of those imports this module, so there is no import circle. Listing models needs
no torch; torch is imported when a model is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PairingError
from .model_file import DEFAULT_MODEL_DIR, ModelFileError, find_cards, read_card, read_weights, resolve_model

if TYPE_CHECKING:  # listing models (the Processing parameters, the UI) must not need torch
    import torch

    from .model_api import ChangeModel
    from .models.adapter import TorchChangeModel
    from .models.pairing import PairedChangeModel

# The model the plugin, CLI and processing algorithm use unless told otherwise: the one that works on real imagery
# (research and non-commercial use only, as its card says); "pix4cap-synthetic" is the redistributable one.
DEFAULT_MODEL = "pix4cap-lite-real"
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


def load_model_file(path: str | os.PathLike, device: str = "cpu") -> "ChangeModel":
    """Card or weights path -> a ready model: the architecture built from the card's config, then the file's
    weights loaded into it (sha256-checked, never unpickled). A card with ``"pair_with"`` (a captioner without a
    change head, e.g. SEN) gives the pair with that detector (:func:`pair_from_card`)."""
    card = read_card(path)
    model = build_from_card(card).to(device)
    return pair_from_card(model, card, device) if card.get("pair_with") else model


def build_from_card(card: dict) -> "TorchChangeModel":
    """The model a card describes, with the card's weights (on the CPU): the architecture is built (layers only),
    the pretrained parts the file leaves out are read from the local checkpoints its config names
    (:meth:`~.models.network.ChangeNetwork.load_external_weights`), then the file's state dict is loaded."""
    from .model_api import InputSpec
    from .models.adapter import TorchChangeModel
    from .models.registry import UnknownModelError, build_model, config_from_dict
    from .vocabulary import Vocabulary

    state = read_weights(card)
    arch = card["architecture"]
    try:
        config = config_from_dict(arch, card["config"])
        vocab = Vocabulary.from_dict(card["vocabulary"]) if card.get("vocabulary") else None
        module, _ = build_model(arch, config)
    except UnknownModelError as e:
        raise ModelFileError(f"{card['_card_path']}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise ModelFileError(f"{card['_card_path']}: invalid config or vocabulary: {e}") from None
    try:
        module.load_external_weights()
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{card['_card_path']}: a pretrained part this model file leaves out: {e}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{card['_weights_path']}: weights do not fit architecture {arch!r}: {e}") from None
    return TorchChangeModel(module, InputSpec.from_dict(card["input"]), vocab, name=card["name"],
                            version=card.get("version", "0"), architecture=arch, card=card)


def looks_like_card_path(value: str) -> bool:
    """Whether a ``pair_with`` value names a card file (else it is a model name)."""
    return Path(value).suffix in (".json", ".safetensors") or "/" in value or "\\" in value


def find_partner(card: dict, partner: str) -> Path:
    """The card path of a captioner card's ``pair_with`` value: a card path (relative to the captioner's card) or
    a model name (looked up in the captioner's folder first, then the usual model folders)."""
    own_dir = Path(card["_card_path"]).parent if card.get("_card_path") else None
    path = Path(partner)
    if looks_like_card_path(partner):
        if own_dir is not None and not path.is_absolute():
            path = own_dir / path
        return resolve_model(path)
    return resolve_model(partner, model_dirs([own_dir] if own_dir is not None else None))


def pair_from_card(captioner: "ChangeModel", card: dict, device: str = "cpu") -> "PairedChangeModel":
    """The captioner paired with the detector its card names (``pair_with``)."""
    import dataclasses

    from .models.pairing import PairedChangeModel, PairingSide, check_pairing

    partner = card.get("pair_with")
    if not isinstance(partner, str):
        raise ModelFileError(f"{card.get('_card_path')}: 'pair_with' must be a model name or card path")
    partner_card = read_card(find_partner(card, partner))
    try:
        check_pairing(PairingSide.of_card(partner_card), PairingSide.of_model(captioner))
    except PairingError as e:
        raise PairingError(f"{card.get('_card_path')}: pair_with {partner!r}: {e}") from None
    detector = load_model_file(partner_card["_card_path"], device=device)
    return PairedChangeModel(detector, captioner, name=captioner.name, version=str(captioner.version),
                             input_spec=dataclasses.replace(captioner.input_spec))


def with_detector(model: "ChangeModel", detector: "ChangeModel | str | os.PathLike", device: str | torch.device = "cpu",
                  extra_dirs: list[str | os.PathLike] | None = None) -> "PairedChangeModel":
    """``model``'s captions with ``detector``'s change mask: the run-time choice (``--detector``) that replaces a
    captioner's card pairing or a model's own change head. ``detector`` is a loaded model or a name / card path
    resolved like ``--model``; the rules are :func:`~.models.pairing.check_pairing`'s."""
    import dataclasses

    from .model_api import ChangeModel
    from .models.pairing import PairedChangeModel, PairingSide, check_pairing

    captioner = model.captioner if isinstance(model, PairedChangeModel) else model
    if isinstance(detector, ChangeModel):
        side = PairingSide.of_model(detector)
    else:
        side = PairingSide.of_card(read_card(find_model(detector, extra_dirs)))
    check_pairing(side, PairingSide.of_model(captioner))
    detector = detector.to(device) if isinstance(detector, ChangeModel) else load_model(detector, device, extra_dirs)
    return PairedChangeModel(detector, captioner, input_spec=dataclasses.replace(captioner.input_spec))
