import os

import pytest

from tests import tiny

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT base model directory with its tokenizer."""
    return tiny.base_model(tmp_path_factory.mktemp("tiny-bert") / "model", "bert")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A learnable 3-class CSV of 60 rows."""
    return tiny.write_csv(tmp_path_factory.mktemp("data") / "train.csv", tiny.texts(20))
