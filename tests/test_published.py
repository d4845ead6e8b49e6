"""Importing published checkpoints (``changescribe models import``), offline.

Each test writes a checkpoint with the peer's exact key names and shapes, in the peer's own container, from the
committed manifest tests/data/published/*.json (written by bench/import_equivalence.py from the peer's code; the
numerical equivalence with that code is the bench script's job). Real torch.save / torch.load, real files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from changescribe.core.cli import main as cli_main
from changescribe.core.model_file import read_card
from changescribe.core.model_loading import load_model_file

MANIFEST = Path(__file__).parent / "data" / "published" / "bit_base_transformer_pos_s4_dd8_dedim8.json"


def _manifest(path: Path = MANIFEST) -> dict:
    return json.loads(path.read_text())


def peer_state(seed: int = 0, manifest: Path = MANIFEST) -> dict[str, torch.Tensor]:
    """Random tensors under the peer's key names, shapes and dtypes (running variances positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in _manifest(manifest)["keys"]:
        if dtype == "int64":
            state[key] = torch.tensor(7) if not shape else torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
    return state


def save_peer_checkpoint(path: Path, state: dict[str, torch.Tensor], **extra) -> Path:
    """The container BIT_CD's trainer writes: its weights under model_G_state_dict beside plain numbers."""
    container = {k: 1 for k in _manifest()["container"]}
    container.update({"model_G_state_dict": state, "optimizer_G_state_dict": {"state": {}, "param_groups": []},
                      "exp_lr_scheduler_G_state_dict": {"last_epoch": 3}, **extra})
    torch.save(container, path)
    return path


