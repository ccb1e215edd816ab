"""Tiny models and data built inside the tests: nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
VOCAB = ASSETS / "vocab.txt"

TOPICS = {
    "sport": "match team goal player score win league coach game".split(),
    "tech": "computer software chip phone internet code data network cloud robot app".split(),
    "food": "pasta bread soup cheese recipe kitchen cook flavor dinner salad pizza".split(),
}
FILLER = "the a an of to and in is was it on for with by at this that from good bad new old great small big very really today yesterday".split()


def tokenizer():
    """A WordPiece tokenizer over the committed tiny vocabulary."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(VOCAB), do_lower_case=True, model_max_length=64)


def base_model(path: Path, arch: str = "bert", layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random base model and its tokenizer to ``path`` (a local HF directory)."""
    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    tok = tokenizer()
    if arch == "bert":
        config = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )
        model = BertModel(config)
    elif arch == "distilbert":
        config = DistilBertConfig(
            vocab_size=tok.vocab_size, dim=32, n_layers=layers, n_heads=2, hidden_dim=64, max_position_embeddings=128
        )
        model = DistilBertModel(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def texts(n_per_class: int = 20, seed: int = 0, topics: dict[str, list[str]] = TOPICS) -> list[tuple[str, str]]:
    """(text, label) pairs that a tiny model can learn: each text mixes its topic's words with filler."""
    rng = random.Random(seed)
    rows = []
    for label, words in topics.items():
        for _ in range(n_per_class):
            n = rng.randint(4, 14)
            tokens = [rng.choice(words) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(n)]
            tokens[rng.randrange(n)] = rng.choice(words)
            rows.append((" ".join(tokens), label))
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], text_column: str = "text", label_column: str = "label") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([text_column, label_column])
        w.writerows(rows)
    return path
