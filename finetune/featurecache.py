"""Feature extraction with the frozen base model run once (``--freeze all``).

With the whole base model frozen, only the classification head trains, and the base's
output for a text is the same every epoch once the base runs in eval mode (no dropout in
the frozen part, as in the usual feature-extraction recipe). So ferry runs the base once
over the training and validation texts, keeps what the head reads (the first token's hidden
state, and the pooler's output where the architecture has one), and trains the head on
that: every epoch after the features costs the head alone.

The head reads the base's output through the model's own ``forward``: a ``CachedBase``
module stands in for the base model while the head trains, and returns the stored
features of the current batch. That is exact for the architectures listed in
``CACHEABLE``, whose heads read the first token (or the pooler); for any other, and under
DDP, training runs the base as usual.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

# Model types whose sequence-classification head reads only the first token's hidden
# state or the pooler output (which reads the first token).
CACHEABLE = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "mpnet",
    "roberta", "xlm-roberta",
})


def usable(net: Any, freeze: str, distributed: bool) -> bool:
    return freeze == "all" and not distributed and getattr(net.config, "model_type", None) in CACHEABLE


class CachedBase:
    """The base model's outputs for a fixed list of texts, served by index."""

    def __init__(self, first: Any, pooled: Any | None):
        self.first = first  # [texts, 1, hidden]
        self.pooled = pooled  # [texts, hidden] or None

    def __len__(self) -> int:
        return int(self.first.shape[0])


class StandIn(torch.nn.Module):
    """Takes the base model's place: whatever the inputs, the cached features of ``index``."""

    def __init__(self, cache: CachedBase, index: Any):
        super().__init__()
        self.cache, self.index = cache, index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        c, i = self.cache, self.index
        return BaseModelOutputWithPooling(last_hidden_state=c.first[i], pooler_output=None if c.pooled is None else c.pooled[i])


@contextlib.contextmanager
def serving(net: Any, cache: CachedBase, index: Sequence[int]) -> Iterator[None]:
    """Inside the block, ``net``'s base model returns the cached features of ``index``."""
    prefix = net.base_model_prefix
    base = getattr(net, prefix)
    # Module.__setattr__ keeps submodules in _modules; swap there so nothing else changes.
    net._modules[prefix] = StandIn(cache, torch.as_tensor(list(index), device=cache.first.device))
    try:
        yield
    finally:
        net._modules[prefix] = base


def build(
    net: Any, ids: Sequence[Sequence[int]], pad_id: int, input_names: Sequence[str], batch_size: int,
    device: Any, autocast: Any, desc: str, quiet: bool,
) -> CachedBase:
    """Run the frozen base once over ``ids`` (eval mode, no grad) and keep what the head reads."""
    from tqdm.auto import tqdm

    from finetune.batching import collate, length_sorted_batches

    base = getattr(net, net.base_model_prefix)
    was_training = base.training
    base.eval()
    first = pooled = None
    batches = list(length_sorted_batches(ids, batch_size))
    bar = tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=quiet, dynamic_ncols=True, mininterval=1.0)
    try:
        # no_grad, not inference_mode: the head saves these tensors for its backward pass
        with torch.no_grad():
            for index in bar:
                batch = collate([ids[i] for i in index], pad_id, input_names, device)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = base(**batch)
                h = out.last_hidden_state[:, :1].float()
                p = getattr(out, "pooler_output", None)
                if first is None:
                    first = torch.zeros((len(ids), 1, h.shape[-1]), device=device)
                    pooled = None if p is None else torch.zeros((len(ids), p.shape[-1]), device=device)
                rows = torch.as_tensor(index, device=device)
                first[rows] = h
                if pooled is not None:
                    pooled[rows] = p.float()
    finally:
        bar.close()
        base.train(was_training)
    return CachedBase(first, pooled)


def logits(net: Any, cache: CachedBase, batch_size: int) -> Any:
    """The head's float32 logits (numpy) for every cached text, in eval mode."""
    import numpy as np

    was_training = net.training
    net.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(cache), batch_size):
                index = range(start, min(start + batch_size, len(cache)))
                with serving(net, cache, index):
                    out.append(net().logits.float().cpu().numpy())
    finally:
        net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, net.config.num_labels), dtype=np.float32)
