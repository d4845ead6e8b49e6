"""Choosing and describing the compute device, so users see whether their GPU is actually used."""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch

from .errors import ChangeScribeError, OutOfDeviceMemory

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error, not a fallback."""
    choice = (choice or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ChangeScribeError("CUDA was requested but this PyTorch sees no CUDA GPU "
                                    f"(torch {torch.__version__}); use --device cpu or auto")
        return torch.device(choice)
    if choice == "cpu":
        return torch.device("cpu")
    raise ChangeScribeError(f"unknown device {choice!r}: use auto, cpu or cuda[:N]")


def describe_device(device: torch.device) -> str:
    """E.g. 'CUDA: NVIDIA H100 80GB HBM3, 79.1 GB' or 'CPU, 2 threads'."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return f"CUDA: {props.name}, {props.total_memory / 1e9:.1f} GB"
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"


def halving_on_oom(fn: Callable[..., T], join: Callable[[list[T]], T], *batch: torch.Tensor, what: str = "batch") -> T:
    """``fn(*batch)``; on CUDA out-of-memory the batch is split in halves (down to one item) before giving up
    with :class:`OutOfDeviceMemory`, whose ``kind`` tells the run policy (:mod:`.run`) to try the CPU."""
    try:
        with torch.inference_mode():
            return fn(*batch)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        n = batch[0].shape[0]
        if n == 1:
            raise OutOfDeviceMemory(f"out of GPU memory even at one {what} per batch: use a smaller tile size "
                                    "or --device cpu") from None
        log.warning("out of GPU memory at %d per %s batch; retrying in halves", n, what)
        h = n // 2
        return join([halving_on_oom(fn, join, *(t[:h] for t in batch), what=what),
                     halving_on_oom(fn, join, *(t[h:] for t in batch), what=what)])
