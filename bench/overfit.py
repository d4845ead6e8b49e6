"""Over-fitting check of the model zoo: each registered model must learn 8 synthetic pairs by heart.

A model that cannot drive its caption loss to ~0 and reproduce the masks of 8 training pairs has a wiring
bug (a detached branch, a wrong target shift, a broken head) that no amount of real training would reveal
quickly. Every registered architecture is trained at a tiny configuration (:data:`TINY`; its own classes,
only narrower and shallower) on 8 pairs from the foundation generator (:mod:`changescribe.training.synthetic`),
with the recipes' losses (:mod:`changescribe.training.losses`): change-mask cross-entropy for models with a
change head, caption cross-entropy (teacher forcing) on one fixed reference per pair for captioners.

DFM's change detector is, as in the paper, a pre-trained BIT that DFM keeps frozen: its BIT is over-fitted to the
masks first, then DFM trains around it (the table shows both step counts, ``BIT+DFM``).

Measured in eval mode on the training pairs: the caption loss, the mask IoU (torchmetrics, via
``training.metrics.MaskScores``) and how many greedy captions equal their reference. Training stops early once
the targets are met (checked every ``check_every`` steps).

    .venv/bin/python bench/overfit.py [--models sen-small dfm-small] [--steps 400] [--size 128] [--threads 2]

``tests/test_models_overfit.py`` (``-m slow``) runs the same loop for every registered model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from changescribe.core.model_api import InputSpec, normalise
from changescribe.core.models.adapter import TorchChangeModel
from changescribe.core.models.dfm import DFM
from changescribe.core.models.network import ChangeNetwork
from changescribe.core.models.registry import build_model, get_entry, known_models
from changescribe.core.vocabulary import Vocabulary
from changescribe.training.config import OptimConfig
from changescribe.training.datasets.synthetic import SyntheticChangeDataset
from changescribe.training.engine import build_optimizer, build_scheduler
from changescribe.training.losses import caption_loss, change_loss
from changescribe.training.metrics import MaskScores

log = logging.getLogger("overfit")

# Per family: fields that make the registered config tiny (applied to the paper AND the small entry, so both
# registered names of a family train their own class at a CPU-friendly size).
_PIX4CAP = dict(backbone="resnet18", backbone_stages=3, btf_channels=(32, 64, 128), btf_kernel=1, head_channels=16,
                d_model=128, heads=4, ffn_dim=256, dropout=0.1)
_SEN = dict(backbone="resnet18", d_model=128, ffn_dim=256, heads=4, ca_reduction=16)
_DFM = dict(vit_width=128, vit_layers=2, vit_heads=4, vit_grid=4, d_model=128, heads=4, ffn_dim=256, st_layers=1,
            cd_grid=8, cd_overrides={"dec_depth": 1, "output_stride": 16}, freeze_cd=True)
_SEMANTIC_CC = dict(embed_dim=96, depth=2, vit_heads=4, global_attn_indexes=(1,), window=4, img_size=128,
                    neck_channels=48, lora_r=0, bcsf_grid=8, neck_units=1, neck_mlp_ratio=2, fpn_channels=48,
                    cd_channels=32, num_query_tokens=8, qformer_hidden=64, qformer_layers=2, qformer_heads=4,
                    qformer_intermediate=128, qformer_encoder_width=None, llm_hidden=96, llm_layers=2, llm_heads=4,
                    llm_intermediate=192, llm_max_positions=160, llm_lora_r=0, freeze_pretrained=False)
TINY: dict[str, dict] = {
    "bit-cd": dict(dec_depth=2),
    "pix4cap": _PIX4CAP, "pix4cap-tiny": _PIX4CAP,
    # its own EfficientNet-Lite0 (no ImageNet weights here, so nothing frozen), the tiny caption branch
    "pix4cap-lite": dict(backbone_frozen=0, d_model=128, heads=4, ffn_dim=256, dropout=0.1),
    "sen": _SEN, "sen-small": _SEN,
    "dfm": _DFM, "dfm-small": _DFM,
    "semantic-cc-vit-l": _SEMANTIC_CC, "semantic-cc-vit-b": _SEMANTIC_CC, "semantic-cc-small": _SEMANTIC_CC,
    # RSICCformer's layout on a ResNet-18-3 (256 channels), 128-wide, an 8 x 8 grid, 2 cross layers
    "rsiccformer": dict(backbone="resnet18", grid=8, d_model=128, heads=4, layers=2, decoder_heads=4, dropout=0.1),
    # Change-Agent's layout on MiT-B0 (32..256 wide), one block pair per branch, 128-wide decoder, binary masks
    "change-agent-mci": dict(backbone="mit_b0", heads=4, layers=1, cd_layers=1, num_classes=2, d_model=128,
                             dropout=0.1),
}
# Semantic-CC's word-level LLM learns more slowly per step than the small Transformer decoders.
LEARNING_RATE = {"semantic-cc": 5e-4}
DEFAULT_LR = 1e-3


@dataclass
class OverfitResult:
    """What one over-fitting run reached (eval mode, on its training pairs)."""

    model: str
    parameters: int
    steps: int
    seconds: float
    caption_loss: float | None  # None: the model does not caption
    mask_iou: float | None  # None: the model has no change head
    exact_captions: int | None  # greedy captions equal to their reference
    pairs: int
    pretrain_steps: int = 0  # DFM: steps spent over-fitting its (then frozen) BIT first

    def passed(self, max_caption_loss: float, min_iou: float) -> bool:
        ok_cap = self.caption_loss is None or self.caption_loss < max_caption_loss
        ok_iou = self.mask_iou is None or self.mask_iou > min_iou
        return ok_cap and ok_iou


def overfit_pairs(count: int = 8, size: int = 128, first_seed: int = 0) -> SyntheticChangeDataset:
    """``count`` generator pairs that all contain change (a pair without change has no mask to learn)."""
    return SyntheticChangeDataset(count, size, first_seed, p_no_change=0.0, change_level=0.6, progress=False)


def tiny_config(name: str, **extra) -> object:
    """The registered config of ``name`` shrunk by :data:`TINY` (plus ``extra``)."""
    return dataclasses.replace(get_entry(name).config, **{**TINY[name], **extra})


def _heads(module: ChangeNetwork) -> tuple[bool, bool]:
    return module.can_detect, module.can_caption


def _split(out, detects: bool, captions: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The model's forward output as (cd_logits, caption_logits); every zoo model returns one or both."""
    if detects and captions:
        return out
    return (out, None) if detects else (None, out)


