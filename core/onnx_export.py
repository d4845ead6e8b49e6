"""ONNX Runtime for a model's change encoder and mask head on the CPU, and the export.

On the CPU ONNX Runtime folds batch-norms into convolutions and fuses activations and paddings: the default model's
mask takes 3.4x less CPU time than in PyTorch (README, *Benchmark*).

Three graphs per model, each taking RAW 0..255 pixels (B, bands, H, W) with normalisation inside the graph (as in
:class:`~.models.adapter.TorchChangeModel`):

* ``cd``: ``encode`` + ``change_logits`` + softmax -> change probability (B, H, W);
* ``caption_encoder`` (captioners using the shared CaptionDecoder): ``encode`` + ``caption_memory`` -> visual
  tokens (B, N, D);
* ``joint``: both outputs from ONE encoder pass, for mask and captions of the same pairs.

Decoding (greedy / beam search with the KV cache) stays in PyTorch, on the tokens. :func:`cpu_runtime` is what the
pipeline calls: on the CPU, with onnxruntime installed, it returns an :class:`OnnxChangeModel` whose graphs are
exported once per model file and tile size into a per-user cache (:func:`cache_dir`; keyed by a hash of the
weights and the config, written atomically, never beside the user's data) or, where that cannot be written, kept
in memory. Graphs are exported lazily: a run without captions never exports the caption encoder. Needs the
optional packages ``onnx`` (export) and ``onnxruntime`` (running); neither is imported until used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .atomic import atomic_path
from .model_api import ChangeModel, Prediction, check_batch, normalise
from .models.adapter import TorchChangeModel

log = logging.getLogger(__name__)

OPSET = 17
GRAPH_FORMAT = 1  # bump when what the graphs compute changes: older cached files are then never used
CACHE_ENV = "CHANGESCRIBE_CACHE_DIR"
# A graph that is not cached yet is exported once this process has run this many tiles of the model at that tile
# size (this run's included): exporting costs about what ONNX Runtime saves on that many tiles of a small model, so
# a single small run stays on PyTorch, while a dock or a batch worker running many small pairs soon exports it.
EXPORT_MIN_TILES = 16


class _ProbabilityGraph(nn.Module):
    def __init__(self, model: TorchChangeModel) -> None:
        super().__init__()
        self.module, self.spec = model.module, model.input_spec

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        feats = self.module.encode(normalise(before, self.spec), normalise(after, self.spec))
        return self.module.change_logits(feats).softmax(1)[:, 1]


class _MemoryGraph(_ProbabilityGraph):
    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        feats = self.module.encode(normalise(before, self.spec), normalise(after, self.spec))
        return self.module.caption_memory(feats)[0]


class _JointGraph(_ProbabilityGraph):
    def forward(self, before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.module.encode(normalise(before, self.spec), normalise(after, self.spec))
        return self.module.change_logits(feats).softmax(1)[:, 1], self.module.caption_memory(feats)[0]


# kind -> (graph class, output names, dynamic axes of each output)
GRAPHS: dict[str, tuple[type[nn.Module], tuple[str, ...], tuple[dict[int, str], ...]]] = {
    "cd": (_ProbabilityGraph, ("probability",), ({0: "batch", 1: "height", 2: "width"},)),
    "caption_encoder": (_MemoryGraph, ("memory",), ({0: "batch", 1: "tokens"},)),
    "joint": (_JointGraph, ("probability", "memory"), ({0: "batch", 1: "height", 2: "width"}, {0: "batch", 1: "tokens"})),
}


def _shared_decoder(model: TorchChangeModel) -> bool:
    return hasattr(model.module, "caption_memory") and hasattr(model.module, "decoder")


def export_graph(model: TorchChangeModel, kind: str, target: str | Path | io.BytesIO, tile_size: int | None = None,
                 opset: int = OPSET) -> None:
    """Write graph ``kind`` (:data:`GRAPHS`) of ``model`` to a file or a buffer; batch, height and width are
    dynamic, traced at ``tile_size`` (default: the model's)."""
    graph_cls, outputs, out_axes = GRAPHS[kind]
    size = int(tile_size or model.input_spec.tile_size)
    dev = model.device
    sample = (torch.full((1, model.input_spec.bands, size, size), 100.0, device=dev),
              torch.full((1, model.input_spec.bands, size, size), 150.0, device=dev))
    axes = {0: "batch", 2: "height", 3: "width"}
    graph = graph_cls(model)
    was_training = graph.module.training
    graph.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that hold for any tile
            torch.onnx.export(graph, sample, target if isinstance(target, io.BytesIO) else str(target),
                              input_names=["before", "after"], output_names=list(outputs),
                              dynamic_axes={"before": axes, "after": axes, **dict(zip(outputs, out_axes))},
                              opset_version=opset, dynamo=False)
    finally:
        graph.module.train(was_training)  # the exporter restores the WRAPPER's mode recursively


def export_onnx(model: TorchChangeModel, path: str | Path, *, captions: bool | None = None,
                tile_size: int | None = None, opset: int = OPSET) -> dict[str, Path]:
    """Write ``PATH.cd.onnx`` (when the model detects change) and ``PATH.caption_encoder.onnx`` (when it
    captions with the shared decoder and ``captions`` is not False). Returns {"cd": ..., "caption_encoder": ...}."""
    base = Path(path)
    base = base.with_name(base.name.removesuffix(".onnx"))
    base.parent.mkdir(parents=True, exist_ok=True)
    kinds = ["cd"] if model.can_detect else []
    if captions is None:
        captions = model.can_caption and _shared_decoder(model)
    if captions:
        if not _shared_decoder(model):
            raise ValueError(f"{model.name!r} does not decode with the shared CaptionDecoder; only its change "
                             "path can be exported")
        kinds.append("caption_encoder")
    out: dict[str, Path] = {}
    for kind in kinds:
        out[kind] = base.with_name(f"{base.name}.{kind}.onnx")
        export_graph(model, kind, out[kind], tile_size, opset)
    return out


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$CHANGESCRIBE_CACHE_DIR``, else the platform's per-user cache folder
    (``~/.cache/changescribe`` on Linux, ``%LOCALAPPDATA%\\changescribe`` on Windows, ``~/Library/Caches/changescribe``
    on macOS), folder ``onnx``. Never the user's data, output or model folders."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "onnx"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "changescribe" / "onnx"


def model_digest(model: TorchChangeModel) -> str:
    """sha256 of everything a graph depends on: every weight and buffer, the config, the input spec, the
    exporter's versions. Two models with the same digest give the same graph, whatever their file is called."""
    h = hashlib.sha256()
    meta = {"format": GRAPH_FORMAT, "opset": OPSET, "torch": torch.__version__, "architecture": model.architecture,
            "config": repr(getattr(model.module, "cfg", None)), "input": model.input_spec.to_dict(),
            "class": type(model.module).__qualname__}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_graph(model: TorchChangeModel, kind: str, tile_size: int, folder: Path | None = None,
                 digest: str | None = None) -> Path | bytes:
    """Graph ``kind`` from the cache, exported into it first when missing (atomically: a concurrent run sees no
    half-written file); the graph's bytes when the cache folder cannot be written."""
    folder = cache_dir() if folder is None else folder
    path = graph_path(model, kind, tile_size, folder, digest)
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".tmp.onnx") as tmp:
            export_graph(model, kind, tmp, tile_size)
        return path
    except OSError as exc:
        log.info("cannot cache the ONNX graph in %s (%s); it is kept in memory", folder, exc)
        buf = io.BytesIO()
        export_graph(model, kind, buf, tile_size)
        return buf.getvalue()


