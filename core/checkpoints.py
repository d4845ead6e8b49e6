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


class PickledObject:
    """An object of a class a checkpoint names, kept as inert data: its class is never imported and none of its
    code runs. The unpickler records what rebuilding it would have been given (``args``, ``state``, ``items``)."""

    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass (defaultdict in an optimiser's state)
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # a list subclass
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)


# The only names a module checkpoint may resolve to real callables: torch's own tensor rebuilders (the ones
# weights_only=True allows too) and plain containers. Every other class or function becomes PickledObject.
_MODULE_PICKLE_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("collections", "OrderedDict"), ("torch", "Size"),
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
}


def _restricted_pickle_module() -> Any:
    """A stand-in for the ``pickle`` module whose unpickler resolves only :data:`_MODULE_PICKLE_ALLOWED`."""
    import pickle  # nosec B403: find_class below never imports a class the file names
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _MODULE_PICKLE_ALLOWED:
                return super().find_class(module, name)
            return PickledObject

    mod = types.ModuleType("changescribe_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


def module_state(obj: PickledObject, prefix: str = "") -> dict[str, Any]:
    """A pickled ``nn.Module`` (read as :class:`PickledObject`) -> its state dict (parameters and persistent
    buffers of it and its children, with their dotted names), as ``module.state_dict()`` would give."""
    import torch

    state = obj.state if isinstance(obj.state, dict) else {}
    out: dict[str, Any] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, t in (state.get(kind) or {}).items():
            if isinstance(t, torch.Tensor) and name not in skip:
                out[prefix + name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, PickledObject):
            out.update(module_state(child, f"{prefix}{name}."))
    return out


def _is_module(obj: Any) -> bool:
    return isinstance(obj, PickledObject) and isinstance(obj.state, dict) and "_modules" in obj.state


def _plain(obj: Any) -> Any:
    """Pickled modules -> their state dicts; other pickled objects -> None; containers kept."""
    if _is_module(obj):
        return module_state(obj)
    if isinstance(obj, PickledObject):
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def load_torch_file(path: str | Path, map_location: Any = "cpu", modules: bool = False) -> Any:
    """The only ``torch.load`` in ChangeScribe: tensors and plain containers only (``weights_only=True``).

    Pretrained parts (SAM, CLIP, Q-Former, ResNet, a Hugging Face ``pytorch_model.bin``) and training checkpoints
    all come through here, so a pickled object is refused with the same clear line wherever it is named, and a
    truncated or foreign file is one line too, never torch's traceback.

    ``modules=True`` reads checkpoints that pickle whole ``nn.Module`` objects (RSICC's trainer saves its modules
    themselves): a restricted unpickler resolves only torch's tensor rebuilders and plain containers, keeps every
    other object as inert data (:class:`PickledObject`, never its class's code) and returns each module as its
    state dict."""
    if modules:
        return _plain(_load(path, map_location, restricted=True))
    return _load(path, map_location, restricted=False)


def _load(path: str | Path, map_location: Any, restricted: bool) -> Any:
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
        if restricted:  # weights_only=False only with the restricted unpickler: nothing the file names is imported
            return torch.load(path, map_location=map_location, weights_only=False,  # nosec B614
                              pickle_module=_restricted_pickle_module())
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
