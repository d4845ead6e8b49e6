"""Upstream pretrained checkpoints from local files: BLIP-2 / MiniGPT-4 Q-Former into Semantic-CC, CLIP's vision
tower into DFM. Checkpoints are written here with the upstream key names and shapes (Hugging Face modules at tiny
sizes, an OpenAI-CLIP-layout module, a LAVIS-layout state dict) and must land tensor for tensor."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections import OrderedDict

import pytest
import torch
from torch import nn

from changescribe.core.model_api import InputSpec
from changescribe.core.model_file import ModelFileError, read_card, save_model_file
from changescribe.core.model_loading import load_model_file
from changescribe.core.models.pretrained import clip_vision_tensors, qformer_tensors
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.vocabulary import Vocabulary

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs transformers + peft (requirements-dev.txt)")

VOCAB = Vocabulary.build(["a house is built", "there is no difference"], min_count=1, max_length=10)

# ---- Semantic-CC <- BLIP-2 Q-Former ----------------------------------------------------------------------------

QF = dict(hidden=32, layers=2, heads=4, intermediate=64, queries=4, encoder_width=48)
SCC = dict(embed_dim=64, depth=2, vit_heads=4, global_attn_indexes=(1,), window=8, img_size=128, neck_channels=32,
           neck_units=1, fpn_channels=32, cd_channels=16, lora_r=0, llm_hidden=32, llm_layers=1, llm_heads=4,
           llm_intermediate=64, llm_max_positions=128, llm_lora_r=0, num_query_tokens=QF["queries"],
           qformer_hidden=QF["hidden"], qformer_layers=QF["layers"], qformer_heads=QF["heads"],
           qformer_intermediate=QF["intermediate"], qformer_encoder_width=QF["encoder_width"])


def hf_qformer_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A BLIP-2 checkpoint as Hugging Face writes it: ``qformer.*`` (Blip2QFormerModel), ``query_tokens`` and the
    vision tower's ``post_layernorm`` (LAVIS's ln_vision)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(seed)
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=QF["hidden"], num_hidden_layers=QF["layers"], num_attention_heads=QF["heads"],
        intermediate_size=QF["intermediate"], encoder_hidden_size=QF["encoder_width"]))
    state = {f"qformer.{k}": v.clone() for k, v in qformer.state_dict().items()}
    state["query_tokens"] = torch.randn(1, QF["queries"], QF["hidden"])
    state["vision_model.post_layernorm.weight"] = torch.rand(QF["encoder_width"])
    state["vision_model.post_layernorm.bias"] = torch.randn(QF["encoder_width"])
    state["language_projection.weight"] = torch.randn(7, QF["hidden"])  # other BLIP-2 parts are ignored
    return state


def lavis_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under LAVIS's names (``blip2_pretrained_flant5xxl.pth``, which MiniGPT-4 loads), plus the
    BERT text parts a query-only Q-Former never uses."""
    out = {}
    for k, v in hf.items():
        if k.startswith("qformer."):
            k = "Qformer.bert." + k[len("qformer."):]
            k = k.replace("Qformer.bert.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
            k = k.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                             ".crossattention.self.")
        elif k.startswith("vision_model.post_layernorm."):
            k = "ln_vision." + k.rsplit(".", 1)[1]
        elif k.startswith("language_projection."):
            k = "t5_proj." + k.rsplit(".", 1)[1]
        out[k] = v
    h, inter = QF["hidden"], QF["intermediate"]
    out["Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(30, h)
    out["Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(12, h)
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(12)[None]
    for i in range(QF["layers"]):  # the text FFN of each layer
        out[f"Qformer.bert.encoder.layer.{i}.intermediate.dense.weight"] = torch.randn(inter, h)
        out[f"Qformer.bert.encoder.layer.{i}.output.dense.weight"] = torch.randn(h, inter)
        out[f"Qformer.bert.encoder.layer.{i}.output.LayerNorm.weight"] = torch.randn(h)
    out["Qformer.cls.predictions.bias"] = torch.randn(30)
    out["visual_encoder.cls_token"] = torch.randn(1, 1, QF["encoder_width"])
    return out


def assert_qformer_landed(model, hf: dict[str, torch.Tensor]) -> None:
    own = model.qformer.state_dict()
    sources = {k[len("qformer."):]: v for k, v in hf.items() if k.startswith("qformer.")}
    assert own.keys() == sources.keys()
    assert all(torch.equal(own[k], sources[k]) for k in own)
    assert torch.equal(model.query_tokens.detach(), hf["query_tokens"])
    assert torch.equal(model.ln_vision.weight.detach(), hf["vision_model.post_layernorm.weight"])
    assert torch.equal(model.ln_vision.bias.detach(), hf["vision_model.post_layernorm.bias"])


@needs_hf
def test_lavis_qformer_checkpoint_loads_into_semantic_cc(tmp_path):
    hf = hf_qformer_state()
    torch.save({"model": lavis_layout(hf), "epoch": 9}, tmp_path / "blip2_pretrained_tiny.pth")
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **SCC,
                              qformer_checkpoint=str(tmp_path / "blip2_pretrained_tiny.pth"), freeze_pretrained=True)
    torch.manual_seed(1)
    model, cfg = build_model("semantic-cc-small", cfg, vocabulary=VOCAB)
    model.load_pretrained()
    assert_qformer_landed(model, hf)
    key = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"  # a LAVIS name, spelled out
    assert torch.equal(model.qformer.encoder.layer[0].crossattention.attention.key.weight, lavis_layout(hf)[key])
    assert model.vision_proj.weight.shape == (QF["encoder_width"], SCC["embed_dim"])  # SAM width -> EVA width
    assert not model.ln_vision.weight.requires_grad and not model.query_tokens.requires_grad  # frozen, as MiniGPT-4
    # frozen pretrained tensors stay out of the model file and are re-read from the checkpoint when it loads
    card = save_model_file(tmp_path / "scc", model, "semantic-cc-small", cfg, InputSpec(tile_size=128), VOCAB)
    from safetensors import safe_open
    with safe_open(read_card(card)["_weights_path"], "pt") as f:
        saved = set(f.keys())
    assert not any(k.startswith(("qformer.", "ln_vision.")) or k == "query_tokens" for k in saved)
    assert "vision_proj.weight" in saved  # trained, so in the file
    loaded = load_model_file(card)
    assert_qformer_landed(loaded.module, hf)
    g = torch.Generator().manual_seed(2)
    before, after = torch.rand(1, 3, 128, 128, generator=g) * 255, torch.rand(1, 3, 128, 128, generator=g) * 255
    from changescribe.core.models.adapter import TorchChangeModel
    assert TorchChangeModel(model, InputSpec(tile_size=128), VOCAB).caption(before, after) == \
        loaded.caption(before, after)


@needs_hf
def test_hf_blip2_checkpoints_load(tmp_path):
    from safetensors.torch import save_file
    hf = hf_qformer_state(seed=5)
    save_file(hf, str(tmp_path / "model.safetensors"))  # a Blip2Model-style export
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **SCC, freeze_pretrained=False)
    model, _ = build_model("semantic-cc-small", cfg, vocabulary=VOCAB)
    from changescribe.core.models.pretrained import load_qformer
    load_qformer(model, tmp_path / "model.safetensors")
    assert_qformer_landed(model, hf)
    # a bare Blip2QFormerModel.save_pretrained folder needs the query tokens beside it
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    bare = Blip2QFormerModel(Blip2QFormerConfig(hidden_size=QF["hidden"], num_hidden_layers=QF["layers"],
                                                num_attention_heads=QF["heads"], intermediate_size=QF["intermediate"],
                                                encoder_hidden_size=QF["encoder_width"]))
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no 'query_tokens'"):
        load_qformer(model, tmp_path / "bare")
    assert torch.equal(model.qformer.layernorm.weight, bare.layernorm.weight)  # the Q-Former itself did load


