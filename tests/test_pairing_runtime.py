"""Choosing the change detector at run time (``--detector`` / ``detect_changes(detector=...)``) and the model's own
caption beam size as the default, on real GeoTIFFs with small model files written here."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import rasterio
import torch

from changescribe.core.cli import build_parser, main
from changescribe.core.errors import ModelError
from changescribe.core.geopackage import read_run
from changescribe.core.model_api import ChangeModel, InputSpec
from changescribe.core.model_file import save_model_file
from changescribe.core.model_loading import load_model_file, with_detector
from changescribe.core.models.pairing import PairedChangeModel
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.pipeline import detect_changes
from changescribe.training.synthetic import write_pair
from changescribe.core.vocabulary import Vocabulary

CAPTIONS = ["a house is built near the road", "there is no difference", "many trees are removed"]
SPEC = InputSpec(tile_size=128, gsd=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny BIT detectors (different random weights), a SEN captioner paired with the first by its card, the
    same SEN without a pairing, and a 160² synthetic pair."""
    d = tmp_path_factory.mktemp("zoo")
    bit_cfg = dataclasses.replace(get_entry("bit-cd").config, dec_depth=1, output_stride=16)
    for seed, name in ((1, "bit-a"), (2, "bit-b")):
        torch.manual_seed(seed)
        bit, _ = build_model("bit-cd", bit_cfg)
        save_model_file(d / name, bit, "bit-cd", bit_cfg, SPEC, name=name)
    vocab = Vocabulary.build(CAPTIONS, min_count=1, max_length=10)
    sen_cfg = dataclasses.replace(get_entry("sen-small").config, d_model=64, ffn_dim=128, heads=4)
    torch.manual_seed(3)
    sen, sen_cfg = build_model("sen-small", sen_cfg, vocabulary=vocab)
    save_model_file(d / "sen-paired", sen, "sen-small", sen_cfg, SPEC, vocab, name="sen-paired", pair_with="bit-a")
    save_model_file(d / "sen-alone", sen, "sen-small", sen_cfg, SPEC, vocab, name="sen-alone")
    pair = write_pair(d / "pair", "p", size=160, seed=7_000_003, change_level=0.8)
    return d, pair


