"""Model inputs shared by parity and the offline bench: tokenized texts and random tokens.

Everything is numpy (int64), so the very same arrays feed PyTorch and ONNX Runtime.
Batches are right-padded, as the tokenizers of the supported encoders pad.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ferry.errors import DataError
from ferry.files import resolve


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, special tokens included, no padding."""
    return [list(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]


def random_ids(tokenizer: Any, vocab_size: int, batch: int, seq: int, rng: np.random.Generator, full: bool = False) -> list[list[int]]:
    """``batch`` random token sequences of at most ``seq`` tokens, framed by the tokenizer's own
    special tokens; real lengths vary inside the batch (the first row is always ``seq`` long,
    so the batch is ``seq`` wide) unless ``full``, when every row is ``seq`` long.
    """
    special = set(tokenizer.all_special_ids)
    usable = max(1, min(vocab_size, len(tokenizer)))
    marker = next(i for i in range(usable + len(special) + 1) if i not in special)
    framed = tokenizer.build_inputs_with_special_tokens([marker])  # [CLS] x [SEP], <s> x </s>, ...
    at = framed.index(marker)
    head, tail = framed[:at], framed[at + 1 :]
    out = []
    for row in range(batch):
        length = seq if full or row == 0 else int(rng.integers(max(len(head) + len(tail) + 1, seq // 4), seq + 1))
        n = max(1, length - len(head) - len(tail))
        body = rng.integers(0, usable, size=n)
        # Special tokens inside a text would change what the model sees (e.g. a pad id in
        # the middle of RoBERTa's positions); draw again where one was hit.
        for i in range(n):
            while int(body[i]) in special:
                body[i] = rng.integers(0, usable)
        out.append([*head, *map(int, body), *tail][:seq])
    return out


def read_texts(path: str, text_column: str = "text", flag: str = "--texts") -> list[str]:
    """Texts without labels: a .txt file (one per line), or the text column of .csv/.tsv/.jsonl/.parquet."""
    from finetune.data import FORMATS, decode_text, read_rows, split_lines

    p = resolve(path)
    if p.is_dir():
        raise DataError(f"{flag} {path}: is a directory; give a .txt (one text per line), .csv, .tsv, .jsonl or .parquet file")
    if not p.is_file():
        raise DataError(f"{flag} {path}: file not found")
    if p.suffix.lower() in FORMATS:
        texts = read_rows(p, text_column, None, "strict", hint="")[0]
    else:
        texts = split_lines(decode_text(p.read_bytes(), f"{flag} {path}", "strict", hint=""))
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{flag} {path}: no texts in the file")
    return texts


def read_jsonl_texts(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of a checkpoint's heldout.jsonl or calibration.jsonl."""
    texts, labels = [], []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte at offset {e.start} is not UTF-8; re-run ferry finetune") from None
    # JSON Lines: lines end with \n alone (str.splitlines() would also split inside a text at U+2028 ...)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            labels.append(str(row.get("label", "")))
        except (ValueError, KeyError, TypeError, AttributeError):  # ValueError: also a 4,300+ digit integer
            raise DataError(f"{path}: line {n} is not a {{\"text\", \"label\"}} JSON object; re-run ferry finetune") from None
    return texts, labels
