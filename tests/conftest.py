"""Shared fixtures: models are loaded once per session (SmolLM2 conversion is cached on disk)."""

from __future__ import annotations

import os
import sys

# As `kvpareto` sets at its entry (cli.main): no hub at run time, set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from kvpareto.models import load_model

TINY = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma3"]
# The command line as a user runs it, in a fresh process (exit codes and stderr are real).
CLI = [sys.executable, "-m", "kvpareto.cli"]


@pytest.fixture(scope="session", autouse=True)
def _no_grad():
    torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def tiny_models():
    return {name: load_model(name, dtype=torch.bfloat16) for name in TINY}
