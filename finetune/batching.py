"""Tokenize once, batch with dynamic padding, and predict: shared by training, evaluate and export.

Texts are tokenized once without padding; each batch is padded only to its own longest
sequence. Batch orders are plain index lists computed from ``(seed, epoch)``, so a run and
its resumed continuation see the same batches.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

# Length-grouped batches sort within windows of this many batches, then shuffle the batches.
GROUP_WINDOW = 50


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length``, unpadded.

    The tokenizer's own ``model_input_names`` decide which extra inputs the model gets
    (token_type_ids for BERT, none for DistilBERT/RoBERTa); :func:`collate` rebuilds them.
    """
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int, input_names: Sequence[str], device: Any = None) -> dict[str, Any]:
    """Pad a batch to its longest sequence: input_ids, attention_mask and token_type_ids when used."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    if device is not None and str(device) != "cpu":
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def batch_indices(
    order: Sequence[int], batch_size: int, lengths: Sequence[int] | None = None, seed: int = 0, epoch: int = 0
) -> list[list[int]]:
    """Cut ``order`` into batches; with ``lengths``, group similar lengths to cut padding.

    Grouping sorts each window of ``GROUP_WINDOW`` batches by length (longest first), cuts
    it, and shuffles the resulting batches with the same ``(seed, epoch)``, so the model
    still sees batches in random order.
    """
    if lengths is None:
        return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    window = batch_size * GROUP_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    random.Random(seed * 100_003 + epoch + 7919).shuffle(batches)
    return batches


def shard(order: Sequence[int], rank: int, world_size: int, pad: bool) -> list[int]:
    """This rank's share of ``order``.

    Training pads with wrap-around so every rank runs the same number of steps (as
    DistributedSampler does); evaluation does not, so each example is counted once.
    """
    if world_size <= 1:
        return list(order)
    order = list(order)
    if pad and len(order) % world_size:
        order += order[: world_size - len(order) % world_size]
    return order[rank::world_size]


def length_sorted_batches(ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Index batches in decreasing length, for inference with the least padding."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def model_input_names(model: Any, tokenizer: Any) -> list[str]:
    """The inputs both the tokenizer produces and the model's forward accepts."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return [n for n in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]) if n in accepted]


def logits_of(
    model: Any,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    input_names: Sequence[str],
    batch_size: int,
    device: Any = None,
    autocast_dtype: Any = None,
) -> Any:
    """float32 logits (numpy, input order) of already-encoded texts, in eval mode without grad."""
    import numpy as np
    import torch

    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    device = device if device is not None else next(model.parameters()).device
    try:
        with torch.inference_mode():
            for index in length_sorted_batches(ids, batch_size):
                batch = collate([ids[i] for i in index], pad_id, input_names, device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(**batch).logits
                logits = logits.float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(ids), logits.shape[1]), dtype=np.float32)
                out[index] = logits
    finally:
        model.train(was_training)
    if out is None:
        return np.zeros((0, getattr(model.config, "num_labels", 0)), dtype=np.float32)
    return out


def predict_logits(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 64, max_length: int = 512) -> Any:
    """float32 logits of ``texts`` as a (len(texts), num_labels) numpy array, in input order.

    Tokenizes once, pads each batch to its own longest text (sorted by length), and runs
    the model in eval mode under ``torch.inference_mode``. Used by ``ferry evaluate`` and by
    export's parity check, so both see exactly the same inputs.
    """
    ids = encode(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return logits_of(model, ids, pad_id, model_input_names(model, tokenizer), batch_size)