def run_import(capsys, *args: str) -> tuple[int, str]:
    code = cli_main(["models", "import", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = peer_state()
    return save_peer_checkpoint(tmp_path / "best_ckpt.pt", state), state


def test_manifest_is_the_peers_released_levir_model():
    m = _manifest()
    assert m["repository"] == "https://github.com/justchenhao/BIT_CD" and len(m["commit"]) == 40
    keys = {k: shape for k, shape, _ in m["keys"]}
    # dedim8: 8 heads x 8 in the decoder, 8 x 64 in the encoder (fused qkv), C = 32, 4 tokens, 8 decoder layers
    assert keys["transformer_decoder.layers.0.0.fn.fn.to_q.weight"] == [64, 32]
    assert keys["transformer.layers.0.0.fn.fn.to_qkv.weight"] == [1536, 32]
    assert keys["conv_a.weight"] == [4, 32, 1, 1] and keys["pos_embedding"] == [1, 8, 32]
    assert sum(k.endswith("0.fn.fn.to_q.weight") for k in keys) == 8


def test_bit_checkpoint_imports_with_every_tensor_where_the_peer_uses_it(tmp_path, capsys, checkpoint):
    ckpt, state = checkpoint
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(tmp_path / "models"))
    assert code == 0, out
    card_path = tmp_path / "models" / "bit-levir-cd.json"
    assert f"model file: {card_path}" in out
    card = read_card(card_path)
    cfg = card["config"]
    assert (cfg["attention_scale"], cfg["qkv_bias"], cfg["backbone_dilation"]) == ("dim", False, False)
    assert (cfg["dec_dim_head"], cfg["dim_head"], cfg["dec_depth"], cfg["enc_depth"], cfg["token_len"]) == (8, 64, 8, 1, 4)
    model = load_model_file(card_path)
    ours = model.module.state_dict()
    qkv = state["transformer.layers.0.0.fn.fn.to_qkv.weight"]
    assert torch.equal(ours["encoder.0.attn.to_q.weight"], qkv[:512])
    assert torch.equal(ours["encoder.0.attn.to_k.weight"], qkv[512:1024])
    assert torch.equal(ours["encoder.0.attn.to_v.weight"], qkv[1024:])
    norm = state["transformer_decoder.layers.5.0.fn.norm.weight"]
    assert torch.equal(ours["decoder.5.norm_q.weight"], norm) and torch.equal(ours["decoder.5.norm_ctx.weight"], norm)
    assert torch.equal(ours["decoder.7.attn.to_v.weight"], state["transformer_decoder.layers.7.0.fn.fn.to_v.weight"])
    assert torch.equal(ours["backbone.layers.2.1.conv2.weight"], state["resnet.layer3.1.conv2.weight"])
    assert torch.equal(ours["head.3.bias"], state["classifier.3.bias"])
    assert torch.equal(ours["pos"], state["pos_embedding"])
    assert not any(k.startswith("backbone.layers.3") for k in ours)  # BIT runs its ResNet-18 to layer3 only
    # layer3 as BIT_CD's BasicBlock builds it: stride 1, no dilation
    conv = model.module.backbone.layers[2][1].conv1
    assert (conv.stride, conv.dilation, conv.padding) == ((1, 1), (1, 1), (1, 1))
    prob = model.change_probability(torch.rand(2, 3, 64, 64) * 255, torch.rand(2, 3, 64, 64) * 255)
    assert prob.shape == (2, 64, 64) and float(prob.std()) > 0


def test_card_carries_source_normalisation_metrics_and_terms(tmp_path, capsys, checkpoint, monkeypatch):
    ckpt, _ = checkpoint
    monkeypatch.setenv("CHANGESCRIBE_MODEL_PATH", os.pathsep.join([str(tmp_path), str(tmp_path / "other")]))
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--dataset", "LEVIR-CD", "--name", "bit-mine")
    assert code == 0, out  # no --folder: the first user model folder, so `changescribe models` lists it at once
    card = read_card(tmp_path / "bit-mine.json")
    assert card["name"] == "bit-mine" and card["architecture"] == "bit-cd" and card["vocabulary"] is None
    assert card["input"] == {"bands": 3, "mean": [127.5] * 3, "std": [127.5] * 3, "tile_size": 256, "gsd": 0.5}
    assert card["metrics"]["test"]["F1"] == pytest.approx(0.8931)
    assert "LEVIR-CD" in card["metrics"]["test"]["data"]
    assert "non-commercial" in card["licence"] and "non-commercial" in card["weights_terms"]
    src = card["source"]
    assert src["repository"] == "https://github.com/justchenhao/BIT_CD" and src["code_commit"] == _manifest()["commit"]
    assert src["checkpoint"] == "best_ckpt.pt" and len(src["checkpoint_sha256"]) == 64
    from changescribe.core.model_card import card_summary

    assert "F1 0.89 on LEVIR-CD test" in card_summary(card)


def test_original_attention_scale_is_one_over_sqrt_of_the_feature_width():
    """BIT's Attention: softmax(q k^T * dim**-0.5) v with q, k, v without bias, written out here by hand."""
    from changescribe.core.models.attention import PreNormBlock

    torch.manual_seed(0)
    blk = PreNormBlock(32, 8, 8, 64, cross=True, qkv_bias=False, scale=32 ** -0.5).eval()
    x, m = torch.randn(2, 50, 32), torch.randn(2, 4, 32)
    a = blk.attn
    q = a.to_q(blk.norm_q(x)).view(2, 50, 8, 8).transpose(1, 2)
    k = a.to_k(blk.norm_ctx(m)).view(2, 4, 8, 8).transpose(1, 2)
    v = a.to_v(blk.norm_ctx(m)).view(2, 4, 8, 8).transpose(1, 2)
    att = (torch.einsum("bhid,bhjd->bhij", q, k) * 32 ** -0.5).softmax(-1)
    h = x + a.to_out(torch.einsum("bhij,bhjd->bhid", att, v).transpose(1, 2).reshape(2, 50, 64))
    expected = h + blk.ff(blk.norm_ff(h))
    assert a.to_q.bias is None and a.to_out.bias is not None
    assert torch.allclose(blk(x, m), expected, atol=1e-6)
    standard = PreNormBlock(32, 8, 8, 64, cross=True, qkv_bias=False)
    standard.load_state_dict(blk.state_dict())
    assert not torch.allclose(standard.eval()(x, m), expected, atol=1e-4)  # the scale really differs


@pytest.mark.parametrize("change, named", [
    ("extra", "transformer.layers.0.2.fn.norm.weight"),
    ("shape", "classifier.0.weight 16x32x3x3 (needs 32x32x3x3)"),
    ("missing", "missing: backbone.layers.1.0.bn1.running_mean"),
])
def test_layers_that_do_not_fit_are_named_and_nothing_is_written(tmp_path, capsys, change, named):
    state = peer_state()
    if change == "extra":
        state["transformer.layers.0.2.fn.norm.weight"] = torch.ones(32)
    elif change == "shape":
        state["classifier.0.weight"] = torch.randn(16, 32, 3, 3)
    else:
        del state["resnet.layer2.0.bn1.running_mean"]
    ckpt = save_peer_checkpoint(tmp_path / "ckpt.pt", state)
    folder = tmp_path / "models"
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(folder))
    assert code == 2
    line = out.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("changescribe: error: ") and "did not fit" in line and named in line
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    ckpt = save_peer_checkpoint(tmp_path / "evil.pt", peer_state(), args=Payload())
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(tmp_path / "models"))
    assert code == 2 and "refused" in out and "arbitrary code" in out and "Traceback" not in out
    assert not marker.exists() and not (tmp_path / "models").exists()


