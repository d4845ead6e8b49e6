"""Every registered model learns 8 synthetic pairs by heart (bench/overfit.py's loop, tiny configs, 128² px).

The over-fitting runs take minutes per model on a CPU, so they are marked ``slow`` (``pytest -m slow``); only the
check that every registered architecture has a tiny config runs by default.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from changescribe.bench.overfit import TINY, overfit, overfit_pairs
from changescribe.core.models.registry import known_models

HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))

# (change mask, caption) each family must produce: BIT masks only, SEN captions only, the others both.
HEADS = {"bit-cd": (True, False), "pix4cap": (True, True), "sen": (False, True), "dfm": (True, True),
         "semantic-cc": (True, True), "rsiccformer": (False, True), "change-agent-mci": (True, True)}
MAX_CAPTION_LOSS, MIN_IOU = 0.1, 0.9


def heads(name: str) -> tuple[bool, bool]:
    return next(v for k, v in HEADS.items() if name == k or name.startswith(k + "-"))


def test_every_registered_model_has_a_tiny_config_and_known_heads():
    assert set(TINY) == set(known_models())
    assert all(heads(name) for name in known_models())


@pytest.fixture(scope="module")
def pairs():
    return overfit_pairs(8, 128)


@pytest.fixture(scope="module")
def one_thread():
    """On a shared 2-core CPU one torch thread avoids OpenMP barrier waits: the LLM and decoder steps are many small
    ops, which ran up to 20x slower with 2 threads under load (Semantic-CC: 35 s idle vs 632 s loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("name", known_models())
def test_model_overfits_eight_pairs(pairs, one_thread, name):
    if name.startswith("semantic-cc") and not HAS_HF:
        pytest.skip("Semantic-CC needs transformers + peft")
    r = overfit(name, pairs, steps=400, max_caption_loss=MAX_CAPTION_LOSS, min_iou=MIN_IOU)
    steps = f"{r.pretrain_steps} (BIT) + {r.steps}" if r.pretrain_steps else str(r.steps)
    print(f"\n{name}: {steps} steps, {r.seconds:.0f} s, caption loss {r.caption_loss}, IoU {r.mask_iou}, "
          f"greedy = reference {r.exact_captions}/{r.pairs}")
    mask, caption = heads(name)
    assert (r.mask_iou is not None) == mask and (r.caption_loss is not None) == caption
    if caption:
        assert r.caption_loss < MAX_CAPTION_LOSS
    if mask:
        assert r.mask_iou > MIN_IOU
