"""``ChangeNetwork``: the base of every registered architecture (BIT, Pix4Cap, SEN, DFM, Semantic-CC).

It declares what a network can do, so callers (the :class:`.adapter.TorchChangeModel` wrapper, the registry,
training and benchmarks) read ``can_detect``, ``can_caption`` and ``default_beam_size`` instead of probing for
attributes with defaults.

It also separates building from loading. A constructor only builds layers from its config; it never reads a
file. Reading LOCAL pretrained weights is an explicit step after construction, taken by whoever needs it:

* a training recipe that starts from a pretrained backbone (ImageNet, sen-pretrain, SAM) calls
  :meth:`ChangeNetwork.load_backbone` with the file (``registry.build_model(backbone_weights=...)`` does it);
* a training recipe that starts from the pretrained parts its config names calls
  :meth:`ChangeNetwork.load_pretrained`;
* loading a model file calls :meth:`ChangeNetwork.load_external_weights` (only the parts the file leaves out,
  e.g. Semantic-CC's frozen SAM encoder), then loads the file's state dict;
* counting parameters on the meta device reads nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn


class ChangeNetwork(nn.Module):
    """A bi-temporal network on normalised inputs; subclasses set the capabilities they have.

    ``can_detect``: it has ``change_logits`` (a change head); SEN has none and runs paired with a detector.
    ``can_caption``: it generates captions (with the model file's vocabulary unless :attr:`has_text_tokenizer`).
    """

    can_detect: ClassVar[bool] = True
    can_caption: ClassVar[bool] = False

    @property
    def default_beam_size(self) -> int:
        """The beam size captions are decoded with unless a run says otherwise (its paper's; 1 = greedy)."""
        return 1

    @property
    def has_text_tokenizer(self) -> bool:
        """True when the network holds its own text tokenizer (Semantic-CC: its LLM's, or the vocabulary attached
        to it), so its captions need no vocabulary beside it."""
        return False

    def attach_vocabulary(self, vocabulary: Any) -> None:
        """Hand the model file's word vocabulary to a network that decodes its own text; others keep it outside."""

    def load_backbone(self, path: str | Path) -> None:
        """Load a LOCAL pretrained backbone file into the network's feature extractor (each architecture knows
        which module that is and which layout its file has); the rest of the network keeps its initialisation."""
        raise ValueError(f"{type(self).__name__} has no backbone that takes pretrained weights")

    def load_external_weights(self) -> None:
        """Read the pretrained tensors that model files leave out (frozen parts re-read from the LOCAL checkpoints
        the config names), so the file's state dict completes the network. Most networks have none."""

    def load_pretrained(self) -> None:
        """Initialise every pretrained part the config names from its LOCAL checkpoint, for a network about to be
        trained: the external parts, and the parts training changes (which a model file then carries)."""
        self.load_external_weights()
