"""Image backbones for `ferry finetune --task image-classification`: load, freeze by stage, augment.

Freeze semantics (``--freeze``), for every backbone:

- the *stages* are the backbone's stage list, bottom first: EfficientNet-Lite's 7 block stages,
  otherwise the longest ``ModuleList`` of the base model (ResNet/ConvNeXt stages, ViT layers,
  HF EfficientNet blocks ...);
- the *stem* is every backbone parameter registered before the first stage (conv stem,
  embeddings), the *top* every backbone parameter after the last (head convolution, final norm);
- the *head* is the new classifier (``classifier`` / ``_fc``), always trained.

``all`` freezes stem, stages and top (only the head trains); ``N`` freezes the stem and the bottom
N stages; ``none`` freezes nothing. ``--unfreeze-top K --unfreeze-after E`` makes the top K
stages and the top trainable after epoch E (the recipe: frozen backbone, then a short unfrozen
phase). BatchNorm layers whose parameters are all frozen stay in eval mode, so their running
statistics never change.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ferry.errors import ConfigError, FerryError, first_line
from ferry.tasks import IMAGE_TASK
from finetune.modeling import encoder_layers, parse_freeze, resolve_model

# TF EfficientNet-Lite's input scaling, (x - 127) / 128, as mean/std over x/255.
LITE_MEAN, LITE_STD = [127 / 255] * 3, [128 / 255] * 3
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load_image_base(model: str, labels: list[str], dropout: float | None, image_size: int) -> tuple[Any, dict[str, Any], str]:
    """(model with a new head for ``labels``, processor dict, resolved source).

    ``model`` is a local Hugging Face image-classification directory, or a ``.pth`` state_dict in
    lukemelas' EfficientNet-Lite naming (built as Lite0 at ``image_size``).
    """
    import transformers
    from transformers import AutoConfig, AutoModelForImageClassification

    from ferry.files import resolve
    from finetune.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteForImageClassification, load_lukemelas_weights, register
    from runtime.pixels import processor_dict

    register()
    id2label = {i: label for i, label in enumerate(labels)}
    label2id = {label: i for i, label in enumerate(labels)}
    path = resolve(model)
    if path.is_file():
        if path.suffix not in (".pth", ".pt"):
            raise FerryError(f"--model {model}: a weights file must be a .pth state_dict (EfficientNet-Lite naming)")
        config = EfficientNetLiteConfig(image_size=image_size, num_labels=len(labels), id2label=id2label, label2id=label2id)
        if dropout is not None:
            config.dropout_rate = dropout
        net = EfficientNetLiteForImageClassification(config)
        load_lukemelas_weights(net, str(path))
        net.config.architectures = [type(net).__name__]
        return net, processor_dict(image_size, LITE_MEAN, LITE_STD), str(path)
    source, local = resolve_model(model)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "Some weights were newly initialized": expected for a new head
    try:
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except Exception as e:
            raise FerryError(f"--model {model}: config.json cannot be read ({first_line(e)})") from None
        config.num_labels, config.id2label, config.label2id = len(labels), id2label, label2id
        fixed = getattr(config, "image_size", None)
        if config.model_type == "efficientnet_lite":
            config.image_size = image_size  # the static SAME padding is computed for this side
        elif isinstance(fixed, int) and fixed != image_size and hasattr(config, "patch_size"):
            raise ConfigError(f"--image-size {image_size}: {config.model_type} model {model} is built for {fixed}")
        if dropout is not None:
            for key in ("dropout_rate", "classifier_dropout_prob", "classifier_dropout", "hidden_dropout_prob"):
                if hasattr(config, key):
                    setattr(config, key, dropout)
                    break
        try:
            net = AutoModelForImageClassification.from_pretrained(source, config=config, ignore_mismatched_sizes=True, local_files_only=True)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise FerryError(f"--model {model}: model type '{config.model_type}' has no {IMAGE_TASK} head in transformers") from None
            raise FerryError(f"--model {model}: cannot load the weights ({first_line(e)})") from None
        except Exception as e:
            raise FerryError(f"--model {model}: cannot load the weights ({first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    net.config.architectures = [type(net).__name__]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    proc_file = Path(source) / "preprocessor_config.json"
    if proc_file.is_file():
        mean, std = _base_normalization(proc_file, mean, std)
    elif config.model_type == "efficientnet_lite":
        mean, std = LITE_MEAN, LITE_STD
    return net, processor_dict(image_size, mean, std), source


def _base_normalization(path: Path, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """(image_mean, image_std) of a base model's preprocessor_config.json: 3 numbers each (one is repeated)."""
    from ferry.files import read_json_object

    proc = read_json_object(path, f"{path}: no such file")
    out = []
    for key, default in (("image_mean", mean), ("image_std", std)):
        v = proc.get(key, default)
        v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise FerryError(f"{path}: {key} must be 3 numbers, got {v!r}; fix the base model's preprocessor config")
        out.append([float(x) for x in v])
    if 0 in out[1]:
        raise FerryError(f"{path}: image_std has a zero; fix the base model's preprocessor config")
    return out[0], out[1]