def test_an_existing_model_file_is_never_replaced(tmp_path, capsys, checkpoint):
    ckpt, _ = checkpoint
    theirs = tmp_path / "bit-levir-cd.json"
    theirs.write_text("someone else's card")
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(tmp_path))
    assert code == 2 and "already exists" in out and "never replaced" in out
    assert theirs.read_text() == "someone else's card"
    assert not (tmp_path / "bit-levir-cd.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_ckpt.pt", "bit-levir-cd.json"]  # no temporaries


@pytest.mark.parametrize("args, says", [
    (["missing.pt", "--from", "bit"], "not found"),
    (["CKPT", "--from", "bit", "--dataset", "WHU-CD"], "no published checkpoint for dataset 'WHU-CD'"),
    (["CKPT", "--from", "bit", "--name", "../escape"], "not usable as a file name"),
    (["NOTCKPT", "--from", "bit"], "cannot be read as a torch checkpoint"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, checkpoint, args, says):
    ckpt, _ = checkpoint
    (tmp_path / "not.pt").write_text("not a checkpoint")
    args = [str(ckpt) if a == "CKPT" else str(tmp_path / "not.pt") if a == "NOTCKPT" else
            str(tmp_path / a) if a == "missing.pt" else a for a in args]
    code, out = run_import(capsys, *args, "--folder", str(tmp_path / "models"))
    assert code == 2 and says in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_a_checkpoint_of_another_bit_variant_imports_with_its_own_sizes(tmp_path, capsys):
    """BIT_CD's base_transformer_pos_s4_dd8 (decoder heads 64 wide): read from the shapes, not assumed."""
    state = peer_state()
    for i in range(8):
        for p in ("to_q", "to_k", "to_v"):
            state[f"transformer_decoder.layers.{i}.0.fn.fn.{p}.weight"] = torch.randn(512, 32) / 32 ** 0.5
        state[f"transformer_decoder.layers.{i}.0.fn.fn.to_out.0.weight"] = torch.randn(32, 512) / 512 ** 0.5
    ckpt = save_peer_checkpoint(tmp_path / "dd8.pt", state)
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(tmp_path), "--name", "dd8")
    assert code == 0, out
    assert read_card(tmp_path / "dd8.json")["config"]["dec_dim_head"] == 64


def test_processing_imports_and_refuses_like_the_cli(qgis_app, tmp_path, checkpoint):
    import processing
    from qgis.core import QgsProcessingException

    ckpt, _ = checkpoint
    folder = tmp_path / "models"
    res = processing.run("changescribe:importcheckpoint", {"CHECKPOINT": str(ckpt), "SOURCE": 0, "NAME": "",
                                                            "FOLDER": str(folder)})
    assert res["MODEL"] == str(folder / "bit-levir-cd.json")
    assert read_card(res["MODEL"])["config"]["attention_scale"] == "dim"
    with pytest.raises(QgsProcessingException, match="already exists"):
        processing.run("changescribe:importcheckpoint", {"CHECKPOINT": str(ckpt), "SOURCE": 0, "FOLDER": str(folder)})
    assert sorted(p.name for p in folder.iterdir()) == ["bit-levir-cd.json", "bit-levir-cd.safetensors"]


def test_the_worker_imports_for_the_dock_and_reports_errors_as_events(tmp_path, checkpoint):
    """The dock's Import checkpoint… in a separate Python: the worker's --import, a real process."""
    import sys

    from changescribe.plugin.worker_client import WorkerError, import_in_python

    ckpt, _ = checkpoint
    job = {"checkpoint": str(ckpt), "family": "bit", "dataset": "LEVIR-CD", "name": "from-worker",
           "folder": str(tmp_path / "models")}
    card = import_in_python(sys.executable, job)
    assert card == str(tmp_path / "models" / "from-worker.json") and read_card(card)["name"] == "from-worker"
    with pytest.raises(WorkerError, match="already exists") as err:
        import_in_python(sys.executable, job)
    assert err.value.kind == "input"


def test_the_dock_picker_offers_import_and_its_task_imports_into_the_model_folder(qgis_app, tmp_path, checkpoint):
    from changescribe.plugin.dock_widgets_import import ImportDialog, ImportTask
    from changescribe.plugin.dock_widgets_model import IMPORT_ENTRY, ModelPanel

    ckpt, _ = checkpoint
    panel = ModelPanel()
    panel.refresh_models([], "")
    combo = panel.model_combo
    last = combo.count() - 1
    assert combo.itemData(last) == IMPORT_ENTRY and combo.itemText(last) == "Import checkpoint…"
    chosen, asked = combo.currentIndex(), []
    panel.import_requested.connect(lambda: asked.append(True))
    combo.setCurrentIndex(last)  # choosing the entry asks for the dialog and keeps the model that was chosen
    assert asked == [True] and combo.currentIndex() == chosen

    folder = tmp_path / "models"
    dialog = ImportDialog(str(folder))
    dialog.checkpoint.setFilePath(str(ckpt))
    assert dialog.name.placeholderText() == "bit-levir-cd"
    job = dialog.job()
    assert job == {"checkpoint": str(ckpt), "family": "bit", "dataset": "LEVIR-CD", "name": None,
                   "folder": str(folder)}
    task = ImportTask(job, None)  # QGIS's Python has torch here; the worker path is tested above
    assert task.run(), task.outcome
    panel.refresh_models([str(folder)], task.outcome[1])
    assert panel.current_card()["name"] == "bit-levir-cd" and "F1 0.89" in panel.card_summary.text()
    again = ImportTask(job, None)
    assert not again.run() and "already exists" in again.outcome[1] and "\n" not in again.outcome[1]


def test_an_imported_model_runs_through_the_streaming_pipeline(tmp_path, capsys, checkpoint):
    """`changescribe detect --model` on the imported card: the pipeline's probability raster is the model's own."""
    import numpy as np
    import rasterio

    from conftest import write_geotiff

    ckpt, _ = checkpoint
    assert run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(tmp_path))[0] == 0
    rng = np.random.default_rng(3)
    before = rng.integers(0, 256, (3, 256, 256), dtype=np.uint8)
    after = before.copy()
    after[:, 80:180, 60:200] = 255 - after[:, 80:180, 60:200]
    b = write_geotiff(tmp_path / "before.tif", before)
    a = write_geotiff(tmp_path / "after.tif", after)
    out, prob = tmp_path / "out.gpkg", tmp_path / "prob.tif"
    code = cli_main(["detect", str(b), str(a), "-o", str(out), "--model", str(tmp_path / "bit-levir-cd.json"),
                     "--device", "cpu", "--probability", str(prob), "--tile-size", "256", "--overlap", "0", "-q"])
    assert code == 0, capsys.readouterr().err
    with rasterio.open(prob) as ds:
        piped = ds.read(1)
    model = load_model_file(tmp_path / "bit-levir-cd.json")
    direct = model.change_probability(torch.from_numpy(before[None]).float(), torch.from_numpy(after[None]).float())
    assert np.abs(piped - direct[0].numpy()).max() < 1e-4


