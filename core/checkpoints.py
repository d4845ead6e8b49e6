"""Reading pretrained checkpoints safely: the one ``torch.load`` in ChangeScribe.

A leaf module (it imports nothing of ChangeScribe but its errors), so the model builders in ``models/`` and the
training engine can use it without an import circle through the model-file format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelError


class CheckpointError(ModelError, ValueError):
    """A torch checkpoint that is refused (it needs unpickling) or cannot be read (damaged, not a torch file).

    A ``ValueError`` too, so the code that builds models from configs reports it like any other bad config."""


def load_torch_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """The only ``torch.load`` in ChangeScribe: tensors and plain containers only (``weights_only=True``).

    Pretrained parts (SAM, CLIP, Q-Former, ResNet, a Hugging Face ``pytorch_model.bin``) and training checkpoints
    all come through here, so a pickled object is refused with the same clear line wherever it is named, and a
    truncated or foreign file is one line too, never torch's traceback."""
    # only pickle's exception class is used: nothing is unpickled
    import pickle  # nosec B403

    import torch

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(2)
    except OSError:
        head = b"PK"  # let torch.load say what is wrong with it (not found, a folder, ...)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive, or (legacy) a pickle stream
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint (damaged or another format): it is "
                              "neither a zip archive nor a pickle stream")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused - this checkpoint holds pickled Python objects besides tensors, and "
                              "loading it would need weights_only=False, which can run arbitrary code. Re-save just "
                              f"its tensors (a state dict, or .safetensors) on a machine you trust ({first})") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as e:  # noqa: BLE001 (a foreign file makes the unpickler fail in any way: IndexError, EOF...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint (damaged or another format): "
                              f"{first}") from None
