"""The contract between the raster pipeline and any change model.

The pipeline only speaks to models through :class:`ChangeModel`, so a BIT-style change detector, a
Pix4Cap captioner or a test oracle all plug in the same way. Inputs are float tensors on the model's
device holding *raw* pixel values on a 0..255 scale (B, bands, H, W); each model normalises with its own
statistics, which travel in its model card, so callers never need to know them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class InputSpec:
    """What a model expects from the raster pipeline (stored in the model card)."""

    bands: int = 3
    # Per-band mean / std on the 0..255 scale; the model normalises with them.
    mean: tuple[float, ...] = (123.675, 116.28, 103.53)
    std: tuple[float, ...] = (58.395, 57.12, 57.375)
    tile_size: int = 256
    # Ground sample distance (m/pixel) the model was trained at; None = any.
    gsd: float | None = 0.5

    def to_dict(self) -> dict:
        return {"bands": self.bands, "mean": list(self.mean), "std": list(self.std),
                "tile_size": self.tile_size, "gsd": self.gsd}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(bands=int(d.get("bands", 3)), mean=tuple(d.get("mean", cls.mean)),
                   std=tuple(d.get("std", cls.std)), tile_size=int(d.get("tile_size", 256)),
                   gsd=d.get("gsd"))


@dataclass
class Prediction:
    """One batch of model output: change probability per pixel, optional caption per pair."""

    probability: torch.Tensor  # (B, H, W) float in [0, 1]
    captions: list[str] | None = None
    extras: dict = field(default_factory=dict)


class ChangeModel(abc.ABC):
    """A bi-temporal model the pipeline can run tile by tile."""

    name: str = "unnamed"
    version: str = "0"
    input_spec: InputSpec = InputSpec()

    @property
    @abc.abstractmethod
    def can_caption(self) -> bool:
        """True when :meth:`caption` produces text (captioning models)."""

    @property
    def can_detect(self) -> bool:
        """True when :meth:`change_probability` gives a change map; a captioner without a change head (SEN) is
        False and runs paired with a detector (:mod:`.models.pairing`)."""
        return True

    @property
    def default_beam_size(self) -> int:
        """The beam size captions are decoded with unless a run says otherwise (its paper's; 1 = greedy)."""
        return 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> "ChangeModel":
        """Move to a device; models without parameters need not override."""
        return self

    @abc.abstractmethod
    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Per-pixel probability of change, (B, H, W) in [0, 1], for raw 0..255 inputs (B, C, H, W)."""

    def caption(self, before: torch.Tensor, after: torch.Tensor, beam_size: int = 1,
                max_length: int | None = None) -> list[str]:
        """One sentence per pair describing what changed."""
        raise NotImplementedError(f"model {self.name!r} does not caption")

    def predict(self, before: torch.Tensor, after: torch.Tensor, with_captions: bool = False,
                beam_size: int = 1) -> Prediction:
        """Probability and optionally captions in one call; captioners override to share the encoder."""
        prob = self.change_probability(before, after)
        caps = self.caption(before, after, beam_size=beam_size) if with_captions and self.can_caption else None
        return Prediction(probability=prob, captions=caps)

    def describe(self) -> dict:
        """Facts for logs and the run metadata."""
        return {"name": self.name, "version": self.version, "captions": self.can_caption,
                "input": self.input_spec.to_dict()}


def normalise(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Raw 0..255 pixels → the model's normalised input (shared by every model)."""
    mean = torch.as_tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def check_batch(before: torch.Tensor, after: torch.Tensor, spec: InputSpec) -> None:
    """Fail early with a readable message instead of a shape error deep inside a network."""
    if before.shape != after.shape:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} differ in shape")
    if before.ndim != 4 or before.shape[1] != spec.bands:
        raise ValueError(f"expected (B, {spec.bands}, H, W) tensors, got {tuple(before.shape)}")