def head_parameters(net: nn.Module) -> set[int]:
    head = getattr(net, "_fc", None) or getattr(net, "classifier", None)
    if head is None:
        raise FerryError(f"cannot find the classification head of {type(net).__name__} (no 'classifier')")
    return {id(p) for p in head.parameters()}


def backbone_parts(net: nn.Module) -> tuple[list[nn.Parameter], list[list[nn.Parameter]], list[nn.Parameter]]:
    """(stem parameters, parameters of each stage bottom first, top parameters), head excluded."""
    if hasattr(net, "stage_modules"):
        stages = [list(m for block in group for m in [block]) for group in net.stage_modules()]
    else:
        stages = [[m] for m in encoder_layers(net)]
    stage_params = [[p for m in group for p in m.parameters()] for group in stages]
    in_stage = {id(p) for group in stage_params for p in group}
    head = head_parameters(net)
    stem, top = [], []
    seen_stage = False
    for p in net.parameters():
        if id(p) in head:
            continue
        if id(p) in in_stage:
            seen_stage = True
        else:
            (top if seen_stage else stem).append(p)
    return stem, stage_params, top


def apply_freeze(net: nn.Module, freeze: str) -> dict[str, int]:
    """Freeze by the semantics in the module docstring; returns the parameter counts."""
    mode = parse_freeze(freeze)
    stem, stages, top = backbone_parts(net)
    frozen: list[nn.Parameter] = []
    if mode == "all":
        frozen = stem + [p for g in stages for p in g] + top
    elif isinstance(mode, int):
        if mode > len(stages):
            raise ConfigError(f"--freeze {mode}: the backbone has only {len(stages)} stages")
        frozen = stem + [p for g in stages[:mode] for p in g]
    for p in frozen:
        p.requires_grad_(False)
    return counts(net) | {"stages": len(stages)}


def unfreeze_top(net: nn.Module, k: int) -> list[nn.Parameter]:
    """Make the top ``k`` stages and the top trainable; returns the parameters that changed."""
    _, stages, top = backbone_parts(net)
    if k > len(stages):
        raise ConfigError(f"--unfreeze-top {k}: the backbone has only {len(stages)} stages")
    changed = [p for p in [q for g in stages[len(stages) - k:] for q in g] + top if not p.requires_grad]
    for p in changed:
        p.requires_grad_(True)
    return changed


def counts(net: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "frozen_parameters": sum(p.numel() for p in net.parameters()) - trainable}


def train_mode(net: nn.Module) -> None:
    """``net.train()``, but BatchNorm layers with all parameters frozen stay in eval mode."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def augment(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float], degrees: float,
            translate: float, flip: bool) -> torch.Tensor:
    """Random resized crop + small affine (+ horizontal flip) as one ``affine_grid``/``grid_sample``.

    A crop of area fraction ``s`` in ``scale`` (aspect 3/4..4/3) at a random position, rotated by up
    to ``degrees`` and shifted by up to ``translate`` of the side, resampled bilinearly back to the
    input size; outside the image is zero, i.e. the mean colour of the normalized input.
    """
    n = x.shape[0]
    u = torch.rand(n, 6, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = (u[:, 1] * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - sx) * (u[:, 2] * 2 - 1) + translate * 2 * (u[:, 4] * 2 - 1)
    cy = (1 - sy) * (u[:, 3] * 2 - 1) + translate * 2 * (u[:, 5] * 2 - 1)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if flip:
        sx = sx * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.stack([
        torch.stack([cos * sx, -sin * sy, cx], 1),
        torch.stack([sin * sx, cos * sy, cy], 1),
    ], 1).to(x.dtype)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixel_tensor(paths: list[str], processor: dict[str, Any]) -> torch.Tensor:
    """Image files decoded and preprocessed by the runtime's :func:`runtime.pixels.load_pixels`, as one float32 tensor."""
    from runtime.pixels import load_pixels

    return torch.from_numpy(load_pixels(paths, processor))


@torch.no_grad()
def image_logits(net: nn.Module, pixels: torch.Tensor, batch_size: int, device: Any, autocast: Any = None) -> torch.Tensor:
    """Logits (float32, on CPU) of preprocessed images, in eval mode."""
    was_training = net.training
    net.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        x = pixels[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out.append(net(pixel_values=x).logits.float().cpu())
    if was_training:
        train_mode(net)
    return torch.cat(out) if out else torch.empty(0, net.config.num_labels)