@needs_hf
def test_qformer_mismatches_are_explained(tmp_path):
    from changescribe.core.models.pretrained import load_qformer
    hf = hf_qformer_state()
    torch.save({"model": lavis_layout(hf)}, tmp_path / "ok.pth")
    # SAM's width straight into the Q-Former (no qformer_encoder_width): cross-attention K/V cannot fit
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **{**SCC, "qformer_encoder_width": None},
                              qformer_checkpoint=str(tmp_path / "ok.pth"))
    with pytest.raises(ValueError, match=r"crossattention\.attention\.key\.weight \(32, 48\) vs \(32, 64\)"):
        build_model("semantic-cc-small", cfg, vocabulary=VOCAB)[0].load_pretrained()
    # more Q-Former layers in the config than in the checkpoint
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **{**SCC, "qformer_layers": 3},
                              qformer_checkpoint=str(tmp_path / "ok.pth"))
    with pytest.raises(ValueError, match=r"tensors are missing, e\.g\. \['encoder\.layer\.2\."):
        build_model("semantic-cc-small", cfg, vocabulary=VOCAB)[0].load_pretrained()
    # 32 queries vs 4
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **{**SCC, "num_query_tokens": 8},
                              qformer_checkpoint=str(tmp_path / "ok.pth"))
    with pytest.raises(ValueError, match=r"query_tokens \(1, 4, 32\) vs \(1, 8, 32\)"):
        build_model("semantic-cc-small", cfg, vocabulary=VOCAB)[0].load_pretrained()
    # not a Q-Former at all; a file that is missing
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1)}}, tmp_path / "eva.pth")
    model, _ = build_model("semantic-cc-small", dataclasses.replace(get_entry("semantic-cc-small").config, **SCC),
                           vocabulary=VOCAB)
    with pytest.raises(ValueError, match="no Q-Former tensors"):
        load_qformer(model, tmp_path / "eva.pth")
    with pytest.raises(ValueError, match="not found"):
        load_qformer(model, tmp_path / "absent.pth")


