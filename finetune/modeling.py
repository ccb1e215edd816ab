"""The base model: find it, load it with a fresh classification head, freeze parts, group parameters."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError, FerryError, first_line
from ferry.files import PKG_PREFIX, resolve

# Config keys that hold the classification head's dropout, per architecture family.
DROPOUT_KEYS = ("classifier_dropout", "seq_classif_dropout", "cls_dropout")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))




def resolve_model(model: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory).

    Raises:
        FerryError: a path that is not a model directory, or a name that is neither a
            local directory nor reachable on the hub.
    """
    path = resolve(model)
    if path.exists() or model.startswith(PKG_PREFIX) or not HUB_ID.match(model) or model.startswith("."):
        if not path.exists():
            raise FerryError(f"--model {model}: no such directory; give a local Hugging Face model directory")
        if not path.is_dir():
            raise FerryError(f"--model {model}: is a file, not a model directory (a folder with config.json and weights)")
        if not (path / "config.json").is_file():
            raise FerryError(f"--model {model}: no config.json in this directory, so it is not a Hugging Face model")
        return str(path), True
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, local_files_only=_offline())
    except Exception as e:  # huggingface_hub raises many types (OSError, HTTP errors, timeouts)
        why = "the hub is unreachable (offline)" if _offline() else f"loading it from the hub failed ({first_line(e)})"
        raise FerryError(f"--model {model}: not a local model directory and {why}") from None
    return model, False


def load_base(model: str, labels: list[str], classifier_dropout: float | None) -> tuple[Any, Any, str]:
    """(model with a new head for ``labels``, tokenizer, resolved source)."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source, local = resolve_model(model)
    kwargs = {"local_files_only": True} if local or _offline() else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "Some weights were newly initialized": expected for a new head
    try:
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except Exception as e:
            raise FerryError(f"--model {model}: config.json cannot be read ({first_line(e)})") from None
        config.num_labels = len(labels)
        config.id2label = {i: label for i, label in enumerate(labels)}
        config.label2id = {label: i for i, label in enumerate(labels)}
        if classifier_dropout is not None:
            for key in DROPOUT_KEYS:
                if key == "classifier_dropout" or hasattr(config, key):
                    setattr(config, key, classifier_dropout)
        try:
            net = AutoModelForSequenceClassification.from_pretrained(
                source, config=config, ignore_mismatched_sizes=True, **kwargs
            )
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise FerryError(
                    f"--model {model}: model type '{config.model_type}' has no sequence-classification head in transformers"
                ) from None
            raise FerryError(f"--model {model}: cannot load the weights ({first_line(e)})") from None
        except Exception as e:
            raise FerryError(f"--model {model}: cannot load the weights ({first_line(e)})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as e:
            raise FerryError(f"--model {model}: cannot load its tokenizer ({first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return net, tokenizer, source


def encoder_layers(model: Any) -> Any:
    """The list of transformer blocks of the base model (the longest ModuleList in it)."""
    import torch

    lists = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise FerryError(f"cannot find the transformer layers of {type(model).__name__}; use --freeze all or none")
    return max(lists, key=len)


def parse_freeze(value: str) -> str | int:
    """'all', 'none' or a number of bottom layers."""
    v = str(value).strip().lower()
    if v in ("all", "none"):
        return v
    if v.isdigit():
        return int(v)
    raise ConfigError(f"--freeze {value!r} must be all, none or a number of layers")


def check_freeze(value: str) -> str | None:
    try:
        parse_freeze(value)
    except ConfigError:
        return "must be all, none or a number of bottom layers (e.g. 2)"
    return None


def apply_freeze(model: Any, freeze: str) -> dict[str, int]:
    """Freeze parameters for the transfer mode and return the counts.

    ``all``: the whole base model (feature extraction; only the head trains).
    ``N``: the embeddings and the bottom N transformer layers (partial sharing).
    ``none``: nothing (full fine-tuning).
    """
    mode = parse_freeze(freeze)
    frozen: list[Any] = []
    if mode == "all":
        frozen = [model.base_model]
    elif isinstance(mode, int):
        layers = encoder_layers(model)
        if mode > len(layers):
            raise ConfigError(f"--freeze {mode}: the model has only {len(layers)} layers")
        embeddings = getattr(model.base_model, "embeddings", None)
        if embeddings is None:
            raise FerryError(f"cannot find the embeddings of {type(model).__name__}; use --freeze all or none")
        frozen = [embeddings, *list(layers)[:mode]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "frozen_parameters": total - trainable}


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decoupled weight decay on matrices, none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def local_path(model: str) -> Path | None:
    p = resolve(model)
    return p if p.exists() else None
