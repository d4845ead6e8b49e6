"""Black or white fill along an image border, undeclared as NoData, is no data by default (issue 14.4)."""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.windows import Window

from changescribe.core.pipeline import detect_changes
from changescribe.core.raster_pair import AlignedPair, BorderFill, validate_pair
from changescribe.training.synthetic import write_pair

STRIP = 48  # px of black fill along the after image's left edge


def _black_strip(path, cols: int, value: int = 0) -> None:
    with rasterio.open(path, "r+") as ds:
        assert ds.nodata is None  # the file declares no NoData, like many mosaics and warped exports
        for b in range(1, ds.count + 1):
            ds.write(np.full((ds.height, cols), value, ds.dtypes[b - 1]), b, window=Window(0, 0, cols, ds.height))


def test_runs_from_the_border_only():
    fill = np.zeros((6, 8), bool)
    fill[:, :2] = True       # a strip along the left edge
    fill[2:4, 4:6] = True    # a dark patch inside: not fill
    fill[5, :] = True        # the last row
    data = np.where(fill, 0, 100).astype(np.uint8)[None]
    runs = BorderFill.scan(lambda w: (data[:, int(w.row_off):int(w.row_off + w.height)],
                                      np.ones((int(w.height), 8), bool)), 8, 6, (0, 255))
    got = runs.mask(Window(0, 0, 8, 6))
    expected = np.zeros((6, 8), bool)
    expected[:, :2] = True
    expected[5, :] = True
    assert (got == expected).all()
    assert (runs.mask(Window(3, 1, 4, 3)) == expected[1:4, 3:7]).all()  # any window agrees with the whole


def test_black_strip_is_no_data_and_the_alignment_says_so(tmp_path):
    pair = write_pair(tmp_path, "fill", size=256, seed=11, change_level=0.0)
    _black_strip(pair.after, STRIP)
    report = validate_pair(pair.before, pair.after)
    assert report.undeclared_nodata == ["before", "after"]
    with AlignedPair(pair.before, pair.after) as aligned:
        _, _, valid = aligned.read(Window(0, 0, 256, 256))
        notes = aligned.report.notes
    assert not valid[:, :STRIP].any() and valid[:, STRIP:].all()
    assert any(n.startswith("after: declares no NoData; black/white fill along its border is no data (18.8 %")
               for n in notes), notes
    with AlignedPair(pair.before, pair.after, fill_nodata=False) as aligned:
        assert aligned.read(Window(0, 0, 256, 256))[2].all()
        assert any("fill detection off" in n for n in aligned.report.notes)


def test_no_region_in_a_black_strip(tmp_path):
    pair = write_pair(tmp_path, "strip", size=384, seed=3, change_level=0.0)
    _black_strip(pair.after, STRIP)
    with rasterio.open(pair.after) as ds:
        strip_right = ds.bounds.left + STRIP * ds.res[0]
    # The generated-scenes model reports a black strip read as image (the default model learnt fill strips are not
    # change, so it could not show that this test can fail).
    off = detect_changes(pair.before, pair.after, "pix4cap-synthetic", tmp_path / "off.gpkg", captions=False,
                         device="cpu", fill_nodata=False)
    in_strip = off.regions.read().geometry.bounds.minx < strip_right
    assert in_strip.any()  # read as image, the strip is change: the test can fail
    on = detect_changes(pair.before, pair.after, "pix4cap-synthetic", tmp_path / "on.gpkg", captions=False,
                        device="cpu")
    regions = on.regions.read()
    assert not (regions.geometry.bounds.minx < strip_right).any(), regions.geometry.bounds
    assert any("black/white fill" in line for line in on.alignment.lines())


def test_white_fill_of_16_bit_imagery_too(tmp_path):
    pair = write_pair(tmp_path, "u16", size=192, seed=4, dtype="uint16")
    _black_strip(pair.before, 20, value=65535)
    with AlignedPair(pair.before, pair.after) as aligned:
        valid = aligned.read(Window(0, 0, 192, 192))[2]
    assert not valid[:, :20].any() and valid[:, 20:].mean() > 0.99


def test_cli_switch_turns_it_off(tmp_path):
    from changescribe.core.cli import build_parser, detect_request

    args = ["detect", "a.tif", "b.tif", "-o", str(tmp_path / "o.gpkg")]
    assert detect_request(build_parser().parse_args(args)).fill_nodata is True
    assert detect_request(build_parser().parse_args(args + ["--keep-border-fill"])).fill_nodata is False
