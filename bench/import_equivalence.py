"""Proof that an imported checkpoint computes what the peer's own code computes.

For a family (``bit``), this builds the peer's model from the peer's own code with random weights, saves it in the
peer's checkpoint format (BIT_CD: its trainer's ``{'model_G_state_dict', 'optimizer_G_state_dict', ...}``),
imports it with ``changescribe models import``, and runs both on the same inputs: the peer's sample pairs (real
LEVIR-CD crops in BIT_CD/samples) and random pairs. It reports the largest difference of the change probability
(must be < 1e-4) and whether the argmax masks are identical. ``--manifest`` also writes the (key, shape) facts of
the peer's checkpoint that the offline tests (tests/test_published.py) rebuild checkpoints from.

    git -C /work/.mirror/justchenhao+BIT_CD/repo archive HEAD | tar -x -C /tmp/BIT_CD
    pip install --target /tmp/peerdeps einops            # the peer's one extra dependency
    PYTHONPATH=/tmp/peerdeps .venv/bin/python bench/import_equivalence.py bit /tmp/BIT_CD

For ``rsiccformer`` it builds RSICC's three modules (resnet101, MCCFormers_diff_as_Q, trans) with random weights,
saves them the way RSICC's trainer does (the modules and their Adam optimisers pickled whole, plus a
``WORDMAP_*.json`` over LEVIR-CC's words in RSICC's layout), imports that, and compares the encoder features (float32
and float64) and the greedy captions (RSICC's caption.py with --beam_size 1) on RSICC's example pair and random pairs:

    mkdir /tmp/RSICC && for f in models.py models_RSICCformerDfusion.py Example/A/train_000016.png \
        Example/B/train_000016.png; do mkdir -p /tmp/RSICC/$(dirname $f); \
        git -C /work/.mirror/Chen-Yang-Liu+RSICC/repo show HEAD:$f > /tmp/RSICC/$f; done
    .venv/bin/python bench/import_equivalence.py rsiccformer /tmp/RSICC --commit d1505e51... [--manifest]

For ``change-agent-mci`` it builds Change-Agent's three modules (``Encoder('segformer-mit_b1')``, ``AttentiveEncoder``,
``DecoderTransformer`` with its predict.py's defaults and its vocab.json) with random weights, saves their state
dicts the way its train.py does, imports that, and compares the three class probabilities, the change probability
and mask of the pipeline's ``predict`` (one encoder pass), and the greedy captions of its ``sample()`` (word ids) on
the LEVIR-CC pairs in shared/data/levircc and random pairs, then the class probabilities again in float64:

    mkdir /tmp/CA && git -C /work/.mirror/Chen-Yang-Liu+Change-Agent/repo archive HEAD \
        Multi_change/model/model_encoder_att.py Multi_change/model/model_decoder.py Multi_change/model/segformer.py \
        Multi_change/data/LEVIR_MCI/vocab.json | tar -x -C /tmp/CA
    pip install --target /tmp/peerdeps einops timm --no-deps     # its pure-Python dependencies, outside the project
    PYTHONPATH=/tmp/peerdeps .venv/bin/python bench/import_equivalence.py change-agent-mci /tmp/CA/Multi_change \
        --commit 1b0b6013... [--manifest] [--time-batch 4]

Its shims are described in :func:`_peer_change_agent` and :class:`_CudaIsCpu`.

Shims (here, never in the project): RSICC's CNN_Encoder asks torchvision for ImageNet weights, so the ResNet-101 is
built without them; newer torch passes ``tgt_is_causal`` to decoder layers, which RSICC's layer does not take, so
its layers are called one by one as nn.TransformerDecoder does. BIT_CD imports ``torchvision.models.utils.load_state_dict_from_url`` (gone
from torchvision) to download ImageNet weights; a stand-in module returns a randomly initialised ResNet's state
dict instead, so nothing is downloaded and every weight is random anyway.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "tests" / "data" / "published"


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Weights with healthy activations (the peer's N(0, 0.02) init makes a deep ResNet's output near constant,
    which would prove little): fan-in scaled normal weights, non-trivial norms and batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(0.1 * r)
            elif t.dim() == 1:  # norm weights
                t.copy_(1.0 + 0.1 * r)
            elif name.endswith("position_encoding.pe"):  # RSICC's fixed sinusoidal table stays as built
                continue
            elif "pos_embedding" in name:
                t.copy_(r)
            else:
                fan_in = t[0].numel()
                t.copy_(r / fan_in ** 0.5)


def _peer_bit(peer: Path, variant: str):
    """BIT_CD's ``define_G`` for ``variant`` (its net_G names), on the CPU."""
    import torchvision

    utils = types.ModuleType("torchvision.models.utils")

    def load_state_dict_from_url(url: str, progress: bool = True, **_: object) -> dict:  # shim: no download
        arch = url.rsplit("/", 1)[-1].split("-")[0]
        return getattr(torchvision.models, arch)(weights=None).state_dict()

    utils.load_state_dict_from_url = load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = utils
    sys.path.insert(0, str(peer))
    from models.networks import define_G  # the peer's own code

    return define_G(argparse.Namespace(net_G=variant), gpu_ids=[])