# ---- rsiccformer: RSICC's trainer pickles its three modules (and their optimisers) themselves ----------------------
RSICC_MANIFEST = MANIFEST.parent / "rsiccformer_resnet101_MCCFormers_diff_as_Q_trans.json"
RSICC_PARTS = ("encoder_image", "encoder_feat", "decoder")
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "pe")


def rsicc_word_map(size: int) -> dict[str, int]:
    """A word map in RSICC's layout: <pad> 0, the words, then <unk>, <start>, <end>."""
    word_map = {"<pad>": 0, **{f"word{i}": i for i in range(1, size - 3)}}
    for special in ("<unk>", "<start>", "<end>"):
        word_map[special] = len(word_map)
    return word_map


def module_tree(state: dict[str, torch.Tensor], part: str) -> torch.nn.Module:
    """Plain nn.Modules holding ``part``'s tensors under the peer's names (pickled as real modules by torch.save)."""
    root = torch.nn.Module()
    for key, t in state.items():
        if not key.startswith(part + "."):
            continue
        *path, leaf = key[len(part) + 1:].split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, torch.nn.Module())
            m = m._modules[p]
        if leaf in _BUFFERS:
            m.register_buffer(leaf, t)
        else:
            m.register_parameter(leaf, torch.nn.Parameter(t))
    return root


