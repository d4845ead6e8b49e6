"""Region captions checked against the region's own facts (core.grounding): the floor under every caption."""

from __future__ import annotations

import pytest
from shapely.geometry import LineString, Point, box

from changescribe.core.grounding import compass_words, ground_caption, is_no_change, region_facts

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
    assert facts.shape == "compact"


def test_shapes():
    assert region_facts(box(0, 0, 10, 10), 100, SCENE).shape == "compact"
    assert region_facts(box(0, 0, 40, 10), 400, SCENE).shape == "elongated"
    assert region_facts(LineString([(0, 0), (200, 5)]).buffer(3), 1200, SCENE).shape == "linear"
    assert compass_words(0.9, 0.1) == "north-east part of the scene"


def test_a_road_on_a_compact_blob_is_replaced_by_the_facts():
    facts = region_facts(Point(250, 50).buffer(8), 201.0, SCENE)
    caption, reason = ground_caption("a road has been built in the bottom right corner of the scene", facts)
    assert "road" not in caption and reason
    assert caption == "a compact change of about 200 m² in the south-east part of the scene"


def test_no_change_is_never_said_of_a_reported_region():
    facts = region_facts(box(10, 10, 40, 40), 900.0, SCENE)
    for sentence in ("there is no difference", "the scene is the same as before", "nothing has changed", ""):
        caption, reason = ground_caption(sentence, facts)
        assert not is_no_change(caption) and caption.startswith("a compact change of about 900 m²") and reason


def test_a_house_on_a_long_thin_strip_is_replaced():
    facts = region_facts(LineString([(0, 150), (290, 150)]).buffer(2), 1160.0, SCENE)
    caption, reason = ground_caption("some houses are built", facts)
    assert caption.startswith("a linear change of about 1160 m²") and reason


def test_a_consistent_caption_keeps_its_words_and_gets_the_scene_position():
    facts = region_facts(box(20, 250, 50, 280), 900.0, SCENE)
    caption, reason = ground_caption("many houses are built in the bottom right corner of the scene", facts)
    assert reason == ""
    assert caption == "many houses are built in the north-west part of the scene"
    road = region_facts(LineString([(0, 150), (290, 150)]).buffer(4), 2300.0, SCENE)
    assert ground_caption("a road is built on the left", road) == ("a road is built in the centre of the scene", "")
