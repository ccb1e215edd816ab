"""Fixtures for the export tests: tiny trained checkpoints (BERT, DistilBERT, RoBERTa) and
artifacts exported from them once per session. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.cli import main
from tests import tiny
from tests.cli import run, run_fails  # noqa: F401  (re-exported to the tests)

LABELS = sorted(tiny.TOPICS)
FAST = ["--quiet", "--threads", "1", "--parity-batch-sizes", "1,3", "--parity-seq-lengths", "8,24,64"]


def roberta_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on the tiny texts (RoBERTa's kind), saved nowhere."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [t for t, _ in tiny.texts(40, seed=5)] + [" ".join(tiny.FILLER)] + [" ".join(w) for w in tiny.TOPICS.values()]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return RobertaTokenizerFast(
        vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"), model_max_length=64
    )


def build_model(arch: str, tokenizer, vocab_size: int | None = None, seed: int = 0):
    import torch
    from transformers import (
        BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification,
        RobertaConfig, RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {y: i for i, y in enumerate(LABELS)}}
    vocab = vocab_size or len(tokenizer)
    if arch == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, **labels)
        return BertForSequenceClassification(config)
    if arch == "distilbert":
        config = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=128, **labels)
        return DistilBertForSequenceClassification(config)
    if arch == "roberta":
        config = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, **labels)
        return RobertaForSequenceClassification(config)
    raise ValueError(arch)


def train(model, tokenizer, rows, steps: int = 80) -> None:
    """A few optimizer steps, so the logits have margins (int8 is judged on labels)."""
    import torch

    import inspect

    accepted = inspect.signature(model.forward).parameters
    label_id = {y: i for i, y in enumerate(LABELS)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=g).tolist()
        batch = tokenizer([rows[i][0] for i in idx], padding=True, truncation=True, max_length=32, return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in accepted}
        loss = model(**batch, labels=torch.tensor([label_id[rows[i][1]] for i in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def make_checkpoint(path: Path, arch: str = "bert", steps: int = 80, vocab_size: int | None = None, tokenizer=None, seed: int = 0) -> Path:
    """A complete checkpoint as `ferry finetune` writes it: model, tokenizer, ferry.json, held-out, validation and calibration data."""
    from ferry.files import atomic_dir
    from finetune.checkpoint import write_checkpoint
    from finetune.data import Examples

    if tokenizer is None:
        tokenizer = roberta_tokenizer(path.parent / f"{path.name}-bpe") if arch == "roberta" else tiny.tokenizer()
    model = build_model(arch, tokenizer, vocab_size, seed)
    rows = tiny.texts(30, seed=11)
    if steps:
        train(model, tokenizer, rows, steps)
    held, cal, val = tiny.texts(12, seed=12), tiny.texts(10, seed=13), tiny.texts(8, seed=14)
    heldout = Examples([t for t, _ in held], [y for _, y in held])
    calibration = Examples([t for t, _ in cal], [y for _, y in cal])
    validation = Examples([t for t, _ in val], [y for _, y in val])
    with atomic_dir(path, overwrite=True) as staging:
        write_checkpoint(staging, model, tokenizer, {"settings": {"max_length": 64}, "labels": LABELS}, heldout, calibration, validation)
    return path


def member_probs(ckpt: Path, texts: list[str]) -> "np.ndarray":
    """A member's softmax probabilities, straight from transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask") or model.config.model_type == "bert"}
    with torch.inference_mode():
        return torch.softmax(model(**enc).logits, -1).numpy()


def manifest(path: Path) -> dict:
    return json.loads((path / "ferry.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bert") / "ckpt", "bert")


@pytest.fixture(scope="session")
def distilbert_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("distilbert") / "ckpt", "distilbert")


@pytest.fixture(scope="session")
def roberta_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("roberta") / "ckpt", "roberta")


@pytest.fixture(scope="session")
def bert_artifact(tmp_path_factory, bert_ckpt) -> Path:
    """All four variants of the tiny BERT, exported once (the export must succeed)."""
    out = tmp_path_factory.mktemp("bert-art") / "artifact"
    rc = main(["export", str(bert_ckpt), "--output", str(out), "--variants", "fp32,int8,int8-static,fp16", *FAST])
    assert rc == 0
    return out
