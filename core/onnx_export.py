"""Optional ONNX export of a model's change path and caption encoder, for a CPU-fast path (onnxruntime).

Two graphs per model, both taking RAW 0..255 pixels (B, bands, H, W) with batch, height and width dynamic
(normalisation is inside the graph, as in :class:`~.models.adapter.TorchChangeModel`):

* ``NAME.cd.onnx``: ``encode`` + ``change_logits`` + softmax -> change probability (B, H, W);
* ``NAME.caption_encoder.onnx`` (captioners using the shared CaptionDecoder): ``encode`` +
  ``caption_memory`` -> visual tokens (B, N, D). Decoding (greedy / beam search with the KV cache) stays
  in PyTorch, on those tokens.

:class:`OnnxChangeModel` runs them behind the pipeline's :class:`ChangeModel` interface, and
:func:`compare_with_torch` measures the largest difference to the PyTorch model. Needs the optional
packages ``onnx`` (export) and ``onnxruntime`` (running); neither is imported until used.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model_api import ChangeModel, check_batch, normalise
from .models.adapter import TorchChangeModel

OPSET = 17


class _ProbabilityGraph(nn.Module):
    def __init__(self, model: TorchChangeModel) -> None:
        super().__init__()
        self.module, self.spec = model.module, model.input_spec

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        feats = self.module.encode(normalise(before, self.spec), normalise(after, self.spec))
        return self.module.change_logits(feats).softmax(1)[:, 1]


class _MemoryGraph(nn.Module):
    def __init__(self, model: TorchChangeModel) -> None:
        super().__init__()
        self.module, self.spec = model.module, model.input_spec

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        feats = self.module.encode(normalise(before, self.spec), normalise(after, self.spec))
        return self.module.caption_memory(feats)[0]


def _export(graph: nn.Module, sample: tuple[torch.Tensor, torch.Tensor], path: Path, output: str,
            out_axes: dict[int, str], opset: int) -> Path:
    axes = {0: "batch", 2: "height", 3: "width"}
    was_training = graph.module.training
    graph.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that hold for any tile
            torch.onnx.export(graph, sample, str(path), input_names=["before", "after"], output_names=[output],
                              dynamic_axes={"before": axes, "after": axes, output: out_axes},
                              opset_version=opset, dynamo=False)
    finally:
        graph.module.train(was_training)  # the exporter restores the WRAPPER's mode recursively
    return path


def export_onnx(model: TorchChangeModel, path: str | Path, *, captions: bool | None = None,
                tile_size: int | None = None, opset: int = OPSET) -> dict[str, Path]:
    """Write ``PATH.cd.onnx`` (when the model detects change) and ``PATH.caption_encoder.onnx`` (when it
    captions with the shared decoder and ``captions`` is not False). Returns {"cd": ..., "caption_encoder": ...}."""
    base = Path(path)
    base = base.with_name(base.name.removesuffix(".onnx"))
    base.parent.mkdir(parents=True, exist_ok=True)
    size = int(tile_size or model.input_spec.tile_size)
    dev = model.device
    sample = (torch.full((1, model.input_spec.bands, size, size), 100.0, device=dev),
              torch.full((1, model.input_spec.bands, size, size), 150.0, device=dev))
    out: dict[str, Path] = {}
    if model.can_detect:
        out["cd"] = _export(_ProbabilityGraph(model), sample, base.with_name(base.name + ".cd.onnx"), "probability",
                            {0: "batch", 1: "height", 2: "width"}, opset)
    shared_decoder = hasattr(model.module, "caption_memory") and hasattr(model.module, "decoder")
    if captions is None:
        captions = model.can_caption and shared_decoder
    if captions:
        if not shared_decoder:
            raise ValueError(f"{model.name!r} does not decode with the shared CaptionDecoder; only its change "
                             "path can be exported")
        out["caption_encoder"] = _export(_MemoryGraph(model), sample,
                                         base.with_name(base.name + ".caption_encoder.onnx"), "memory",
                                         {0: "batch", 1: "tokens"}, opset)
    return out


def _session(path: str | Path, threads: int | None, providers: tuple[str, ...]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


class OnnxChangeModel(ChangeModel):
    """The exported graphs behind :class:`ChangeModel`; captions decode with the PyTorch model's decoder
    (on CPU) from the ONNX visual tokens. ``torch_model`` supplies the name, input spec and vocabulary."""

    def __init__(self, torch_model: TorchChangeModel, files: dict[str, str | Path], *, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self.torch_model = torch_model.to("cpu")
        self.name, self.version = torch_model.name, torch_model.version
        self.input_spec = torch_model.input_spec
        self.cd = _session(files["cd"], threads, providers) if files.get("cd") else None
        self.memory = _session(files["caption_encoder"], threads, providers) if files.get("caption_encoder") else None

    @property
    def can_caption(self) -> bool:
        return self.memory is not None and self.torch_model.can_caption

    @property
    def can_detect(self) -> bool:
        return self.cd is not None

    def _run(self, session: Any, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        check_batch(before, after, self.input_spec)
        feed = {"before": before.detach().float().cpu().numpy(), "after": after.detach().float().cpu().numpy()}
        return torch.from_numpy(session.run(None, feed)[0])

    def change_probability(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        if self.cd is None:
            raise NotImplementedError(f"model {self.name!r} has no exported change path")
        return self._run(self.cd, before, after)

    def caption(self, before: torch.Tensor, after: torch.Tensor, beam_size: int = 1,
                max_length: int | None = None) -> list[str]:
        if not self.can_caption:
            raise NotImplementedError(f"model {self.name!r} has no exported caption encoder")
        memory = self._run(self.memory, before, after)
        vocab = self.torch_model.vocabulary
        dec = self.torch_model.module.decoder.eval()
        with torch.inference_mode():
            ids = dec.generate(memory, None, beam_size=beam_size, max_len=max_length or vocab.max_length)
        return vocab.decode_batch(ids)

    def describe(self) -> dict:
        d = super().describe()
        d["runtime"] = "onnxruntime"
        return d


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
        out["memory"] = float((onnx_model._run(onnx_model.memory, before, after) - ref).abs().max())
    return out
