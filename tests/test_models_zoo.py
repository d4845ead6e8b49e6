"""The model zoo (SEN, DFM, Semantic-CC), pairing, parameter counts and the ONNX fast path.

Every model runs at a tiny configuration of its own classes on 256 px pairs: forward, loss backward,
greedy + beam decoding to strings, and a bit-exact model-file round trip. Paper configurations are built
on the meta device only (Semantic-CC's 7B LLM included)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from changescribe.core.model_api import InputSpec
from changescribe.core.errors import PairingError
from changescribe.core.model_file import ModelFileError, read_card, save_model_file
from changescribe.core.model_loading import load_model_file
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.pairing import PairedChangeModel
from changescribe.core.models.registry import build_model, count_parameters, get_entry, list_models
from changescribe.core.vocabulary import Vocabulary
from changescribe.training.losses import caption_loss, change_loss

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
needs_hf = pytest.mark.skipif(not HAS_HF, reason="Semantic-CC needs transformers + peft (requirements-dev.txt)")

CAPTIONS = ["a house is built near the road", "there is no difference", "many trees are removed",
            "a road is built , and a house appears", "the scene is the same as before"]

# Tiny configurations of the registered classes (the small registry configs, shrunk further for CI speed).
TINY = {
    "sen-small": dict(d_model=64, ffn_dim=128, heads=4),
    "dfm-small": dict(vit_width=64, vit_layers=2, vit_heads=4, d_model=64, heads=4, ffn_dim=128, cd_grid=8,
                      cd_overrides={"dec_depth": 1, "output_stride": 16}, freeze_cd=False),
    "semantic-cc-small": dict(embed_dim=64, depth=2, vit_heads=4, global_attn_indexes=(1,), window=8,
                              neck_channels=32, neck_units=1, fpn_channels=32, cd_channels=16, num_query_tokens=4,
                              qformer_hidden=32, qformer_layers=2, qformer_heads=4, qformer_intermediate=64,
                              llm_hidden=32, llm_layers=2, llm_heads=4, llm_intermediate=64, llm_max_positions=128,
                              lora_r=4, llm_lora_r=4, freeze_pretrained=True),
}
if not HAS_HF:
    del TINY["semantic-cc-small"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops (step-by-step decoding): on 2 shared cores one torch thread avoids OpenMP barrier
    waits that make each op take a scheduler slice (measured 10-40x faster decoding under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(CAPTIONS, min_count=1, max_length=12)


def tiny_config(name: str, **extra):
    return dataclasses.replace(get_entry(name).config, **{**TINY[name], **extra})


@pytest.fixture(scope="module")
def tiny_models(vocab):
    out = {}
    for i, name in enumerate(TINY):
        torch.manual_seed(i)
        out[name] = build_model(name, tiny_config(name), vocabulary=vocab)
    return out


def raw_pair(b: int = 2, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 255, torch.rand(b, 3, size, size, generator=g) * 255


SIZE = {"sen-small": 256, "dfm-small": 256, "semantic-cc-small": 256}  # LEVIR-CC tiles


def normed(x: torch.Tensor) -> torch.Tensor:
    from changescribe.core.model_api import normalise
    return normalise(x, InputSpec())


# ---- forward / backward ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_forward_backward(tiny_models, vocab, name):
    module, cfg = tiny_models[name]
    module.train()
    size = SIZE[name]
    before, after = (normed(t) for t in raw_pair(2, size))
    caps = vocab.encode(CAPTIONS[:2])
    out = module(before, after, caps[:, :-1])
    cd, logits = (None, out) if name.startswith("sen") else out
    assert logits.shape == (2, caps.shape[1] - 1, len(vocab))
    loss = caption_loss(logits, caps[:, 1:])
    if cd is not None:
        assert cd.shape == (2, 2, size, size)
        loss = loss + change_loss(cd, torch.randint(0, 2, (2, size, size)))
    assert torch.isfinite(loss)
    loss.backward()

    def grad(p: torch.nn.Parameter) -> float:
        return 0.0 if p.grad is None else float(p.grad.abs().sum())

    if name == "sen-small":
        assert module.extractor.conv1.weight.grad is None  # the paper fine-tunes from conv2_x on
        assert grad(module.extractor.layers[0][0].conv1.weight) > 0
        assert grad(module.sfe.conv.weight) > 0 and grad(module.sfe.ca_after.mlp[0].weight) > 0
        assert grad(module.decoder.embed.weight) > 0
    elif name == "dfm-small":
        assert grad(module.vit.conv1.weight) > 0 and grad(module.cd.backbone.conv1.weight) > 0
        assert grad(module.jfm.fusion_logits) > 0 and grad(module.cd_proj.weight) > 0
    else:
        qkv = module.encoder.blocks[0].attn.qkv
        assert qkv.weight.grad is None and grad(qkv.lora_b.weight) > 0  # SAM frozen, LoRA trains
        assert grad(module.bcsf[0].spatial.weight) == 0  # FFN output layer starts at zero ...
        assert grad(module.bcsf[0].ffn_sf[2].weight) > 0  # ... and is what trains first
        assert grad(module.neck[0].inter_cc.similarity.weight) > 0
        assert grad(module.cd_decoder.proj.weight) > 0 and grad(module.enhancer.proj.weight) > 0
        assert module.qformer.layernorm.weight.grad is None  # Q-Former frozen
        lora_llm = [p for n, p in module.llm.named_parameters() if "lora_B" in n]
        assert lora_llm and all(grad(p) > 0 for p in lora_llm)
        base_llm = [p for n, p in module.llm.named_parameters() if "lora_" not in n]
        assert all(not p.requires_grad for p in base_llm)
    module.zero_grad(set_to_none=True)
    module.eval()


@pytest.mark.parametrize("name", list(TINY))
def test_decode_to_strings(tiny_models, vocab, name):
    module, _ = tiny_models[name]
    model = TorchChangeModel(module, InputSpec(), vocab, name=name)
    before, after = raw_pair(2, SIZE[name], seed=1)
    greedy = model.caption(before, after)
    beam = model.caption(before, after, beam_size=3)
    assert len(greedy) == len(beam) == 2 and all(isinstance(c, str) for c in greedy + beam)
    assert all(len(c.split()) <= vocab.max_length - 1 for c in greedy + beam)
    if name.startswith("sen"):
        assert not model.can_detect and model.default_beam_size == 3
        with pytest.raises(NotImplementedError, match="pair"):
            model.change_probability(before, after)
    else:
        pred = model.predict(before, after, with_captions=True)
        assert pred.probability.shape == (2, SIZE[name], SIZE[name]) and pred.captions == greedy


@needs_hf
def test_semantic_cc_beam_one_is_greedy(tiny_models):
    module, _ = tiny_models["semantic-cc-small"]
    module.eval()
    with torch.no_grad():
        feats = module.encode(*(normed(t) for t in raw_pair(2, 256, seed=2)))
        greedy = module.generate_captions(feats, beam_size=1, max_len=8)
        # greedy = argmax of the teacher-forced logits, step by step (generation == training graph)
        tok = module.tokenizer
        seq = torch.full((2, 1), tok.bos_id)
        for _ in range(greedy.shape[1]):
            logits = module.caption_logits(feats, seq)[:, -1].float()
            logits[:, [tok.pad_id, tok.bos_id]] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        for row, ref in zip(greedy.tolist(), seq[:, 1:].tolist()):
            n = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
            assert row[:n] == ref[:n]


# ---- model files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_model_file_round_trip(tiny_models, vocab, tmp_path, name):
    module, cfg = tiny_models[name]
    card = save_model_file(tmp_path / name, module, name, cfg, InputSpec(), vocab, version="0.1")
    loaded = load_model_file(card)
    ref, new = module.state_dict(), loaded.module.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    original = TorchChangeModel(module, InputSpec(), vocab)
    before, after = raw_pair(1, SIZE[name], seed=3)
    assert original.caption(before, after, beam_size=2) == loaded.caption(before, after, beam_size=2)
    if original.can_detect:
        assert torch.equal(original.change_probability(before, after), loaded.change_probability(before, after))


# ---- SEN -------------------------------------------------------------------------------------------------

def test_sen_equations(tiny_models):
    module, _ = tiny_models["sen-small"]
    module.eval()
    sfe = module.sfe
    with torch.no_grad():
        img, feats = torch.randn(1, 3, 64, 64), torch.randn(1, 64, 2, 2)
        shallow = sfe.conv(img)  # Eq. 4: the shared conv on the raw image, on F's grid
        assert shallow.shape == (1, 64, 2, 2)
        mlp = sfe.ca_before.mlp
        weight = torch.sigmoid(mlp(shallow.mean((2, 3), keepdim=True)) + mlp(shallow.amax((2, 3), keepdim=True)))
        torch.testing.assert_close(sfe.ca_before(shallow, feats), weight * feats)  # Eq. 5
        # Eq. 12: SelfAtt(CrossAtt(F_aft, F_diff) - CrossAtt(F_bef, F_diff)) + F_diff, shared CrossAtt
        layer = module.cagd[0]
        fb, fa, fd = torch.randn(3, 2, 4, 64).unbind(0)
        nb, na, nd = layer(fb, fa, fd)
        torch.testing.assert_close(na, layer.cross(fa, fd))
        torch.testing.assert_close(nd, layer.self_attn(layer.cross(fa, fd) - layer.cross(fb, fd)) + fd)
        # Eq. 2: the extractor reads Concat(I_aft, I_bef)
        seen = []
        h = module.extractor.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        b, a = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
        module.encode(b, a)
        h.remove()
        assert torch.equal(seen[0][:, :3], a) and torch.equal(seen[0][:, 3:], b)


# ---- DFM -------------------------------------------------------------------------------------------------

def test_dfm_contrastive_outputs_and_cd_weights(tiny_models, vocab, tmp_path):
    module, cfg = tiny_models["dfm-small"]
    module.eval()
    before, after = (normed(t) for t in raw_pair(3, 128, seed=4))
    with torch.no_grad():
        feats = module.encode(before, after)
        v = module.contrastive_embedding(feats)
        assert v.shape == (3, cfg.vit_width)
        torch.testing.assert_close(v, feats.cls[1] - feats.cls[0])
        t = module.project_text(torch.randn(5, cfg.text_dim))
        assert t.shape == (5, cfg.vit_width)
        logits = module.contrastive_logits(feats, torch.randn(5, cfg.text_dim))
        assert logits.shape == (3, 5) and float(logits.abs().max()) <= math.exp(module.logit_scale.item()) + 1e-4
    # a bit-cd model file loads into DFM's CD encoder; DFM's mask is then BIT's
    bit_cfg = dataclasses.replace(get_entry("bit-cd").config, dec_depth=1, output_stride=16)
    torch.manual_seed(9)
    bit, _ = build_model("bit-cd", bit_cfg)
    card = save_model_file(tmp_path / "bit", bit, "bit-cd", bit_cfg, InputSpec())
    from changescribe.training.recipes.dfm import load_cd_weights

    load_cd_weights(module, card)
    raw_b, raw_a = raw_pair(1, 128, seed=5)
    dfm_prob = TorchChangeModel(module, InputSpec(), vocab).change_probability(raw_b, raw_a)
    bit_prob = load_model_file(card).change_probability(raw_b, raw_a)
    torch.testing.assert_close(dfm_prob, bit_prob)
    frozen, _ = build_model("dfm-small", tiny_config("dfm-small", freeze_cd=True), vocabulary=vocab)
    assert not any(p.requires_grad for p in frozen.cd.parameters())
    frozen.train()
    assert not frozen.cd.training  # a frozen pre-trained CD keeps its BatchNorm statistics


# ---- Semantic-CC -------------------------------------------------------------------------------------------

def test_lora_linear():
    from changescribe.core.models.vit import LoRALinear
    torch.manual_seed(0)
    layer = LoRALinear(8, 6, r=2, alpha=4.0, dropout=0.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # B = 0
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    delta = (x @ layer.lora_a.weight.t() @ layer.lora_b.weight.t()) * 2.0
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias) + delta)
    layer.freeze_base()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_a.weight", "lora_b.weight"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_a.weight", "lora_b.weight"}  # SAM keys unchanged


def test_semantic_cc_blocks():
    from changescribe.core.models.semantic_cc import BCSF, ChangeFeatureEnhancer, InterTaskAttention
    torch.manual_seed(0)
    bcsf = BCSF(8, grid=4, ffn_ratio=1.0)
    x = torch.randn(4, 4, 4, 8)
    torch.testing.assert_close(bcsf(x), x)  # untrained BCSF = identity (zero FFN outputs)
    torch.testing.assert_close(bcsf(torch.randn(4, 6, 6, 8)).shape, torch.Size([4, 6, 6, 8]))  # other grids
    inter = InterTaskAttention(8, 3)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 5, 3)
    s = torch.einsum("bnc,cd,bnd->bn", x1, inter.similarity.weight[0], x2)[..., None]  # per-pixel x1^T W x2
    ref = torch.sigmoid(inter.proj(torch.cat([x1, x2 * torch.sigmoid(s)], -1)))
    torch.testing.assert_close(inter(x1, x2), ref)
    enh = ChangeFeatureEnhancer(6, 10)
    f1, f2 = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    g1 = f1 * torch.sigmoid(enh.proj_1(torch.cat([f1, f2], -1)))
    g2 = f2 * torch.sigmoid(enh.proj_2(torch.cat([f2, f1], -1)))
    torch.testing.assert_close(enh(f1, f2), enh.proj(torch.cat([g1, g2, g1 - g2], -1)))  # Eq. 8


def _tiny_hf_llm(folder: Path, vocab: Vocabulary) -> None:
    """A local Hugging Face LLM folder (random tiny Llama + a word-level tokenizer), as a user would have."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(11)
    words = {w: i for i, w in enumerate(vocab.itos)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<UNK>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<START>", eos_token="<END>", pad_token="<NULL>",
                                   unk_token="<UNK>")
    fast.save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                 tie_word_embeddings=False)).save_pretrained(folder)