@needs_hf
def test_qformer_checkpoint_needed_at_load_only_when_frozen(tmp_path):
    """Frozen: the model file lacks the Q-Former, so the checkpoint must still be there. Trained: the file has it."""
    hf = hf_qformer_state()
    torch.save({"model": lavis_layout(hf)}, tmp_path / "q.pth")
    cards = {}
    for frozen in (True, False):
        cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **SCC, freeze_pretrained=frozen,
                                  qformer_checkpoint=str(tmp_path / "q.pth"))
        model, cfg = build_model("semantic-cc-small", cfg, vocabulary=VOCAB)
        model.load_pretrained()
        assert_qformer_landed(model, hf)
        assert model.qformer.layernorm.weight.requires_grad is not frozen
        with torch.no_grad():
            model.query_tokens.add_(1.0)  # as if training had changed them
        cards[frozen] = save_model_file(tmp_path / f"scc-{frozen}", model, "semantic-cc-small", cfg,
                                        InputSpec(tile_size=128), VOCAB)
    (tmp_path / "q.pth").unlink()
    with pytest.raises(ModelFileError, match="q.pth not found"):
        load_model_file(cards[True])
    trained = load_model_file(cards[False])  # the checkpoint is not read: the file holds the trained Q-Former
    assert torch.equal(trained.module.query_tokens.detach(), hf["query_tokens"] + 1.0)


def test_building_reads_no_checkpoint_loading_is_an_explicit_step(tmp_path):
    """Constructors only build layers, so checkpoints named in a config are read when, and only when, a caller
    asks: ``load_pretrained`` (a recipe starting training) reads them all, ``load_external_weights`` (a model file
    being loaded) only those the file leaves out. Files that are not there make the difference visible."""
    absent = str(tmp_path / "absent-clip.pt")
    dfm, _ = build_model("dfm", dataclasses.replace(get_entry("dfm").config, **DFM_TINY, clip_checkpoint=absent),
                         vocabulary=VOCAB)
    dfm.load_external_weights()  # DFM's model file carries its trained ViT: nothing is read
    with pytest.raises(ValueError, match="absent-clip.pt not found"):
        dfm.load_pretrained()
    if not HAS_HF:
        return
    for frozen in (False, True):
        cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **SCC, freeze_pretrained=frozen,
                                  qformer_checkpoint=str(tmp_path / "absent-qformer.pth"))
        scc, _ = build_model("semantic-cc-small", cfg, vocabulary=VOCAB)
        if frozen:  # a frozen Q-Former stays out of the model file: loading the file reads the checkpoint
            with pytest.raises(ValueError, match="absent-qformer.pth not found"):
                scc.load_external_weights()
        else:  # a trained one is in the file
            scc.load_external_weights()
        with pytest.raises(ValueError, match="absent-qformer.pth not found"):
            scc.load_pretrained()
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **SCC, sam_checkpoint=str(tmp_path / "no-sam.pt"))
    scc, _ = build_model("semantic-cc-small", cfg, vocabulary=VOCAB)
    with pytest.raises(ValueError, match="no-sam.pt not found"):  # SAM's frozen tensors are never in the file
        scc.load_external_weights()


# ---- pickles ---------------------------------------------------------------------------------------------------

class TrainingState:
    """An arbitrary object inside a checkpoint, as training frameworks pickle (config objects, loggers)."""

    def __init__(self) -> None:
        self.lr = 1e-4