def _save_bit_checkpoint(net: torch.nn.Module, path: Path) -> None:
    """The dict BIT_CD's trainer saves (models/trainer.py _save_checkpoint), with a stepped SGD optimiser."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 - epoch / 201)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    opt.step()
    net.load_state_dict(state)  # the step only creates momentum buffers; weights stay as randomised
    torch.save({"epoch_id": 199, "best_val_acc": 0.9, "best_epoch_id": 187, "model_G_state_dict": net.state_dict(),
                "optimizer_G_state_dict": opt.state_dict(), "exp_lr_scheduler_G_state_dict": sched.state_dict()}, path)


def _pairs(peer: Path, n_samples: int | None, n_random: int, seed: int,
           folder: str = "samples") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The peer's sample pairs (``folder``/A and /B: real LEVIR-CD / LEVIR-CC crops) and random 0..255 pairs, as
    (name, HxWx3, HxWx3) uint8."""
    from PIL import Image

    pairs = []
    for a in sorted((peer / folder / "A").glob("*.png"))[:n_samples]:
        b = peer / folder / "B" / a.name
        if b.is_file():
            ia, ib = np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB"))
            if ia.shape == ib.shape:  # one sample pair (test_113_0256) is 768x384 beside 768x383: not a pair
                pairs.append((a.name, ia, ib))
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        pairs.append((f"random{i}", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
                      rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)))
    return pairs


