"""Modeled memory of a config at any context length and batch, from a model's config alone.

What `kvpareto project` ranks by. The parts are the closed forms a trial reports as modeled:
- weights: the trial's modeled weight bytes, which no length or batch changes;
- KV: the cache's `modeled_peak_nbytes` for a prompt of the new length, times the batch (each
  sequence holds its own cache);
- activations: `model.modeled_activation_peak` at the new length. That model is written for one
  sequence; each of its terms grows at most linearly with the batch, so the peak at batch 1 times
  the batch bounds it from above.

The cache is built on `shell_model`, the model's modules on the meta device: every scheme can
hook it, and no weight is read or allocated.
"""

from __future__ import annotations

import torch

from kvpareto.config import Config
from kvpareto.kv import make_cache
from kvpareto.memory import MemoryParts
from kvpareto.memory.model import modeled_activation_peak


def shell_model(model_config) -> torch.nn.Module:
    """The model of `model_config` with every tensor on the meta device (no bytes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def modeled_memory(
    shell: torch.nn.Module,
    config: Config,
    length: int,
    weights_bytes: int,
    compute: torch.dtype,
    storage: torch.dtype,
    threads: int,
    batch: int = 1,
    sdpa_packs: bool | None = None,
) -> MemoryParts:
    """The modeled parts of `config` holding a `length`-token prompt for `batch` sequences,
    computing in `compute` on `threads` threads with float parts held in `storage`, on a machine
    whose SDPA packs K/V or not (`sdpa_packs`; default: this machine)."""
    with make_cache(shell, config, storage, prompt_length=length) as cache:
        kv = cache.modeled_peak_nbytes(batch)
    peak = modeled_activation_peak(
        shell.config, config, length, compute, storage, threads, sdpa_packs
    )
    return MemoryParts(weights_bytes, kv, batch * peak)
