"""SEN's two training stages: MoCo-v2's InfoNCE, queue and momentum; the multi-date views (ordered strategy, season
augment, the three folder layouts); stage 1 through the CLI on synthetic pairs, its backbone file loaded by stage 2,
whose model file the pipeline runs paired with a change detector; the engine's plateau scheduler and its resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from PIL import Image
from torch import nn

from changescribe.core.model_api import InputSpec
from changescribe.core.model_file import read_card, save_model_file
from changescribe.core.model_loading import load_model_file
from changescribe.core.models.backbones import ResNetBackbone
from changescribe.core.models.pairing import PairedChangeModel
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.pipeline import detect_changes
from changescribe.training.synthetic import write_pair
from changescribe.core.vocabulary import Vocabulary
from changescribe.training.__main__ import main as training_main
from changescribe.training.config import AugmentConfig, config_from_dict, load_config
from changescribe.training.contrastive import MoCo, backbone_state_dict, info_nce, moco_logits
from changescribe.training.datasets.augment import BiTemporalAugment
from changescribe.training.datasets.multidate import BiTemporalViews, MultiDateTiles, date_pair
from changescribe.training.engine import Task, fit
from changescribe.training.recipes import sen
from changescribe.training.recipes.sen_pretrain import read_backbone_metadata

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"
SHARED = REPO.parent / "shared" / "data"
QUIET = {"log.tensorboard": False, "log.plot": False}
TINY_SEN = {"d_model": 32, "ffn_dim": 64, "heads": 2}  # sen-small's ResNet-18 extractor, a narrow head


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny convolutions run several times faster than with threads that compete
    for the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- MoCo-v2 -----------------------------------------------------------------------------------------------------
def test_info_nce_on_a_constructed_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # two negatives as columns: (0, 1) and (-1, 0)
    logits = moco_logits(q, k, queue, temperature=0.5)
    assert torch.allclose(logits, torch.tensor([[1.2, 0.0, -2.0], [2.0, 2.0, 0.0]]))
    by_hand = [-math.log(math.exp(1.2) / (math.exp(1.2) + 1 + math.exp(-2.0))),
               -math.log(math.exp(2.0) / (2 * math.exp(2.0) + 1))]
    assert info_nce(logits).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    # a sharper temperature makes the well-separated first row cheaper
    assert info_nce(moco_logits(q[:1], k[:1], queue, 0.1)).item() < by_hand[0]


def _tiny_moco(**kw) -> MoCo:
    torch.manual_seed(0)
    return MoCo(ResNetBackbone("resnet18", 6, stages=1), dim=4, **kw)


def test_queue_is_a_ring_buffer():
    moco = _tiny_moco(queue_size=5)
    first = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    moco.enqueue(first)
    assert int(moco.queue_ptr) == 3 and torch.equal(moco.queue[:, :3], first.t())
    old = moco.queue[:, 1:3].clone()
    second = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    moco.enqueue(second)  # columns 3, 4, then wraps to 0: the oldest key goes first
    assert int(moco.queue_ptr) == 1
    assert torch.equal(moco.queue[:, [3, 4, 0]], second.t()) and torch.equal(moco.queue[:, 1:3], old)
    with pytest.raises(ValueError, match="do not fit"):
        moco.enqueue(torch.randn(6, 4))


def test_key_encoder_follows_the_momentum_rule_and_queues_its_keys():
    moco = _tiny_moco(queue_size=8, momentum=0.9, bn_groups=2)
    for pq, pk in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad  # the key encoder starts as a copy
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as an optimiser step would
    k_old = [p.clone() for p in moco.encoder_k.parameters()]
    q_now = [p.clone() for p in moco.encoder_q.parameters()]
    x, y = torch.randn(4, 6, 32, 32), torch.randn(4, 6, 32, 32)
    logits = moco(x, y)
    assert logits.shape == (4, 1 + 8) and int(moco.queue_ptr) == 4
    for pk, ko, qn in zip(moco.encoder_k.parameters(), k_old, q_now):
        assert torch.allclose(pk, 0.9 * ko + 0.1 * qn, atol=1e-6)
    # the queued keys are the normalised key embeddings, and they were the positives of this batch
    keys = moco.queue[:, :4].t()
    assert torch.allclose(keys.norm(dim=1), torch.ones(4), atol=1e-5)
    q = torch.nn.functional.normalize(moco._grouped(moco.encoder_q, x), dim=1)
    assert torch.allclose(logits[:, 0], (q * keys).sum(1) / moco.temperature, atol=1e-4)
    info_nce(logits).backward()  # gradients reach the query encoder only
    assert all(p.grad is not None for p in moco.encoder_q.parameters())
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    moco.eval()  # outside training: no momentum step, no enqueue
    before = [p.clone() for p in moco.encoder_k.parameters()]
    moco(x, y)
    assert int(moco.queue_ptr) == 4 and all(torch.equal(a, b) for a, b in zip(before, moco.encoder_k.parameters()))


def test_backbone_state_dict_is_torchvision_layout():
    moco = _tiny_moco(queue_size=4)
    state = backbone_state_dict(moco.encoder_q.backbone)
    assert "conv1.weight" in state and state["conv1.weight"].shape[1] == 6 and "layer1.0.conv1.weight" in state
    fresh = ResNetBackbone("resnet18", 6, stages=1)
    fresh.load_state_dict({k.replace("layer1.", "layers.0."): v for k, v in state.items()})


# ---- the multi-date views ------------------------------------------------------------------------------------
def _place_folders(root: Path, places: int, dates: int, size: int = 40) -> Path:
    """ROOT/<place>/<date>.png, date t filled with grey level 20 (t + 1) + place (a readable signature)."""
    for p in range(places):
        for t in range(dates):
            (root / f"place{p}").mkdir(parents=True, exist_ok=True)
            img = np.full((size, size, 3), 20 * (t + 1) + p, np.uint8)
            Image.fromarray(img).save(root / f"place{p}" / f"2020-0{t + 1}-01.png")
    return root


def _date_of(view_half: torch.Tensor, place: int) -> int:
    return (int(view_half[0, 0, 0]) - place) // 20 - 1


def test_ordered_strategy_puts_the_older_date_first_and_season_augment_draws_twice(tmp_path):
    places = MultiDateTiles(_place_folders(tmp_path / "tiles", 2, 4))
    assert len(places) == 2 and places.num_dates(0) == 4 and places.name(1) == "place1"
    plain = BiTemporalAugment(AugmentConfig())
    torch.manual_seed(0)
    views = BiTemporalViews(places, 32, plain, "ordered", "augment")
    seen, differ = set(), 0
    for _ in range(80):
        item = views[0]
        assert item["query"].shape == item["key"].shape == (6, 32, 32) and item["query"].dtype == torch.uint8
        iq, jq, ik, jk = item["dates"].tolist()
        assert _date_of(item["query"][:3], 0) == iq and _date_of(item["query"][3:], 0) == jq
        assert _date_of(item["key"][:3], 0) == ik and _date_of(item["key"][3:], 0) == jk
        assert iq <= jq and ik <= jk
        seen |= {(iq, jq), (ik, jk)}
        differ += (iq, jq) != (ik, jk)
    assert seen == {(i, j) for i in range(4) for j in range(i, 4)}  # SEN's 4 + 3 + 2 + 1 = 10 pairs
    assert differ > 40
    # "random" season: the key shows the same dates (and, unaugmented, the same window) as the query
    same = BiTemporalViews(places, 32, plain, "ordered", "random")
    for _ in range(5):
        item = same[1]
        assert torch.equal(item["query"], item["key"])
    # unordered: the newer date may come first
    g = torch.Generator().manual_seed(1)
    assert any(i > j for i, j in (date_pair(4, "unordered", g) for _ in range(50)))
    with pytest.raises(ValueError, match="time_swap"):
        BiTemporalViews(places, 32, BiTemporalAugment(AugmentConfig(time_swap=0.5)))
    with pytest.raises(ValueError, match="smaller than data.size"):
        BiTemporalViews(places, 64, plain)[0]


def test_augmented_views_stay_co_registered(tmp_path):
    """Crop and flips are one geometry for both dates of a view: a place whose dates are identical images
    gives views whose two halves are identical; the photometric jitter is drawn per date."""
    root = tmp_path / "same"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    for t in range(2):
        (root / "p").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "p" / f"{t}.png")
    geo = BiTemporalAugment(AugmentConfig(geometric=True, crop=True, crop_scale=(0.2, 1.0)))
    torch.manual_seed(0)
    views = BiTemporalViews(MultiDateTiles(root), 32, geo)
    items = [views[0] for _ in range(4)]
    assert all(torch.equal(i["query"][:3], i["query"][3:]) for i in items)
    assert not all(torch.equal(i["query"], i["key"]) for i in items)  # the two views differ
    light = BiTemporalAugment(AugmentConfig(photometric=True, brightness=0.4, contrast=0.4, saturation=0, hue=0))
    item = BiTemporalViews(MultiDateTiles(root), 32, light)[0]
    assert not torch.equal(item["query"][:3], item["query"][3:])


def test_layouts_levircc_ab_folders_and_sentinel2_band_folders(tmp_path):
    ab = MultiDateTiles(SHARED / "levircc")  # real LEVIR-CC pairs, A before B
    assert len(ab) == 3 and ab.name(0) == "train_000016" and ab.num_dates(0) == 2
    before, after = ab.load(0, [0, 1])
    assert before.shape == after.shape == (3, 256, 256) and not torch.equal(before, after)
    # SSL4EO-S12: <place>/<acquisition folder>/B4.tif, B3.tif, B2.tif (uint16 reflectance x 10^4)
    root = tmp_path / "s2c"
    for place, dates in (("0000001", ("20200110T1", "20200415T1", "20200720T1")), ("0000002", ("20200301T1",))):
        for t, d in enumerate(dates):
            f = root / place / d
            f.mkdir(parents=True)
            for b, value in (("B4", 2000 + 1000 * t), ("B3", 1000), ("B2", 500)):
                with rasterio.open(f / f"{b}.tif", "w", driver="GTiff", width=40, height=40, count=1,
                                   dtype="uint16", crs="EPSG:32632", transform=from_origin(0, 400, 10, 10)) as dst:
                    dst.write(np.full((1, 40, 40), value, np.uint16))
    s2 = MultiDateTiles(root)
    assert len(s2) == 1 and s2.num_dates(0) == 3  # the single-date place is skipped
    red = [int(x[0, 0, 0]) for x in s2.load(0, [0, 1, 2])]
    assert red == [51, 76, 102]  # 2000, 3000, 4000 x 255 / 10000, in time order
    assert int(s2.load(0, [0])[0][2, 0, 0]) == int(500 * 255 / 10000)


# ---- the two stages end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """Stage 1 through the CLI: a few MoCo steps on 32 px synthetic pairs with sen-small's extractor."""
    out = tmp_path_factory.mktemp("sen-pretrain")
    over = {"data.train_pairs": 8, "data.size": 32, "tile_size": 32, "optim.batch_size": 4, "optim.epochs": 1,
            "contrastive.queue_size": 16, "contrastive.dim": 16, "contrastive.bn_groups": 2,
            "model_name": "tiny-pretrain", **QUIET}
    args = ["sen-pretrain", "--config", str(CONFIGS / "sen_pretrain_synthetic.json"), "--out", str(out),
            "--device", "cpu"]
    for k, v in over.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert training_main(args) == 0
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["step"] == "2" and math.isfinite(float(rows[0]["loss"]))
    assert 0 <= float(rows[0]["acc1"]) <= 1
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert state["queue"].shape == (16, 16) and int(state["queue_ptr"]) == 8  # two steps of four keys
    return out / "tiny-pretrain.safetensors"


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """A small BIT change detector model file (random weights) for SEN to pair with."""
    d = tmp_path_factory.mktemp("bit")
    cfg = dataclasses.replace(get_entry("bit-cd").config, dec_depth=1, output_stride=16)
    torch.manual_seed(7)
    bit, _ = build_model("bit-cd", cfg)
    return save_model_file(d / "tiny-bit", bit, "bit-cd", cfg, InputSpec(tile_size=64), name="tiny-bit")


