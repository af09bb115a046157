"""Contracts that every implementation of a kind keeps, written once and run over all of them
(as Optuna's storage test suites are): tests/test_contracts.py runs them.

- Bytes: for every registered KV scheme, and for pruning with every registered scorer, the bytes
  a cache holds equal the closed form to the byte, after a prefill of any length and chunking and
  after each decode step, and the most it held during the prefill equals the modeled peak.
- Forks: for every registered KV scheme, and for pruning, a fork of a prefilled cache
  (`KVCache.fork`) continues exactly as the cache itself would, and feeding it leaves the cache
  as it was.
- Registries: a name registered twice is refused, an unknown name is a `UserError` that lists
  every known name, and `names()` is everything that `get` finds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.errors import UserError
from kvpareto.hf_compat import with_cache
from kvpareto.kv import make_cache
from kvpareto.kv.pruning import SCORERS
from kvpareto.registry import Registry

# Static configurations that exercise every storage rule: bits, granularities, residual windows,
# symmetric tiles, smoothing and rotation, per-layer bits.
STATIC_GRID = [
    Config(),
    Config(k_bits=8, v_bits=8),
    Config(k_bits=4, v_bits=2, residual_length=32),
    Config(k_bits=2, v_bits=2, k_granularity="per-channel", residual_length=32),
    Config(
        k_bits=4, v_bits=4, k_granularity="per-block", v_granularity="per-tensor", group_size=64
    ),
    Config(k_bits=2, v_bits=4, symmetric=True, group_size=128, residual_length=5),
    Config(k_bits=4, v_bits=8, k_smooth=True, rotation="hadamard"),
    Config.from_dict({"k_bits": 4, "v_bits": 4, "layer_bits": {0: {"k_bits": 16, "v_bits": 2}}}),
]

# The static configurations that pruning is checked under (tests/test_pruning.py too): the
# static grid with the 8/8 case swapped for two plainer low-bit ones.
PRUNE_GRID = [
    STATIC_GRID[0],
    Config(k_bits=4, v_bits=2),
    Config(k_bits=8, v_bits=4, symmetric=True, group_size=64),
    *STATIC_GRID[3:],
]

ADAPTIVE_GRID = [
    Config(kv_scheme="adaptive", target_mean_bits=3.0),
    Config(kv_scheme="adaptive", target_mean_bits=6.5, symmetric=True, group_size=64),
    Config(kv_scheme="rule", target_mean_bits=4.0),
    Config(kv_scheme="rule", target_mean_bits=12.0),
]


@dataclass(frozen=True)
class BytesCase:
    """One model and config, prefilled at each length with each chunk size, then decoded."""

    model: str
    config: Config
    lengths: tuple[int, ...] = (1, 31, 100, 257)
    chunks: tuple[int, ...] = (0, 24)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.config.label()}"


def _pruned(config: Config, scorer: str = "knorm") -> Config:
    return replace(config, prune_rate=0.5, prune_scorer=scorer)


# A prompt of 300 tokens pruned by half, unchunked and in chunks of 50, against the same unpruned.
_PRUNING = dict(lengths=(300,), chunks=(0, 50))

BYTES_CASES = (
    [BytesCase(m, c) for m in ("tiny-llama", "tiny-gemma3") for c in STATIC_GRID]
    + [BytesCase("tiny-llama", c) for c in ADAPTIVE_GRID]
    + [
        BytesCase(m, p, **_PRUNING)
        for m in ("tiny-llama", "tiny-gemma3")
        for c in PRUNE_GRID
        for p in (c, _pruned(c))
    ]
    + [
        BytesCase("tiny-llama", _pruned(Config(k_bits=4, v_bits=4, group_size=64), s), **_PRUNING)
        for s in SCORERS.names()
    ]
)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(seed))


def check_measured_bytes_equal_modeled(model, case: BytesCase, decode_steps: int = 3) -> None:
    for length in case.lengths:
        for chunk in case.chunks:
            config = replace(case.config, chunk_size=chunk)
            at = (length, chunk)
            with make_cache(model, config, torch.bfloat16, prompt_length=length) as cache:
                prefill(model, _ids(length), cache, chunk)
                assert cache.nbytes() == cache.modeled_nbytes(length), at
                assert cache.peak_nbytes == cache.modeled_peak_nbytes(), at
                # Decoding keeps them equal token by token.
                for step in range(decode_steps):
                    model(_ids(1, seed=step), **with_cache(cache))
                    assert cache.nbytes() == cache.modeled_nbytes(length + step + 1), at


# One configuration per scheme, and pruning, on a model with global and one with sliding layers.
FORK_CASES = [
    ("tiny-llama", STATIC_GRID[2]),
    ("tiny-gemma3", STATIC_GRID[2]),
    ("tiny-llama", ADAPTIVE_GRID[0]),
    ("tiny-llama", ADAPTIVE_GRID[2]),
    ("tiny-llama", _pruned(PRUNE_GRID[1], "snapkv")),
]


def check_a_fork_continues_as_the_cache_and_apart_from_it(model, config: Config) -> None:
    length, chunk = 100, 24
    with make_cache(model, config, torch.bfloat16, prompt_length=length) as cache:
        prefill(model, _ids(length), cache, chunk)
        held = cache.nbytes()
        with cache.fork() as fork:
            # Three tokens at once: an adaptive write of several widths needs the fork's hooks.
            forked = model(_ids(3, seed=7), **with_cache(fork)).logits
            assert cache.nbytes() == held and cache.get_seq_length() == length
            assert fork.get_seq_length() == length + 3
            original = model(_ids(3, seed=7), **with_cache(cache)).logits
            assert torch.equal(forked, original)
            assert fork.nbytes() == cache.nbytes()


def schemes_covered() -> set[str]:
    return {case.config.kv_scheme for case in BYTES_CASES}


def scorers_covered() -> set[str]:
    return {c.config.prune_scorer for c in BYTES_CASES if c.config.prune_rate > 0}


def check_registry(registry: Registry) -> None:
    names = registry.names()
    assert names, f"no {registry.kind} is registered"
    assert list(registry) == names and len(registry) == len(names)
    assert all(name in registry for name in names)
    entries = [registry.get(name) for name in names]
    first = names[0]
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(first, entries[0])
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(first)(entries[0])
    assert registry.names() == names and registry.get(first) is entries[0]
    with pytest.raises(UserError) as caught:
        registry.get("no-such-name")
    known = ", ".join(sorted(names))
    assert str(caught.value) == (
        f"unknown {registry.kind} 'no-such-name'; known {registry.plural}: {known}"
    )
    assert "no-such-name" not in registry