def save_rsicc_checkpoint(folder: Path, state: dict[str, torch.Tensor], word_map: bool = True, **extra) -> Path:
    """RSICC's save_checkpoint container (modules and Adam optimisers pickled whole) and its word map beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {p: module_tree(state, p) for p in RSICC_PARTS}
    container = {"epoch": 30, "epochs_since_improvement": 2, "bleu-4": 0.64, **parts,
                 **{f"{p}_optimizer": torch.optim.Adam(m.parameters(), lr=1e-4) for p, m in parts.items()}, **extra}
    path = folder / "BEST_checkpoint_resnet101_MCCFormers_diff_as_Q_trans.pth.tar"
    torch.save(container, path)
    if word_map:
        (folder / "WORDMAP_LEVIR_CC_5_cap_per_img_5_min_word_freq.json").write_text(
            json.dumps(rsicc_word_map(_manifest(RSICC_MANIFEST)["vocabulary"])))
    return path


def test_rsicc_manifest_is_the_peers_released_model():
    m = _manifest(RSICC_MANIFEST)
    assert m["repository"] == "https://github.com/Chen-Yang-Liu/RSICC" and len(m["commit"]) == 40
    keys = {k: shape for k, shape, _ in m["keys"]}
    assert sum(k.startswith("encoder_image.net.6.") and k.endswith(".conv1.weight") for k in keys) == 23  # ResNet-101
    assert keys["encoder_feat.projection.weight"] == [512, 1024, 1, 1]
    assert keys["encoder_feat.transformer.2.attention.in_proj_weight"] == [1536, 512]
    assert keys["decoder.transformer.layers.0.multihead_attn2.in_proj_weight"] == [3072, 1024]
    assert keys["decoder.wdc.weight"] == [m["vocabulary"], 1024]
    assert set(m["container"]) >= {*RSICC_PARTS, "decoder_optimizer", "bleu-4"}


def test_rsiccformer_checkpoint_of_pickled_modules_imports_as_a_captioner(tmp_path, capsys):
    from changescribe.core.model_loading import build_from_card
    from changescribe.core.vocabulary import END_ID, PAD_ID, START_ID, UNK_ID

    state = peer_state(1, RSICC_MANIFEST)
    ckpt = save_rsicc_checkpoint(tmp_path / "models_checkpoint", state)
    code, out = run_import(capsys, str(ckpt), "--from", "rsiccformer", "--folder", str(tmp_path / "models"))
    assert code == 0, out
    card = read_card(tmp_path / "models" / "rsiccformer-levir-cc.json")
    assert card["architecture"] == "rsiccformer" and card["pair_with"] == "bit-levir-cd"
    assert card["input"]["mean"] == [123.675, 116.28, 103.53] and card["input"]["tile_size"] == 256
    assert "captions only" in card["description"] and card["source"]["code_commit"] == _manifest(RSICC_MANIFEST)["commit"]
    words = rsicc_word_map(_manifest(RSICC_MANIFEST)["vocabulary"])
    assert card["vocabulary"]["words"][4:7] == ["word1", "word2", "word3"]
    model = build_from_card(card)  # the captioner alone (its detector is paired on loading)
    ours = model.module.state_dict()
    emb = state["decoder.vocab_embedding.weight"]
    for our_id, name in ((PAD_ID, "<pad>"), (UNK_ID, "<unk>"), (START_ID, "<start>"), (END_ID, "<end>"), (4, "word1")):
        assert torch.equal(ours["decoder.embed.weight"][our_id], emb[words[name]])
        assert torch.equal(ours["decoder.classifier.bias"][our_id], state["decoder.wdc.bias"][words[name]])
    qkv = state["encoder_feat.transformer.1.attention.in_proj_weight"]
    assert torch.equal(ours["cross.1.attn.to_k.weight"], qkv[512:1024])
    cross = state["decoder.transformer.layers.0.multihead_attn2.in_proj_bias"]
    assert torch.equal(ours["decoder.layers.0.cross_attn.to_v.bias"], cross[2048:])
    assert torch.equal(ours["extractor.layers.2.22.conv3.weight"], state["encoder_image.net.6.22.conv3.weight"])
    assert torch.equal(ours["fuse.2.body.7.running_var"], state["encoder_feat.resblock.2.left.7.running_var"])
    assert torch.equal(ours["col_embed.weight"], state["encoder_feat.w_embedding.weight"])
    captions = model.caption(torch.rand(1, 3, 64, 64) * 255, torch.rand(1, 3, 64, 64) * 255)
    assert len(captions) == 1 and all(w.startswith("word") for w in captions[0].split())


def test_rsiccformer_import_refuses_unknown_layers_a_missing_or_foreign_word_map(tmp_path, capsys):
    state = peer_state(2, RSICC_MANIFEST)
    extra = {**state, "decoder.extra_head.weight": torch.zeros(3, 3)}
    ckpt = save_rsicc_checkpoint(tmp_path / "a", extra)
    code, out = run_import(capsys, str(ckpt), "--from", "rsiccformer", "--folder", str(tmp_path / "m"))
    assert code == 2 and "decoder.extra_head.weight" in out and "Traceback" not in out
    ckpt = save_rsicc_checkpoint(tmp_path / "b", state, word_map=False)
    code, out = run_import(capsys, str(ckpt), "--from", "rsiccformer", "--folder", str(tmp_path / "m"))
    assert code == 2 and "word map" in out and "--word-map" in out
    (tmp_path / "b" / "WORDMAP_other.json").write_text(json.dumps(rsicc_word_map(40)))
    code, out = run_import(capsys, str(ckpt), "--from", "rsiccformer", "--folder", str(tmp_path / "m"))
    assert code == 2 and "40 entries" in out
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())  # nothing half-written


class _RunsCode:
    """A pickled object whose unpickling would run a command: the restricted unpickler must never call it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_rsiccformer_checkpoint_never_runs_pickled_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    ckpt = save_rsicc_checkpoint(tmp_path / "c", peer_state(3, RSICC_MANIFEST), payload=_RunsCode(marker))
    code, out = run_import(capsys, str(ckpt), "--from", "rsiccformer", "--folder", str(tmp_path / "m"))
    assert code == 0, out  # the payload is kept as inert data and dropped; the weights import
    assert not marker.exists()
    code, out = run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(tmp_path / "m"))
    assert code == 2 and "refused" in out and not marker.exists()  # other families stay weights_only=True