def _sen_config(**over):
    return load_config(CONFIGS / "sen_synthetic.json", {
        "config_overrides": TINY_SEN, "data.train_pairs": 8, "data.val_pairs": 4, "data.size": 64, "tile_size": 64,
        "optim.batch_size": 4, "optim.epochs": 1, "model_name": "sen-tiny-test",
        "vocabulary.path": str(SHARED / "levircc_captions.json"), **QUIET, **over})


def test_stage1_file_initialises_stage2_whose_model_file_the_pipeline_runs_paired(
        tmp_path, pretrained, detector):
    meta = read_backbone_metadata(pretrained)
    assert meta["backbone"] == "resnet18" and meta["in_channels"] == 6 and meta["input_order"] == "after_before"
    assert meta["contrastive"]["strategy"] == "ordered" and meta["training"]["steps"] == 2
    card = sen.train(_sen_config(backbone_init=str(pretrained), pair_with=str(detector)), tmp_path / "run")
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["step"] == "2" and "val_BLEU-4" in rows[0]
    c = read_card(card)
    # the detector's card path, relative to the exported card (as pairing.pair_from_card resolves it)
    assert c["architecture"] == "sen-small" and c["pair_with"].startswith("../")
    assert (Path(card).parent / c["pair_with"]).resolve() == detector.resolve()
    assert c["training"]["backbone_init"]["file"] == pretrained.name
    assert c["training"]["pair_with"]["name"] == "tiny-bit" and "BLEU-4" in c["metrics"]
    assert c["recipe"]["optim"]["scheduler"] == "plateau" and c["recipe"]["optim"]["plateau_factor"] == 0.7
    model = load_model_file(card)
    assert isinstance(model, PairedChangeModel) and model.detector.name == "tiny-bit"
    # the stage-1 weights: the frozen stem (SEN fine-tunes from conv2_x) still holds them exactly
    from safetensors.torch import load_file
    stage1 = load_file(str(pretrained))
    extractor = model.captioner.module.extractor
    assert torch.equal(extractor.conv1.weight, stage1["conv1.weight"])
    assert not torch.equal(extractor.layers[0][0].conv1.weight, stage1["layer1.0.conv1.weight"])  # fine-tuned
    pair = write_pair(tmp_path / "pair", "p", size=96, seed=5)
    result = detect_changes(pair.before, pair.after, str(card), tmp_path / "r.gpkg", device="cpu")
    assert result.output.exists() and result.metadata["model"]["paired"]["detector"]["name"] == "tiny-bit"
    assert isinstance(result.scene_caption, str) and result.scene_caption


