"""Published checkpoints of other projects, turned into ChangeScribe model files (``changescribe models import``).

Papers publish their trained weights in their own code's layout. Each *family* here names such a code base, the
registered architecture that matches it layer for layer (with the options that make it op for op the same), what
its checkpoints were trained on and reported, and under which terms they are published. Importing reads the
checkpoint safely (``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code),
renames its tensors to the architecture's (:mod:`.models.converters`), checks that every layer fits, and writes a
model file (safetensors + card) that never replaces an existing one and is never left half-written.

Listing the families needs only the standard library (the dock and Processing list them without torch).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import TAG
from .errors import InputError
from .model_file import CARD_SUFFIX, WEIGHTS_SUFFIX


@dataclass(frozen=True)
class DatasetFacts:
    """What a family's checkpoint for one dataset was trained at and what its paper reports on that data's test
    split (metrics as fractions, as ChangeScribe's cards hold them)."""

    name: str
    gsd: float | None
    metrics: dict[str, float]
    split: str
    checkpoint: str  # where this checkpoint is published


@dataclass(frozen=True)
class Family:
    """A published code base whose checkpoints ChangeScribe can import."""

    name: str
    architecture: str  # the registered architecture that matches it layer for layer
    title: str
    paper: str
    repository: str
    commit: str  # the peer code the conversion was checked against (bench/import_equivalence.py)
    licence: str
    weights_terms: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tile_size: int
    datasets: dict[str, DatasetFacts] = field(default_factory=dict)
    # a captioner without a change head: the detector its card pairs it with (a model name, resolved on loading)
    pair_with: str | None = None
    # the file that names a captioner's words when its checkpoint does not (RSICC: data/WORDMAP_*.json; Change-Agent:
    # data/LEVIR_MCI/vocab.json), a glob beside the checkpoint or in its data/ sibling
    word_map_glob: str | None = None
    # its trainer pickles whole nn.Module objects (RSICC): read with the restricted unpickler, never weights_only=False
    pickled_modules: bool = False

    @property
    def default_dataset(self) -> str:
        return next(iter(self.datasets))


BIT = Family(
    name="bit",
    architecture="bit-cd",
    title="BIT (justchenhao/BIT_CD)",
    paper="Chen, Qi & Shi, 'Remote sensing image change detection with transformers', IEEE TGRS 2021",
    repository="https://github.com/justchenhao/BIT_CD",
    commit="adcd7aea6f234586ffffdd4e9959404f96271711",
    licence="BIT_CD: code released for non-commercial and research purposes only; for commercial purposes, "
            "contact the authors",
    weights_terms="research and non-commercial use only (BIT_CD's terms)",
    # its data loader: ToTensor (0..1) then Normalize(0.5, 0.5) -> (x - 127.5) / 127.5 on the 0..255 scale
    mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), tile_size=256,
    datasets={"LEVIR-CD": DatasetFacts(
        name="LEVIR-CD", gsd=0.5,
        # BIT_CD's README gives no numbers; these are the BIT paper's LEVIR-CD row as other papers' comparison
        # tables cite it (P/R/F1 89.24/89.37/89.31, e.g. LUORioet/SCDF-Net's README; IoU 80.68, which is also
        # F1/(2-F1)). Its OA (98.92 in our earlier note) was found in no source, so it is left out.
        metrics={"F1": 0.8931, "IoU": 0.8068, "precision": 0.8924, "recall": 0.8937},
        split="LEVIR-CD test split, 256 px crops (reported in the BIT paper; P/R/F1/IoU as cited by later papers' "
              "comparison tables, the BIT_CD README gives none)",
        checkpoint="checkpoints/BIT_LEVIR/best_ckpt.pt: Google Drive "
                   "https://drive.google.com/file/d/1IVdF5a3e1_7DiSndtMkhpZuCSgDLLFcg or Baidu (code 2lyz), "
                   "linked from the BIT_CD README")},
)

