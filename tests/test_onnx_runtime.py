"""The CPU fast path (issue 17.4): the change encoder and mask head on ONNX Runtime give PyTorch's probabilities,
the pipeline uses it unless told not to, and its exported graphs are cached safely.

Real onnx export, real onnxruntime sessions, the shipped default model on the shipped sample pair; nothing mocked.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from changescribe.core.model_loading import load_model  # noqa: E402
from changescribe.core.onnx_export import (  # noqa: E402
    EXPORT_MIN_TILES, OnnxChangeModel, cached_graph, compare_with_torch, cpu_runtime, graph_path, model_digest)
from changescribe.core.pipeline import detect_changes  # noqa: E402

TOLERANCE = 1e-4  # largest difference of a change probability (0..1) between ONNX Runtime and PyTorch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("default", "cpu")


def real_tiles(pair: tuple[str, str], n: int = 3, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` tiles of the sample pair, raw 0..255 (what the pipeline feeds a model)."""
    out = []
    for path in pair:
        with rasterio.open(path) as src:
            data = src.read(indexes=[1, 2, 3]).astype(np.float32)
        out.append(torch.from_numpy(np.stack([data[:, i * 192:i * 192 + size, i * 192:i * 192 + size]
                                              for i in range(n)])))
    return out[0], out[1]


def test_graphs_match_pytorch_and_captions_are_the_same(model, sample, tmp_path):
    fast = cpu_runtime(model, 256, folder=tmp_path, need=("cd",))
    assert isinstance(fast, OnnxChangeModel) and fast.describe()["runtime"] == "onnxruntime"
    before, after = real_tiles(sample)
    diffs = compare_with_torch(model, fast, before, after)
    assert set(diffs) == {"probability", "memory"} and max(diffs.values()) < TOLERANCE, diffs
    # mask + captions from one encoder pass (the joint graph) = PyTorch's mask and words
    ref = model.predict(before, after, with_captions=True, beam_size=3)
    got = fast.predict(before, after, with_captions=True, beam_size=3)
    assert float((got.probability - ref.probability).abs().max()) < TOLERANCE
    assert got.captions == ref.captions and all(got.captions)
    # a tile of another size than the traced one runs on PyTorch (a traced 'SAME' padding holds for its size only)
    small_b, small_a = before[:, :, :96, :96], after[:, :, :96, :96]
    assert torch.equal(fast.change_probability(small_b, small_a), model.change_probability(small_b, small_a))


def test_cache_is_keyed_by_the_weights_and_written_atomically(model, tmp_path):
    folder = tmp_path / "cache"
    path = cached_graph(model, "cd", 256, folder)
    assert path == graph_path(model, "cd", 256, folder) and path.is_file()
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary left beside it
    stamp = path.stat().st_mtime_ns
    assert cached_graph(model, "cd", 256, folder) == path and path.stat().st_mtime_ns == stamp  # reused
    # other weights: another key, so a changed model file never runs a stale graph
    other = load_model("default", "cpu")
    with torch.no_grad():
        next(other.module.parameters()).add_(0.01)
    assert model_digest(other) != model_digest(model)
    assert graph_path(other, "cd", 256, folder) != path
    # a cache folder that cannot be made: the graph is exported into memory and still runs
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    graph = cached_graph(model, "cd", 256, blocker / "onnx")
    assert isinstance(graph, bytes) and len(graph) > 1000
    fast = OnnxChangeModel(model, {"cd": graph}, threads=1, size=256)
    b, a = torch.full((1, 3, 256, 256), 90.0), torch.full((1, 3, 256, 256), 160.0)
    assert float((fast.change_probability(b, a) - model.change_probability(b, a)).abs().max()) < TOLERANCE


def test_small_runs_export_only_once_enough_tiles_ran_and_use_a_cached_graph(model, tmp_path):
    folder = tmp_path / "cache"
    for _ in range(2):  # two small runs: 2 x 7 tiles, below EXPORT_MIN_TILES
        assert cpu_runtime(model, 256, folder=folder, tiles=7) is model
    assert not folder.exists()
    assert EXPORT_MIN_TILES <= 7 * 3
    fast = cpu_runtime(model, 256, folder=folder, tiles=7)  # the process's third small run: it pays now
    assert isinstance(fast, OnnxChangeModel) and graph_path(model, "cd", 256, folder).is_file()
    assert cpu_runtime(model, 128, folder=folder, tiles=1) is model  # another tile size: counted apart, not cached
    assert isinstance(cpu_runtime(model, 256, folder=tmp_path / "cache", tiles=1), OnnxChangeModel)  # cached: used


