"""The one builder of tiny models and checkpoints for the tests (nothing is downloaded).

Tests take the shared ones as session fixtures (tests/conftest.py: ``tiny_bert``, ``bert_ckpt``,
``distilbert_ckpt``, ``roberta_ckpt``, ``resnet_ckpt``, ``vit_ckpt``) and call these functions
only for a model of their own: another seed, an untrained or mismatched one, a plain
Hugging Face directory. The data they learn from is tests/tiny.py's.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from ferry.tasks import IMAGE_TASK, TEXT_TASK
from tests import tiny

MAX_LENGTH = 64  # a text checkpoint's max_length
IMAGE_SIZE = 32  # the square side the tiny image checkpoints are trained at
IMAGE_FINETUNE = ["--task", IMAGE_TASK, "--epochs", "3", "--batch-size", "8", "--learning-rate", "1e-2",
                  "--image-size", str(IMAGE_SIZE), "--calibration-samples", "6", "--patience", "0", "--freeze", "none",
                  "--quiet"]


# --- tokenizers -----------------------------------------------------------------------------------

def tokenizer():
    """A WordPiece tokenizer over the committed tiny vocabulary (BERT's and DistilBERT's kind)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(tiny.VOCAB), do_lower_case=True, model_max_length=MAX_LENGTH)


def roberta_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained on the tiny texts (RoBERTa's kind); its files go to ``directory``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [t for t, _ in tiny.texts(40, seed=5)] + [" ".join(tiny.FILLER)] + [" ".join(w) for w in tiny.TOPICS.values()]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return RobertaTokenizerFast(
        vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"), model_max_length=MAX_LENGTH
    )


# --- text models --------------------------------------------------------------------------------

def text_config(arch: str, vocab_size: int, **extra):
    """The tiny configuration of ``arch`` (bert, distilbert or roberta): 2 layers, 32 wide, 2 heads."""
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if arch == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, **extra)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=128, **extra)
    if arch == "roberta":
        return RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
                             bos_token_id=0, eos_token_id=2, **extra)
    raise ValueError(arch)


def base_model(path: Path, arch: str = "bert", seed: int = 0) -> Path:
    """Write a tiny random base model (no classification head) and its tokenizer to ``path``: what
    `ferry finetune --model` starts from."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    tok = tokenizer()
    model = AutoModel.from_config(text_config(arch, tok.vocab_size))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def text_model(arch: str, tok, vocab_size: int | None = None, seed: int = 0):
    """A tiny random sequence classifier over tiny.LABELS; its embedding table has ``vocab_size``
    rows (default: the tokenizer's vocabulary)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    labels = {"id2label": dict(enumerate(tiny.LABELS)), "label2id": {y: i for i, y in enumerate(tiny.LABELS)}}
    return AutoModelForSequenceClassification.from_config(text_config(arch, vocab_size or len(tok), **labels))


def train(model, tok, rows: list[tuple[str, str]], steps: int) -> None:
    """A few optimizer steps on random batches of ``rows``, so the logits have margins: quantized
    variants then agree with fp32 and pass export's gate, and label comparisons are not decided by noise."""
    import torch

    accepted = inspect.signature(model.forward).parameters
    label_id = {y: i for i, y in enumerate(tiny.LABELS)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=g).tolist()
        batch = tok([rows[i][0] for i in idx], padding=True, truncation=True, max_length=32, return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in accepted}
        loss = model(**batch, labels=torch.tensor([label_id[rows[i][1]] for i in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def text_checkpoint(path: Path, arch: str = "bert", steps: int = 80, seed: int = 0, vocab_size: int | None = None,
                    tok=None) -> Path:
    """A complete text checkpoint as `ferry finetune` writes it (model, tokenizer, ferry.json, held-out,
    calibration and validation texts): a tiny ``arch`` classifier trained for ``steps`` steps on
    tiny.texts(), or random with ``steps=0``. ``tok`` defaults to the architecture's tiny tokenizer."""
    import torch

    from ferry.files import atomic_dir
    from finetune.checkpoint import write_checkpoint
    from finetune.data import Examples

    if tok is None:
        tok = roberta_tokenizer(path.parent / f"{path.name}-bpe") if arch == "roberta" else tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads, and spinning ones crawl on a busy CPU
    try:
        model = text_model(arch, tok, vocab_size, seed)
        if steps:
            train(model, tok, tiny.texts(30, seed=11), steps)
    finally:
        torch.set_num_threads(threads)
    heldout, calibration, validation = (Examples([t for t, _ in rows], [y for _, y in rows])
                                        for rows in (tiny.texts(12, seed=12), tiny.texts(10, seed=13), tiny.texts(8, seed=14)))
    manifest = {
        "task": TEXT_TASK,
        "labels": tiny.LABELS,
        "settings": {"max_length": MAX_LENGTH, "seed": seed, "steps": steps},
    }
    with atomic_dir(path, overwrite=True) as staging:
        write_checkpoint(staging, model, tok, manifest, heldout, calibration, validation)
    return path


def member_probs(ckpt: Path, texts: list[str]):
    """A text checkpoint's softmax probabilities on ``texts`` (texts x labels), straight from transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask") or model.config.model_type == "bert"}
    with torch.inference_mode():
        return torch.softmax(model(**enc).logits, -1).numpy()


# --- image models -------------------------------------------------------------------------------

def effnet_config():
    """A tiny EfficientNet-Lite configuration (3 stages, 8 to 16 channels, 5 labels) at IMAGE_SIZE."""
    from finetune.efficientnet_lite import EfficientNetLiteConfig

    return EfficientNetLiteConfig(
        image_size=IMAGE_SIZE, stem_channels=8, head_channels=32, channels=(8, 12, 16), repeats=(1, 2, 1),
        kernels=(3, 5, 3), strides=(1, 2, 2), expand_ratios=(1, 2, 2), num_labels=5)


def image_model(path: Path, arch: str = "effnet", seed: int = 0) -> Path:
    """Write a tiny random image-classification base model (resnet, vit or effnet) for IMAGE_SIZE to ``path``."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    from finetune.efficientnet_lite import EfficientNetLiteForImageClassification

    torch.manual_seed(seed)
    if arch == "resnet":
        model = ResNetForImageClassification(ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5))
    elif arch == "vit":
        model = ViTForImageClassification(ViTConfig(
            image_size=IMAGE_SIZE, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, num_labels=5))
    elif arch == "effnet":
        model = EfficientNetLiteForImageClassification(effnet_config())
    else:
        raise ValueError(arch)
    model.save_pretrained(path, safe_serialization=True)
    return path


def image_checkpoint(path: Path, arch: str) -> Path:
    """The real `ferry finetune --task image-classification` of a tiny ``arch`` (resnet: the tiny CNN;
    vit) on tiny.image_folder() images, at IMAGE_SIZE; base model and images go beside ``path``."""
    from ferry.cli import main

    base = image_model(path.parent / f"{path.name}-base", arch)
    data = tiny.image_folder(path.parent / f"{path.name}-data", per_class=12)
    rc = main(["finetune", "--model", str(base), "--train", str(data), "--output", str(path), *IMAGE_FINETUNE])
    assert rc == 0, "ferry finetune failed on the tiny image data"
    return path