def _forward(module: nn.Module, before: torch.Tensor, after: torch.Tensor, tokens: torch.Tensor,
             detects: bool, captions: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    out = module(before, after, tokens[:, :-1]) if captions else module(before, after)
    return _split(out, detects, captions)


def _loss(cd: torch.Tensor | None, cap: torch.Tensor | None, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The recipes' objective for the heads present: L_det (mask cross-entropy) + L_cap (caption cross-entropy)."""
    total = torch.zeros((), device=mask.device)
    if cd is not None:
        total = total + change_loss(cd.float(), mask)
    if cap is not None:
        total = total + caption_loss(cap.float(), tokens[:, 1:])
    return total


@torch.no_grad()
def measure(module: nn.Module, spec: InputSpec, vocab: Vocabulary, data: SyntheticChangeDataset,
            references: list[str]) -> tuple[float | None, float | None, int | None]:
    """Eval-mode caption loss, mask IoU and exact greedy captions on the training pairs."""
    detects, captions = _heads(module)
    module.eval()
    dev = next(module.parameters()).device
    before = normalise(data.before.to(dev).float(), spec)
    after = normalise(data.after.to(dev).float(), spec)
    tokens = vocab.encode(references).to(dev)
    cd, cap = _forward(module, before, after, tokens, detects, captions)
    cap_loss = float(caption_loss(cap.float(), tokens[:, 1:])) if cap is not None else None
    iou = exact = None
    if cd is not None:
        scores = MaskScores()
        scores.update(cd.float().softmax(1)[:, 1], data.mask)
        iou = scores.compute()["IoU"]
    if captions:
        model = TorchChangeModel(module, spec, vocab)
        said = model.caption(data.before.to(dev).float(), data.after.to(dev).float(), beam_size=1)
        exact = sum(s == vocab.decode(vocab.encode(r)) for s, r in zip(said, references))
    module.train()
    return cap_loss, iou, exact


def _fit(module: nn.Module, loss_fn: Callable[[], torch.Tensor], done_fn: Callable[[], bool], steps: int,
         lr: float, check_every: int, desc: str, progress: bool) -> int:
    """Adam with warm-up and cosine decay on ``loss_fn`` until ``done_fn`` (asked every ``check_every`` steps)
    says the targets are met, or for ``steps``; returns the steps taken."""
    o = OptimConfig(optimizer="adam", lr=lr, scheduler="cosine", warmup_steps=10)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = build_optimizer(params, o)
    sched = build_scheduler(opt, o, steps)
    module.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    done = 0
    for step in bar:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        if sched is not None:
            sched.step()
        done = step + 1
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if (done % check_every == 0 or done == steps) and done_fn():
            break
    bar.close()
    return done


def overfit(name: str, data: SyntheticChangeDataset, steps: int = 400, lr: float | None = None,
            max_caption_loss: float = 0.1, min_iou: float = 0.9, check_every: int = 25, seed: int = 0,
            device: str = "cpu", progress: bool = False, **config_changes) -> OverfitResult:
    """Train ``name`` at its tiny config on all of ``data`` (one batch) for up to ``steps`` Adam steps.

    Stops as soon as the eval-mode caption loss is below ``max_caption_loss`` and the mask IoU above
    ``min_iou`` (for the heads the model has)."""
    torch.manual_seed(seed)
    references = [caps[0] for caps in data.captions]  # one fixed target each, so the loss can reach ~0
    vocab = Vocabulary.build(references, min_count=1, max_length=max(len(r.split()) for r in references) + 4)
    spec = InputSpec(tile_size=data.before.shape[-1])
    entry = get_entry(name)
    module, _ = build_model(name, tiny_config(name, **config_changes), input_spec=spec,
                            vocabulary=vocab if entry.captions else None)
    dev = torch.device(device)
    module.to(dev)
    before = normalise(data.before.to(dev).float(), spec)
    after = normalise(data.after.to(dev).float(), spec)
    mask = data.mask.to(dev)
    tokens = vocab.encode(references).to(dev)
    family = next((k for k in LEARNING_RATE if name.startswith(k)), None)
    lr = lr or LEARNING_RATE.get(family, DEFAULT_LR)
    started, pretrain = time.perf_counter(), 0
    measured: list = [None, None, None]

    def met(target: nn.Module) -> bool:
        measured[:] = measure(target, spec, vocab, data, references)
        log.info("%s: caption loss %s, IoU %s", name, measured[0], measured[1])
        return OverfitResult(name, 0, 0, 0.0, *measured, pairs=len(data)).passed(max_caption_loss, min_iou)

    if isinstance(module, DFM) and module.cfg.freeze_cd:  # the paper's pre-trained, frozen CD model
        module.cd.requires_grad_(True)
        pretrain = _fit(module.cd, lambda: change_loss(module.cd(before, after).float(), mask),
                        lambda: met(module.cd), steps, lr, check_every, f"{name} (BIT)", progress)
        module.cd.requires_grad_(False)
    detects, captions = _heads(module)

    def loss_fn() -> torch.Tensor:
        return _loss(*_forward(module, before, after, tokens, detects, captions), mask, tokens)

    done = _fit(module, loss_fn, lambda: met(module), steps, lr, check_every, name, progress)
    return OverfitResult(name, sum(p.numel() for p in module.parameters()), done, time.perf_counter() - started,
                         *measured, pairs=len(data), pretrain_steps=pretrain)


def _fmt(v: float | None, pattern: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else pattern.format(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=known_models(), help="registered names (default: all)")
    p.add_argument("--steps", type=int, default=400, help="at most this many Adam steps per model")
    p.add_argument("--size", type=int, default=128, help="pair size in pixels")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (Semantic-CC 5e-4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    unknown = [m for m in args.models if m not in TINY]
    if unknown:
        p.error(f"no tiny config for {unknown}; known: {sorted(TINY)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = overfit_pairs(args.pairs, args.size)
    print(f"{args.pairs} synthetic pairs of {args.size}² px, at most {args.steps} steps, "
          f"{torch.get_num_threads()} threads on {args.device}")
    print("| model | params (M) | steps | caption loss | greedy = reference | mask IoU | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = overfit(name, data, args.steps, args.lr, device=args.device, progress=True)
        exact = f"{r.exact_captions}/{r.pairs}" if r.exact_captions is not None else "—"
        steps = f"{r.pretrain_steps}+{r.steps}" if r.pretrain_steps else str(r.steps)
        print(f"| {name} | {r.parameters / 1e6:.2f} | {steps} | {_fmt(r.caption_loss, '{:.4f}')} | {exact} | "
              f"{_fmt(r.mask_iou, '{:.3f}')} | {r.seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