RSICCFORMER = Family(
    name="rsiccformer",
    architecture="rsiccformer",
    title="RSICCformer (Chen-Yang-Liu/RSICC)",
    paper="Liu, Zhao, Chen, Zou & Shi, 'Remote Sensing Image Change Captioning With Dual-Branch Transformers: A New "
          "Method and a Large Scale Dataset', IEEE TGRS 2022",
    repository="https://github.com/Chen-Yang-Liu/RSICC",
    commit="d1505e514c450c3728782ca723e82761e70bafd3",
    licence="RSICC: the repository states no licence; ask the authors before any use beyond research",
    weights_terms="no terms stated by the source (research use of LEVIR-CC; ask the authors otherwise)",
    # its caption.py: /255 then Normalize(ImageNet mean, std) -> on the 0..255 scale
    mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), tile_size=256,
    datasets={"LEVIR-CC": DatasetFacts(
        name="LEVIR-CC", gsd=0.5,
        metrics={},  # the paper's BLEU/METEOR/ROUGE-L/CIDEr are not recorded: not yet checked against a source
        split="LEVIR-CC test split, 256 px pairs",
        checkpoint="one .pth.tar (its three modules, pickled) and data/WORDMAP_LEVIR_CC_5_cap_per_img_5_min_word_freq"
                   ".json: Google Drive https://drive.google.com/drive/folders/1cEv-BXISfWjw1RTzL39uBojH7atjLdCG or "
                   "Baidu (code 2fbc), linked from the RSICC README")},
    pair_with="bit-levir-cd",  # the default name of `models import --from bit`: BIT's LEVIR-CD change mask
    word_map_glob="WORDMAP_*.json",
    pickled_modules=True,
)

