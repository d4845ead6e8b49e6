"""Building and loading are separate steps: a registered architecture's constructor takes only its config and reads
no file; pretrained backbone weights come afterwards through ``ChangeNetwork.load_backbone`` (which
``build_model(backbone_weights=...)`` calls), and land in the backbone only, tensor for tensor."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import subprocess
import sys
from operator import attrgetter

import pytest
import torch
from torchvision.models import resnet18

from changescribe.core.models.backbones import efficientnet_lite0_weights
from changescribe.core.models.registry import build_model, get_entry, known_models

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))

# Audit hooks cannot be removed, so the file watch runs in its own interpreter. Every architecture is built twice on
# the meta device (the first build imports what it needs); the second build must open, list or scan nothing. The
# last lines prove the watch sees a weights read: a load_backbone of the installed EfficientNet-Lite0 file.
WATCH = """
import sys, torch
from changescribe.core.models.registry import build_model, known_models
seen, on = [], [False]
sys.addaudithook(lambda event, args: on[0] and event in ("open", "os.listdir", "os.scandir") and seen.append(args))
with torch.device("meta"):
    for name in known_models():
        build_model(name)
    on[0] = True
    for name in known_models():
        build_model(name)
    on[0] = False
print("BUILD", seen)
seen.clear()
on[0] = True
build_model("pix4cap-lite")[0].load_backbone("imagenet")
on[0] = False
print("LOAD", any(str(a[0]).endswith(".pth") for a in seen if a))
"""


def test_constructors_take_only_a_config_and_read_no_file():
    for name in known_models():
        params = list(inspect.signature(get_entry(name).builder.__init__).parameters)
        assert params == ["self", "cfg"], f"{name}: {params}"
    out = subprocess.run([sys.executable, "-c", WATCH], capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.splitlines()
    assert "BUILD []" in lines, out.stdout
    assert "LOAD True" in lines, out.stdout


def test_imagenet_efficientnet_lite0_lands_in_pix4cap_lite_and_nowhere_else():
    """The default model's architecture: every backbone tensor is the installed package's, the frozen stem and
    first 8 blocks stay frozen, and everything past the backbone keeps its (seeded) initialisation."""
    torch.manual_seed(0)
    plain, _ = build_model("pix4cap-lite")
    torch.manual_seed(0)
    loaded, _ = build_model("pix4cap-lite", backbone_weights="imagenet")
    package = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    own = loaded.backbone.state_dict()
    assert all(own[k].equal(package[k]) for k in own)
    assert not own["_blocks.3._depthwise_conv.weight"].equal(plain.backbone.state_dict()[
        "_blocks.3._depthwise_conv.weight"])
    rest = {k: v for k, v in plain.state_dict().items() if not k.startswith("backbone.")}
    assert rest and all(loaded.state_dict()[k].equal(v) for k, v in rest.items())
    frozen = [*loaded.backbone._conv_stem.parameters(), *loaded.backbone._blocks[7].parameters()]
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in loaded.backbone._blocks[8].parameters())
    plain.load_backbone("imagenet")  # the same method, called after construction by hand
    assert all(plain.backbone.state_dict()[k].equal(v) for k, v in own.items())


# The ResNet-based architectures and where each keeps its backbone (rsiccformer shrunk to ResNet-18 for speed).
RESNET_BACKBONES = {"bit-cd": "backbone", "pix4cap-tiny": "backbone", "sen-small": "extractor",
                    "dfm-small": "cd.backbone", "rsiccformer": "extractor"}


@pytest.mark.parametrize("name", sorted(RESNET_BACKBONES))
def test_resnet_weights_land_in_each_architectures_backbone(tmp_path, name):
    torch.manual_seed(3)
    ref = resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    cfg = get_entry(name).config
    if name == "rsiccformer":
        cfg = dataclasses.replace(cfg, backbone="resnet18", d_model=64, layers=1)
    module, _ = build_model(name, cfg, backbone_weights=str(tmp_path / "r18.pth"))
    backbone = attrgetter(RESNET_BACKBONES[name])(module)
    for i, layer in enumerate(backbone.layers):
        ref_layer = getattr(ref, f"layer{i + 1}")
        assert layer[0].conv1.weight.equal(ref_layer[0].conv1.weight)
        assert layer[-1].bn2.running_var.equal(ref_layer[-1].bn2.running_var)


def test_a_missing_backbone_file_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"^checkpoint .*absent\.pth not found$"):
        build_model("bit-cd", backbone_weights=str(tmp_path / "absent.pth"))


@pytest.mark.skipif(not HAS_HF, reason="Semantic-CC needs transformers + peft (requirements-dev.txt)")
def test_sam_weights_load_into_semantic_cc_after_construction(tmp_path):
    from safetensors.torch import save_file

    tiny = dict(embed_dim=64, depth=2, vit_heads=4, global_attn_indexes=(1,), window=8, img_size=128,
                neck_channels=32, neck_units=1, fpn_channels=32, cd_channels=16, lora_r=0, llm_hidden=32,
                llm_layers=1, llm_heads=4, llm_intermediate=64, llm_max_positions=128, llm_lora_r=0,
                num_query_tokens=4, qformer_hidden=32, qformer_layers=1, qformer_heads=4, qformer_intermediate=64,
                vocab_size=20)
    cfg = dataclasses.replace(get_entry("semantic-cc-small").config, **tiny)
    torch.manual_seed(5)
    source, _ = build_model("semantic-cc-small", cfg)
    sam = tmp_path / "sam_tiny.safetensors"
    save_file({f"image_encoder.{k}": v.contiguous() for k, v in source.encoder.state_dict().items()}, str(sam))
    torch.manual_seed(6)
    model, _ = build_model("semantic-cc-small", cfg, backbone_weights=str(sam))
    own = model.encoder.state_dict()
    assert all(own[k].equal(v) for k, v in source.encoder.state_dict().items())
    # a config that names sam_checkpoint keeps it: load_backbone then reads nothing (the path need not exist)
    named, _ = build_model("semantic-cc-small", dataclasses.replace(cfg, sam_checkpoint=str(sam)))
    named.load_backbone(tmp_path / "absent.safetensors")
