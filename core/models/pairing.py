"""Pairing a change detector with a captioner that has no change head (SEN), behind one ChangeModel.

:class:`PairedChangeModel` takes the probability map from the detector and the captions from the
captioner; each wrapped model normalises the raw 0..255 input with its own statistics, so the two need
not share them. A captioner's model card may name its partner::

    "pair_with": "bit-cd-levir"          # a model name (searched like --model) or a card path

and :func:`~changescribe.core.model_file.load_model_file` then returns the pair: the partner is resolved
through :mod:`changescribe.core.model_loading` (the captioner's own folder first, then the usual model
folders) when the captioner is loaded. The partner must detect change and must not itself carry a
``pair_with`` entry (no chains, no cycles).

The detector can also be chosen at run time (:func:`with_detector`; ``changescribe detect --detector``,
``detect_changes(detector=...)``): it replaces the card's ``pair_with``, and a captioner without a card pairing
gets one. A model with its own change head may be given a detector too: the mask then comes from the given
detector and only the captions from the model (e.g. a stronger CD model under Pix4Cap's captions). A model that
does not caption needs no detector (pass the detector as the model instead), and the detector must detect
change and not be a pair itself; both are refused with a :class:`~changescribe.core.errors.ModelError`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..model_api import ChangeModel, InputSpec


class PairedChangeModel(ChangeModel):
    """``change_probability`` from ``detector``, ``caption`` from ``captioner``.

    ``input_spec`` defaults to the captioner's (captioners are trained at one tile size and GSD, while
    change detectors are fully convolutional); both models must read the same number of bands.
    """

    def __init__(self, detector: ChangeModel, captioner: ChangeModel, *, name: str | None = None,
                 version: str | None = None, input_spec: InputSpec | None = None) -> None:
        if not detector.can_detect:
            raise ValueError(f"{detector.name!r} cannot detect change, so it cannot be the pair's detector")
        if detector.input_spec.bands != captioner.input_spec.bands:
            raise ValueError(f"detector {detector.name!r} reads {detector.input_spec.bands} bands but captioner "
                             f"{captioner.name!r} reads {captioner.input_spec.bands}")
        self.detector, self.captioner = detector, captioner
        self.name = name or f"{captioner.name}+{detector.name}"
        self.version = version or str(captioner.version)
        self.input_spec = input_spec or captioner.input_spec

    @property
    def can_detect(self) -> bool:
        return True

    @property
    def can_caption(self) -> bool:
        return self.captioner.can_caption

    @property
    def default_beam_size(self) -> int:
        return self.captioner.default_beam_size

    @property
    def device(self) -> torch.device:
        return self.detector.device

    def to(self, device: str | torch.device) -> "PairedChangeModel":
        self.detector = self.detector.to(device)
        self.captioner = self.captioner.to(device)
        return self

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return self.detector.change_probability(before, after)

    def caption(self, before: torch.Tensor, after: torch.Tensor, beam_size: int = 1,
                max_length: int | None = None) -> list[str]:
        if not self.can_caption:
            raise NotImplementedError(f"model {self.name!r} does not caption")
        dev = self.captioner.device
        return self.captioner.caption(before.to(dev), after.to(dev), beam_size=beam_size, max_length=max_length)

    def describe(self) -> dict:
        d = super().describe()
        d["paired"] = {"detector": self.detector.describe(), "captioner": self.captioner.describe()}
        return d


def pair_from_card(captioner: ChangeModel, card: dict[str, Any], device: str = "cpu") -> ChangeModel:
    """The captioner itself, or the pair named by its card's ``pair_with`` (see module docstring)."""
    from ..model_file import ModelFileError, load_model_file, read_card, resolve_model
    from ..model_loading import model_dirs

    partner = card.get("pair_with")
    if not partner:
        return captioner
    if not isinstance(partner, str):
        raise ModelFileError(f"{card.get('_card_path')}: 'pair_with' must be a model name or card path")
    own_dir = Path(card["_card_path"]).parent if card.get("_card_path") else None
    path = Path(partner)
    if path.suffix in (".json", ".safetensors") or "/" in partner or "\\" in partner:  # a card path
        if own_dir is not None and not path.is_absolute():
            path = own_dir / path  # relative to the captioner's card
        partner_card = resolve_model(path)
    else:  # a model name: the captioner's folder first, then the usual model folders
        partner_card = resolve_model(partner, model_dirs([own_dir] if own_dir is not None else None))
    if read_card(partner_card).get("pair_with"):
        raise ModelFileError(f"{partner_card}: a pair_with partner must be a change detector without its own "
                             "'pair_with' entry")
    detector = load_model_file(partner_card, device=device)
    if not detector.can_detect:
        raise ModelFileError(f"{card.get('_card_path')}: pair_with partner {partner!r} does not detect change")
    spec = captioner.input_spec
    if detector.input_spec.bands != spec.bands:
        raise ModelFileError(f"{card.get('_card_path')}: pair_with partner {partner!r} reads "
                             f"{detector.input_spec.bands} bands, the captioner {spec.bands}")
    return PairedChangeModel(detector, captioner, name=captioner.name, version=str(captioner.version),
                             input_spec=dataclasses.replace(spec))


def with_detector(model: ChangeModel, detector: ChangeModel | str | os.PathLike, device: str | torch.device = "cpu",
                  extra_dirs: list[str | os.PathLike] | None = None) -> PairedChangeModel:
    """``model``'s captions with ``detector``'s change mask (the run-time choice; see the module docstring).

    ``detector`` is a loaded model or a name / card path resolved like ``--model`` (``extra_dirs``, then
    ``CHANGESCRIBE_MODEL_PATH``, then the shipped models)."""
    if not model.can_caption:
        raise ModelError(f"model {model.name!r} does not caption, so it takes no separate detector; run the "
                         f"detector as the model instead")
    if isinstance(detector, ChangeModel):
        detector = detector.to(device)
    else:
        from ..model_loading import load_model
        detector = load_model(detector, device, extra_dirs)
    if isinstance(detector, PairedChangeModel):
        raise ModelError(f"detector {detector.name!r} is itself a captioner paired with a detector (its card has "
                         f"'pair_with'); name that change detector instead")
    if not detector.can_detect:
        raise ModelError(f"detector {detector.name!r} has no change head, so it cannot make the change mask")
    captioner = model.captioner if isinstance(model, PairedChangeModel) else model
    if detector.input_spec.bands != captioner.input_spec.bands:
        raise ModelError(f"detector {detector.name!r} reads {detector.input_spec.bands} bands but model "
                         f"{captioner.name!r} reads {captioner.input_spec.bands}")
    return PairedChangeModel(detector, captioner, input_spec=dataclasses.replace(captioner.input_spec))
