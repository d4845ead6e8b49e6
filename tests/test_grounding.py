"""Region facts, change types, grounded captions and contradiction flags (core.grounding)."""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.features import rasterize
from scipy import ndimage
from shapely.geometry import LineString, Point, Polygon, box
from shapely.ops import unary_union

from changescribe.core.grounding import (
    BUILDING_REMOVED,
    NEW_BUILDING,
    OTHER,
    VEG_GAINED,
    VEG_LOST,
    GroundedRegion,
    classify_change,
    compass_words,
    decoder_type,
    ground_caption,
    ground_region,
    is_no_change,
    measure_pixels,
    region_facts,
    scene_paragraph,
)

SCENE = (0.0, 0.0, 300.0, 300.0)  # x0, y0, x1, y1 in metres; north is up (y grows northwards)


@pytest.mark.parametrize("x, y, words", [
    (50, 250, "north-west part of the scene"), (150, 250, "north part of the scene"),
    (250, 250, "north-east part of the scene"), (50, 150, "west part of the scene"),
    (150, 150, "centre of the scene"), (250, 150, "east part of the scene"),
    (50, 50, "south-west part of the scene"), (150, 50, "south part of the scene"),
    (250, 50, "south-east part of the scene"),
])
def test_position_comes_from_the_region_in_the_scene(x, y, words):
    facts = region_facts(Point(x, y).buffer(8), 200.0, SCENE)
    assert facts.position == words
    assert facts.shape == "compact" and facts.orientation == ""
    # the decoder's crop-relative position is replaced by the region's own, wherever the crop was
    sentence, flag = ground_caption("many houses are built in the bottom right corner of the scene", facts)
    assert sentence == f"many houses are built in the {words}" and flag == ""


def test_shapes_and_orientation():
    assert region_facts(box(0, 0, 10, 10), 100, SCENE).shape == "compact"
    assert region_facts(box(0, 0, 40, 10), 400, SCENE).shape == "elongated"
    east_west = region_facts(LineString([(0, 0), (200, 5)]).buffer(3), 1200, SCENE)
    assert east_west.shape == "linear" and east_west.orientation == "east–west"
    assert 80 <= east_west.orientation_deg <= 100 and east_west.elongation > 6 and east_west.compactness < 0.2
    north_south = region_facts(box(100, 10, 106, 290), 1680, SCENE)
    assert north_south.orientation == "north–south"
    diagonal = region_facts(LineString([(10, 10), (250, 250)]).buffer(3), 2000, SCENE)
    assert diagonal.orientation == "north-east–south-west"
    assert region_facts(LineString([(10, 250), (250, 10)]).buffer(3), 2000, SCENE).orientation == \
        "north-west–south-east"
    assert compass_words(0.9, 0.1) == "north-east part of the scene"


def _scene_pixels(before_rgb, after_rgb, size=64, noise=0.0, seed=0):
    """A (3, size, size) before/after pair on a 0..255 scale: uniform ground with the given colours inside a
    square (rows/cols 16..48), the same ground outside."""
    rng = np.random.default_rng(seed)
    ground = np.array([120, 110, 100], np.float32)[:, None, None] * np.ones((3, size, size), np.float32)
    before, after = ground.copy(), ground.copy()
    before[:, 16:48, 16:48] = np.array(before_rgb, np.float32)[:, None, None]
    after[:, 16:48, 16:48] = np.array(after_rgb, np.float32)[:, None, None]
    if noise:
        before += rng.normal(0, noise, before.shape).astype(np.float32)
        after += rng.normal(0, noise, after.shape).astype(np.float32)
    inside = np.zeros((size, size), bool)
    inside[16:48, 16:48] = True
    return np.clip(before, 0, 255), np.clip(after, 0, 255), inside


def test_pixel_facts_measure_brightness_greenness_texture_and_objects():
    # green, noisy canopy before; flat grey-brown ground after: darker green gone, brighter, smoother
    before, after, inside = _scene_pixels((40, 120, 40), (150, 140, 130), noise=0.0)
    before[:, 16:48, 16:48] += np.random.default_rng(1).normal(0, 25, (3, 32, 32)).astype(np.float32)
    change = np.zeros_like(inside)
    change[18:30, 18:30] = True   # two separate parts of the mask inside the region
    change[36:46, 36:46] = True
    p = measure_pixels(before, after, inside, change)
    assert p.greenness_before > 0.25 and p.greenness_after < 0.05 and p.d_greenness < -0.25
    assert p.d_brightness > 0.1 and p.d_texture < -0.01
    assert p.objects == 2 and p.greenness_index == "ExG"
    # a fourth band is read as near-infrared: NDVI
    nir_b, nir_a = np.full((1, 64, 64), 200, np.float32), np.full((1, 64, 64), 60, np.float32)
    p4 = measure_pixels(np.concatenate([before, nir_b]), np.concatenate([after, nir_a]), inside, change)
    assert p4.greenness_index == "NDVI" and p4.d_greenness < -0.3


