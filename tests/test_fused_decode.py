"""Fused decode attention over the packed KV cache: equal to the reference path, and optional.

The reference is the same cache with fusing off: it dequantizes the history in the compute dtype
and runs SDPA. Each decode step starts both paths from one cache state (a copy), so what is
compared is one step's arithmetic, not two histories that drift apart by a code flipped here and
there. Tolerances: in fp32 both paths compute in fp32 and differ only in summation order, so
logits agree to 1e-5. In bf16 the reference rounds every dequantized K/V value, the scores and
the output to bf16 (8 significant bits) where the kernel accumulates in fp32: logits of about 1
then differ by a few bf16 ulps, and 2e-2 (5 ulps at 1.0) bounds what was seen (at most 1.2e-2).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.hf_compat import with_cache
from kvpareto.kernels import build, decode_linear, fused_decode
from kvpareto.kv.static import QuantizedKVCache
from kvpareto.models import load_model
from tests.conftest import TINY

SCHEMES = [
    Config(k_bits=4, v_bits=4),
    Config(k_bits=2, v_bits=8, residual_length=5),
    Config(k_bits=8, v_bits=2, k_granularity="per-channel", residual_length=16),
    Config(k_bits=4, v_bits=4, symmetric=True, group_size=64),
    Config(k_bits=4, v_bits=4, k_smooth=True, rotation="hadamard", residual_length=3),
    Config(k_bits=2, v_bits=4, k_granularity="per-channel", k_smooth=True, rotation="hadamard"),
    Config(k_bits=16, v_bits=16),  # all tail: DynamicCache's values, read in place
    Config(k_bits=16, v_bits=4, residual_length=7),
    Config(k_bits=4, v_bits=16, k_granularity="per-channel", rotation="hadamard"),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def kernel():
    if build.kernel() is None:
        pytest.skip("no C++ compiler: the fused kernel could not be built")


@pytest.fixture(scope="module")
def fp32_models():
    return {name: load_model(name, dtype=torch.float32).model for name in TINY}


def _ids(n, seed):
    return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference(cache: QuantizedKVCache) -> QuantizedKVCache:
    ref = copy.deepcopy(cache)
    for layer in ref.layers:
        layer.fused = False
    return ref


def _worst_step_gap(model, cache, steps: int = 24) -> float:
    """Prefill 100 tokens (past the residual window and Gemma3's 32-token window), then decode
    `steps` tokens; the largest logit gap between the fused step and the reference step."""
    model(_ids(100, 0), **with_cache(cache))
    worst = 0.0
    for token in _ids(steps, 1)[0]:
        ref = model(token.view(1, 1), **with_cache(_reference(cache))).logits.float()
        fused = model(token.view(1, 1), **with_cache(cache)).logits.float()
        worst = max(worst, (fused - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.label())
def test_fused_decode_equals_the_reference_path_in_fp32(kernel, fp32_models, name, cfg):
    model = fp32_models[name]
    cache = QuantizedKVCache(model.config, cfg, torch.float32, fused=True)
    assert _worst_step_gap(model, cache) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.label())
def test_fused_decode_equals_the_reference_path_in_bf16(kernel, tiny_models, name, cfg):
    model = tiny_models[name].model
    cache = QuantizedKVCache(model.config, cfg, torch.bfloat16, fused=True)
    assert _worst_step_gap(model, cache) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("cfg", [Config(), Config(k_bits=4, v_bits=2)], ids=lambda c: c.label())
def test_fused_decode_over_a_pruned_cache_equals_the_reference_path(
    kernel, tiny_models, cfg, monkeypatch
):
    # Pruning keeps fewer rows than tokens written: the kernel must read the kept rows (and
    # count the new token after them) exactly as the reference path's mask does.
    model = tiny_models["tiny-llama"].model
    calls = []
    attend = fused_decode.attend
    monkeypatch.setattr(fused_decode, "attend", lambda *a: calls.append(1) or attend(*a))
    cfg = replace(cfg, prune_rate=0.5, prune_scorer="snapkv", chunk_size=32)
    cache = QuantizedKVCache(model.config, cfg, torch.bfloat16, prompt_length=100, fused=True)
    prefill(model, _ids(100, 0), cache, cfg.chunk_size)
    assert cache.layers[0].k.kept < 100
    worst = 0.0
    for token in _ids(8, 1)[0]:
        ref = model(token.view(1, 1), **with_cache(_reference(cache))).logits.float()
        fused = model(token.view(1, 1), **with_cache(cache)).logits.float()
        worst = max(worst, (fused - ref).abs().max().item())
    assert len(calls) == 8 * len(cache.layers)
    assert worst <= TOLERANCE[torch.bfloat16]


def test_decode_steps_run_the_kernel_and_prefill_does_not(kernel, tiny_models, monkeypatch):
    model = tiny_models["tiny-gemma3"].model
    calls = []
    attend = fused_decode.attend
    monkeypatch.setattr(fused_decode, "attend", lambda *a: calls.append(1) or attend(*a))
    cache = QuantizedKVCache(model.config, Config(k_bits=4, v_bits=4), torch.bfloat16, fused=True)
    model(_ids(40, 0), **with_cache(cache))
    assert not calls
    model(_ids(1, 1), **with_cache(cache))
    assert len(calls) == len(cache.layers)


def test_fused_steps_store_what_the_reference_stores(kernel, tiny_models):
    model = tiny_models["tiny-llama"].model
    cfg = Config(k_bits=2, v_bits=4, k_granularity="per-channel", residual_length=8)
    fused = QuantizedKVCache(model.config, cfg, torch.bfloat16, fused=True)
    ref = QuantizedKVCache(model.config, cfg, torch.bfloat16, fused=False)
    for cache in (fused, ref):
        model(_ids(50, 0), **with_cache(cache))
        for token in _ids(40, 1)[0]:
            model(token.view(1, 1), **with_cache(cache))
    assert fused.nbytes() == ref.nbytes() == fused.modeled_nbytes(90)
    assert fused.peak_nbytes == ref.peak_nbytes
    for a, b in zip(fused.layers, ref.layers, strict=True):
        assert (a.k.kept, a.k.n_q, a.v.n_q) == (b.k.kept, b.k.n_q, b.v.n_q)


def test_schemes_the_kernel_does_not_read_keep_the_reference_path(tiny_models):
    model = tiny_models["tiny-llama"].model
    for cfg in (
        Config(k_bits=4, v_bits=4, k_granularity="per-block"),
        Config(k_bits=4, v_bits=4, v_granularity="per-channel"),
        Config(k_bits=4, v_bits=4, k_granularity="per-tensor"),
    ):
        cache = QuantizedKVCache(model.config, cfg, torch.bfloat16, fused=True)
        assert not any(layer.fused for layer in cache.layers)


def test_without_a_compiler_decode_falls_back_after_one_notice(tiny_models, monkeypatch, capsys):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    build.kernel.cache_clear()
    decode_linear.kernel_faster.cache_clear()  # decided once per process, with the kernel there
    try:
        model = tiny_models["tiny-llama"].model
        cache = QuantizedKVCache(model.config, Config(k_bits=4, v_bits=4), torch.bfloat16)
        QuantizedKVCache(model.config, Config(k_bits=4, v_bits=4), torch.bfloat16)
        model(_ids(20, 0), **with_cache(cache))
        model(_ids(1, 1), **with_cache(cache))
        notices = capsys.readouterr().err.count("compiled kernels unavailable")
    finally:
        build.kernel.cache_clear()
        decode_linear.kernel_faster.cache_clear()
    assert notices == 1
    assert not any(layer.fused for layer in cache.layers)
