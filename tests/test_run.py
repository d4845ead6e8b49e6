"""Run policy (core/run.py): the probability cache, and out of GPU memory → smaller batches → the CPU.

Real rasters, real torch, real GeoPackages. The out-of-memory cases use test models that raise torch's own
``torch.cuda.OutOfMemoryError`` for their first calls, so the policy runs on a machine without a GPU too.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from changescribe.core.api import DetectRequest
from changescribe.core.device import halving_on_oom
from changescribe.core.errors import OutOfDeviceMemory
from changescribe.core.pipeline import detect_changes
from changescribe.core.run import CPU_FALLBACK_NOTE, STALE_CACHE_NOTE, cache_key, cache_path, run_request
from changescribe.training.synthetic import write_pair
from conftest import OracleModel, write_geotiff


class OutOfMemoryFirst(OracleModel):
    """The oracle, but its first ``ooms`` batches (of any size) fail like a full GPU."""

    def __init__(self, ooms: int, captions: bool = False):
        super().__init__(64)
        self.ooms, self.batches, self.caption_batches, self._captions = ooms, [], [], captions

    @property
    def can_caption(self) -> bool:
        return self._captions

    def change_probability(self, before, after):
        self.batches.append(before.shape[0])
        if self.ooms > 0:
            self.ooms -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
        return super().change_probability(before, after)

    def caption(self, before, after, beam_size=1, max_length=None):
        self.caption_batches.append(before.shape[0])
        if before.shape[0] > 1:  # captioning needs more memory than inference: only one pair at a time fits
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return [f"change seen at mean {float(after.mean()):.1f}"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), name="run", size=192, seed=11)


def test_halving_splits_down_to_one_then_says_out_of_memory():
    seen = []

    def fails_above_two(x):
        seen.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("test")
        return x * 2

    x = torch.arange(8)
    assert torch.equal(halving_on_oom(fails_above_two, torch.cat, x), x * 2)  # in order, complete
    assert seen == [8, 4, 2, 2, 4, 2, 2]

    def always(x):
        raise torch.cuda.OutOfMemoryError("test")

    with pytest.raises(OutOfDeviceMemory, match="even at one tile per batch") as info:
        halving_on_oom(always, torch.cat, x, what="tile")
    assert info.value.kind == "oom"


def test_inference_and_captioning_halve_their_batches(tmp_path, pair):
    plain = detect_changes(pair.before, pair.after, OracleModel(64), tmp_path / "plain.gpkg", batch_size=4,
                           captions=False, device="cpu")
    model = OutOfMemoryFirst(ooms=1, captions=True)
    result = detect_changes(pair.before, pair.after, model, tmp_path / "halved.gpkg", batch_size=4, device="cpu")
    assert model.batches[:3] == [4, 2, 2]  # the first batch ran in halves; later ones whole
    assert len(result.regions) == len(plain.regions) >= 2
    assert max(model.caption_batches) > 1 and 1 in model.caption_batches  # batches were split down to one
    captions = result.regions.read()["model_caption"]  # the decoder's own sentence (caption is the grounded one)
    assert all(c.startswith("change seen") for c in captions)


def test_out_of_memory_even_at_one_tile_runs_again_on_the_cpu(tmp_path, pair):
    model = OutOfMemoryFirst(ooms=2)  # a batch of 2, then its half: the whole first attempt fails
    notes = []
    request = DetectRequest(before=str(pair.before), after=str(pair.after), output=str(tmp_path / "r.gpkg"),
                            device="auto", batch_size=2, captions=False)
    result = run_request(request, on_note=notes.append, model=model)
    assert notes == [CPU_FALLBACK_NOTE] and result.notes == [CPU_FALLBACK_NOTE]
    assert result.output.is_file() and result.device.startswith("CPU") and model.batches[:2] == [2, 1]
    # asked for the CPU, there is nowhere else to go: one typed error, nothing written
    with pytest.raises(OutOfDeviceMemory) as info:
        run_request(DetectRequest(**{**request.to_dict(), "device": "cpu", "output": str(tmp_path / "no.gpkg")}),
            model=OutOfMemoryFirst(ooms=10))
    assert info.value.kind == "oom" and not (tmp_path / "no.gpkg").exists()


def test_cache_reuses_the_map_for_another_threshold_and_drops_a_stale_one(tmp_path, pair):
    cache = tmp_path / "cache"
    base = DetectRequest(before=str(pair.before), after=str(pair.after), output=str(tmp_path / "a.gpkg"),
                         threshold=0.5, captions=False, device="cpu", cache_dir=str(cache),
                         probability_output=str(tmp_path / "a_probability.tif"))
    first = run_request(base, model=OracleModel(64))
    (cached,) = cache.iterdir()
    assert cached == cache_path(cache, cache_key(base)) and first.stats.tiles > 0 and not first.reused_probability
    assert first.probability == tmp_path / "a_probability.tif" and first.probability.is_file()
    second = run_request(DetectRequest(**{**base.to_dict(), "threshold": 0.9, "output": str(tmp_path / "b.gpkg"),
                                  "probability_output": None}), model=OracleModel(64))
    assert second.reused_probability and second.stats.tiles == 0 and second.probability is None
    assert len(second.regions) <= len(first.regions)
    # a map that no longer fits (e.g. written for another grid) is dropped, and the model runs again
    write_geotiff(cached, np.zeros((1, 10, 10), np.float32))
    notes = []
    third = run_request(DetectRequest(**{**base.to_dict(), "output": str(tmp_path / "c.gpkg")}), on_note=notes.append,
                model=OracleModel(64))
    assert notes == [STALE_CACHE_NOTE] and third.stats.tiles > 0 and not third.reused_probability
    with rasterio.open(cached) as src:
        assert src.width == 192
    assert len(third.regions) == len(first.regions)
    # the cache keeps the last inputs only
    other = write_pair(tmp_path / "other", name="o", size=128, seed=3)
    run_request(DetectRequest(**{**base.to_dict(), "before": str(other.before), "after": str(other.after),
                         "output": str(tmp_path / "d.gpkg"), "probability_output": None}), model=OracleModel(64))
    assert [p.name for p in cache.iterdir()] != [cached.name] and len(list(cache.iterdir())) == 1