def test_checkpoints_that_need_unpickling_are_refused(tmp_path):
    from changescribe.core.models.pretrained import read_checkpoint
    torch.save({"model": {"query_tokens": torch.zeros(1, 2, 3)}, "state": TrainingState()}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="refused - this checkpoint holds pickled Python objects"):
        read_checkpoint(tmp_path / "full.pth")
    torch.save({"model": {"query_tokens": torch.zeros(1, 2, 3)}, "epoch": 3}, tmp_path / "plain.pth")
    assert set(read_checkpoint(tmp_path / "plain.pth")) == {"query_tokens"}  # tensors + plain values are fine


# ---- DFM <- CLIP vision tower --------------------------------------------------------------------------------------

CLIP = dict(width=64, layers=2, heads=4, patch=32, image=128)  # a 4 x 4 patch grid
DFM_TINY = dict(vit_width=CLIP["width"], vit_layers=CLIP["layers"], vit_heads=CLIP["heads"], vit_patch=CLIP["patch"],
                vit_grid=CLIP["image"] // CLIP["patch"], d_model=64, heads=4, ffn_dim=128, st_layers=1, cd_grid=8,
                cd_overrides={"dec_depth": 1, "output_stride": 16}, vit_activation="quick_gelu")


def hf_clip(tmp_path, act: str = "quick_gelu"):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP["width"], intermediate_size=4 * CLIP["width"],
                                             num_hidden_layers=CLIP["layers"], num_attention_heads=CLIP["heads"],
                                             image_size=CLIP["image"], patch_size=CLIP["patch"], hidden_act=act))
    model.save_pretrained(tmp_path / "clip-hf")
    return model.eval()


