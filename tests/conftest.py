"""Shared fixtures. Tests run offline, on the CPU, on the embedded default."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from utils.assets import load_tokenizer

    return load_tokenizer(None)