def test_stage2_refuses_a_backbone_for_another_extractor_and_a_partner_without_change_head(
        tmp_path, pretrained, detector):
    with pytest.raises(ValueError, match="another extractor"):
        sen.train(_sen_config(backbone_init=str(pretrained), config_overrides={**TINY_SEN, "backbone": "resnet34"}),
                  tmp_path / "a")
    with pytest.raises(ValueError, match="another extractor"):
        sen.train(_sen_config(backbone_init=str(pretrained),
                              config_overrides={**TINY_SEN, "input_order": "before_after"}), tmp_path / "b")
    sen_cfg = dataclasses.replace(get_entry("sen-small").config, **TINY_SEN)
    other, _ = build_model("sen-small", sen_cfg)
    captioner = save_model_file(tmp_path / "other-sen", other, "sen-small", sen_cfg, InputSpec())
    with pytest.raises(ValueError, match="no change head"):
        sen.pairing(str(captioner), tmp_path / "c", 3)
    value, card = sen.pairing("tiny-bit", detector.parent, 3)  # a name stays a name, found beside the card
    assert value == "tiny-bit" and card["name"] == "tiny-bit"
    value, card = sen.pairing("not-installed-detector", tmp_path, 3)
    assert value == "not-installed-detector" and card is None


# ---- the plateau scheduler ----------------------------------------------------------------------------------
BLEU = [0.5, 0.4, 0.45, 0.3, 0.6, 0.1, 0.2, 0.1]  # new bests at epochs 1 and 5 (1-based)