class OpenAIBlock(nn.Module):
    """OpenAI CLIP's ResidualAttentionBlock parameter layout (nn.MultiheadAttention's fused in_proj)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)


def openai_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A whole OpenAI/open_clip CLIP state dict: ``visual.*`` plus text-tower keys that must be ignored."""
    torch.manual_seed(seed)
    w, grid = CLIP["width"], CLIP["image"] // CLIP["patch"]
    visual = nn.Module()
    visual.conv1 = nn.Conv2d(3, w, CLIP["patch"], CLIP["patch"], bias=False)
    visual.class_embedding = nn.Parameter(torch.randn(w))
    visual.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w))
    visual.ln_pre = nn.LayerNorm(w)
    visual.transformer = nn.Module()
    visual.transformer.resblocks = nn.Sequential(*[OpenAIBlock(w, CLIP["heads"]) for _ in range(CLIP["layers"])])
    visual.ln_post = nn.LayerNorm(w)
    visual.proj = nn.Parameter(torch.randn(w, 32))
    for p in visual.parameters():  # LayerNorms start at 1/0: make every tensor distinctive
        nn.init.normal_(p, std=0.5)
    state = {f"visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(3 * 16, 16)  # text tower
    state["token_embedding.weight"] = torch.randn(10, 16)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def test_openai_clip_checkpoint_loads_into_dfm(tmp_path):
    state = openai_clip_state()
    torch.save(state, tmp_path / "ViT-B-32-tiny.pt")
    cfg = dataclasses.replace(get_entry("dfm").config, **DFM_TINY, clip_checkpoint=str(tmp_path / "ViT-B-32-tiny.pt"))
    model, cfg = build_model("dfm", cfg, vocabulary=VOCAB)
    model.load_pretrained()
    vit = model.vit.state_dict()
    w = CLIP["width"]
    for i in range(CLIP["layers"]):
        qkv = state[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"]
        assert torch.equal(vit[f"blocks.{i}.attn.to_q.weight"], qkv[:w])
        assert torch.equal(vit[f"blocks.{i}.attn.to_k.weight"], qkv[w:2 * w])
        assert torch.equal(vit[f"blocks.{i}.attn.to_v.weight"], qkv[2 * w:])
        assert torch.equal(vit[f"blocks.{i}.attn.to_v.bias"],
                           state[f"visual.transformer.resblocks.{i}.attn.in_proj_bias"][2 * w:])
        assert torch.equal(vit[f"blocks.{i}.attn.to_out.weight"],
                           state[f"visual.transformer.resblocks.{i}.attn.out_proj.weight"])
        assert torch.equal(vit[f"blocks.{i}.ff.net.0.weight"], state[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"])
        assert torch.equal(vit[f"blocks.{i}.ff.net.3.bias"], state[f"visual.transformer.resblocks.{i}.mlp.c_proj.bias"])
        assert torch.equal(vit[f"blocks.{i}.norm_q.weight"], state[f"visual.transformer.resblocks.{i}.ln_1.weight"])
        assert torch.equal(vit[f"blocks.{i}.norm_ff.bias"], state[f"visual.transformer.resblocks.{i}.ln_2.bias"])
    for ours, theirs in (("conv1.weight", "conv1.weight"), ("class_embedding", "class_embedding"),
                         ("positional_embedding", "positional_embedding"), ("ln_pre.weight", "ln_pre.weight"),
                         ("ln_post.bias", "ln_post.bias")):
        assert torch.equal(vit[ours], state[f"visual.{theirs}"])
    # the ViT is trained (TGCL), so the model file carries it and loading the file never reads the checkpoint
    card = save_model_file(tmp_path / "dfm", model, "dfm", cfg, InputSpec(tile_size=128), VOCAB)
    (tmp_path / "ViT-B-32-tiny.pt").unlink()
    loaded = load_model_file(card)
    assert all(torch.equal(v, loaded.module.vit.state_dict()[k]) for k, v in vit.items())


def test_hf_clip_loads_and_computes_what_clip_computes(tmp_path):
    pytest.importorskip("transformers")
    hf = hf_clip(tmp_path)
    cfg = dataclasses.replace(get_entry("dfm").config, **DFM_TINY, clip_checkpoint=str(tmp_path / "clip-hf"))
    model, _ = build_model("dfm", cfg, vocabulary=VOCAB)
    model.load_pretrained()
    x = torch.randn(2, 3, CLIP["image"], CLIP["image"])
    with torch.no_grad():
        ours, _ = model.vit.eval()(x)
        ref = hf(pixel_values=x).last_hidden_state
        ref = hf.vision_model.post_layernorm(ref) if hasattr(hf, "vision_model") else hf.post_layernorm(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # same tokens: mapping and QuickGELU are right


def test_clip_mismatches_are_explained(tmp_path):
    pytest.importorskip("transformers")
    from changescribe.core.models.pretrained import load_clip_vision
    hf_clip(tmp_path, act="gelu")
    cfg = dataclasses.replace(get_entry("dfm").config, **DFM_TINY, clip_checkpoint=str(tmp_path / "clip-hf"))
    with pytest.raises(ValueError, match="activation is 'gelu' but the config's vit_activation is 'quick_gelu'"):
        build_model("dfm", cfg, vocabulary=VOCAB)[0].load_pretrained()
    torch.save(openai_clip_state(), tmp_path / "clip.pt")
    for change, message in (({"vit_width": 128, "d_model": 128}, r"conv1\.weight \(64, 3, 32, 32\) vs \(128, 3, 32, 32\)"),
                            ({"vit_layers": 3}, r"tensors are missing, e\.g\. \['blocks\.2\."),
                            ({"vit_layers": 1}, r"no place in this config, e\.g\. \['blocks\.1\."),
                            ({"vit_grid": 7}, r"positional_embedding \(17, 64\) vs \(50, 64\)")):
        cfg = dataclasses.replace(get_entry("dfm").config, **{**DFM_TINY, **change})
        model, _ = build_model("dfm", cfg, vocabulary=VOCAB)
        with pytest.raises(ValueError, match=message):
            load_clip_vision(model.vit, tmp_path / "clip.pt", cfg.vit_activation)
    with pytest.raises(ValueError, match="no CLIP vision tower"):
        clip_vision_tensors({"transformer.resblocks.0.ln_1.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="no Q-Former tensors"):
        qformer_tensors({"visual.class_embedding": torch.zeros(3)})


def test_registered_paper_configs_can_take_the_upstream_weights():
    """The paper configurations are shaped for the public checkpoints (built on the meta device)."""
    dfm = get_entry("dfm").config
    assert (dfm.vit_width, dfm.vit_layers, dfm.vit_heads, dfm.vit_patch, dfm.vit_grid, dfm.vit_activation) == \
        (768, 12, 12, 32, 7, "quick_gelu")  # OpenAI CLIP ViT-B/32
    for name in ("semantic-cc-vit-l", "semantic-cc-vit-b"):
        c = get_entry(name).config
        assert (c.qformer_hidden, c.qformer_layers, c.qformer_heads, c.qformer_intermediate, c.num_query_tokens,
                c.qformer_cross_every, c.qformer_encoder_width) == (768, 12, 12, 3072, 32, 2, 1408)  # BLIP-2