def test_a_change_of_the_whole_scene_is_not_counted_as_the_region_s():
    # the after image is brighter and greener everywhere (another season); inside the region nothing else changed
    before, after, inside = _scene_pixels((150, 130, 110), (150, 130, 110))
    after = np.clip(after * np.array([0.95, 1.25, 0.95], np.float32)[:, None, None] + 10, 0, 255)
    ring = ~inside
    alone = measure_pixels(before, after, inside, inside)
    assert alone.d_greenness > 0.05 and alone.d_brightness > 0.04
    p = measure_pixels(before, after, inside, inside, ring)
    assert abs(p.d_greenness) < 0.01 and abs(p.d_brightness) < 0.01
    assert p.background_greenness_change > 0.05


def _facts(before_rgb, after_rgb, geom=None, noise=0.0, area=256.0):
    before, after, inside = _scene_pixels(before_rgb, after_rgb, noise=noise)
    return region_facts(geom if geom is not None else box(200, 200, 216, 216), area, SCENE,
                        measure_pixels(before, after, inside, inside))


def test_change_types_from_the_pixels():
    trees_cut = _facts((40, 120, 40), (150, 140, 130))
    kind, confidence, _ = classify_change(trees_cut)
    assert kind == VEG_LOST and confidence >= 0.5
    planted = _facts((150, 140, 130), (40, 120, 40))
    assert classify_change(planted)[0] == VEG_GAINED
    # a grey roof on bare ground: the facts allow a new or a removed building; the decoder's words decide
    roof = _facts((150, 130, 110), (90, 90, 95))
    assert classify_change(roof, "a house is built")[0] == NEW_BUILDING
    assert classify_change(roof, "the houses are demolished")[0] == BUILDING_REMOVED


def test_a_type_the_facts_contradict_is_not_used_and_is_flagged():
    roof = _facts((150, 130, 110), (90, 90, 95))
    kind, _, reason = classify_change(roof, "the trees are cut down")
    assert kind != VEG_LOST and "greenness did not change" in reason
    g = ground_region("the trees are cut down at the top", roof)
    assert g.change_type != VEG_LOST and "greenness" in g.caption_flag
    assert g.model_caption == "the trees are cut down in the north-east part of the scene"
    assert "tree" not in g.caption and "in the north-east part of the scene" in g.caption
    # grass named as the ground of a building is no claim about vegetation
    assert ground_region("some houses are built on the grass", roof).caption_flag == ""


def test_a_road_on_a_compact_blob_is_flagged_and_the_caption_says_the_facts():
    facts = region_facts(Point(250, 50).buffer(8), 201.0, SCENE)
    g = ground_region("a road has been built in the bottom right corner of the scene", facts)
    assert g.caption_flag == "names a road or path on a compact region"
    assert g.change_type != "new road" and "road" not in g.caption
    assert g.caption.endswith("about 200 m², compact, in the south-east part of the scene")
    assert g.model_caption == "a road has been built in the south-east part of the scene"


def test_no_change_is_never_said_of_a_reported_region():
    facts = _facts((150, 130, 110), (90, 90, 95), area=900.0)
    for sentence in ("there is no difference", "the scene is the same as before", "nothing has changed"):
        g = ground_region(sentence, facts)
        assert g.caption_flag.startswith("no-change sentence on a region reported as changed")
        assert not is_no_change(g.caption) and "about 900 m²" in g.caption
        assert g.model_caption == sentence
    empty = ground_region("", facts)
    assert empty.caption_flag == "" and empty.model_caption == "" and "about 900 m²" in empty.caption


def test_a_house_on_a_long_thin_strip_is_flagged():
    facts = region_facts(LineString([(0, 150), (290, 150)]).buffer(2), 1160.0, SCENE)
    g = ground_region("some houses are built", facts)
    assert g.caption_flag == "names a building on a long thin strip" and g.change_type != NEW_BUILDING
    assert "along a east–west line" not in g.caption and "linear along an east–west line" in g.caption


def test_decoder_class_words():
    assert decoder_type("many houses are built along the road") == NEW_BUILDING
    assert decoder_type("two houses are demolished and replaced by bareland") == BUILDING_REMOVED
    assert decoder_type("the trees on the left are removed") == VEG_LOST
    assert decoder_type("some trees are planted") == VEG_GAINED
    assert decoder_type("a road is built") == "new road"
    assert decoder_type("there is no difference") is None and decoder_type("") is None