@needs_hf
def test_semantic_cc_local_weights_stay_outside_the_model_file(tiny_models, vocab, tmp_path):
    """sam_checkpoint + llm_path: weights come from local files, the model file keeps only trained tensors."""
    from safetensors.torch import save_file
    module, _ = tiny_models["semantic-cc-small"]
    sam = {f"image_encoder.{k}": v.clone() for k, v in module.encoder.state_dict().items() if ".lora_" not in k}
    sam["image_encoder.pos_embed"] = torch.randn(1, 8, 8, 64)  # trained for another size: resized on load
    save_file(sam, str(tmp_path / "sam_tiny.safetensors"))
    _tiny_hf_llm(tmp_path / "llm", vocab)
    cfg = tiny_config("semantic-cc-small", sam_checkpoint=str(tmp_path / "sam_tiny.safetensors"),
                      llm_path=str(tmp_path / "llm"))
    torch.manual_seed(3)
    model, cfg = build_model("semantic-cc-small", cfg)  # no vocabulary: the LLM folder's tokenizer decodes
    assert not torch.equal(model.encoder.state_dict()["blocks.0.attn.qkv.weight"],
                           sam["image_encoder.blocks.0.attn.qkv.weight"])  # building reads no checkpoint
    model.load_pretrained()
    enc = model.encoder.state_dict()
    assert torch.equal(enc["blocks.0.attn.qkv.weight"], sam["image_encoder.blocks.0.attn.qkv.weight"])
    assert enc["pos_embed"].shape == (1, 16, 16, 64)
    keys = set(model.state_dict())
    assert not any(k.startswith("llm.") and "lora_" not in k for k in keys)
    assert not any(k.startswith("encoder.blocks.") and ".lora_" not in k for k in keys)
    assert any("lora_" in k for k in keys) and any(k.startswith("qformer.") for k in keys)
    card = save_model_file(tmp_path / "scc", model, "semantic-cc-small", cfg, InputSpec())
    assert read_card(card)["vocabulary"] is None and read_card(card)["config"]["llm_path"] == str(tmp_path / "llm")
    loaded = load_model_file(card)
    assert loaded.can_caption
    before, after = raw_pair(1, 256, seed=6)
    original = TorchChangeModel(model, InputSpec())
    assert original.caption(before, after) == loaded.caption(before, after)
    assert torch.equal(original.change_probability(before, after), loaded.change_probability(before, after))