def _plateau_run(out: Path, epochs: int, max_steps: int | None = None, resume: bool = False,
                 groups: list[str] | None = None) -> None:
    cfg = config_from_dict({"recipe": "test", "model_name": "plateau", "seed": 3,
                            "log": {"tensorboard": False, "plot": False},
                            "optim": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "batch_size": 4,
                                      "epochs": epochs, "max_steps": max_steps, "grad_clip": None,
                                      "scheduler": "plateau", "plateau_factor": 0.7, "plateau_patience": 3,
                                      "plateau_metric": "BLEU-4", "plateau_groups": groups}})
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))  # "encoder" 0, "decoder" 1 (as SEN's groups)
    data = [{"x": torch.randn(3)} for _ in range(4)]

    def validate(m, device):  # the metric of epoch e (0-based): log.csv holds e rows while it validates
        with (out / "log.csv").open() as f:
            return {"BLEU-4": BLEU[len(list(csv.DictReader(f)))]}

    task = Task(module, data, data, lambda m, b, d: (m(b["x"]).pow(2).mean(), {}), validate,
                lambda m: m["BLEU-4"], lambda m, metrics, run: out / "none",
                param_group=lambda name: "decoder" if name.startswith("1.") else "encoder")
    fit(cfg, task, out, resume=resume)


