"""``TorchChangeModel``: any registered :class:`.network.ChangeNetwork` behind the pipeline's :class:`ChangeModel`.

The wrapped network declares ``can_detect``, ``can_caption`` and ``default_beam_size`` (:class:`.network.ChangeNetwork`)
and provides, all on *normalised* inputs:

* ``encode(before, after) -> features`` - the expensive shared part, run once per batch;
* ``change_logits(features) -> (B, 2, H, W)``;
* captioners also: ``caption_memory(features) -> (memory (B, N, D), memory_mask | None)`` and a
  ``decoder`` (:class:`CaptionDecoder`);
* captioners that decode with their own generator (Semantic-CC's LLM) instead provide
  ``generate_captions(features, beam_size, max_len) -> ids (B, T)`` and ``decode_captions(ids) -> list[str]``,
  and take a word-level vocabulary as their tokenizer through ``attach_vocabulary``;
* captioners without a change head (SEN) declare ``can_detect = False`` and have no ``change_logits``: they
  run in the pipeline paired with a change detector (:class:`.pairing.PairedChangeModel`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..model_api import ChangeModel, InputSpec, Prediction, check_batch, normalise
from ..vocabulary import Vocabulary
from .network import ChangeNetwork


class TorchChangeModel(ChangeModel):
    """Inference wrapper: normalises raw 0..255 input, runs in eval mode under ``torch.inference_mode``."""

    def __init__(self, module: ChangeNetwork, input_spec: InputSpec, vocabulary: Vocabulary | None = None, *,
                 name: str = "unnamed", version: str = "0", architecture: str | None = None,
                 card: dict[str, Any] | None = None) -> None:
        self.module = module.eval()
        self.input_spec = input_spec
        self.vocabulary = vocabulary
        self.name, self.version = name, version
        self.architecture = architecture
        self.card = card or {}
        if vocabulary is not None:
            module.attach_vocabulary(vocabulary)

    @property
    def can_caption(self) -> bool:
        return self.module.can_caption and (self.vocabulary is not None or self.module.has_text_tokenizer)

    @property
    def can_detect(self) -> bool:
        """False for captioners without a change head (pair them with a detector)."""
        return self.module.can_detect

    @property
    def default_beam_size(self) -> int:
        """The beam size the model's paper decodes with (1 = greedy when the config says nothing)."""
        return self.module.default_beam_size

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> "TorchChangeModel":
        self.module.to(device)
        return self

    def _prepare(self, before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(before, after, self.input_spec)
        dev = self.device
        b = normalise(before.to(dev, torch.float32), self.input_spec)
        a = normalise(after.to(dev, torch.float32), self.input_spec)
        return b, a

    def _probability(self, feats: Any) -> torch.Tensor:
        if not self.can_detect:
            raise NotImplementedError(f"model {self.name!r} only captions; pair it with a change detector "
                                      "(a 'pair_with' entry in its model card, or PairedChangeModel)")
        return self.module.change_logits(feats).float().softmax(1)[:, 1]

    def _captions(self, feats: Any, beam_size: int, max_length: int | None) -> list[str]:
        if hasattr(self.module, "generate_captions"):
            ids = self.module.generate_captions(feats, beam_size=beam_size,
                                                max_len=max_length or getattr(self.vocabulary, "max_length", None))
            return self.module.decode_captions(ids.cpu())
        memory, mask = self.module.caption_memory(feats)
        ids = self.module.decoder.generate(memory, mask, beam_size=beam_size,
                                           max_len=max_length or self.vocabulary.max_length)
        return self.vocabulary.decode_batch(ids.cpu())

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        if not self.can_detect:
            self._probability(None)  # raises the explanation
        self.module.eval()
        with torch.inference_mode():
            return self._probability(self.module.encode(*self._prepare(before, after)))

    def caption(self, before: torch.Tensor, after: torch.Tensor, beam_size: int = 1,
                max_length: int | None = None) -> list[str]:
        if not self.can_caption:
            raise NotImplementedError(f"model {self.name!r} does not caption")
        self.module.eval()
        with torch.inference_mode():
            return self._captions(self.module.encode(*self._prepare(before, after)), beam_size, max_length)

    def predict(self, before: torch.Tensor, after: torch.Tensor, with_captions: bool = False,
                beam_size: int = 1) -> Prediction:
        """Mask and captions from ONE encoder pass."""
        self.module.eval()
        with torch.inference_mode():
            feats = self.module.encode(*self._prepare(before, after))
            prob = self._probability(feats)
            caps = self._captions(feats, beam_size, None) if with_captions and self.can_caption else None
        return Prediction(probability=prob, captions=caps)

    def describe(self) -> dict:
        d = super().describe()
        d["architecture"] = self.architecture
        d["detects"] = self.can_detect
        return d
