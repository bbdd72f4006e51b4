"""Tiny HF model directories shared by the tests in this folder (built once per session)."""
from __future__ import annotations

import pytest

from hf_fixtures import save_tiny_gpt2, save_tiny_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def hf_dir(request, llama_dir, gpt2_dir):
    """Each test using it runs for both architectures."""
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]