# ---- pairing ------------------------------------------------------------------------------------------------

def test_pairing_end_to_end(tiny_models, vocab, tmp_path):
    sen, sen_cfg = tiny_models["sen-small"]
    bit_cfg = dataclasses.replace(get_entry("bit-cd").config, dec_depth=1, output_stride=16)
    torch.manual_seed(7)
    bit, _ = build_model("bit-cd", bit_cfg)
    save_model_file(tmp_path / "tiny-bit", bit, "bit-cd", bit_cfg, InputSpec(tile_size=256), name="tiny-bit")
    sen_card = save_model_file(tmp_path / "tiny-sen", sen, "sen-small", sen_cfg, InputSpec(), vocab,
                               pair_with="tiny-bit")
    model = load_model_file(sen_card)
    assert isinstance(model, PairedChangeModel) and model.name == "tiny-sen"
    assert model.can_caption and model.default_beam_size == 3
    before, after = raw_pair(2, 128, seed=8)  # shapes are tested above; 128 px keeps this end-to-end test fast
    bit_model = load_model_file(tmp_path / "tiny-bit.json")
    sen_model = TorchChangeModel(sen, InputSpec(), vocab)
    torch.testing.assert_close(model.change_probability(before, after), bit_model.change_probability(before, after))
    assert model.caption(before, after, beam_size=3) == sen_model.caption(before, after, beam_size=3)
    pred = model.predict(before, after, with_captions=True)
    assert pred.probability.shape == (2, 128, 128) and len(pred.captions) == 2
    assert model.describe()["paired"]["detector"]["architecture"] == "bit-cd"
    # by path too, relative to the captioner's card
    card = json.loads(sen_card.read_text())
    card["pair_with"] = "./tiny-bit.json"
    sen_card.write_text(json.dumps(card))
    assert isinstance(load_model_file(sen_card), PairedChangeModel)
    # errors: unknown partner; a partner that cannot detect
    card["pair_with"] = "no-such-model"
    sen_card.write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="no model named 'no-such-model'"):
        load_model_file(sen_card)
    save_model_file(tmp_path / "other-sen", sen, "sen-small", sen_cfg, InputSpec(), vocab)
    card["pair_with"] = "other-sen"
    sen_card.write_text(json.dumps(card))
    with pytest.raises(PairingError, match="does not detect change"):
        load_model_file(sen_card)
    with pytest.raises(PairingError, match="does not detect change"):
        PairedChangeModel(sen_model, sen_model)