def _session(source: str | Path | bytes, threads: int | None, providers: tuple[str, ...]) -> Any:
    # ONNX Runtime's telemetry leaves a session file (.ses) in the user's temporary folder at import: a run must
    # leave nothing there, and sends nothing anywhere
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), sess_options=opts,
                                providers=list(providers))


GraphSource = str | Path | bytes
Loader = Callable[[str], GraphSource]


class OnnxChangeModel(ChangeModel):
    """The exported graphs behind :class:`ChangeModel`; captions decode with the PyTorch model's decoder
    (on CPU) from the ONNX visual tokens. ``torch_model`` supplies the name, input spec and vocabulary.

    ``files`` gives graphs by kind (paths or bytes); ``loader(kind)`` gives a missing one when it is first needed
    (a mask-only run never exports the caption graphs). ``size``: the tile size the graphs were traced at; inputs
    of another size then run in PyTorch (a traced 'SAME' padding holds for the traced size)."""

    def __init__(self, torch_model: TorchChangeModel, files: dict[str, GraphSource] | None = None, *,
                 threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 loader: Loader | None = None, size: int | None = None) -> None:
        self.torch_model = torch_model.to("cpu")
        self.name, self.version = torch_model.name, torch_model.version
        self.input_spec = torch_model.input_spec
        self._threads, self._providers, self._loader, self.size = threads, providers, loader, size
        self._sessions: dict[str, Any] = {k: _session(v, threads, providers) for k, v in (files or {}).items() if v}
        if self._loader is None and "cd" not in self._sessions:
            self._sessions["cd"] = None  # a captioner exported without its change path: PyTorch makes the mask

    def _graph(self, kind: str) -> Any | None:
        """The session of graph ``kind``; None when there is none (not given and no loader, or its export failed,
        which is logged once: the PyTorch model then computes that part)."""
        if kind not in self._sessions:
            if self._loader is None:
                return None
            try:
                self._sessions[kind] = _session(self._loader(kind), self._threads, self._providers)
            except Exception as exc:  # noqa: BLE001 (an exporter or runtime failure: PyTorch still runs it)
                log.warning("ONNX graph %s of %s not available (%s); PyTorch runs it", kind, self.name, exc)
                self._sessions[kind] = None
        return self._sessions[kind]

    @property
    def cd(self) -> Any | None:
        return self._graph("cd") if self.torch_model.can_detect else None

    @property
    def memory(self) -> Any | None:
        return self._graph("caption_encoder") if self.can_caption else None

    @property
    def can_caption(self) -> bool:
        return self.torch_model.can_caption and _shared_decoder(self.torch_model)

    @property
    def can_detect(self) -> bool:
        return self.torch_model.can_detect

    @property
    def default_beam_size(self) -> int:
        return self.torch_model.default_beam_size

    def _traced(self, before: torch.Tensor) -> bool:
        return self.size is None or tuple(before.shape[-2:]) == (self.size, self.size)

    def _run(self, session: Any, before: torch.Tensor, after: torch.Tensor) -> list[torch.Tensor]:
        check_batch(before, after, self.input_spec)
        feed = {"before": before.detach().to("cpu", torch.float32).numpy(),
                "after": after.detach().to("cpu", torch.float32).numpy()}
        return [torch.from_numpy(out) for out in session.run(None, feed)]

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        session = self.cd if self._traced(before) else None
        if session is None:
            return self.torch_model.change_probability(before, after)
        return self._run(session, before, after)[0]

    def _decode(self, memory: torch.Tensor, beam_size: int, max_length: int | None) -> list[str]:
        vocab = self.torch_model.vocabulary
        dec = self.torch_model.module.decoder.eval()
        with torch.inference_mode():
            ids = dec.generate(memory, None, beam_size=beam_size, max_len=max_length or vocab.max_length)
        return vocab.decode_batch(ids)

    def caption(self, before: torch.Tensor, after: torch.Tensor, beam_size: int = 1,
                max_length: int | None = None) -> list[str]:
        session = self.memory if self._traced(before) else None
        if session is None:
            return self.torch_model.caption(before, after, beam_size, max_length)
        return self._decode(self._run(session, before, after)[0], beam_size, max_length)

    def predict(self, before: torch.Tensor, after: torch.Tensor, with_captions: bool = False,
                beam_size: int = 1) -> Prediction:
        """Mask and captions from ONE encoder pass (the joint graph)."""
        joint = self._graph("joint") if with_captions and self.can_caption and self.can_detect and \
            self._traced(before) else None
        if joint is None:
            return super().predict(before, after, with_captions, beam_size)
        prob, memory = self._run(joint, before, after)
        return Prediction(probability=prob, captions=self._decode(memory, beam_size, None))

    def describe(self) -> dict:
        d = self.torch_model.describe()
        d["runtime"] = "onnxruntime"
        return d


