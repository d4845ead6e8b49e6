"""How far grounded captions can be trusted (issue 18): change types and position words on generated scenes with
their true types, and grounded vs decoder captions on the real LEVIR-CC pairs against their five references.

    .venv/bin/python bench/grounding.py synthetic --seeds 100 140      # facts + types on true change regions
    .venv/bin/python bench/grounding.py pipeline --seeds 200 210        # whole runs, regions matched to the truth
    .venv/bin/python bench/grounding.py levircc --model default         # BLEU-4 / CIDEr-D, 3 real pairs

``synthetic`` renders generated scenes (training/synthetic.py) and measures every true change region's pixels
(core.grounding.measure_pixels on the rendered pair): the type the rules give from the facts alone, and with the
decoder's class words taken from the generator's own caption of the change (the best case of a decoder). Position
words: the compass words of the region's centroid against those of the generator's centroid, and the decoder-style
position phrase of the generator's caption (which describes the whole 256² image, as a crop's would) read as
compass words. ``levircc`` writes each real pair as a GeoTIFF (0.5 m, the LEVIR-CC GSD), runs the pipeline and
scores, per pair, the decoder's sentence for the whole pair, the largest region's decoder sentence
(``model_caption``) and its grounded caption against the five references, with pycocoevalcap's BLEU-4 and
CIDEr-D (captions lower-cased and split on spaces, as the references were made; no Java tokenizer).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TRUE_TYPES = {("building", "appeared"): "new building", ("building", "vanished"): "building removed or damaged",
              ("road", "appeared"): "new road", ("vegetation", "vanished"): "vegetation lost",
              ("vegetation", "appeared"): "vegetation gained", ("water", "appeared"): "water",
              ("water", "vanished"): "water"}
_CROP_WORDS = {"top": (None, 0.15), "upper": (None, 0.15), "bottom": (None, 0.85), "lower": (None, 0.85),
               "left": (0.15, None), "right": (0.85, None)}


def crop_position(sentence: str) -> str | None:
    """The compass words a LEVIR-CC-style position phrase ("in the top left corner") stands for, or None."""
    from changescribe.core.grounding import compass_words

    m = re.search(r"\b(top|bottom|upper|lower|left|right|middle|center|centre)\b(\s+(left|right))?", sentence)
    if not m:
        return None
    fx, fy = 0.5, 0.5
    for word in (m.group(1), m.group(3)):
        if word in _CROP_WORDS:
            x, y = _CROP_WORDS[word]
            fx, fy = x if x is not None else fx, y if y is not None else fy
    return compass_words(fx, fy)


def synthetic(seeds: range, size: int = 256) -> dict:
    from rasterio.features import rasterize
    from scipy import ndimage
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    from changescribe.core.grounding import classify_change, compass_words, measure_pixels, region_facts
    from changescribe.training.synthetic import make_pair

    rows = []
    for seed in seeds:
        pair = make_pair(size, seed=seed, change_level=0.8)
        h, w = pair.change_mask.shape
        for rec in pair.changes:
            rings = [[(x, y) for y, x in ring] for ring in rec["polygons"]]
            inside = rasterize([(Polygon(r), 1) for r in rings], out_shape=(h, w)).astype(bool)
            if inside.sum() < 8:
                continue
            geom = unary_union([Polygon([(x, h - y) for x, y in r]) for r in rings])
            changed = pair.change_mask.astype(bool)
            ring = ndimage.binary_dilation(inside, iterations=8) & ~inside & ~changed  # as the pipeline's margin
            px = measure_pixels(pair.before.astype(np.float32), pair.after.astype(np.float32), inside, changed, ring)
            facts = region_facts(geom, geom.area * 0.25, (0, 0, w, h), px)
            truth = TRUE_TYPES[(rec["object"], rec["kind"])]
            words = {"building": "houses", "road": "road", "vegetation": "trees", "water": "pond"}[rec["object"]]
            verb = "are built" if rec["kind"] == "appeared" else "are removed"
            if rec["object"] == "vegetation":
                verb = "are planted" if rec["kind"] == "appeared" else "are cut down"
            said = f"some {words} {verb}"
            cy, cx = rec["centroid"]
            rows.append(dict(truth=truth, facts_only=classify_change(facts)[0],
                             with_words=classify_change(facts, said)[0], position=facts.position,
                             true_position=compass_words(cx / w, cy / h),
                             caption_position=crop_position(pair.captions[0]), changes=len(pair.changes)))
    n = len(rows)
    per_type = collections.defaultdict(lambda: [0, 0, 0])
    for r in rows:
        t = per_type[r["truth"]]
        t[0] += 1
        t[1] += r["facts_only"] == r["truth"]
        t[2] += r["with_words"] == r["truth"]
    single = [r for r in rows if r["changes"] == 1 and r["caption_position"] is not None]
    return {
        "scenes": len(seeds), "regions": n,
        "type_accuracy_facts_only": round(sum(r["facts_only"] == r["truth"] for r in rows) / n, 3),
        "type_accuracy_with_decoder_words": round(sum(r["with_words"] == r["truth"] for r in rows) / n, 3),
        "other_change_share": round(sum(r["facts_only"] == "other change" for r in rows) / n, 3),
        "per_type": {k: {"regions": v[0], "facts_only": round(v[1] / v[0], 3), "with_words": round(v[2] / v[0], 3)}
                     for k, v in sorted(per_type.items())},
        "grounded_position_correct": round(sum(r["position"] == r["true_position"] for r in rows) / n, 3),
        "caption_position_correct_single_change_scenes": (
            round(sum(r["caption_position"] == r["true_position"] for r in single) / len(single), 3) if single
            else None),
        "single_change_scenes_with_a_position_phrase": len(single),
    }


def pipeline(seeds: range, size: int = 512, model_name: str = "pix4cap-synthetic") -> dict:
    """The whole pipeline on generated scenes: each region matched to the true change it overlaps most; its type
    (facts + the decoder's words) against the true type, and position words against the true change's centroid:
    the region's grounded position, and the decoder's own position phrase (which describes its crop)."""
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    import changescribe.core.captioning as captioning
    from changescribe.core.grounding import compass_words, ground_region
    from changescribe.core.model_loading import load_model
    from changescribe.core.pipeline import detect_changes
    from changescribe.training.synthetic import write_pair

    raw: dict[tuple, str] = {}

    def spy(caption, facts):  # the decoder's sentence before grounding, keyed by the region's facts
        raw[(round(facts.fx, 6), round(facts.fy, 6))] = caption
        return ground_region(caption, facts)

    captioning.ground_region = spy
    model = load_model(model_name, "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            files = write_pair(Path(tmp) / str(seed), "s", size=size, seed=seed, change_level=0.8)
            meta = json.loads(files.captions.read_text())
            result = detect_changes(files.before, files.after, model, Path(tmp) / f"{seed}.gpkg", min_area=4.0,
                                    device="cpu")
            frame = result.regions.read()
            with __import__("rasterio").open(files.before) as src:
                t = src.transform
            truths = []
            for rec in meta["changes"]:
                geom = unary_union([Polygon([t * (x, y) for y, x in ring]) for ring in rec["polygons"]])
                cy, cx = rec["centroid"]
                truths.append((TRUE_TYPES[(rec["object"], rec["kind"])], geom, compass_words(cx / size, cy / size)))
            scene = (t.c, t.f + t.e * size, t.c + t.a * size, t.f)
            for _, row in frame.iterrows():
                overlaps = [(row.geometry.intersection(g).area, kind, where) for kind, g, where in truths]
                best = max(overlaps, default=(0, None, None))
                if best[0] < 0.3 * row.geometry.area:
                    continue  # a false alarm or a sliver of a true change
                c = row.geometry.centroid
                fx, fy = (c.x - scene[0]) / (scene[2] - scene[0]), (scene[3] - c.y) / (scene[3] - scene[1])
                said = raw.get((round(fx, 6), round(fy, 6)), "")
                rows.append(dict(truth=best[1], kind=row["change_type"], where=best[2], position=row["position"],
                                 said_position=crop_position(said), flag=bool(row["caption_flag"]),
                                 said=said))
    n = len(rows)
    with_phrase = [r for r in rows if r["said_position"] is not None]
    return {"scenes": len(seeds), "size": size, "model": model_name, "matched_regions": n,
            "type_accuracy": round(sum(r["kind"] == r["truth"] for r in rows) / max(n, 1), 3),
            "other_change_share": round(sum(r["kind"] == "other change" for r in rows) / max(n, 1), 3),
            "flagged_share": round(sum(r["flag"] for r in rows) / max(n, 1), 3),
            "grounded_position_correct": round(sum(r["position"] == r["where"] for r in rows) / max(n, 1), 3),
            "decoder_sentences_with_a_position_phrase": len(with_phrase),
            "decoder_position_correct": round(sum(r["said_position"] == r["where"] for r in with_phrase)
                                              / max(len(with_phrase), 1), 3),
            "grounded_position_correct_same_regions": round(sum(r["position"] == r["where"] for r in with_phrase)
                                                            / max(len(with_phrase), 1), 3)}


def _scores(candidates: dict[str, str], refs: dict[str, list[str]]) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    def tok(s: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9\- ]", " ", s.lower()).split())

    res = {k: [tok(v) or "nothing"] for k, v in candidates.items()}
    gts = {k: [tok(s) for s in refs[k]] for k in candidates}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": round(float(bleu[3]), 4), "CIDEr-D": round(float(cider), 4)}


def levircc(model_name: str, device: str = "cpu") -> dict:
    import rasterio
    import torch
    from PIL import Image
    from rasterio.transform import from_origin

    from changescribe.core.model_loading import load_model
    from changescribe.core.pipeline import detect_changes

    meta = json.loads((DATA / "levircc_captions.json").read_text())
    images = meta["images"] if isinstance(meta, dict) else meta
    names = sorted(p.stem for p in (DATA / "levircc" / "A").glob("*.png"))
    refs = {im["filename"].split(".")[0]: im["sentences"] for im in images if im["filename"].split(".")[0] in names}
    model = load_model(model_name, device)
    whole, model_caps, grounded, regions = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            paths = []
            arrays = []
            for side in ("A", "B"):
                rgb = np.asarray(Image.open(DATA / "levircc" / side / f"{name}.png").convert("RGB"))
                arrays.append(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32))[None])
                path = Path(tmp) / f"{name}_{side}.tif"
                with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[1], height=rgb.shape[0], count=3,
                                   dtype="uint8", crs="EPSG:32633",
                                   transform=from_origin(500000, 5000000, 0.5, 0.5)) as dst:
                    dst.write(rgb.transpose(2, 0, 1))
                paths.append(path)
            with torch.no_grad():
                whole[name] = model.caption(arrays[0].to(model.device), arrays[1].to(model.device),
                                            beam_size=model.default_beam_size)[0]
            result = detect_changes(paths[0], paths[1], model, Path(tmp) / f"{name}.gpkg", device=device)
            frame = result.regions.read()
            regions[name] = {"scene_caption": result.scene_caption, "regions": [
                {k: (row[k] if not isinstance(row[k], float) else round(row[k], 3)) for k in
                 ("region_id", "area_m2", "change_type", "type_confidence", "caption", "model_caption",
                  "caption_flag")} for _, row in frame.sort_values("area_m2", ascending=False).iterrows()]}
            if len(frame):
                top = frame.sort_values("area_m2", ascending=False).iloc[0]
                model_caps[name], grounded[name] = top["model_caption"] or "", top["caption"] or ""
            else:
                model_caps[name] = grounded[name] = result.scene_caption
    return {"pairs": names, "model": model_name,
            "decoder_whole_pair": {**_scores(whole, refs), "captions": whole},
            "decoder_largest_region_model_caption": {**_scores(model_caps, refs), "captions": model_caps},
            "grounded_largest_region_caption": {**_scores(grounded, refs), "captions": grounded},
            "runs": regions}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--seeds", nargs=2, type=int, default=(100, 140))
    s.add_argument("--size", type=int, default=256)
    pp = sub.add_parser("pipeline")
    pp.add_argument("--seeds", nargs=2, type=int, default=(200, 210))
    pp.add_argument("--size", type=int, default=512)
    pp.add_argument("--model", default="pix4cap-synthetic")
    lv = sub.add_parser("levircc")
    lv.add_argument("--model", default="default")
    lv.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.what == "synthetic":
        out = synthetic(range(*args.seeds), args.size)
    elif args.what == "pipeline":
        out = pipeline(range(*args.seeds), args.size, args.model)
    else:
        out = levircc(args.model, args.device)
    json.dump(out, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
