"""Texts for the model: the artifact's tokenizer, and token ids padded into batches grouped by length.

No transformers here: the tokenizer is the artifact's ``tokenizer.json`` loaded with the
``tokenizers`` library (the same Rust tokenizer that transformers' fast tokenizers wrap, so the
ids are identical, without importing transformers, which takes seconds and may pull in torch).

A batch is grouped by token length and each group is padded only to its own longest text, so
short texts don't pay for long ones.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from ferry.errors import ArtifactError, first_line
from runtime.artifact import Artifact

TOKENIZER_FILE = "tokenizer.json"
# The names a tokenizer gives its padding token, tried in order (none: id 0).
PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>")
# A length group closes when padding it to its longest text would add more than this
# fraction of padding tokens to its real tokens.
PAD_SLACK = 0.25


def load_tokenizer(artifact: Artifact, max_length: int) -> Any:
    """The artifact's tokenizer.json, truncating to ``max_length``, never padding; built from the
    bytes checked against the manifest's files map (when it has one).

    Raises:
        ArtifactError: no tokenizer.json, a damaged one, or one that does not match the model.
    """
    from tokenizers import Tokenizer

    path = artifact.path / TOKENIZER_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{artifact.path}: no {TOKENIZER_FILE}; the serving runtime needs a fast tokenizer, re-export from a "
            "checkpoint saved with a fast tokenizer"
        )
    data = artifact.read_verified(TOKENIZER_FILE)
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises a plain Exception for a damaged file
        raise ArtifactError(f"{path}: cannot load the tokenizer ({first_line(e)})") from None
    tok.no_padding()
    tok.enable_truncation(max_length)
    check_vocabulary(artifact, tok)
    return tok


def check_vocabulary(artifact: Artifact, tok: Any) -> None:
    """Refuse a tokenizer that emits ids past the model's embedding table (every text using them would fail)."""
    if not (artifact.path / "config.json").is_file():
        return  # no config.json: nothing to compare with
    try:
        vocab_size = int(json.loads(artifact.read_verified("config.json")).get("vocab_size") or 0)
    except (ValueError, TypeError, AttributeError):
        return  # no usable config.json: nothing to compare with
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if vocab_size and top >= vocab_size:
        raise ArtifactError(
            f"{artifact.path / TOKENIZER_FILE}: token ids go up to {top} but config.json's vocab_size is {vocab_size}; "
            "the tokenizer does not match the model, re-export from the checkpoint"
        )


def pad_id(tokenizer: Any) -> int:
    """The id of the tokenizer's padding token (0 when it has none: the attention mask hides padding, whatever its id)."""
    for token in PAD_TOKENS:
        i = tokenizer.token_to_id(token)
        if i is not None:
            return int(i)
    return 0


def encode(tokenizer: Any, texts: Sequence[str]) -> list[Any]:
    """The tokenizer's encodings of ``texts``; a string the Rust tokenizer cannot take (a lone
    surrogate) has its bad code points replaced instead of failing the batch."""
    try:
        return tokenizer.encode_batch(list(texts))
    except TypeError:
        return tokenizer.encode_batch([t.encode("utf-8", "replace").decode("utf-8") for t in texts])


def collate(
    ids: Sequence[Sequence[int]], pad: int, input_names: Sequence[str], length: int | None = None,
    type_ids: Sequence[Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad ``ids`` to the longest (or ``length``) and build the inputs ``input_names`` asks for.

    Token types are ``type_ids`` (an encoding's own), else 0 (single-sentence inputs).
    """
    width = length or max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    types = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
        if type_ids is not None:
            types[row, : len(x)] = type_ids[row]
    feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
    if "position_ids" in input_names:
        feeds["position_ids"] = np.broadcast_to(np.arange(width, dtype=np.int64), input_ids.shape).copy()
    return {k: v for k, v in feeds.items() if k in input_names}


def length_groups(
    lengths: Sequence[int], max_group: int | None = None, slack: float = PAD_SLACK, max_tokens: int | None = None,
) -> list[list[int]]:
    """Indices grouped by token length: each group is padded to its own longest text.

    Indices are sorted by length; a group closes when it holds ``max_group`` texts, when
    padding it to the next text's length would exceed ``slack`` of its real tokens, or when
    its padded tokens would pass ``max_tokens`` (a text longer than that forms its own group).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        full = max_group is not None and len(current) >= max_group
        wasteful = current and n * (len(current) + 1) > (real + n) * (1 + slack)
        over = max_tokens is not None and n * (len(current) + 1) > max_tokens
        if current and (full or wasteful or over):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        groups.append(current)
    return groups