def test_plateau_decays_only_the_named_group_and_resumes_exactly(tmp_path):
    """SEN decays the decoder's rate only: the encoder group keeps lr 0.1 while the decoder's falls, across a resume."""
    _plateau_run(tmp_path / "straight", 8, groups=["decoder"])
    last = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    lrs = {g["name"]: g["lr"] for g in last["optim"]["param_groups"]}
    assert lrs == pytest.approx({"encoder": 0.1, "decoder": 0.049})
    with (tmp_path / "straight" / "log.csv").open() as f:
        straight = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in straight] == pytest.approx([0.1] * 4 + [0.07] * 4)  # the decayed group's
    _plateau_run(tmp_path / "resumed", 8, max_steps=3, groups=["decoder"])
    _plateau_run(tmp_path / "resumed", 8, resume=True, groups=["decoder"])
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert {g["name"]: g["lr"] for g in resumed["optim"]["param_groups"]} == lrs
    for k in last["model"]:
        assert torch.equal(last["model"][k], resumed["model"][k])
    with pytest.raises(ValueError, match="plateau_groups.*decoders"):
        _plateau_run(tmp_path / "typo", 1, groups=["decoders"])


def test_sen_optimiser_groups_split_at_the_caption_decoder():
    module, _ = build_model("sen-small", dataclasses.replace(get_entry("sen-small").config, **TINY_SEN),
                            input_spec=InputSpec(tile_size=64), vocabulary=Vocabulary.build(["a b c"], min_count=1))
    groups = {sen.optimiser_group(n) for n, _ in module.named_parameters()}
    assert groups == {"encoder", "decoder"}
    decoder = [n for n, _ in module.named_parameters() if sen.optimiser_group(n) == "decoder"]
    assert all(n.startswith("decoder.") for n in decoder) and any("embed" in n for n in decoder)


def test_plateau_decays_after_patience_and_resumes_exactly(tmp_path):
    _plateau_run(tmp_path / "straight", 8)
    with (tmp_path / "straight" / "log.csv").open() as f:
        straight = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in straight]
    # epochs 2-4 bring no new best -> x 0.7 from epoch 5; 6-8 none again -> x 0.7 after epoch 8
    assert lrs == pytest.approx([0.1] * 4 + [0.07] * 4)
    last = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert last["optim"]["param_groups"][0]["lr"] == pytest.approx(0.049)
    # interrupted after epoch 3 (two epochs without a new best so far), then resumed: the scheduler must
    # remember them and decay after epoch 4 exactly as the uninterrupted run did
    _plateau_run(tmp_path / "resumed", 8, max_steps=3)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["scheduler"]["num_bad_epochs"] == 2
    _plateau_run(tmp_path / "resumed", 8, resume=True)
    with (tmp_path / "resumed" / "log.csv").open() as f:
        resumed = list(csv.DictReader(f))
    assert [(r["epoch"], r["lr"], r["loss"]) for r in resumed] == [(r["epoch"], r["lr"], r["loss"]) for r in straight]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert b["scheduler"] == last["scheduler"]
    for k in last["model"]:
        assert torch.equal(last["model"][k], b["model"][k])


def test_plateau_configuration_errors(tmp_path):
    from changescribe.training.config import OptimConfig
    from changescribe.training.engine import build_scheduler

    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(opt, OptimConfig(scheduler="plateau", warmup_steps=10), 100)
    with pytest.raises(ValueError, match="plateau"):
        build_scheduler(opt, OptimConfig(scheduler="plateau", plateau_factor=1.5), 100)
    # a metric the validation does not report fails at the first epoch, not silently never decays
    cfg = config_from_dict({"recipe": "test", "model_name": "plateau", "log": {"tensorboard": False, "plot": False},
                            "optim": {"optimizer": "sgd", "lr": 0.1, "batch_size": 2, "epochs": 1,
                                      "scheduler": "plateau", "plateau_metric": "CIDEr"}})
    data = [{"x": torch.randn(3)} for _ in range(2)]
    task = Task(nn.Linear(3, 1), data, data, lambda m, b, d: (m(b["x"]).pow(2).mean(), {}),
                lambda m, d: {"BLEU-4": 0.1}, lambda m: m["BLEU-4"], lambda m, metrics, run: tmp_path / "none")
    with pytest.raises(ValueError, match="not among the validation metrics"):
        fit(cfg, task, tmp_path / "bad")
