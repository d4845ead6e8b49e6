"""Word-level caption vocabulary, tokenised the way the LEVIR-CC code does it.

Tokenisation: lower-case, drop ``.`` and ``?``, split ``,`` and ``;`` off as their own tokens, split on
spaces. Ids 0..3 are ``<NULL>`` (padding), ``<UNK>``, ``<START>``, ``<END>``; the words follow in
alphabetical order. The vocabulary travels inside the model card (``to_dict``), so a model file always
decodes with the words it was trained on. torch is imported only by :meth:`Vocabulary.encode`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

NULL, UNK, START, END = "<NULL>", "<UNK>", "<START>", "<END>"
SPECIALS = (NULL, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3


def tokenize(text: str) -> list[str]:
    """LEVIR-CC tokenisation of one sentence."""
    text = text.lower().replace(".", " ").replace("?", " ").replace(",", " , ").replace(";", " ; ")
    return text.split()


class Vocabulary:
    """Word <-> id mapping with LEVIR-CC conventions (see module docstring)."""

    def __init__(self, words: Sequence[str], max_length: int = 40, min_count: int | None = None) -> None:
        words = [w for w in words if w not in SPECIALS]
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate words in vocabulary")
        if max_length < 3:
            raise ValueError("max_length must leave room for <START>, a word and <END>")
        self.max_length = max_length
        self.min_count = min_count

    pad_id, unk_id, start_id, end_id = PAD_ID, UNK_ID, START_ID, END_ID

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, max_length={self.max_length})"

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_length: int = 40) -> "Vocabulary":
        """Keep words seen at least ``min_count`` times (5 in the LEVIR-CC code); rarer ones map to <UNK>."""
        counts = Counter(w for c in captions for w in tokenize(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count), max_length, min_count)

    @classmethod
    def from_levircc(cls, path: str | Path, min_count: int = 5, max_length: int = 40,
                     splits: Sequence[str] = ("train",)) -> "Vocabulary":
        """Build from a LEVIR-CC caption JSON (``{"images": [{"split", "sentences", ...}]}`` or a bare
        list of such records), using the TRAIN split only by default so test words never leak in."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        records = data["images"] if isinstance(data, dict) else data
        caps = [s for r in records if r.get("split") in splits for s in r["sentences"]]
        if not caps:
            raise ValueError(f"{path}: no captions in splits {list(splits)}")
        return cls.build(caps, min_count, max_length)

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": "levircc-words/1", "words": list(self.itos), "max_length": self.max_length,
                "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        words = list(d["words"])
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        return cls(words, int(d.get("max_length", 40)), d.get("min_count"))

    # ---- ids -------------------------------------------------------------------------------------
    def ids(self, text: str, max_length: int | None = None) -> list[int]:
        """<START> w1 .. wn <END> as ids, cut so the whole sequence fits ``max_length`` (<END> kept)."""
        n = (max_length or self.max_length) - 2
        words = [self.stoi.get(w, UNK_ID) for w in tokenize(text)][:n]
        return [START_ID, *words, END_ID]

    def encode(self, text: str | Sequence[str], max_length: int | None = None) -> "torch.Tensor":
        """One sentence -> LongTensor (max_length,); a list -> (N, max_length); padded with <NULL>=0."""
        import torch

        length = max_length or self.max_length
        texts = [text] if isinstance(text, str) else list(text)
        out = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.ids(t, length)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out[0] if isinstance(text, str) else out

    def decode(self, ids: Any) -> str:
        """Ids (1-D tensor or list) -> sentence: stops at <END>, drops the special tokens."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i < len(SPECIALS) or i >= len(self.itos):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def decode_batch(self, ids: Any) -> list[str]:
        """(B, T) ids -> B sentences."""
        return [self.decode(row) for row in ids]
