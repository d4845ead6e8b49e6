"""Model code: shapes, gradients, decoding (cache == no cache, beam 1 == greedy, beam == exhaustive),
model files (round trip, sha256, pickles, unknown architecture), vocabulary."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from changescribe.core.model_api import InputSpec
from changescribe.core.model_file import ModelFileError, read_card, resolve_model, save_model_file
from changescribe.core.model_loading import load_model_file
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.backbones import ResNetBackbone
from changescribe.core.models.caption_decoder import CaptionDecoder
from changescribe.training.losses import pix4cap_loss
from changescribe.core.models.network import ChangeNetwork
from changescribe.core.models.registry import (UnknownModelError, build_model, count_parameters, get_entry,
                                               known_models, list_models)
from changescribe.core.vocabulary import Vocabulary, tokenize

LEVIRCC = Path("/work/shared/data/levircc_captions.json")
CAPTIONS = ["a house is built near the road", "there is no difference", "many trees are removed",
            "a road is built , and a house appears", "the scene is the same as before"] * 2


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build(CAPTIONS, min_count=1)


@pytest.fixture(scope="module")
def tiny(vocab):
    torch.manual_seed(0)
    module, cfg = build_model("pix4cap-tiny", vocabulary=vocab)
    return module, cfg


def raw_pair(b: int = 2, size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 255, torch.rand(b, 3, size, size, generator=g) * 255


# ---- forward / backward ---------------------------------------------------------------------------

def test_pix4cap_tiny_forward_backward(tiny, vocab):
    module, cfg = tiny
    module.train()
    before, after = raw_pair(2, 256)
    caps = vocab.encode(CAPTIONS[:2])
    cd, logits = module(before / 255, after / 255, caps[:, :-1])
    assert cd.shape == (2, 2, 256, 256)
    assert logits.shape == (2, caps.shape[1] - 1, len(vocab))
    mask = torch.randint(0, 2, (2, 256, 256))
    loss, _ = pix4cap_loss(cd, mask, logits, caps[:, 1:])
    loss.backward()
    g = module.backbone.conv1.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert module.decoder.embed.weight.grad.abs().sum() > 0
    module.zero_grad(set_to_none=True)
    module.eval()
    with torch.no_grad():  # five captions per pair share one encoding
        five = vocab.encode(CAPTIONS)
        _, many = module(before / 255, after / 255, five[:, :-1])
        _, one = module(before[1:] / 255, after[1:] / 255, five[5:6, :-1])
    assert many.shape == (10, five.shape[1] - 1, len(vocab))
    torch.testing.assert_close(many[5:6], one, rtol=1e-4, atol=1e-4)


def test_bit_forward_shapes_and_grad():
    torch.manual_seed(0)
    module, cfg = build_model("bit-cd")
    assert module.backbone.strides == (4, 8, 8) and cfg.token_len == 4
    before, after = raw_pair(2, 128)
    logits = module(before / 255, after / 255)
    assert logits.shape == (2, 2, 128, 128)
    logits.logsumexp(1).mean().backward()
    assert module.backbone.conv1.weight.grad.abs().sum() > 0


def test_pix4cap_128_input(tiny):
    module, _ = tiny
    model = TorchChangeModel(module, InputSpec(tile_size=128), None)
    prob = model.change_probability(*raw_pair(1, 128))
    assert prob.shape == (1, 128, 128)


def test_paper_configs_parameter_counts():
    rows = {r["name"]: r for r in list_models()}
    for name, row in rows.items():
        print(f"{name}: {row['parameters'] / 1e6:.2f} M parameters")
    assert 3.0e6 < rows["bit-cd"]["parameters"] < 4.0e6  # BIT paper: 3.55 M
    assert rows["pix4cap"]["parameters"] > rows["pix4cap-tiny"]["parameters"]
    assert rows["pix4cap-tiny"]["parameters"] * 4 < 30e6  # float32 file under 30 MB
    module, cfg = build_model("pix4cap")  # really builds on CPU
    assert sum(p.numel() for p in module.parameters()) == rows["pix4cap"]["parameters"] == count_parameters("pix4cap")
    module.eval()
    with torch.no_grad():
        cd, _ = module(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
    assert cd.shape == (1, 2, 64, 64)


# ---- backbone ---------------------------------------------------------------------------------------

def test_backbone_local_weights_six_channels(tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(1)
    ref = resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    rgb, six = ResNetBackbone("resnet18", 3, 4).eval(), ResNetBackbone("resnet18", 6, 3).eval()
    rgb.load_pretrained(tmp_path / "r18.pth")
    six.load_pretrained(tmp_path / "r18.pth")
    assert six.channels == (64, 128, 256) and rgb.strides == (4, 8, 16, 32)
    torch.testing.assert_close(six.conv1.weight, ref.conv1.weight.repeat(1, 2, 1, 1) / 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # two identical stacked images respond like one image
        torch.testing.assert_close(six(torch.cat([x, x], 1))[-1], rgb(x)[2], rtol=1e-4, atol=1e-4)


# ---- caption decoder --------------------------------------------------------------------------------

def uncached_greedy(dec: CaptionDecoder, memory: torch.Tensor, mask=None) -> torch.Tensor:
    """Reference: re-decode the whole prefix with teacher forcing at every step."""
    b = memory.shape[0]
    seq = torch.full((b, 1), dec.start_id, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(dec.max_len - 1):
        logits = dec(seq, memory, mask)[:, -1].float()
        logits[:, [dec.pad_id, dec.start_id]] = float("-inf")
        tok = logits.argmax(-1).masked_fill(done, dec.pad_id)
        seq = torch.cat([seq, tok[:, None]], 1)
        done |= tok == dec.end_id
        if done.all():
            break
    return seq[:, 1:]


@pytest.fixture(scope="module")
def random_decoder() -> CaptionDecoder:
    torch.manual_seed(3)
    return CaptionDecoder(vocab_size=50, d_model=64, heads=4, layers=2, ffn_dim=128, dropout=0.1, max_len=20).eval()


def test_cached_greedy_equals_uncached(random_decoder):
    dec = random_decoder
    memory = torch.randn(4, 9, 64)
    with torch.no_grad():
        fast, slow = dec.greedy(memory), uncached_greedy(dec, memory)
        assert torch.equal(fast, slow)
        # the cache also reproduces the teacher-forced logits themselves
        state, seq = dec.prepare(memory), torch.cat([torch.full((4, 1), dec.start_id), fast], 1)
        stepped = torch.stack([dec.step(seq[:, t], state) for t in range(seq.shape[1] - 1)], 1)
        torch.testing.assert_close(stepped, dec(seq[:, :-1], memory), rtol=1e-5, atol=1e-5)


def test_memory_mask_equals_dropping_tokens(random_decoder):
    dec = random_decoder
    memory = torch.randn(2, 9, 64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad():
        a = dec(torch.tensor([[2, 5, 7], [2, 9, 4]]), memory, mask)
        b = dec(torch.tensor([[2, 5, 7], [2, 9, 4]]), memory[:, :6])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(dec.greedy(memory, mask), uncached_greedy(dec, memory, mask))
        assert torch.equal(dec.beam_search(memory, mask, beam_size=3), dec.beam_search(memory[:, :6], beam_size=3))


def test_beam_one_equals_greedy(random_decoder):
    memory = torch.randn(5, 7, 64)
    with torch.no_grad():
        assert torch.equal(random_decoder.beam_search(memory, beam_size=1), random_decoder.greedy(memory))


def test_beam_search_finds_exhaustive_optimum():
    torch.manual_seed(5)
    dec = CaptionDecoder(vocab_size=6, d_model=32, heads=2, layers=1, ffn_dim=64, dropout=0.0, max_len=5).eval()
    with torch.no_grad():
        dec.classifier.bias[3] += 1.0  # make <END> competitive so finished beams matter
        memory = torch.randn(3, 4, 32)
        best = dec.beam_search(memory, beam_size=64)  # wide enough to be exact
        words = [1, 3, 4, 5]  # every token except <NULL> and <START>
        for i in range(3):
            top, top_seq = float("-inf"), None
            for n in range(1, 5):
                for seq in itertools.product(words, repeat=n):
                    if 3 in seq[:-1] or (n < 4 and seq[-1] != 3):
                        continue  # <END> only last; shorter than the limit must end with <END>
                    inp = torch.tensor([[2, *seq[:-1]]])
                    logits = dec(inp, memory[i: i + 1])[0].float()
                    logits[:, [0, 2]] = float("-inf")
                    score = logits.log_softmax(-1)[torch.arange(n), torch.tensor(seq)].sum().item()
                    if score > top:
                        top, top_seq = score, list(seq)
            row = [t for t in best[i].tolist() if t != 0]
            assert row == top_seq


def test_beam_per_sample_finish_and_length_penalty(random_decoder):
    memory = torch.randn(3, 5, 64)
    with torch.no_grad():
        for lp in (0.0, 1.0):
            ids = random_decoder.beam_search(memory, beam_size=3, length_penalty=lp, max_len=12)
            assert ids.shape[0] == 3 and ids.shape[1] <= 11
            for row in ids.tolist():  # nothing but padding after <END>
                if 3 in row:
                    assert all(t == 0 for t in row[row.index(3) + 1:])


# ---- adapter ---------------------------------------------------------------------------------------

def test_adapter_predict_shares_encoder(tiny, vocab):
    module, _ = tiny
    model = TorchChangeModel(module, InputSpec(), vocab, name="t")
    before, after = raw_pair(2, 256)
    calls = []
    handle = module.backbone.register_forward_hook(lambda *a: calls.append(1))
    pred = model.predict(before, after, with_captions=True, beam_size=3)
    handle.remove()
    assert len(calls) == 1
    assert pred.probability.shape == (2, 256, 256)
    assert 0 <= float(pred.probability.min()) and float(pred.probability.max()) <= 1
    assert pred.captions == model.caption(before, after, beam_size=3)
    greedy = model.caption(before, after)
    assert len(greedy) == 2 and all(isinstance(c, str) for c in greedy)
    torch.testing.assert_close(pred.probability, model.change_probability(before, after))
    assert not module.training


def test_bit_adapter_cannot_caption():
    module, _ = build_model("bit-cd")
    model = TorchChangeModel(module, InputSpec())
    assert not model.can_caption
    with pytest.raises(NotImplementedError):
        model.caption(*raw_pair(1, 64))
    assert model.predict(*raw_pair(1, 64), with_captions=True).captions is None


def test_every_architecture_declares_what_it_can_do():
    """Callers read the declarations (no probing with defaults), so they must match what the classes have:
    a change head exactly when ``can_detect``, a caption path exactly when ``can_caption``, and the registry's
    ``captions`` / ``detects`` the same."""
    for name in known_models():
        entry = get_entry(name)
        net = entry.builder
        assert issubclass(net, ChangeNetwork), name
        assert net.can_detect == hasattr(net, "change_logits") == entry.detects, name
        assert net.can_caption == (hasattr(net, "caption_memory") or hasattr(net, "generate_captions")), name
        assert entry.captions == net.can_caption, name
    sen, _ = build_model("sen-small")
    assert TorchChangeModel(sen, InputSpec()).default_beam_size == sen.cfg.beam_size == 3  # SEN's paper decodes so
    bit, _ = build_model("bit-cd")
    assert TorchChangeModel(bit, InputSpec()).default_beam_size == 1


# ---- model files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny, vocab):
    module, cfg = tiny
    d = tmp_path_factory.mktemp("models")
    card = save_model_file(d / "tiny-test", module, "pix4cap-tiny", cfg, InputSpec(), vocab, version="0.1",
                           training_data="unit test", metrics={"bleu4": 0.0}, licence="GPL-2.0-or-later")
    return card


def test_round_trip_bit_exact(saved, tiny, vocab):
    module, _ = tiny
    card = read_card(saved)
    assert card["architecture"] == "pix4cap-tiny" and card["vocabulary"]["words"] == vocab.itos
    assert card["config"]["btf_channels"] == [32, 64, 128]
    loaded = load_model_file(saved)
    assert loaded.module.cfg.btf_channels == (32, 64, 128) and loaded.can_caption
    ref, new = module.state_dict(), loaded.module.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    before, after = raw_pair(2, 256, seed=4)
    original = TorchChangeModel(module, InputSpec(), vocab)
    assert torch.equal(original.change_probability(before, after), loaded.change_probability(before, after))
    assert original.caption(before, after, beam_size=3) == loaded.caption(before, after, beam_size=3)
    assert loaded.name == "tiny-test" and loaded.version == "0.1"


def test_tied_embeddings_round_trip(tmp_path, vocab):
    import dataclasses
    cfg = dataclasses.replace(get_entry("pix4cap-tiny").config, tie_embeddings=True, d_model=64, ffn_dim=64)
    module, cfg = build_model("pix4cap-tiny", cfg, vocabulary=vocab)
    assert module.decoder.classifier.weight is module.decoder.embed.weight
    loaded = load_model_file(save_model_file(tmp_path / "tied", module, "pix4cap-tiny", cfg, InputSpec(), vocab))
    assert loaded.module.decoder.classifier.weight is loaded.module.decoder.embed.weight
    assert torch.equal(loaded.module.decoder.embed.weight, module.decoder.embed.weight)


def test_read_card_needs_no_torch(saved):
    code = ("import sys; from changescribe.core.model_file import read_card; "
            f"c = read_card({str(saved)!r}); assert c['name'] == 'tiny-test'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tampered_weights_rejected(saved, tmp_path):
    import shutil
    card = shutil.copy(saved, tmp_path / "x.json")
    weights = shutil.copy(saved.with_suffix(".safetensors"), tmp_path / "x.safetensors")
    data = bytearray(Path(weights).read_bytes())
    data[-10] ^= 0xFF
    Path(weights).write_bytes(bytes(data))
    json_card = json.loads(Path(card).read_text())
    json_card["weights"] = "x.safetensors"
    Path(card).write_text(json.dumps(json_card))
    with pytest.raises(ModelFileError, match="sha256"):
        load_model_file(card)


def test_pickle_refused(tmp_path, tiny):
    module, _ = tiny
    torch.save(module.state_dict(), tmp_path / "model.pt")
    for target in (tmp_path / "model.pt", tmp_path / "model.pth"):
        with pytest.raises(ModelFileError, match="pickled checkpoints are refused"):
            load_model_file(target)
    # a pickle disguised as .safetensors, with a card whose sha256 matches it
    import hashlib
    import shutil
    shutil.copy(tmp_path / "model.pt", tmp_path / "evil.safetensors")
    digest = hashlib.sha256((tmp_path / "evil.safetensors").read_bytes()).hexdigest()
    (tmp_path / "evil.json").write_text(json.dumps({
        "format": "changescribe-model/1", "name": "evil", "architecture": "pix4cap-tiny", "config": {},
        "input": InputSpec().to_dict(), "sha256": digest}))
    with pytest.raises(ModelFileError, match="pickled checkpoints are refused"):
        load_model_file(tmp_path / "evil.json")


def test_unknown_architecture(saved, tmp_path):
    import shutil
    shutil.copy(saved.with_suffix(".safetensors"), tmp_path / "u.safetensors")
    card = json.loads(saved.read_text())
    card.update(architecture="no-such-net", weights="u.safetensors")
    (tmp_path / "u.json").write_text(json.dumps(card))
    with pytest.raises(ModelFileError, match="unknown model architecture 'no-such-net'.*pix4cap-tiny"):
        load_model_file(tmp_path / "u.json")
    with pytest.raises(UnknownModelError, match="bit-cd"):
        get_entry("no-such-net")


def test_resolve_model(saved):
    assert resolve_model("tiny-test", [saved.parent]) == saved
    assert resolve_model(saved.with_suffix(".safetensors")) == saved
    with pytest.raises(ModelFileError, match="available: \\['tiny-test'\\]"):
        resolve_model("missing", [saved.parent])


# ---- vocabulary -----------------------------------------------------------------------------------

def test_vocabulary_round_trip(vocab):
    assert tokenize("A road is built, and trees; removed?.") == ["a", "road", "is", "built", ",", "and",
                                                                  "trees", ";", "removed"]
    assert vocab.itos[:4] == ["<NULL>", "<UNK>", "<START>", "<END>"]
    ids = vocab.encode("A road is built, and a house appears.")
    assert ids.shape == (40,) and ids[0] == 2 and ids.dtype == torch.long
    assert vocab.decode(ids) == "a road is built , and a house appears"
    assert vocab.decode([2, vocab.stoi["road"], 3, vocab.stoi["house"]]) == "road"
    assert vocab.decode(vocab.encode("a zebra is built")) == "a is built"  # <UNK> dropped
    batch = vocab.encode(CAPTIONS[:3], max_length=6)
    assert batch.shape == (3, 6) and batch[0, -1] == 3  # cut, <END> kept
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.itos == vocab.itos and again.max_length == vocab.max_length


@pytest.mark.skipif(not LEVIRCC.is_file(), reason="LEVIR-CC captions not available")
def test_vocabulary_from_levircc():
    v = Vocabulary.from_levircc(LEVIRCC)
    assert 300 < len(v) < 600 and v.min_count == 5
    records = json.loads(LEVIRCC.read_text())["images"]
    train = [s for r in records if r["split"] == "train" for s in r["sentences"]]
    assert "there" in v and "building" in v
    assert v.decode(v.encode(train[0])) == train[0]
    test_only = {w for r in records if r["split"] == "test" for s in r["sentences"] for w in s.split()}
    test_only -= {w for s in train for w in s.split()}
    assert test_only and not any(w in v for w in test_only)  # built from TRAIN only
