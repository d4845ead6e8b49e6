"""The semantic-cc recipe (seed paper 001): the three stages per epoch (which parameters train in each, which
loss each uses), local SAM / LLM weights (and a clear error when a path is missing), one short run through
the CLI whose model file the pipeline runs, an exact resume across stages, and the paper's datasets per stage
(``data_cd``: the cd stage on its own set, validated there).

Tiny configurations of the real classes on 64 px pairs; one torch thread (many tiny ops on 2 shared cores)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.model_file import read_card
from changescribe.core.model_loading import load_model
from changescribe.core.models.registry import build_model, get_entry
from changescribe.core.pipeline import detect_changes
from changescribe.training.synthetic import write_pair
from changescribe.core.vocabulary import Vocabulary
from changescribe.training.config import load_config
from changescribe.training.engine import Runtime, fit
from changescribe.training.losses import caption_loss, change_loss

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))
pytestmark = pytest.mark.skipif(not HAS_HF, reason="Semantic-CC needs transformers + peft (requirements-dev.txt)")

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "semantic_cc_synthetic.json"
# The zoo test's tiny Semantic-CC: 64-wide 2-block ViT (global attention in block 1), one neck unit, 2-layer
# Q-Former and LLM of width 32. Trained from scratch unless a test adds LoRA + frozen local weights.
TINY = dict(embed_dim=64, depth=2, vit_heads=4, global_attn_indexes=[1], window=8, neck_channels=32, neck_units=1,
            fpn_channels=32, cd_channels=16, num_query_tokens=4, qformer_hidden=32, qformer_layers=2,
            qformer_heads=4, qformer_intermediate=64, llm_hidden=32, llm_layers=2, llm_heads=4,
            llm_intermediate=64, llm_max_positions=128)
RUN = {"data.train_pairs": 4, "data.val_pairs": 1, "data.size": 64, "tile_size": 64, "optim.batch_size": 2,
       "optim.epochs": 1, "optim.warmup_steps": 0, "log.tensorboard": False, "log.plot": False,
       "vocabulary.min_count": 1, "vocabulary.max_length": 16, "config_overrides": TINY}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**over):
    return load_config(CONFIG, {**RUN, **over})


def _rows(run: Path) -> list[dict]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory) -> dict:
    """A tiny SAM image-encoder checkpoint, a tiny BLIP-2 Q-Former checkpoint (safetensors) and a tiny Hugging
    Face LLM folder, as a user would have them for the paper configuration, plus a LEVIR-MCI tree to train on."""
    from safetensors.torch import save_file
    from test_models_zoo import _tiny_hf_llm
    from test_training_data import CAPTIONS, NO_CHANGE, write_levircc

    root = tmp_path_factory.mktemp("scc_weights")
    torch.manual_seed(5)
    sam, _ = build_model("semantic-cc-small", dataclasses.replace(get_entry("semantic-cc-small").config, **TINY,
                                                                  vocab_size=8))
    save_file({f"image_encoder.{k}": v.contiguous() for k, v in sam.encoder.state_dict().items()},
              str(root / "sam_tiny.safetensors"))
    save_file({**{k: v.contiguous() for k, v in sam.qformer.state_dict().items()},
               "query_tokens": sam.query_tokens.detach().contiguous()}, str(root / "qformer_tiny.safetensors"))
    _tiny_hf_llm(root / "llm", Vocabulary.build(CAPTIONS + NO_CHANGE, min_count=1, max_length=16))
    data = write_levircc(root / "LEVIR-MCI", {"train": 2, "val": 1}, size=64, labels=True)
    return {"sam_checkpoint": str(root / "sam_tiny.safetensors"), "llm_path": str(root / "llm"),
            "qformer_checkpoint": str(root / "qformer_tiny.safetensors"), "data": str(data)}


def test_every_parameter_belongs_to_one_component_of_the_paper():
    from changescribe.training.recipes.semantic_cc import STAGE_PARTS, part_of

    model, _ = build_model("semantic-cc-small", dataclasses.replace(get_entry("semantic-cc-small").config, **TINY,
                                                                    lora_r=4, llm_lora_r=4, vocab_size=8))
    parts = {part_of(n) for n, _ in model.named_parameters()}
    assert parts == {"image_encoder", "neck", "cd_decoder", "caption_decoder"}
    assert STAGE_PARTS["joint"] == ("neck.",)  # stage iii: the neck alone


def test_three_stages_train_the_intended_parameters(tmp_path, local_weights):
    """One epoch, one batch per stage, on LEVIR-MCI with frozen local SAM, Q-Former and LLM weights and LoRA
    (the paper's setting): each stage moves exactly its parameters; the run exports a small model file that
    loads."""
    from changescribe.training.recipes.semantic_cc import build_task, part_of

    overrides = {**TINY, "lora_r": 4, "llm_lora_r": 4, "freeze_pretrained": True,
                 "sam_checkpoint": local_weights["sam_checkpoint"], "llm_path": local_weights["llm_path"],
                 "qformer_checkpoint": local_weights["qformer_checkpoint"]}
    cfg = _cfg(**{"data.source": "levirmci", "data.root": local_weights["data"], "config_overrides": overrides,
                  "model_name": "scc-stages"})
    task = build_task(cfg, tmp_path / "run", Runtime(torch.device("cpu")))
    assert [s.name for s in task.stages] == ["cd", "cc", "joint"]
    trainable = {n for n, p in task.module.named_parameters() if p.requires_grad}
    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def state() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in task.module.model.named_parameters()}

    def snapshot_first(stage):
        def loss(model, batch, device):
            snapshots.setdefault(stage.name, state())  # the weights as the stage begins
            return stage.loss(model, batch, device)
        return loss

    task.stages = tuple(dataclasses.replace(s, loss=snapshot_first(s)) for s in task.stages)
    card = fit(cfg, task, tmp_path / "run")
    snapshots["end"] = state()
    assert {n for n, p in task.module.named_parameters() if p.requires_grad} == trainable  # restored

    def moved(a: str, b: str) -> set[str]:
        """Components whose parameters changed between two snapshots."""
        return {part_of(n) for n, t in snapshots[a].items() if not torch.equal(t, snapshots[b][n])}

    assert moved("cd", "cc") == {"image_encoder", "neck", "cd_decoder"}  # i) CD
    assert moved("cc", "joint") == {"neck", "caption_decoder"}  # ii) CC, image encoder frozen
    assert moved("joint", "end") == {"neck"}  # iii) joint: the neck alone
    lora = [n for n in snapshots["cd"] if n.startswith("encoder.") and ".lora_" in n]
    assert lora and all(not torch.equal(snapshots["cd"][n], snapshots["cc"][n]) for n in lora if "lora_b" in n)
    sam_base = [n for n in snapshots["cd"] if n.startswith("encoder.blocks.") and ".lora_" not in n]
    assert sam_base and all(torch.equal(snapshots["cd"][n], snapshots["end"][n]) for n in sam_base)
    frozen = [n for n in snapshots["cd"] if n.startswith(("qformer.", "query_tokens", "ln_vision."))
              or (n.startswith("llm.") and "lora_" not in n)]  # MiniGPT-4's Q-Former and the LLM stay frozen
    assert frozen and all(torch.equal(snapshots["cd"][n], snapshots["end"][n]) for n in frozen)
    assert any(not torch.equal(snapshots["cc"][n], snapshots["joint"][n]) for n in snapshots["cc"]
               if n.startswith("llm.") and "lora_B" in n)  # the LLM's LoRA trains in the cc stage

    rows = _rows(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["step"] == "3"  # one optimiser step per stage
    assert all(float(rows[0][c]) > 0 for c in ("loss_cd", "loss_cc", "loss_joint", "loss_joint_cd"))
    c = read_card(card)
    assert c["architecture"] == "semantic-cc-small" and c["vocabulary"] is None  # the LLM folder's tokenizer
    assert c["config"]["llm_path"] == local_weights["llm_path"] and c["training"]["stages"] == ["cd", "cc", "joint"]
    assert c["data"]["source"] == "levirmci" and "IoU" in c["metrics"] and "BLEU-4" in c["metrics"]
    # checkpoints hold only what trains; resume loads them strictly (the frozen tensors come from the files)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert not any(k.startswith("model.llm.") and "lora_" not in k for k in last)
    assert not any(k.startswith("model.encoder.blocks.") and ".lora_" not in k for k in last)
    assert not any(k.startswith(("model.qformer.", "model.query_tokens")) for k in last)
    task.module.load_state_dict(last)
    model = load_model(str(card), "cpu")
    pred = model.predict(torch.rand(1, 3, 64, 64) * 255, torch.rand(1, 3, 64, 64) * 255, with_captions=True)
    assert pred.probability.shape == (1, 64, 64) and isinstance(pred.captions[0], str)


def test_stage_losses_and_eq9_lambda():
    """cd: L_cd; cc: L_cc; joint: L = L_cc + lambda L_cd with the paper's lambda = 0.5 (and a configured one)."""
    from changescribe.training.datasets import build_dataset, collate
    from changescribe.training.recipes.semantic_cc import build_task, caption_tokens

    for lam in (0.5, 2.0):
        over = {**TINY, "instructions": ["Describe the change."]}
        if lam != 0.5:
            over["cd_loss_weight"] = lam
        cfg = _cfg(config_overrides=over)
        task = build_task(cfg, "unused", Runtime(torch.device("cpu")))
        assert task.module.model.cfg.cd_loss_weight == lam
        data = build_dataset(cfg.data, "train", train=True, progress=False)
        batch = collate([data[0], data[1]])
        m = task.module.eval()  # no dropout: the same forward twice gives the same numbers
        cd_stage, cc_stage, joint = task.stages
        random.seed(0)
        total, parts = joint.loss(m, batch, torch.device("cpu"))
        random.seed(0)
        chosen = [random.choice(caps) for caps in batch["captions"]]
        x, y = caption_tokens(m.model.tokenizer, chosen, cfg.vocabulary.max_length)
        spec = InputSpec(tile_size=64)
        before, after = (normalise(batch[k].float(), spec) for k in ("before", "after"))
        cd, cap = m(before, after, x, 0)
        l_cd, l_cc = change_loss(cd, batch["mask"]), caption_loss(cap, y, pad_id=-100)
        torch.testing.assert_close(total, l_cc + lam * l_cd)
        assert parts["loss_joint_cd"] == pytest.approx(l_cd.item())
        assert parts["loss_joint_cc"] == pytest.approx(l_cc.item())
        assert cd_stage.loss(m, batch, torch.device("cpu"))[0].item() == pytest.approx(l_cd.item())
        random.seed(0)
        assert cc_stage.loss(m, batch, torch.device("cpu"))[0].item() == pytest.approx(l_cc.item())
    assert y[0, -1].item() in (-100, m.model.tokenizer.eos_id) and x[0, 0].item() == m.model.tokenizer.bos_id


def test_missing_local_weights_fail_clearly(tmp_path):
    from changescribe.training.recipes.semantic_cc import train

    paper = {**TINY, "lora_r": 4, "llm_lora_r": 4, "freeze_pretrained": True}
    with pytest.raises(FileNotFoundError, match="sam_checkpoint: no file at .*nowhere/sam.pth"):
        train(_cfg(config_overrides={**paper, "sam_checkpoint": str(tmp_path / "nowhere" / "sam.pth")}), tmp_path / "a")
    (tmp_path / "sam.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="llm_path: .*not a Hugging Face model folder"):
        train(_cfg(config_overrides={**paper, "sam_checkpoint": str(tmp_path / "sam.pth"),
                                     "llm_path": str(tmp_path / "vicuna")}), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="qformer_checkpoint: nothing at"):
        train(_cfg(config_overrides={**paper, "sam_checkpoint": str(tmp_path / "sam.pth"),
                                     "qformer_checkpoint": str(tmp_path / "blip2.pth")}), tmp_path / "e")
    with pytest.raises(ValueError, match="no config_overrides.sam_checkpoint"):  # frozen random SAM: refused
        train(_cfg(config_overrides=paper), tmp_path / "c")
    with pytest.raises(ValueError, match="crop"):
        train(_cfg(**{"data.augment.crop": True}), tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before anything was written


def test_cli_short_run_exports_a_model_the_pipeline_runs(tmp_path):
    from changescribe.training.__main__ import main

    out = tmp_path / "run"
    args = ["semantic-cc", "--config", str(CONFIG), "--out", str(out), "--device", "cpu"]
    for k, v in {**RUN, "model_name": "scc-tiny"}.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    assert main(args) == 0
    c = read_card(out / "scc-tiny.json")
    assert c["architecture"] == "semantic-cc-small" and c["vocabulary"] and c["recipe"]["recipe"] == "semantic-cc"
    assert c["training"]["stages"] == ["cd", "cc", "joint"] and c["recipe"]["optim"]["optimizer"] == "adamw"
    assert c["training"]["steps"] == 6  # 2 batches x 3 stages
    pair = write_pair(tmp_path / "pair", "p", size=96, seed=3)
    result = detect_changes(pair.before, pair.after, str(out / "scc-tiny.json"), tmp_path / "r.gpkg", device="cpu")
    assert result.output.exists() and result.metadata["model"]["captions"] is True
    assert isinstance(result.scene_caption, str) and result.scene_caption


def test_staged_resume_equals_the_uninterrupted_run(tmp_path):
    from changescribe.training.recipes.semantic_cc import train

    over = {"optim.epochs": 2, "optim.warmup_steps": 2}
    train(_cfg(**over), tmp_path / "straight")
    train(_cfg(**over, **{"optim.max_steps": 6}), tmp_path / "resumed")  # interrupted after epoch 1
    train(_cfg(**over), tmp_path / "resumed", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _rows(tmp_path / "straight")[1]["loss_joint"] == _rows(tmp_path / "resumed")[1]["loss_joint"]


@pytest.mark.slow
def test_stages_under_ddp_two_cpu_processes(tmp_path):
    """Stages freeze different parameters under one DDP wrapper (find_unused_parameters): no hang, no error
    (~30 s: two processes import transformers)."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "changescribe.training", "semantic-cc", "--config", str(CONFIG), "--out", str(out),
            "--device", "cpu", "--ddp", "--nproc", "2"]
    for k, v in {**RUN, "data.train_pairs": 8, "model_name": "scc-ddp"}.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "[rank 0/2] finished: 6 optimizer steps" in text and "[rank 1/2] finished: 6 optimizer steps" in text
    assert read_card(out / "scc-ddp.json")["training"]["processes"] == 2


# ---- the paper's datasets per stage (Sec. III-F): D_cd for the cd stage, D_cc and D_cd-cc for the others -------
CD_SET = {"source": "synthetic", "train_pairs": 6, "val_pairs": 2, "size": 64, "first_seed": 500_000}


def write_levircd(root: Path) -> Path:
    """A LEVIR-CD tree (ROOT/<split>/{A,B,label}, label {0,255}) from synthetic scenes: one 128 x 192 train image
    (six 64 px crops) and one 64 x 128 val image (two crops)."""
    import numpy as np
    from PIL import Image

    from changescribe.training.synthetic import make_pair

    for split, (h, w), seed in (("train", (128, 192), 11), ("val", (64, 128), 12)):
        p = make_pair(192, seed=seed, p_no_change=0.0)
        images = {"A": p.before[:3, :h, :w].transpose(1, 2, 0), "B": p.after[:3, :h, :w].transpose(1, 2, 0),
                  "label": p.change_mask[:h, :w].astype(np.uint8) * 255}
        for folder, arr in images.items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(arr)).save(root / split / folder / f"{split}_1.png")
    return root


def test_cd_stage_reads_its_own_dataset(tmp_path):
    """data_cd = a LEVIR-CD tree (6 crops, no captions), data = 4 synthetic captioned pairs, batch 2: the cd stage
    passes over the 6 crops only (3 steps), cc and joint over the 4 pairs only (2 + 2); validation takes masks
    from LEVIR-CD val and captions from the synthetic val pairs; the model file runs in the pipeline."""
    from changescribe.training.datasets import build_dataset
    from changescribe.training.evaluate import evaluate
    from changescribe.training.recipes.semantic_cc import MASK_METRICS, build_task

    cd_root = write_levircd(tmp_path / "LEVIR-CD")
    cfg = _cfg(**{"data_cd": {"source": "levircd", "root": str(cd_root), "crop_size": 64}, "model_name": "scc-2sets"})
    task = build_task(cfg, tmp_path / "run", Runtime(torch.device("cpu")))
    seen: dict[str, list[str]] = {}

    def recording(stage):
        def loss(model, batch, device):
            seen.setdefault(stage.name, []).extend(batch["name"])
            return stage.loss(model, batch, device)
        return loss

    task.stages = tuple(dataclasses.replace(s, loss=recording(s)) for s in task.stages)
    card = fit(cfg, task, tmp_path / "run")
    crops = {f"train_1_{r:04d}_{c:04d}" for r in (0, 64) for c in (0, 64, 128)}
    pairs = {f"synthetic_{i}" for i in range(4)}
    assert sorted(seen["cd"]) == sorted(crops)  # every crop once, nothing else
    assert sorted(seen["cc"]) == sorted(pairs) and sorted(seen["joint"]) == sorted(pairs)
    rows = _rows(tmp_path / "run")
    assert rows[0]["step"] == "7" and float(rows[0]["loss_cd"]) > 0 and float(rows[0]["loss_joint_cd"]) > 0

    model = load_model(str(card), "cpu")  # the best (= only) epoch's weights, as validation saw them
    metrics = task.validate(task.module, torch.device("cpu"))
    on_cd = evaluate(model, build_dataset(cfg.data_cd, "val"), 2)
    on_cc = evaluate(model, build_dataset(cfg.data, "val"), 2)
    assert "BLEU-4" in on_cc and "BLEU-4" not in on_cd  # LEVIR-CD has no captions (none generated)
    assert {k: metrics[k] for k in MASK_METRICS} == {k: on_cd[k] for k in MASK_METRICS}
    assert {k: metrics[k] for k in MASK_METRICS} != {k: on_cc[k] for k in MASK_METRICS}
    assert metrics["BLEU-4"] == on_cc["BLEU-4"]

    c = read_card(card)
    assert c["training"]["train_pairs_per_stage"] == {"cd": 6, "cc": 4, "joint": 4}
    assert c["data_cd"]["source"] == "levircd" and c["recipe"]["data_cd"]["root"] == str(cd_root)
    assert "levircd val split (2 pairs)" in c["metrics"]["split"] and "LEVIR-CD" in c["training_data"]
    assert c["metrics"]["IoU"] == round(metrics["IoU"], 4)
    pair = write_pair(tmp_path / "pair", "p", size=96, seed=3)
    result = detect_changes(pair.before, pair.after, str(card), tmp_path / "r.gpkg", device="cpu")
    assert result.output.exists() and isinstance(result.scene_caption, str) and result.scene_caption


def test_staged_resume_with_a_separate_cd_dataset(tmp_path):
    """Per-stage datasets of different lengths (cd: 3 batches, cc and joint: 2 each) resume bit-exactly."""
    from changescribe.training.recipes.semantic_cc import train

    over = {"optim.epochs": 2, "optim.warmup_steps": 2, "data_cd": CD_SET}
    train(_cfg(**over), tmp_path / "straight")
    train(_cfg(**over, **{"optim.max_steps": 7}), tmp_path / "resumed")  # interrupted after epoch 1
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 0
    train(_cfg(**over), tmp_path / "resumed", resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 14 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == ["7", "14"]
    assert all(straight[1][c] == resumed[1][c] for c in ("loss_cd", "loss_cc", "loss_joint", "val_IoU", "val_BLEU-4"))


def test_separate_cd_dataset_refusals(tmp_path):
    from changescribe.training.__main__ import main
    from changescribe.training.recipes.semantic_cc import train
    from test_training_data import write_levircc

    cc = write_levircc(tmp_path / "LEVIR-CC", {"train": 2, "val": 1}, size=64)
    with pytest.raises(ValueError, match="D_cd-cc"):  # joint stage: the caption set needs masks too
        train(_cfg(**{"data.source": "levircc", "data.root": str(cc), "data_cd": CD_SET}), tmp_path / "a")
    with pytest.raises(ValueError, match="no change masks to train the cd stage"):
        train(_cfg(**{"data_cd": {"source": "levircc", "root": str(cc)}}), tmp_path / "b")
    with pytest.raises(ValueError, match="data_cd pairs are 32x32 px but data pairs are 64x64"):
        train(_cfg(**{"data_cd": {**CD_SET, "size": 32}}), tmp_path / "d")
    with pytest.raises(SystemExit):  # other recipes do not read data_cd: refused rather than ignored
        main(["pix4cap", "--config", str(REPO / "training" / "configs" / "pix4cap_synthetic.json"), "--out",
              str(tmp_path / "c"), "--set", f"data_cd={json.dumps(CD_SET)}"])
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_paper_config_puts_levircd_on_the_cd_stage():
    cfg = load_config(REPO / "training" / "configs" / "semantic_cc_levircc_levircd.json")
    assert cfg.data_cd.source == "levircd" and cfg.data_cd.crop_size == 256
    assert cfg.data.source == "levircc" and cfg.data.pseudo_labels  # D_cc, and with masks D_cd-cc
    assert cfg.config_overrides["cd_loss_weight"] == 0.5 and cfg.optim.epochs == 300 and cfg.optim.batch_size == 1
    assert load_config(CONFIG).data_cd is None  # one set for all stages unless data_cd is given
