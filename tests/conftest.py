"""Shared fixtures. Models are built once per session in the git-ignored cache folder."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from nasrt.fixtures import smollm2_dir, write_synthetic


def pytest_collection_modifyitems(config, items):
    """Tests that need a GPU or TensorRT-LLM are reported as NOT RUN (skipped with that word), never passed."""
    has_gpu = torch.cuda.is_available()
    has_trtllm = importlib.util.find_spec("tensorrt_llm") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="NOT RUN: needs a CUDA GPU"))
        if "trtllm" in item.keywords and not has_trtllm:
            item.add_marker(pytest.mark.skip(reason="NOT RUN: needs TensorRT-LLM 1.2 (NVIDIA index or container)"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """HF safetensors checkpoint + tokenizer of the real SmolLM2-135M-Instruct."""
    return smollm2_dir()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """Synthetic HF DeciLM with every layer variant (8 layers, sharded with an index)."""
    return write_synthetic(tmp_path_factory.mktemp("synthetic") / "hf", "all-variants")


@pytest.fixture()
def synthetic_copy(synthetic, tmp_path) -> Path:
    """A private copy of the synthetic model that a test may damage."""
    dst = tmp_path / "hf"
    shutil.copytree(synthetic, dst)
    return dst


@pytest.fixture()
def no_trtllm(monkeypatch):
    """Make TensorRT-LLM absent even on a machine that has it."""
    import nasrt.deploy.engine

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(nasrt.deploy.engine.importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "tensorrt_llm" else real_find_spec(name, *a))
    monkeypatch.setattr(nasrt.deploy.engine.shutil, "which", lambda name, *a: None)