def test_imported_rsiccformer_pairs_with_the_imported_bit_detector(tmp_path, capsys, checkpoint):
    """Both imports in one folder: loading RSICCformer's card gives its captions with BIT's change mask."""
    from changescribe.core.models.pairing import PairedChangeModel

    ckpt, _ = checkpoint
    folder = tmp_path / "models"
    assert run_import(capsys, str(ckpt), "--from", "bit", "--folder", str(folder))[0] == 0
    rsicc = save_rsicc_checkpoint(tmp_path / "rsicc", peer_state(4, RSICC_MANIFEST))
    assert run_import(capsys, str(rsicc), "--from", "rsiccformer", "--folder", str(folder))[0] == 0
    model = load_model_file(folder / "rsiccformer-levir-cc.json")
    assert isinstance(model, PairedChangeModel) and model.can_detect and model.can_caption
    before, after = torch.rand(1, 3, 64, 64) * 255, torch.rand(1, 3, 64, 64) * 255
    pred = model.predict(before, after, with_captions=True)
    bit = load_model_file(folder / "bit-levir-cd.json")
    assert torch.allclose(pred.probability, bit.change_probability(before, after), atol=1e-5)
    assert len(pred.captions) == 1 and all(w.startswith("word") for w in pred.captions[0].split())


# ---- change-agent-mci: Change-Agent's trainer saves {encoder_dict, encoder_trans_dict, decoder_dict} -----------------
MCI_MANIFEST = MANIFEST.parent / "change_agent_mci_segformer-mit_b1.json"


def mci_word_map(size: int) -> dict[str, int]:
    """A vocab.json in Change-Agent's layout: <NULL>, <UNK>, <START>, <END> at 0..3, then the words."""
    return {"<NULL>": 0, "<UNK>": 1, "<START>": 2, "<END>": 3, **{f"word{i}": i for i in range(4, size)}}


def save_mci_checkpoint(root: Path, state: dict[str, torch.Tensor], word_map: bool = True) -> Path:
    """Change-Agent's layout: Multi_change/models_ckpt/MCI_model.pth (its three state dicts) and the repository's
    Multi_change/data/LEVIR_MCI/vocab.json."""
    m = _manifest(MCI_MANIFEST)
    container = {key: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
                 for key, name in m["parts"].items()}
    path = root / "Multi_change" / "models_ckpt" / "MCI_model.pth"
    path.parent.mkdir(parents=True)
    torch.save(container, path)
    if word_map:
        vocab = root / "Multi_change" / "data" / "LEVIR_MCI" / "vocab.json"
        vocab.parent.mkdir(parents=True)
        vocab.write_text(json.dumps(mci_word_map(m["vocabulary"])))
    return path