# ---- parameter counts and the CLI ----------------------------------------------------------------------------

ZOO = ("sen", "sen-small", "dfm", "dfm-small", "semantic-cc-vit-l", "semantic-cc-vit-b", "semantic-cc-small")


def test_paper_configs_parameter_counts(capsys):
    from changescribe.core.cli import main
    rows = {r["name"]: r["parameters"] for r in list_models()}
    with capsys.disabled():
        for name in ZOO:
            count = f"{rows[name] / 1e6:.2f} M" if rows[name] is not None else "n/a (no transformers)"
            print(f"\n{name}: {count} parameters", end="")
        print()
    assert abs(rows["sen"] - 39.9e6) / 39.9e6 < 0.05, rows["sen"]  # SEN paper, Table I: 39.9 M
    assert get_entry("sen").config.vocab_size == 436  # the LEVIR-CC train vocabulary
    assert count_parameters("sen") == rows["sen"]
    if HAS_HF:
        assert rows["semantic-cc-vit-l"] > rows["semantic-cc-vit-b"] > 6.9e9  # Vicuna-7B-size LLM inside
        assert rows["semantic-cc-small"] < 30e6
    assert rows["sen-small"] < 20e6 and rows["dfm-small"] < 20e6
    assert rows["dfm"] > rows["dfm-small"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ZOO:
        assert name in out
    assert f"{rows['sen'] / 1e6:8.2f} M params" in out


# ---- ONNX ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pix4cap-tiny", "bit-cd"])
def test_onnx_export_matches_torch(vocab, tmp_path, name):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from changescribe.core.onnx_export import OnnxChangeModel, compare_with_torch, export_onnx
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_entry(name).config, **({"dec_depth": 2} if name == "bit-cd" else {}))
    module, _ = build_model(name, cfg, vocabulary=vocab if name.startswith("pix4cap") else None)
    model = TorchChangeModel(module, InputSpec(tile_size=64), vocab if name.startswith("pix4cap") else None)
    files = export_onnx(model, tmp_path / name)
    assert set(files) == ({"cd", "caption_encoder"} if name.startswith("pix4cap") else {"cd"})
    fast = OnnxChangeModel(model, files, threads=2)
    for size in (64, 96):  # batch and tile size are dynamic
        before, after = raw_pair(3 if size == 64 else 1, size, seed=size)
        diffs = compare_with_torch(model, fast, before, after)
        assert all(d < 1e-4 for d in diffs.values()), diffs
    if fast.can_caption:
        before, after = raw_pair(2, 64, seed=1)
        assert fast.caption(before, after, beam_size=3) == model.caption(before, after, beam_size=3)
    assert not module.training