CHANGE_AGENT_MCI = Family(
    name="change-agent-mci",
    architecture="change-agent-mci",
    title="Change-Agent MCI (Chen-Yang-Liu/Change-Agent)",
    paper="Liu, Chen, Zhang, Qi, Zou & Shi, 'Change-Agent: Toward Interactive Comprehensive Remote Sensing Change "
          "Interpretation and Analysis', IEEE TGRS 2024",
    repository="https://github.com/Chen-Yang-Liu/Change-Agent",
    commit="1b0b601352e325a43b697db209dfd492385b5f92",
    licence="Change-Agent: MIT licence (LICENSE.txt); its README adds that the code can be used for academic "
            "purposes only",
    weights_terms="no separate terms stated for MCI_model.pth; the repository's README limits use to academic "
                  "purposes",
    # its data loader and predict.py: (x - mean) / std on the 0..255 scale with LEVIR-MCI's statistics
    mean=(0.39073 * 255, 0.38623 * 255, 0.32989 * 255), std=(0.15329 * 255, 0.14628 * 255, 0.13648 * 255),
    tile_size=256,
    datasets={"LEVIR-MCI": DatasetFacts(
        name="LEVIR-MCI", gsd=0.5,
        metrics={},  # the paper's mIoU and BLEU/METEOR/ROUGE-L/CIDEr are not recorded: not checked against a source
        split="LEVIR-MCI test split, 256 px pairs",
        checkpoint="Multi_change/models_ckpt/MCI_model.pth (its encoder, encoder_trans and decoder state dicts) from "
                   "Hugging Face lcybuaa/Change-Agent, with the word map Multi_change/data/LEVIR_MCI/vocab.json of the "
                   "repository, linked from the Change-Agent README")},
    word_map_glob="LEVIR_MCI/vocab.json",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (BIT, RSICCFORMER, CHANGE_AGENT_MCI)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown checkpoint family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_choices() -> list[tuple[str, str]]:
    """(name, title) of every family, for the CLI's help, the dock and Processing."""
    return [(f.name, f.title) for f in FAMILIES.values()]


def published_checkpoints() -> list[tuple[str, str, str]]:
    """(family, dataset, label) of every published checkpoint that imports, in a stable order (dock, Processing)."""
    return [(f.name, d, f"{f.title}, {d}") for f in FAMILIES.values() for d in f.datasets]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_name(family: Family, dataset: str) -> str:
    return f"{family.name}-{dataset.lower()}"


def default_folder() -> str | None:
    """Where imports go unless told: the first user model folder (``$CHANGESCRIBE_MODEL_PATH``, which the plugin
    sets from Settings), so the new model is listed at once; None when there is none."""
    from .model_loading import MODEL_PATH_ENV

    return next((p for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p), None)


def model_paths(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(card, weights) of a model file called ``name`` in ``folder``."""
    folder = Path(folder)
    return folder / (name + CARD_SUFFIX), folder / (name + WEIGHTS_SUFFIX)


def check_destination(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Refuse a bad name, a folder that is a file, or a model file that already exists (never replaced)."""
    if not _NAME.match(name):
        raise InputError(f"model name {name!r} is not usable as a file name: use letters, digits, '.', '_' and '-'")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"the model folder {folder} is a file, not a folder")
    card, weights = model_paths(folder, name)
    for p in (card, weights):
        if os.path.lexists(p):
            raise InputError(f"{p} already exists; model files are never replaced: choose another --name or folder")
    return card, weights


def find_word_map(family: Family, checkpoint: Path, word_map: str | os.PathLike | None) -> dict[str, int] | None:
    """A captioner family's word map: the file given, else the one its glob finds beside the checkpoint (also
    without the glob's folders) or in its ``data/`` sibling (where RSICC's and Change-Agent's scripts put it); None
    for a family that needs none."""
    import json

    if family.word_map_glob is None:
        return None
    if word_map is None:
        name = Path(family.word_map_glob).name
        found = sorted({p for d, glob in ((checkpoint.parent, name), (checkpoint.parent, family.word_map_glob),
                                          (checkpoint.parent.parent / "data", family.word_map_glob))
                        for p in d.glob(glob)})
        if len(found) != 1:
            raise InputError(f"{family.name} checkpoints name their words in a separate word map ({family.word_map_glob}"
                             f"); {'none' if not found else 'several'} beside {checkpoint}: pass --word-map FILE")
        word_map = found[0]
    try:
        with open(word_map, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the word map {word_map}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and type(v) is int for k, v in data.items()):
        raise InputError(f"the word map {word_map} is not a JSON object of word -> integer id")
    return data


def import_checkpoint(checkpoint: str | os.PathLike, family: str, folder: str | os.PathLike, name: str | None = None,
                      dataset: str | None = None, word_map: str | os.PathLike | None = None) -> Path:
    """Convert a published ``checkpoint`` of ``family`` into the model file ``folder/NAME.{json,safetensors}``;
    returns the card path. Nothing is written unless the whole conversion succeeds and the written file loads
    back strictly; an existing model file is never replaced. A captioner's words come from its ``word_map``
    (:func:`find_word_map`)."""
    fam = get_family(family)
    dataset = dataset or fam.default_dataset
    if dataset not in fam.datasets:
        raise InputError(f"family {fam.name!r} has no published checkpoint for dataset {dataset!r}; known: "
                         f"{', '.join(fam.datasets)}")
    facts = fam.datasets[dataset]
    name = name or default_name(fam, dataset)
    source = Path(checkpoint)
    if not source.is_file():
        raise InputError(f"checkpoint {source} not found" if not source.exists() else f"checkpoint {source} is not a file")
    card_path, weights_path = check_destination(folder, name)

    from .checkpoints import load_torch_file
    from .model_api import InputSpec
    from .model_file import read_card, save_model_file, sha256_file
    from .model_loading import build_from_card
    from .models.converters import convert, family_vocabulary

    words = find_word_map(fam, source, word_map)
    raw = load_torch_file(source, modules=fam.pickled_modules)  # tensors and plain containers only
    module, config = convert(fam.name, raw, str(source), word_map=words)
    vocabulary = family_vocabulary(fam.name, words, config, str(source)) if words is not None else None
    spec = InputSpec(bands=3, mean=fam.mean, std=fam.std, tile_size=fam.tile_size, gsd=facts.gsd)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TAG}-import-{os.getpid()}-", dir=folder))
    except OSError as e:
        raise InputError(f"cannot write in the model folder {folder}: {e.strerror or e}") from None
    try:
        written = save_model_file(
            tmp / card_path.name, module, fam.architecture, config, spec, vocabulary, name=name, version="1",
            description=f"{fam.title}, imported from its published {dataset} checkpoint: "
                        + ("change mask only." if vocabulary is None else
                           f"captions only, paired with the change detector {fam.pair_with!r} (its change mask)."
                           if fam.pair_with else "change mask and captions from one encoder pass."),
            training_data=f"{dataset} (the published checkpoint's own training)",
            metrics={"test": {"data": f"{dataset} test (reported by the paper)", "split": facts.split,
                              **facts.metrics}},
            licence=fam.licence, weights_terms=fam.weights_terms, paper=fam.paper,
            source={"family": fam.name, "repository": fam.repository, "code_commit": fam.commit,
                    "published": facts.checkpoint, "checkpoint": source.name,
                    "checkpoint_sha256": sha256_file(source)},
            **({"pair_with": fam.pair_with} if fam.pair_with else {}))
        build_from_card(read_card(written))  # the written file must load back, strictly, before it is shown
        _place(tmp / weights_path.name, weights_path)
        try:
            _place(written, card_path)
        except BaseException:
            weights_path.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise InputError(f"cannot write the model file in {folder}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card_path


def _place(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` unless ``dst`` exists (a hard link fails on an existing name: no race)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise InputError(f"{dst} appeared while importing; it is not replaced") from None
    except OSError:  # a file system without hard links: the temporary folder is beside dst, so rename is atomic
        if os.path.lexists(dst):
            raise InputError(f"{dst} appeared while importing; it is not replaced") from None
        os.rename(src, dst)
    src.unlink(missing_ok=True)