def _manifest_text(manifest: dict) -> str:
    """JSON with one (key, shape, dtype) per line, so a diff of two peer versions reads layer by layer."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "keys"}, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(row) for row in manifest["keys"])
    return f'{head},\n "keys": [\n{rows}\n ]\n}}\n'


def _commit(peer: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(peer), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; pass --commit)"


def run_bit(args: argparse.Namespace) -> dict:
    from changescribe.core.cli import main as cli_main
    from changescribe.core.model_loading import load_model_file

    torch.manual_seed(args.seed)
    net = _peer_bit(Path(args.peer), args.variant).eval()
    _randomise(net, args.seed)
    results = {"family": "bit", "variant": args.variant, "peer_commit": args.commit or _commit(Path(args.peer))}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "best_ckpt.pt"
        _save_bit_checkpoint(net, ckpt)
        if args.manifest:
            saved = torch.load(ckpt, weights_only=True)
            MANIFESTS.mkdir(parents=True, exist_ok=True)
            manifest = {"family": "bit", "repository": "https://github.com/justchenhao/BIT_CD",
                        "commit": results["peer_commit"], "variant": args.variant,
                        "container": sorted(saved), "state_key": "model_G_state_dict",
                        "keys": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
                                 for k, v in saved["model_G_state_dict"].items()]}
            out = MANIFESTS / f"bit_{args.variant}.json"
            out.write_text(_manifest_text(manifest))
            results["manifest"] = str(out.relative_to(REPO))
        code = cli_main(["models", "import", str(ckpt), "--from", "bit", "--folder", tmp, "--name", "bit-test"])
        if code:
            raise SystemExit(f"import failed with exit code {code}")
        model = load_model_file(Path(tmp) / "bit-test.json")
        worst, masks_equal, spread = 0.0, True, []
        for name, a, b in _pairs(Path(args.peer), args.samples, args.random_pairs, args.seed):
            ta = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()
            tb = torch.from_numpy(b.copy()).permute(2, 0, 1)[None].float()
            with torch.no_grad():  # the peer's input: ToTensor then Normalize(0.5, 0.5)
                logits = net((ta / 255 - 0.5) / 0.5, (tb / 255 - 0.5) / 0.5)
            peer_prob = logits.softmax(1)[:, 1]
            ours = model.change_probability(ta, tb)
            diff = float((peer_prob - ours).abs().max())
            worst = max(worst, diff)
            decided = (peer_prob - 0.5).abs() > 1e-4  # pixels within rounding of a tie could go either way
            same = bool(torch.equal(logits.argmax(1)[decided], (ours > 0.5).long()[decided]))
            masks_equal &= same
            spread.append(float(peer_prob.std()))
            print(f"{name:28s} max |p_peer - p_ours| = {diff:.2e}   masks equal: {same}   "
                  f"p mean {float(peer_prob.mean()):.3f} std {float(peer_prob.std()):.3f}")
        if args.time_batch:
            results["pairs_per_s"] = _time_both(net, model, args.time_batch, args.seed)
    results.update(pairs=len(spread), max_abs_diff=worst, masks_equal=masks_equal, ok=worst < 1e-4 and masks_equal,
                   probability_std_min=min(spread))
    return results


def _peer_rsicc(peer: Path, vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """RSICC's three modules as its train.py builds them (resnet101, MCCFormers_diff_as_Q, trans), on the CPU.

    Shim: its CNN_Encoder asks torchvision for ImageNet weights (``pretrained=True``); here the ResNet-101 is built
    without them (nothing is downloaded; every weight is randomised anyway)."""
    import torchvision

    plain = torchvision.models.resnet101
    torchvision.models.resnet101 = lambda pretrained=False, **_: plain(weights=None)
    sys.path.insert(0, str(peer))
    from models import CNN_Encoder  # the peer's own code
    from models_RSICCformerDfusion import DecoderTransformer, MCCFormers_diff_as_Q

    enc = CNN_Encoder(NetType="resnet101", method="trans")
    feat = MCCFormers_diff_as_Q(feature_dim=1024, dropout=0.5, h=14, w=14, d_model=512, n_head=8, n_layers=3)
    dec = DecoderTransformer(feature_dim=1024, vocab_size=vocab_size, n_head=8, n_layers=1, dropout=0.5)
    return enc.eval(), feat.eval(), dec.eval()


def _rsicc_word_map(captions: Path) -> dict[str, int]:
    """A word map in RSICC's layout (<pad> 0, the words, then <unk>, <start>, <end>) over LEVIR-CC's words."""
    from changescribe.core.vocabulary import SPECIALS, Vocabulary

    words = [w for w in Vocabulary.from_levircc(captions).itos if w not in SPECIALS]
    word_map = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    for special in ("<unk>", "<start>", "<end>"):
        word_map[special] = len(word_map)
    return word_map


def _peer_greedy(dec: torch.nn.Module, memory: torch.Tensor, word_map: dict[str, int]) -> list[str]:
    """RSICC's caption.py with --beam_size 1, for one pair: the whole 52-token buffer through the peer decoder
    under its causal mask at every step, the most likely word at the newest position, until <end> or 51 words."""
    rev = {v: k for k, v in word_map.items()}
    length = 52
    mask = torch.full((length, length), float("-inf")).triu(1)
    tgt = torch.zeros(length, 1, dtype=torch.long)
    tgt[0, 0] = word_map["<start>"]
    words: list[str] = []
    for step in range(1, length):
        x = dec.position_encoding(dec.vocab_embedding(tgt))
        for layer in dec.transformer.layers:  # nn.TransformerDecoder (no final norm), whose newer versions pass
            x = layer(x, memory, tgt_mask=mask)  # tgt_is_causal, which RSICC's layer does not take
        logits = dec.wdc(x)[step - 1, 0]
        word = int(logits.argmax())
        if word == word_map["<end>"]:
            break
        words.append(rev[word])
        tgt[step, 0] = word
    return [w for w in words if w not in ("<start>", "<pad>")]


def run_rsiccformer(args: argparse.Namespace) -> dict:
    from changescribe.core.cli import main as cli_main
    from changescribe.core.checkpoints import load_torch_file
    from changescribe.core.model_api import normalise
    from changescribe.core.model_loading import load_model_file

    torch.manual_seed(args.seed)
    word_map = _rsicc_word_map(Path(args.captions))
    enc, feat, dec = _peer_rsicc(Path(args.peer), len(word_map))
    for i, net in enumerate((enc, feat, dec)):
        _randomise(net, args.seed + i)
    with torch.no_grad():  # sharper cross-attention and word scores, so that the captions depend on the pair
        for layer in dec.transformer.layers:
            layer.multihead_attn2.in_proj_weight.mul_(args.sharpen)
        dec.wdc.weight.mul_(args.sharpen)
    results = {"family": "rsiccformer", "peer_commit": args.commit or _commit(Path(args.peer)),
               "vocabulary": len(word_map)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "BEST_checkpoint_resnet101_MCCFormers_diff_as_Q_trans.pth.tar"
        opts = [torch.optim.Adam(n.parameters(), lr=1e-4) for n in (enc, feat, dec)]
        torch.save({"epoch": 30, "epochs_since_improvement": 0, "bleu-4": 0.6, "encoder_image": enc,
                    "encoder_feat": feat, "decoder": dec, "encoder_image_optimizer": opts[0],
                    "encoder_feat_optimizer": opts[1], "decoder_optimizer": opts[2]}, ckpt)  # RSICC's save_checkpoint
        words = Path(tmp) / "WORDMAP_LEVIR_CC_5_cap_per_img_5_min_word_freq.json"
        words.write_text(json.dumps(word_map))
        if args.manifest:
            saved = load_torch_file(ckpt, modules=True)
            manifest = {"family": "rsiccformer", "repository": "https://github.com/Chen-Yang-Liu/RSICC",
                        "commit": results["peer_commit"], "variant": "resnet101_MCCFormers_diff_as_Q_trans",
                        "container": sorted(saved), "parts": list(("encoder_image", "encoder_feat", "decoder")),
                        "vocabulary": len(word_map),
                        "keys": [[f"{part}.{k}", list(v.shape), str(v.dtype).removeprefix("torch.")]
                                 for part in ("encoder_image", "encoder_feat", "decoder")
                                 for k, v in saved[part].items()]}
            MANIFESTS.mkdir(parents=True, exist_ok=True)
            out = MANIFESTS / "rsiccformer_resnet101_MCCFormers_diff_as_Q_trans.json"
            out.write_text(_manifest_text(manifest))
            results["manifest"] = str(out.relative_to(REPO))
        code = cli_main(["models", "import", str(ckpt), "--from", "rsiccformer", "--folder", tmp, "--name",
                         "rsicc-test"])
        if code:
            raise SystemExit(f"import failed with exit code {code}")
        card = json.loads((Path(tmp) / "rsicc-test.json").read_text())
        card.pop("pair_with", None)  # compare the captioner alone (its detector is not imported here)
        (Path(tmp) / "rsicc-test.json").write_text(json.dumps(card))
        model = load_model_file(Path(tmp) / "rsicc-test.json")
        worst, same_all, n = 0.0, True, 0
        for name, a, b in _pairs(Path(args.peer), None, args.random_pairs, args.seed, "Example"):
            ta = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()
            tb = torch.from_numpy(b.copy()).permute(2, 0, 1)[None].float()
            with torch.no_grad():  # the peer's input: /255 then ImageNet Normalize (caption.py)
                mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
                std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
                memory = feat(enc((ta / 255 - mean) / std), enc((tb / 255 - mean) / std))  # (196, 1, 1024)
                peer_words = _peer_greedy(dec, memory, word_map)
                ours = model.module.encode(normalise(ta, model.input_spec),
                                           normalise(tb, model.input_spec)).tokens
            diff = float((memory.permute(1, 0, 2) - ours).abs().max())
            caption = model.caption(ta, tb, beam_size=1)[0]
            same = caption.split() == peer_words
            worst, same_all, n = max(worst, diff), same_all and same, n + 1
            print(f"{name:24s} max |feat_peer - feat_ours| = {diff:.2e}  captions equal: {same}  "
                  f"peer: {' '.join(peer_words)[:60]!r}")
        # the same encoder features in float64: what remains of the float32 difference is rounding, not the ops
        worst64 = 0.0
        enc.double(), feat.double(), model.module.double()
        for name, a, b in _pairs(Path(args.peer), None, args.random_pairs, args.seed, "Example"):
            ta = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].double()
            tb = torch.from_numpy(b.copy()).permute(2, 0, 1)[None].double()
            with torch.no_grad():
                mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]
                std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
                memory = feat(enc((ta / 255 - mean) / std), enc((tb / 255 - mean) / std))
                spec = model.input_spec
                m64 = torch.tensor(spec.mean, dtype=torch.float64)[:, None, None]
                s64 = torch.tensor(spec.std, dtype=torch.float64)[:, None, None]
                ours = model.module.encode((ta - m64) / s64, (tb - m64) / s64).tokens
            worst64 = max(worst64, float((memory.permute(1, 0, 2) - ours).abs().max()))
    # float32 rounding through a ResNet-101 (one batched pass here, one per image there) reaches ~1e-4 on these
    # LayerNorm-scale features; float64 shows the ops are the same
        if args.time_batch:
            enc.float(), feat.float(), model.module.float()
            results["pairs_per_s"] = _time_rsicc(enc, feat, dec, model, word_map, args.time_batch, args.seed)
    results.update(pairs=n, max_abs_diff=worst, max_abs_diff_float64=worst64, captions_equal=same_all,
                   ok=worst64 < 1e-9 and worst < 1e-3 and same_all)
    return results


class _CudaIsCpu:
    """Shim for peers that call ``.cuda()`` on tensors they make (Change-Agent's position codes and decoding buffers):
    inside the block ``Tensor.cuda`` returns the tensor itself, so the peer's code runs unchanged on this CPU."""

    def __enter__(self) -> None:
        self.saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *_, **__: t

    def __exit__(self, *_: object) -> None:
        torch.Tensor.cuda = self.saved


def _peer_change_agent(peer: Path, word_vocab: dict[str, int], max_length: int):
    """Change-Agent's three modules as its predict.py builds them (Encoder('segformer-mit_b1'), AttentiveEncoder,
    DecoderTransformer with its defaults), on the CPU.

    Shims: segformer.py imports mmseg's logger and mmcv's checkpoint loader, which only its unused init_weights
    calls: stand-in modules. Its Segformer_baseline reads ImageNet MiT weights (model/pretrained/mit_b1.pth, a
    Git LFS file not in the repository) while it is built: that read returns no weights, so the MiT keeps its random
    initialisation, as built with pretrained=False (every weight is randomised anyway)."""
    for name in ("mmseg", "mmseg.utils", "mmcv", "mmcv.runner"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["mmseg.utils"].get_root_logger = None
    sys.modules["mmcv.runner"].load_checkpoint = None
    sys.path.insert(0, str(peer))
    from model.model_decoder import DecoderTransformer  # the peer's own code
    from model.model_encoder_att import AttentiveEncoder, Encoder

    load = torch.load
    torch.load = lambda *_, **__: {"head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)}
    try:
        enc = Encoder("segformer-mit_b1")
    finally:
        torch.load = load
    trans = AttentiveEncoder(train_stage=None, n_layers=3, feature_size=[16, 16, 512], heads=8, dropout=0.1)
    dec = DecoderTransformer(encoder_dim=512, feature_dim=512, vocab_size=len(word_vocab), max_lengths=max_length,
                             word_vocab=word_vocab, n_head=8, n_layers=1, dropout=0.1)
    return enc.eval(), trans.eval(), dec.eval()


# its predict.py's statistics, kept in float64 (as its Python floats are) until the input's dtype is known
MCI_MEAN = torch.tensor([0.39073 * 255, 0.38623 * 255, 0.32989 * 255], dtype=torch.float64)[:, None, None]
MCI_STD = torch.tensor([0.15329 * 255, 0.14628 * 255, 0.13648 * 255], dtype=torch.float64)[:, None, None]


def _peer_mci(enc, trans, dec, a: torch.Tensor, b: torch.Tensor, caption: bool = True):
    """Change-Agent on one raw 0..255 pair (1, 3, H, W): its class logits (1, 3, H, W) and, with ``caption``, the
    word ids of its greedy sample() (after <START>, up to <END>): one encoder pass, as its test.py does."""
    mean, std = MCI_MEAN.to(a.dtype), MCI_STD.to(a.dtype)
    with _CudaIsCpu():
        f1, f2 = enc((a - mean) / std, (b - mean) / std)
        c1, c2, seg = trans(f1, f2)
        ids = dec.sample(c1, c2, k=1)[1:] if caption else []
    end = dec.word_vocab["<END>"]
    return seg, ids[:ids.index(end)] if end in ids else ids


def run_change_agent_mci(args: argparse.Namespace) -> dict:
    from changescribe.core.cli import main as cli_main
    from changescribe.core.model_api import normalise
    from changescribe.core.model_loading import load_model_file

    torch.manual_seed(args.seed)
    peer = Path(args.peer)
    vocab_file = peer / "data" / "LEVIR_MCI" / "vocab.json"
    word_vocab = json.loads(vocab_file.read_text())
    max_length = 41  # its --max_length default (train.py, test.py, predict.py)
    enc, trans, dec = _peer_change_agent(peer, word_vocab, max_length)
    for i, net in enumerate((enc, trans, dec)):
        _randomise(net, args.seed + i)
    with torch.no_grad():  # sharper cross-attention and word scores, so that the captions depend on the pair
        for layer in dec.transformer.layers:
            layer.multihead_attn.in_proj_weight.mul_(args.sharpen)
        dec.wdc.weight.mul_(args.sharpen)
    pairs_dir = Path(args.pairs)
    pairs = _pairs(pairs_dir.parent, None, args.random_pairs, args.seed, pairs_dir.name)
    with torch.no_grad():  # random weights call nearly every pixel a change: move the no-change logit so that half
        a, b = (torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() for x in pairs[0][1:])  # of the first pair
        seg, _ = _peer_mci(enc, trans, dec, a, b, caption=False)  # is change, and the mask check means something
        trans.to_seg[1].bias[0] += (seg[:, 1:].amax(1) - seg[:, 0]).median()
    results = {"family": "change-agent-mci", "peer_commit": args.commit or _commit(peer),
               "vocabulary": len(word_vocab)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "MCI_model.pth"
        parts = {"encoder_dict": enc, "encoder_trans_dict": trans, "decoder_dict": dec}
        torch.save({k: m.state_dict() for k, m in parts.items()}, ckpt)  # its train.py's checkpoint
        (Path(tmp) / "vocab.json").write_text(vocab_file.read_text())
        if args.manifest:
            saved = torch.load(ckpt, weights_only=True)
            names = {"encoder_dict": "encoder", "encoder_trans_dict": "encoder_trans", "decoder_dict": "decoder"}
            manifest = {"family": "change-agent-mci", "repository": "https://github.com/Chen-Yang-Liu/Change-Agent",
                        "commit": results["peer_commit"], "variant": "segformer-mit_b1", "container": sorted(saved),
                        "parts": names, "vocabulary": len(word_vocab), "max_length": max_length,
                        "keys": [[f"{names[part]}.{k}", list(v.shape), str(v.dtype).removeprefix("torch.")]
                                 for part in names for k, v in saved[part].items()]}
            MANIFESTS.mkdir(parents=True, exist_ok=True)
            out = MANIFESTS / "change_agent_mci_segformer-mit_b1.json"
            out.write_text(_manifest_text(manifest))
            results["manifest"] = str(out.relative_to(REPO))
        code = cli_main(["models", "import", str(ckpt), "--from", "change-agent-mci", "--folder", tmp, "--name",
                         "mci-test"])
        if code:
            raise SystemExit(f"import failed with exit code {code}")
        model = load_model_file(Path(tmp) / "mci-test.json")
        rev = {i: w for w, i in word_vocab.items()}
        worst, worst_change, masks_equal, same_all, spread, captions = 0.0, 0.0, True, True, [], set()
        for name, a, b in pairs:
            ta = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()
            tb = torch.from_numpy(b.copy()).permute(2, 0, 1)[None].float()
            with torch.no_grad():
                seg, peer_ids = _peer_mci(enc, trans, dec, ta, tb)
                feats = model.module.encode(normalise(ta, model.input_spec), normalise(tb, model.input_spec))
                ours = model.module.class_logits(feats)
                our_ids = model.module.decoder.generate(model.module.caption_memory(feats)[0])[0].tolist()
            our_ids = our_ids[:our_ids.index(3)] if 3 in our_ids else our_ids  # <END>
            diff = float((seg.softmax(1) - ours.softmax(1)).abs().max())
            pred = model.predict(ta, tb, with_captions=True)  # the pipeline's path: one encoder pass, both heads
            peer_change = (seg[:, 1:].amax(1) - seg[:, 0]).sigmoid()
            change_diff = float((peer_change - pred.probability).abs().max())
            decided = (peer_change - 0.5).abs() > 1e-4
            same_mask = bool(torch.equal((seg.argmax(1) != 0)[decided], (pred.probability > 0.5)[decided]))
            # its predict.py's text (minus <UNK>, which ChangeScribe's vocabulary never writes out); the word map's
            # ids are the vocabulary's here (its specials are ours, at 0..3), so the id sequences compare directly
            words = [rev[i] for i in peer_ids if rev[i] not in ("<NULL>", "<UNK>", "<START>", "<END>")]
            same = peer_ids == our_ids and pred.captions[0].split() == words
            worst, worst_change = max(worst, diff), max(worst_change, change_diff)
            masks_equal, same_all = masks_equal and same_mask, same_all and same
            spread.append(float(peer_change.std()))
            captions.add(tuple(peer_ids))
            print(f"{name:20s} max |p_peer - p_ours| 3 classes {diff:.2e}, change {change_diff:.2e}  masks equal: "
                  f"{same_mask}  captions equal: {same}  change share {float((seg.argmax(1) != 0).float().mean()):.2f}"
                  f"  peer: {' '.join(words)[:50]!r}")
        identical = _identical_dates(enc, trans, dec, model, pairs[0])
        worst64 = 0.0  # the same in float64: what remains of the float32 difference is rounding, not the ops
        enc.double(), trans.double(), dec.double(), model.module.double()
        for name, a, b in pairs:
            ta = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].double()
            tb = torch.from_numpy(b.copy()).permute(2, 0, 1)[None].double()
            with torch.no_grad():
                seg, _ = _peer_mci(enc, trans, dec, ta, tb, caption=False)
                spec = model.input_spec
                m64 = torch.tensor(spec.mean, dtype=torch.float64)[:, None, None]
                s64 = torch.tensor(spec.std, dtype=torch.float64)[:, None, None]
                feats = model.module.encode((ta - m64) / s64, (tb - m64) / s64)
                ours = model.module.class_logits(feats)
            worst64 = max(worst64, float((seg.softmax(1) - ours.softmax(1)).abs().max()))
        if args.time_batch:
            enc.float(), trans.float(), dec.float(), model.module.float()
            results["pairs_per_s"] = _time_mci(enc, trans, dec, model, args.time_batch, args.seed)
    results.update(pairs=len(pairs), max_abs_diff=worst, max_abs_diff_change=worst_change,
                   max_abs_diff_float64=worst64, masks_equal=masks_equal, captions_equal=same_all,
                   probability_std_min=min(spread), distinct_captions=len(captions), identical_dates=identical,
                   ok=worst < 1e-4 and worst_change < 1e-4 and masks_equal and same_all and worst64 < 1e-9
                   and identical["max_abs_diff"] < 1e-4 and identical["captions_equal"])
    return results


def _identical_dates(enc, trans, dec, model, pair: tuple) -> dict:
    """The original's other branch: with both dates equal and each block's two local branches given the same
    weights, query and context are equal at the first block of each branch, and the original then takes keys and
    values from the context itself (its ``not x1.equal(x2)`` test). Both models get the same weights; compared on
    (before, before) of ``pair``."""
    from changescribe.core.model_api import normalise

    with torch.no_grad():
        for group in (trans.Transformer_aug_CD, trans.Dynamic_DIF_aware_TR):
            for layer in group:
                for block in list(layer)[:2]:
                    block.K_d_conv.load_state_dict(block.Q_d_conv.state_dict())
        for neck in (model.module.cd_neck, model.module.cc_neck):
            for blocks in neck:
                for block in blocks:
                    block.context_local.load_state_dict(block.query_local.state_dict())
        ta = torch.from_numpy(pair[1].copy()).permute(2, 0, 1)[None].float()
        seg, peer_ids = _peer_mci(enc, trans, dec, ta, ta)
        x = normalise(ta, model.input_spec)
        feats = model.module.encode(x, x)
        ours = model.module.class_logits(feats)
        our_ids = model.module.decoder.generate(model.module.caption_memory(feats)[0])[0].tolist()
    our_ids = our_ids[:our_ids.index(3)] if 3 in our_ids else our_ids
    out = {"max_abs_diff": float((seg.softmax(1) - ours.softmax(1)).abs().max()), "captions_equal": peer_ids == our_ids}
    print(f"{pair[0]} twice, local branches shared: max |p_peer - p_ours| 3 classes {out['max_abs_diff']:.2e}  "
          f"captions equal: {out['captions_equal']}")
    return out


def _time_mci(enc, trans, dec, model, batch: int, seed: int, reps: int = 3) -> dict:
    """Pairs/s of mask + caption: Change-Agent's predict.py (one pair at a time, the whole encoder once for the
    caption and again for the mask) and the imported model's predict (one batch, one encoder pass), alternating."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(batch, 3, 256, 256, generator=g) * 255, torch.rand(batch, 3, 256, 256, generator=g) * 255

    def peer() -> None:
        for i in range(batch):
            _peer_mci(enc, trans, dec, a[i:i + 1], b[i:i + 1])  # generate_change_caption
            _peer_mci(enc, trans, dec, a[i:i + 1], b[i:i + 1], caption=False)  # change_detection

    runs = {"peer": peer, "imported": lambda: model.predict(a, b, with_captions=True)}
    return _alternate(runs, batch, reps, digits=3)


def _alternate(runs: dict, batch: int, reps: int, digits: int) -> dict:
    """Pairs/s of each of ``runs`` (callables over the same ``batch`` pairs), alternating after one warm-up each:
    the median of ``reps`` runs, so both sides see the same load on a shared CPU."""
    import time

    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for fn in runs.values():
            fn()
        for _ in range(reps):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {k: round(batch / sorted(v)[len(v) // 2], digits) for k, v in times.items()} | {
        "batch": batch, "threads": torch.get_num_threads()}


def _time_rsicc(enc, feat, dec, model, word_map: dict[str, int], batch: int, seed: int, reps: int = 3) -> dict:
    """Pairs/s of RSICC's own captioning (caption.py: one pair at a time, greedy) and of the imported model's
    ``caption`` on the same random 256² batch, on this CPU, in this process, alternating (median of ``reps``)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(batch, 3, 256, 256, generator=g) * 255, torch.rand(batch, 3, 256, 256, generator=g) * 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def peer() -> None:
        for i in range(batch):
            x, y = (a[i:i + 1] / 255 - mean) / std, (b[i:i + 1] / 255 - mean) / std
            _peer_greedy(dec, feat(enc(x), enc(y)), word_map)

    runs = {"peer": peer, "imported": lambda: model.caption(a, b, beam_size=1)}
    return _alternate(runs, batch, reps, digits=3)


def _time_both(net: torch.nn.Module, model, batch: int, seed: int, reps: int = 3) -> dict:
    """Pairs/s of the peer's forward pass and of the imported model's change_probability on the same batch, on
    this CPU, in this process, alternating (median of ``reps`` each, after one warm-up)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(batch, 3, 256, 256, generator=g) * 255, torch.rand(batch, 3, 256, 256, generator=g) * 255
    runs = {"peer": lambda: net((a / 255 - 0.5) / 0.5, (b / 255 - 0.5) / 0.5), "imported": lambda: model.change_probability(a, b)}
    return _alternate(runs, batch, reps, digits=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=["bit", "rsiccformer", "change-agent-mci"])
    p.add_argument("peer", help="a checkout of the peer's code (BIT_CD, RSICC, Change-Agent's Multi_change folder)")
    p.add_argument("--pairs", default=str(REPO.parent / "shared" / "data" / "levircc"),
                   help="change-agent-mci: a folder with A/ and B/ image pairs (default: LEVIR-CC pairs in shared/)")
    p.add_argument("--captions", default=str(REPO.parent / "shared" / "data" / "levircc_captions.json"),
                   help="rsiccformer: LEVIR-CC captions (its words make the word map)")
    p.add_argument("--variant", default="base_transformer_pos_s4_dd8_dedim8",
                   help="the peer's model name (BIT_CD --net_G; default: its released LEVIR-CD model's)")
    p.add_argument("--random-pairs", type=int, default=4)
    p.add_argument("--sharpen", type=float, default=4.0,
                   help="rsiccformer: scale of the random decoder's cross-attention and word scores (1 = as drawn)")
    p.add_argument("--samples", type=int, default=None, help="use only the first N of the peer's sample pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None, help="the peer commit, when the checkout is not a git repository")
    p.add_argument("--time-batch", type=int, default=0, help="also time both on this many random pairs per batch")
    p.add_argument("--manifest", action="store_true", help="also write tests/data/published/<family>_<variant>.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    runs = {"bit": run_bit, "rsiccformer": run_rsiccformer, "change-agent-mci": run_change_agent_mci}
    results = runs[args.family](args)
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
