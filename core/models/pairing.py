"""Pairing a change detector with a captioner behind one ChangeModel, and the rules for it (in one place).

:class:`PairedChangeModel` takes the probability map from the detector and the captions from the
captioner; each wrapped model normalises the raw 0..255 input with its own statistics, so the two need
not share them. A pair is made from a captioner's card (``"pair_with": NAME_OR_CARD``: a captioner without a
change head, e.g. SEN) or at run time (``--detector``; a captioning model with its own change head may be given
another detector too). Finding and loading the partner is :mod:`changescribe.core.model_loading`'s job; this
module reads no files.

:func:`check_pairing` holds every rule, for loaded models and for cards alike (:class:`PairingSide`): the
captioner must caption, the detector must detect change and must not be a pair itself (no chains, no cycles), and
both must read the same bands. A broken rule is a :class:`~changescribe.core.errors.PairingError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PairingError
from ..model_api import ChangeModel, InputSpec


@dataclass(frozen=True)
class PairingSide:
    """What the pairing rules need to know of one model, from the loaded model or from its card."""

    name: str
    detects: bool
    captions: bool
    bands: int
    paired: bool

    @classmethod
    def of_model(cls, model: ChangeModel) -> "PairingSide":
        return cls(model.name, model.can_detect, model.can_caption, model.input_spec.bands,
                   isinstance(model, PairedChangeModel))

    @classmethod
    def of_card(cls, card: dict[str, Any]) -> "PairingSide":
        """From a card, without loading the weights (the architecture's registry entry says what it can do)."""
        from .registry import get_entry

        entry = get_entry(card["architecture"])
        return cls(str(card.get("name")), entry.detects, entry.captions, int(card["input"].get("bands", 3)),
                   bool(card.get("pair_with")))


def check_pairing(detector: PairingSide, captioner: PairingSide) -> None:
    """Every rule for ``captioner``'s captions over ``detector``'s change mask; :class:`PairingError` if broken."""
    if not captioner.captions:
        raise PairingError(f"model {captioner.name!r} does not caption, so it takes no separate detector; run the "
                           "detector as the model instead")
    if detector.paired:
        raise PairingError(f"detector {detector.name!r} is itself a captioner paired with a detector (its card has "
                           "'pair_with'); name that change detector instead")
    if not detector.detects:
        raise PairingError(f"detector {detector.name!r} has no change head: it does not detect change, so it cannot "
                           f"make the change mask for {captioner.name!r}")
    if detector.bands != captioner.bands:
        raise PairingError(f"detector {detector.name!r} reads {detector.bands} bands but model {captioner.name!r} "
                           f"reads {captioner.bands}")


class PairedChangeModel(ChangeModel):
    """``change_probability`` from ``detector``, ``caption`` from ``captioner``.

    ``input_spec`` defaults to the captioner's (captioners are trained at one tile size and GSD, while
    change detectors are fully convolutional); both models must read the same number of bands.
    """

    def __init__(self, detector: ChangeModel, captioner: ChangeModel, *, name: str | None = None,
                 version: str | None = None, input_spec: InputSpec | None = None) -> None:
        check_pairing(PairingSide.of_model(detector), PairingSide.of_model(captioner))
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