def test_scene_paragraph_totals_by_type_and_counts_flags():
    ne = [region_facts(Point(250 + dx, 250).buffer(5), 80.0, SCENE) for dx in (0, 10, 20)]
    sw = region_facts(Point(40, 40).buffer(10), 300.0, SCENE)
    regions = [(f, GroundedRegion(NEW_BUILDING, 0.8, f"new building {i}", "", "x" if i == 0 else ""))
               for i, f in enumerate(ne)] + [(sw, GroundedRegion(VEG_LOST, 0.9, "vegetation lost big", "", ""))]
    text = scene_paragraph("4 changed regions covering 540 m²", regions, flagged=1)
    assert text.startswith("4 changed regions covering 540 m²: ")
    assert "vegetation lost (1, 300 m²), in the south-west part of the scene" in text
    assert "new buildings (3, 240 m²), concentrated in the north-east part of the scene" in text
    assert "Largest: vegetation lost big" in text
    assert "1 decoder caption contradicts the facts of its region (flagged)" in text
    assert OTHER not in text


def _truth_regions(seeds):
    """(true type, facts) of every change of generated scenes, measured on the rendered pixels."""
    from changescribe.training.synthetic import make_pair

    names = {("building", "appeared"): NEW_BUILDING, ("building", "vanished"): BUILDING_REMOVED,
             ("road", "appeared"): "new road", ("vegetation", "vanished"): VEG_LOST,
             ("vegetation", "appeared"): VEG_GAINED, ("water", "appeared"): "water", ("water", "vanished"): "water"}
    out = []
    for seed in seeds:
        pair = make_pair(256, seed=seed, change_level=0.8)
        h, w = pair.change_mask.shape
        for rec in pair.changes:
            rings = [[(x, y) for y, x in ring] for ring in rec["polygons"]]
            inside = rasterize([(Polygon(r), 1) for r in rings], out_shape=(h, w)).astype(bool)
            if inside.sum() < 8:
                continue
            geom = unary_union([Polygon([(x, h - y) for x, y in r]) for r in rings])  # north up
            changed = pair.change_mask.astype(bool)
            ring = ndimage.binary_dilation(inside, iterations=8) & ~inside & ~changed
            px = measure_pixels(pair.before.astype(np.float32), pair.after.astype(np.float32), inside, changed, ring)
            cy, cx = rec["centroid"]
            out.append((names[(rec["object"], rec["kind"])], compass_words(cx / w, cy / h),
                        region_facts(geom, geom.area * 0.25, (0, 0, w, h), px)))
    return out


def test_facts_on_generated_scenes_with_known_geometry():
    regions = _truth_regions(range(900, 906))
    assert len(regions) >= 15
    # compass words from the region's own centroid agree with the generator's centroid of the change
    assert all(facts.position == where for _, where, facts in regions)
    hits = [classify_change(facts)[0] == truth for truth, _, facts in regions]
    assert np.mean(hits) >= 0.5, np.mean(hits)
    lost = [facts.pixels for truth, _, facts in regions if truth == VEG_LOST]
    assert lost and all(p.d_greenness < 0 for p in lost)


def test_rotated_rectangle_is_shapely_s_to_the_last_bit():
    """Elongation and orientation come from the minimum rotated rectangle: computed for all hull edges at once,
    it is the very rectangle shapely's ``minimum_rotated_rectangle`` gives (ties included: squares, discs)."""
    from shapely.affinity import rotate
    from shapely.geometry import MultiPolygon

    from changescribe.core.grounding import _rotated_rectangle

    rng = np.random.default_rng(3)
    shapes = [box(0, 0, 10, 10), Point(3, 4).buffer(5), LineString([(0, 0), (1, 1)]), Point(1, 1),
              MultiPolygon([box(0, 0, 2, 2), box(5, 1, 9, 3)]), LineString([(0, 0), (200, 5)]).buffer(3)]
    for _ in range(300):
        x, y = rng.uniform(3e5, 4e5), rng.uniform(4e6, 5e6)
        w, h = rng.integers(1, 60, 2) * 0.6
        shapes.append(rotate(box(x, y, x + w, y + h), float(rng.uniform(0, 180))))
        shapes.append(Polygon(rng.uniform(0, 50, (int(rng.integers(3, 12)), 2)) + (x, y)).convex_hull)
    for geom in shapes:
        rect = geom.minimum_rotated_rectangle
        want = [list(v) for v in rect.exterior.coords.xy] if rect.geom_type == "Polygon" else [[0, 0], [0, 0]]
        assert [list(v) for v in _rotated_rectangle(geom)] == want
