"""ResNet feature extractors shared by all change models.

Built from torchvision with ``weights=None`` (never downloads); ImageNet or any other weights come only
from a local file (``torch.load(weights_only=True)`` or safetensors), so nothing is unpickled.

Pix4Cap's paper says "ResNet32", which is not a standard ResNet depth. We read it as **ResNet-34** (the
BasicBlock ResNet with [3, 4, 6, 3] blocks, 64..512 channels), the nearest standard network; the
choice is recorded in every model card through the config's ``backbone`` field.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

# name -> (constructor, channels of layer1..layer4)
RESNETS: dict[str, tuple] = {
    "resnet18": (tvm.resnet18, (64, 128, 256, 512)),
    "resnet34": (tvm.resnet34, (64, 128, 256, 512)),
    "resnet50": (tvm.resnet50, (256, 512, 1024, 2048)),
    "resnet101": (tvm.resnet101, (256, 512, 1024, 2048)),
}


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors`` or a weights-only torch file; unwraps {'state_dict': ...} and
    {'model': ...} (LAVIS / MiniGPT-4 checkpoints). A torch file that only loads by unpickling arbitrary
    objects is refused: that would run whatever code the file names."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from ..model_file import CheckpointError
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 (SafetensorError, OSError: a damaged or foreign file)
            raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None
    else:
        from ..model_file import load_torch_file

        state = load_torch_file(path)  # the one guarded torch.load (refuses pickles, says what is damaged)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map a 3-band stem kernel to ``in_channels`` bands.

    For a multiple of 3 (6 = two stacked RGB images, as SEN's single-stream input) the kernel is
    repeated and divided by the repeat count, so a stack of identical images gives the same response
    as one image; otherwise every band gets the mean RGB kernel, scaled the same way.
    """
    c = weight.shape[1]
    if c == in_channels:
        return weight
    if in_channels % c == 0:
        n = in_channels // c
        return weight.repeat(1, n, 1, 1) / n
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (c / in_channels)


def _dilate_stage(stage: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a stride-2 stage into a stride-1 dilated one in place (torchvision's dilation layout:
    the first block keeps the previous dilation, later blocks use the new one). Works for
    BasicBlock too, which torchvision refuses to build dilated."""
    for i, block in enumerate(stage):
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                if m.stride == (2, 2):
                    m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    d = previous if i == 0 else dilation
                    m.dilation, m.padding = (d, d), (d, d)


class ResNetBackbone(nn.Module):
    """Multi-scale ResNet features: ``forward(x)`` returns ``stages`` maps at strides 4, 8, 16, 32.

    ``stages=3`` drops layer4 (a light "ResNet-x-3" extractor, as SEN's ResNet101-3 or BIT's S4 variant);
    ``output_stride`` 8 or 16 replaces the last strides by dilation (BIT uses 8). ``channels`` and
    ``strides`` report what each returned map has, so necks and decoders size themselves from them.
    """

    def __init__(self, name: str = "resnet18", in_channels: int = 3, stages: int = 4,
                 output_stride: int = 32, weights_path: str | Path | None = None) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; known: {sorted(RESNETS)}")
        if not 1 <= stages <= 4:
            raise ValueError("stages must be 1..4")
        if output_stride not in (8, 16, 32):
            raise ValueError("output_stride must be 8, 16 or 32")
        ctor, channels = RESNETS[name]
        net = ctor(weights=None)
        self.name, self.in_channels = name, in_channels
        self.conv1 = net.conv1 if in_channels == 3 else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if in_channels != 3:
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layers = nn.ModuleList([getattr(net, f"layer{i + 1}") for i in range(stages)])
        strides, dilation = [4], 1
        for i in range(1, stages):
            if strides[-1] * 2 > output_stride:
                _dilate_stage(self.layers[i], dilation * 2, dilation)
                dilation *= 2
                strides.append(strides[-1])
            else:
                strides.append(strides[-1] * 2)
        self.channels: tuple[int, ...] = tuple(channels[:stages])
        self.strides: tuple[int, ...] = tuple(strides)
        if weights_path is not None:
            self.load_pretrained(weights_path)

    @property
    def out_channels(self) -> int:
        """Width of the deepest returned map."""
        return self.channels[-1]

    def load_pretrained(self, path: str | Path) -> None:
        """Load torchvision-layout ResNet weights from a local file (extra keys such as ``fc`` and
        dropped stages are ignored; a missing key of a kept module is an error)."""
        state = load_state_file(path)
        mapped: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if k.startswith("layer"):
                idx, rest = k[5:].split(".", 1)
                if int(idx) <= len(self.layers):
                    mapped[f"layers.{int(idx) - 1}.{rest}"] = v
            elif k.startswith(("conv1.", "bn1.")):
                mapped[k] = adapt_stem_weight(v, self.in_channels) if k == "conv1.weight" else v
        missing, _ = self.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(f"{path}: weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats
