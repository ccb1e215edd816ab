"""Session fixtures shared by every test directory: tiny data, a tiny base model and the tiny
checkpoints of tests/fixtures.py, each built once. Tests that change a checkpoint copy it first."""

import os

import pytest

from tests import fixtures, tiny

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT base model directory with its tokenizer."""
    return fixtures.base_model(tmp_path_factory.mktemp("tiny-bert") / "model", "bert")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A learnable 3-class CSV of 60 rows."""
    return tiny.write_csv(tmp_path_factory.mktemp("data") / "train.csv", tiny.texts(20))


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory):
    """A tiny BERT classifier trained for a few steps, as a complete checkpoint."""
    return fixtures.text_checkpoint(tmp_path_factory.mktemp("bert") / "ckpt", "bert")


@pytest.fixture(scope="session")
def distilbert_ckpt(tmp_path_factory):
    return fixtures.text_checkpoint(tmp_path_factory.mktemp("distilbert") / "ckpt", "distilbert")


@pytest.fixture(scope="session")
def roberta_ckpt(tmp_path_factory):
    return fixtures.text_checkpoint(tmp_path_factory.mktemp("roberta") / "ckpt", "roberta")


@pytest.fixture(scope="session")
def resnet_ckpt(tmp_path_factory):
    """A tiny ResNet fine-tuned by `ferry finetune` on tiny images."""
    return fixtures.image_checkpoint(tmp_path_factory.mktemp("resnet") / "ckpt", "resnet")


@pytest.fixture(scope="session")
def vit_ckpt(tmp_path_factory):
    """A tiny ViT fine-tuned by `ferry finetune` on tiny images."""
    return fixtures.image_checkpoint(tmp_path_factory.mktemp("vit") / "ckpt", "vit")