def onnxruntime_available() -> bool:
    """Whether onnxruntime and onnx (the exporter needs it) can be imported, without importing them."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


_LOADED: dict[tuple, OnnxChangeModel] = {}  # one model's sessions per process (dock, worker: many runs)
_TILES_SEEN: dict[tuple, int] = {}  # tiles run per (model digest, tile size, cache folder) in this process


def graph_path(model: TorchChangeModel, kind: str, tile_size: int, folder: Path | None = None,
               digest: str | None = None) -> Path:
    """Where graph ``kind`` of ``model`` at ``tile_size`` is cached (whether or not it is there yet)."""
    folder = cache_dir() if folder is None else folder
    return folder / f"{model.name}-{(digest or model_digest(model))[:32]}-{int(tile_size)}.{kind}.onnx"


def cpu_runtime(model: ChangeModel, tile_size: int, notify: Callable[[str], None] | None = None,
                folder: Path | None = None, need: tuple[str, ...] = ("cd",), tiles: int | None = None) -> ChangeModel:
    """``model`` with its encoder and mask head on ONNX Runtime when that is possible and pays (a PyTorch model on
    the CPU, onnxruntime and onnx installed), else ``model`` itself.

    The graphs in ``need`` are exported (or taken from the cache) now, so a model the exporter cannot handle stays
    on PyTorch from the start, said through ``notify``; other graphs are exported when first used. A graph not yet
    cached is exported only once this process's runs of the model at this tile size reach :data:`EXPORT_MIN_TILES`
    tiles, counting this run's ``tiles`` (None: at once): exporting costs about as much CPU time as PyTorch loses on
    that many tiles, and later runs find it cached."""
    if not isinstance(model, TorchChangeModel) or model.device.type != "cpu" or not onnxruntime_available():
        return model
    if not need or (not model.can_detect and not _shared_decoder(model)):
        return model
    threads = torch.get_num_threads()
    try:
        digest = model_digest(model)
        key = (digest, int(tile_size), threads, str(folder), id(model.module))
        seen = (digest, int(tile_size), str(folder))
        _TILES_SEEN[seen] = _TILES_SEEN.get(seen, 0) + (tiles or 0)
        if key not in _LOADED and tiles is not None and _TILES_SEEN[seen] < EXPORT_MIN_TILES and \
                not all(graph_path(model, kind, tile_size, folder, digest).is_file() for kind in need):
            return model
        if key not in _LOADED:
            def loader(kind: str) -> GraphSource:
                return cached_graph(model, kind, int(tile_size), folder, digest)

            fast = OnnxChangeModel(model, threads=threads, loader=loader, size=int(tile_size))
            applies = {"cd": model.can_detect, "caption_encoder": fast.can_caption,
                       "joint": model.can_detect and fast.can_caption}
            for kind in need:
                if applies[kind]:
                    fast._sessions[kind] = _session(loader(kind), threads, fast._providers)
            _LOADED.clear()  # one model at a time: a dock switching models does not pile sessions up
            _LOADED[key] = fast
        return _LOADED[key]
    except Exception as exc:  # noqa: BLE001 (any exporter/runtime failure: PyTorch still runs the model)
        if notify is not None:
            notify(f"ONNX Runtime not used for {model.name} ({type(exc).__name__}: {str(exc)[:200]}); "
                   "running on PyTorch")
        return model


def compare_with_torch(model: TorchChangeModel, onnx_model: OnnxChangeModel, before: torch.Tensor,
                       after: torch.Tensor) -> dict[str, float]:
    """Largest absolute differences ONNX vs PyTorch: probability and (when exported) visual tokens."""
    out: dict[str, float] = {}
    if onnx_model.cd is not None:
        ref = model.change_probability(before, after).cpu()
        out["probability"] = float((onnx_model.change_probability(before, after) - ref).abs().max())
    if onnx_model.memory is not None:
        model.module.eval()
        with torch.inference_mode():
            b, a = model._prepare(before, after)
            ref = model.module.caption_memory(model.module.encode(b, a))[0].cpu()
        out["memory"] = float((onnx_model._run(onnx_model.memory, before, after)[0] - ref).abs().max())
    return out
