"""Tiny HF model directories shared by the tests in this folder (built once per session)."""
from __future__ import annotations

import pytest

from hf_fixtures import save_tiny_gpt2, save_tiny_llama, save_tiny_qwen2


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="session", params=["llama", "gpt2", "qwen2"])
def hf_dir(request, tmp_path_factory):
    """Each test using it runs for every architecture: Llama (GQA, untied), GPT-2 (tied,
    Conv1D), Qwen2 (GQA and tied, q/k/v biases)."""
    return request.getfixturevalue(f"{request.param}_dir")