@pytest.fixture(scope="module")
def mci_import(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One Change-Agent checkpoint (about 0.5 GB of random float32 under its exact names), imported once."""
    root = tmp_path_factory.mktemp("mci")
    state = peer_state(5, MCI_MANIFEST)
    ckpt = save_mci_checkpoint(root, state)
    code = cli_main(["models", "import", str(ckpt), "--from", "change-agent-mci", "--folder", str(root / "models")])
    assert code == 0
    return root / "models" / "change-agent-mci-levir-mci.json", state


def test_mci_manifest_is_the_peers_released_model():
    m = _manifest(MCI_MANIFEST)
    assert m["repository"] == "https://github.com/Chen-Yang-Liu/Change-Agent" and len(m["commit"]) == 40
    keys = {k: shape for k, shape, _ in m["keys"]}
    # MiT-B1: widths 64/128/320/512, two blocks per stage, keys reduced 8/4/2/1 (stage 4 has no reduction conv)
    assert [keys[f"encoder.cnn.segformer.patch_embed{n}.proj.weight"][0] for n in range(1, 5)] == [64, 128, 320, 512]
    assert sum(k.startswith("encoder.cnn.segformer.block") and k.endswith(".norm1.weight") for k in keys) == 8
    assert keys["encoder.cnn.segformer.block1.0.attn.sr.weight"] == [64, 64, 8, 8]
    assert "encoder.cnn.segformer.block4.0.attn.sr.weight" not in keys
    assert keys["encoder.cnn.segformer.block3.1.attn.kv.weight"] == [640, 320]
    assert keys["encoder_trans.to_seg.1.weight"] == [3, 64, 1, 1]  # no change, road, building
    assert keys["encoder_trans.h_embedding_CD.weight"] == [16, 256]
    assert sum(k.endswith(".0.att.to_q.weight") for k in keys) == 6  # 3 caption + 3 change block pairs
    assert keys["decoder.transformer.layers.0.multihead_attn.in_proj_weight"] == [1536, 512]
    assert keys["decoder.wdc.weight"] == [m["vocabulary"], 512]
    assert keys["decoder.position_encoding.pe"] == [m["max_length"], 1, 512]
    assert m["container"] == ["decoder_dict", "encoder_dict", "encoder_trans_dict"]


def test_change_agent_mci_imports_with_every_tensor_where_the_peer_uses_it(mci_import):
    from changescribe.core.model_card import card_summary

    card_path, state = mci_import
    card = read_card(card_path)
    assert card["architecture"] == "change-agent-mci" and "pair_with" not in card
    assert "one encoder pass" in card["description"] and "academic" in card["licence"]
    assert card["input"]["mean"] == pytest.approx([99.636, 98.489, 84.122], abs=1e-3)
    assert card["input"]["tile_size"] == 256 and card["input"]["gsd"] == 0.5
    assert card["source"]["code_commit"] == _manifest(MCI_MANIFEST)["commit"]
    assert card["vocabulary"]["words"][:6] == ["<NULL>", "<UNK>", "<START>", "<END>", "word4", "word5"]
    assert card["vocabulary"]["max_length"] == 42 and card["config"]["max_caption_length"] == 42  # 41 words
    assert card["config"]["backbone"] == "mit_b1" and card["config"]["num_classes"] == 3
    assert "LEVIR-MCI" in card["metrics"]["test"]["data"] and "change mask + captions" in card_summary(card)
    model = load_model_file(card_path)
    ours = model.module.state_dict()
    kv = state["encoder.cnn.segformer.block2.1.attn.kv.weight"]
    assert torch.equal(ours["backbone.stages.1.1.attn.attn.to_k.weight"], kv[:128])
    assert torch.equal(ours["backbone.stages.1.1.attn.attn.to_v.weight"], kv[128:])
    assert torch.equal(ours["backbone.stages.0.0.attn.reduce_norm.bias"],
                       state["encoder.cnn.segformer.block1.0.attn.norm.bias"])
    assert torch.equal(ours["backbone.embeds.3.proj.weight"], state["encoder.cnn.segformer.patch_embed4.proj.weight"])
    assert torch.equal(ours["cd_neck.2.1.context_local.norm.running_var"],
                       state["encoder_trans.Transformer_aug_CD.2.1.K_d_conv.BN.running_var"])
    assert torch.equal(ours["cc_neck.1.0.query_local.dw1x5.weight"],
                       state["encoder_trans.Dynamic_DIF_aware_TR.1.0.Q_d_conv.d_conv_1x5.weight"])
    assert torch.equal(ours["cc_neck.0.1.kv_fuse.1.weight"],
                       state["encoder_trans.Dynamic_DIF_aware_TR.0.1.att.fuse_conv.1.weight"])
    assert torch.equal(ours["cd_neck.0.0.attn.to_out.bias"], state["encoder_trans.Transformer_aug_CD.0.0.att.to_out.0.bias"])
    # its position code: the first half from h_embedding by column, the second from w_embedding by row
    assert torch.equal(ours["cc_position.cols.weight"], state["encoder_trans.h_embedding.weight"])
    assert torch.equal(ours["cd_position.rows.weight"], state["encoder_trans.w_embedding_CD.weight"])
    assert torch.equal(ours["up.3.3.weight"], state["encoder_trans.to_fused.3.3.weight"])
    assert torch.equal(ours["classify.1.bias"], state["encoder_trans.to_seg.1.bias"])
    assert torch.equal(ours["cap_fuse.body.7.running_mean"], state["decoder.LN.left.7.running_mean"])
    cross = state["decoder.transformer.layers.0.multihead_attn.in_proj_weight"]
    assert torch.equal(ours["decoder.layers.0.cross_attn.to_q.weight"], cross[:512])
    assert torch.equal(ours["decoder.classifier.weight"], state["decoder.wdc.weight"])  # its ids are ours


def test_change_agent_mci_gives_mask_and_caption_from_one_encoder_pass(mci_import):
    card_path, _ = mci_import
    model = load_model_file(card_path)
    passes = []
    model.module.backbone.register_forward_hook(lambda *_: passes.append(1))
    g = torch.Generator().manual_seed(0)
    before, after = torch.rand(2, 3, 64, 64, generator=g) * 255, torch.rand(2, 3, 64, 64, generator=g) * 255
    pred = model.predict(before, after, with_captions=True)
    assert len(passes) == 1  # both dates, both heads: one MiT pass (Change-Agent's predict.py runs it twice)
    assert pred.probability.shape == (2, 64, 64) and len(pred.captions) == 2
    assert all(w.startswith("word") for c in pred.captions for w in c.split())
    from changescribe.core.model_api import normalise

    with torch.no_grad():  # the binary mask is the original's argmax over (no change, road, building) != no change
        classes = model.module.class_logits(model.module.encode(normalise(before, model.input_spec),
                                                                normalise(after, model.input_spec)))
    changed = classes.argmax(1) != 0
    assert 0 < float(changed.float().mean()) < 1
    assert torch.equal(changed, pred.probability > 0.5)


def test_change_agent_mci_refuses_unknown_layers_and_a_missing_word_map(tmp_path, capsys, mci_import):
    _, state = mci_import
    ckpt = save_mci_checkpoint(tmp_path / "novocab", {"decoder.wdc.bias": state["decoder.wdc.bias"]}, word_map=False)
    code, out = run_import(capsys, str(ckpt), "--from", "change-agent-mci", "--folder", str(tmp_path / "m"))
    assert code == 2 and "word map" in out and "--word-map" in out and len(out.strip().splitlines()) == 1
    extra = {**state, "encoder_trans.Transformer_aug.0.0.norm1.weight": torch.ones(512)}
    ckpt = save_mci_checkpoint(tmp_path / "extra", extra)
    code, out = run_import(capsys, str(ckpt), "--from", "change-agent-mci", "--folder", str(tmp_path / "m"))
    assert code == 2 and "encoder_trans.Transformer_aug.0.0.norm1.weight" in out and "did not fit" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())  # nothing half-written


def test_imported_change_agent_mci_runs_through_the_streaming_pipeline(tmp_path, capsys, mci_import):
    """`changescribe detect --model` on the imported card: its own mask and captions, no detector paired."""
    import numpy as np
    import rasterio

    from conftest import write_geotiff

    card_path, _ = mci_import
    rng = np.random.default_rng(4)
    before = rng.integers(0, 256, (3, 256, 256), dtype=np.uint8)
    after = before.copy()
    after[:, 40:200, 60:220] = 255 - after[:, 40:200, 60:220]
    b, a = write_geotiff(tmp_path / "before.tif", before), write_geotiff(tmp_path / "after.tif", after)
    out, prob = tmp_path / "out.gpkg", tmp_path / "prob.tif"
    code = cli_main(["detect", str(b), str(a), "-o", str(out), "--model", str(card_path), "--device", "cpu",
                     "--probability", str(prob), "--tile-size", "256", "--overlap", "0", "--no-onnxruntime"])
    text = capsys.readouterr().out
    assert code == 0 and "scene caption:" in text
    with rasterio.open(prob) as ds:
        piped = ds.read(1)
    model = load_model_file(card_path)
    direct = model.change_probability(torch.from_numpy(before[None]).float(), torch.from_numpy(after[None]).float())
    assert np.abs(piped - direct[0].numpy()).max() < 1e-4


def test_mci_block_takes_keys_from_the_context_when_query_and_context_are_equal():
    """Change-Agent's block attends to ReLU(BN(1x1(q * (c - q)))), but to c itself where q and c are identical (its
    ``not x1.equal(x2)`` test, over its batch of 1; per pair here), written out by hand."""
    from changescribe.core.models.change_agent import DifferenceBlock

    torch.manual_seed(0)
    blk = DifferenceBlock(16, 4, 0.0).eval()
    blk.context_local.load_state_dict(blk.query_local.state_dict())  # equal inputs then give q == c exactly
    x, y = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    context = torch.stack([x[0], y[1]])  # pair 0: the same map twice; pair 1: two different maps

    def block(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        qt, kvt = q.flatten(2).transpose(1, 2), kv.flatten(2).transpose(1, 2)
        t = blk.norm1(blk.attn(qt, kvt) + qt)
        return blk.norm2(blk.ffn(t) + t).transpose(1, 2).reshape(q.shape)

    with torch.no_grad():
        q, c = x + blk.query_local(x), context + blk.context_local(context)
        fused = blk.kv_fuse(q * (c - q))
        out = blk(x, context)
        assert torch.allclose(out[:1], block(q[:1], c[:1]), atol=1e-5)
        assert torch.allclose(out[1:], block(q[1:], fused[1:]), atol=1e-5)
        assert not torch.allclose(out[:1], block(q[:1], fused[:1]), atol=1e-3)  # the two branches really differ