def _probability(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _cli(*argv: str) -> int:
    return main(["detect", *argv, "-q", "--min-area", "20"])


def test_cli_detector_replaces_the_card_pairing(files, tmp_path, capsys):
    d, pair = files
    # reference masks: each detector run on its own
    for name in ("bit-a", "bit-b"):
        assert _cli(str(pair.before), str(pair.after), "-o", str(tmp_path / f"{name}.gpkg"), "--model",
                    str(d / f"{name}.json"), "--probability", str(tmp_path / f"{name}.tif")) == 0
    assert not np.array_equal(_probability(tmp_path / "bit-a.tif"), _probability(tmp_path / "bit-b.tif"))
    # the card pairs SEN with bit-a; --detector bit-b (a card path) overrides it
    out = tmp_path / "sen.gpkg"
    assert _cli(str(pair.before), str(pair.after), "-o", str(out), "--model", str(d / "sen-paired.json"),
                "--detector", str(d / "bit-b.json"), "--probability", str(tmp_path / "sen.tif"), "--json") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    np.testing.assert_array_equal(_probability(tmp_path / "sen.tif"), _probability(tmp_path / "bit-b.tif"))
    run = read_run(out)
    assert run["model"]["paired"]["detector"]["name"] == "bit-b"
    assert run["model"]["paired"]["captioner"]["name"] == "sen-paired"
    assert line["regions"] >= 1 and line["scene_caption"]
    # a captioner without any pairing runs once a detector is named (by name, through CHANGESCRIBE_MODEL_PATH)
    out2 = tmp_path / "alone.gpkg"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHANGESCRIBE_MODEL_PATH", str(d))
        assert _cli(str(pair.before), str(pair.after), "-o", str(out2), "--model", str(d / "sen-alone.json"),
                    "--detector", "bit-a", "--probability", str(tmp_path / "alone.tif")) == 0
    np.testing.assert_array_equal(_probability(tmp_path / "alone.tif"), _probability(tmp_path / "bit-a.tif"))


def test_cli_detector_errors(files, tmp_path, capsys):
    d, pair = files
    args = [str(pair.before), str(pair.after), "-o", str(tmp_path / "x.gpkg")]
    # the detector has no change head
    assert _cli(*args, "--model", str(d / "sen-paired.json"), "--detector", str(d / "sen-alone.json")) == 2
    assert "has no change head" in capsys.readouterr().err
    # a pair cannot be the detector (no chains)
    assert _cli(*args, "--model", str(d / "sen-alone.json"), "--detector", str(d / "sen-paired.json")) == 2
    assert "is itself a captioner paired" in capsys.readouterr().err
    # a model that does not caption takes no detector
    assert _cli(*args, "--model", str(d / "bit-a.json"), "--detector", str(d / "bit-b.json")) == 2
    assert "does not caption" in capsys.readouterr().err
    # an unknown detector name
    assert _cli(*args, "--model", str(d / "sen-alone.json"), "--detector", "no-such-detector") == 2
    assert "no model named 'no-such-detector'" in capsys.readouterr().err
    # without a detector, a captioner with no change head cannot make a mask
    with pytest.raises(NotImplementedError, match="pair it with a change detector"):
        detect_changes(pair.before, pair.after, str(d / "sen-alone.json"), None, device="cpu")
    assert not (tmp_path / "x.gpkg").exists()


def test_detector_for_a_model_with_its_own_change_head(files):
    """Allowed: the given detector's mask replaces the model's own, the model still captions."""
    d, _ = files
    vocab = Vocabulary.build(CAPTIONS, min_count=1, max_length=10)
    cfg = dataclasses.replace(get_entry("pix4cap-tiny").config, d_model=64, heads=4, ffn_dim=128)
    torch.manual_seed(4)
    module, cfg = build_model("pix4cap-tiny", cfg, vocabulary=vocab)
    card = save_model_file(d / "p4c", module, "pix4cap-tiny", cfg, SPEC, vocab)
    pix4cap = load_model_file(card)
    paired = with_detector(pix4cap, str(d / "bit-b.json"))
    assert isinstance(paired, PairedChangeModel) and paired.captioner is pix4cap and paired.can_caption
    g = torch.Generator().manual_seed(0)
    before, after = torch.rand(1, 3, 128, 128, generator=g) * 255, torch.rand(1, 3, 128, 128, generator=g) * 255
    bit_b = load_model_file(d / "bit-b.json")
    torch.testing.assert_close(paired.change_probability(before, after), bit_b.change_probability(before, after))
    assert paired.caption(before, after) == pix4cap.caption(before, after)
    with pytest.raises(ModelError, match="reads 4 bands"):
        with_detector(pix4cap, _FourBandDetector())


class _FourBandDetector(ChangeModel):
    """A detector for another band count (the band check needs no weights)."""

    name = "four-band"
    input_spec = InputSpec(bands=4)
    can_caption = False

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return (after - before).abs().mean(1).clamp(0, 1)


class _BeamRecorder(ChangeModel):
    """A captioning ChangeModel that records the beam size the pipeline asks for (its paper's would be 4)."""

    name = "beam-recorder"
    input_spec = InputSpec(tile_size=64, gsd=None)
    can_caption = True
    default_beam_size = 4

    def __init__(self) -> None:
        self.beams: set[int] = set()

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((after - before).abs().mean(1) - 40.0) / 8.0)

    def caption(self, before, after, beam_size: int = 1, max_length: int | None = None) -> list[str]:
        self.beams.add(beam_size)
        return ["something changed"] * before.shape[0]


def test_beam_size_defaults_to_the_models_own(files):
    _, pair = files
    model = _BeamRecorder()
    detect_changes(pair.before, pair.after, model, None, device="cpu")
    assert model.beams == {4}
    model.beams.clear()
    detect_changes(pair.before, pair.after, model, None, device="cpu", beam_size=1)
    assert model.beams == {1}
    args = build_parser().parse_args(["detect", "a.tif", "b.tif", "-o", "o.gpkg"])
    assert args.beam_size is None and args.detector is None
    sen = load_model_file(files[0] / "sen-paired.json")
    assert sen.default_beam_size == 3  # SEN's paper beam, from its card's config
