"""The model's suggested caption for an area an analyst draws, in whichever Python runs the models.

The dock's *Annotate* panel asks for it in QGIS's Python, or, when runs go to a separate environment, through
the worker (``python -m changescribe.core.worker --suggest``), so a suggestion never needs PyTorch in QGIS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class SuggestionJob:
    """An area (``bounds`` in ``bounds_crs``, any CRS pyproj reads) over a before/after pair, and the model."""

    before: str
    after: str
    model: str
    bounds_crs: str
    bounds: Bounds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuggestionJob":
        from .errors import InputError

        try:
            bounds = tuple(float(v) for v in d["bounds"])
            if len(bounds) != 4:
                raise ValueError("bounds needs 4 numbers")
            return cls(str(d["before"]), str(d["after"]), str(d["model"]), str(d["bounds_crs"]), bounds)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a suggestion job: {exc}") from None


def suggest_caption(job: SuggestionJob, models: dict | None = None) -> str:
    """The caption for ``job.bounds`` over the pair, cropped at the model's GSD; ``models`` caches loaded models."""
    from pyproj import Transformer

    from .captioning import decoder_captions
    from .errors import InputError
    from .model_loading import load_model
    from .raster_pair import AlignedPair

    models = {} if models is None else models
    model = models.get(job.model)
    if model is None:
        model = models[job.model] = load_model(job.model)
    if not model.can_caption:
        raise InputError(f"the model {model.name} cannot caption")
    with AlignedPair(job.before, job.after, bands=model.input_spec.bands, target_gsd=model.input_spec.gsd) as pair:
        tr = Transformer.from_crs(job.bounds_crs, pair.grid.crs.to_wkt(), always_xy=True)
        return decoder_captions(pair, model, [tr.transform_bounds(*job.bounds)])[0]
