"""The data that weight quantizers which calibrate (AWQ) are fitted on.

Calibration text is local and shares nothing with what is evaluated: the docstrings of a few
standard-library modules (`CALIBRATION_MODULES`), which overlap neither the task generators'
prompts nor the perplexity text (`pydoc_data.topics`, the language reference). Calibrating on
evaluation prompts would let AWQ fit the very facts it is then scored on. The text's source (with
the Python version, whose release its docstrings are) and its token ids enter the weight-cache
key (`weights.quantize`), so a change to either quantizes afresh.
"""

from __future__ import annotations

import importlib
import inspect
import platform

import torch

from kvpareto.weights.quantize import Calibration

CALIBRATION_SEQS = 8
CALIBRATION_TOKENS = 256
# English prose with a little code, about 3.6k SmolLM2 tokens together, of which 2048 are used.
CALIBRATION_MODULES = ("argparse", "collections", "json", "itertools", "re")


def calibration(tokenizer) -> Calibration:
    """The calibration set for `tokenizer`: what `weights.quantize.quantized_model` takes."""
    return Calibration(source=calibration_source(), ids=calibration_ids(tokenizer))


def calibration_source() -> str:
    """What the calibration text is, for cache keys: its modules and the Python they ship with."""
    return f"CPython {platform.python_version()} docstrings of {', '.join(CALIBRATION_MODULES)}"


def calibration_ids(tokenizer) -> torch.Tensor:
    """[CALIBRATION_SEQS, CALIBRATION_TOKENS] token ids of `CALIBRATION_MODULES`' docstrings."""
    text = "\n\n".join(inspect.getdoc(importlib.import_module(m)) for m in CALIBRATION_MODULES)
    stream = tokenizer.encode(text, add_special_tokens=False)
    need = CALIBRATION_SEQS * CALIBRATION_TOKENS
    if len(stream) < need:
        raise ValueError(f"calibration text has {len(stream)} tokens, fewer than {need}")
    return torch.tensor(stream[:need]).reshape(CALIBRATION_SEQS, CALIBRATION_TOKENS)