def test_pipeline_uses_onnxruntime_unless_switched_off_and_gives_pytorchs_map(model, sample, tmp_path, monkeypatch):
    monkeypatch.setenv("CHANGESCRIBE_CACHE_DIR", str(tmp_path / "cache"))
    cached_graph(model, "cd", 256)  # the sample pair is 9 tiles: below EXPORT_MIN_TILES, so export it first
    maps, logs = {}, {}
    from changescribe.core.run_control import RunControl

    for on in (True, False):
        lines: list[str] = []
        prob = tmp_path / f"p{int(on)}.tif"
        result = detect_changes(*sample, "default", tmp_path / f"r{int(on)}.gpkg", device="cpu", captions=True,
                                probability_output=prob, control=RunControl(on_log=lines.append), onnxruntime=on)
        with rasterio.open(prob) as src:
            maps[on] = src.read(1)
        logs[on] = lines
        assert (result.metadata["model"].get("runtime") == "onnxruntime") is on
        assert len(result.regions) > 0 and all(result.regions.read()["caption"])
    assert any("ONNX Runtime runs the change encoder" in line for line in logs[True])
    assert not any("ONNX Runtime" in line for line in logs[False])
    valid = maps[False] >= 0
    assert np.array_equal(valid, maps[True] >= 0)
    assert float(np.abs(maps[True][valid] - maps[False][valid]).max()) < TOLERANCE
    assert os.listdir(tmp_path / "cache" / "onnx")  # graphs only in the cache, never beside the data or outputs
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".onnx")]


def test_decoding_runs_on_one_cpu_thread_and_gives_the_same_words(model, sample):
    """Decoding is many tiny operations: on the CPU it runs on one intra-op thread, then the count is restored."""
    seen: list[int] = []
    hook = model.module.decoder.classifier.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before, after = real_tiles(sample, n=2)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        captions = {beam: model.caption(before, after, beam_size=beam) for beam in (1, 3)}
        assert torch.get_num_threads() == 2 and seen and set(seen) == {1}
    finally:
        hook.remove()
        torch.set_num_threads(previous)
    # one thread or two, the words are the same; beam search reorders beams without copying the memory K/V
    with torch.inference_mode():
        feats = model.module.encode(*model._prepare(before, after))
        memory = model.module.caption_memory(feats)[0]
        dec = model.module.decoder
        for beam in (1, 3):
            ids = dec.greedy(memory) if beam == 1 else dec.beam_search(memory, beam_size=beam)
            assert model.vocabulary.decode_batch(ids) == captions[beam]


def test_equal_caption_windows_are_read_and_captioned_once(model, sample):
    """A scene no wider than a model footprint gives every region the same crop: it is encoded once."""
    from rasterio.windows import Window

    from changescribe.core.captioning import caption_windows
    from changescribe.core.model_api import ChangeModel
    from changescribe.core.raster_pair import AlignedPair

    class Counting(ChangeModel):
        """The real model, counting the pairs it is asked to caption."""

        def __init__(self, inner):
            self.inner, self.pairs, self.input_spec, self.name = inner, 0, inner.input_spec, inner.name

        can_caption = True

        def change_probability(self, before, after):
            return self.inner.change_probability(before, after)

        def caption(self, before, after, beam_size=1, max_length=None):
            self.pairs += before.shape[0]
            return self.inner.caption(before, after, beam_size, max_length)

    counting = Counting(model)
    a, b = Window(0, 0, 256, 256), Window(256, 256, 256, 256)
    with AlignedPair(*sample) as pair:
        got = caption_windows(pair, counting, [a, a, b, a, b])
        assert counting.pairs == 2
        one_by_one = [caption_windows(pair, model, [w])[0] for w in (a, b)]
    assert got == [one_by_one[0], one_by_one[0], one_by_one[1], one_by_one[0], one_by_one[1]]
