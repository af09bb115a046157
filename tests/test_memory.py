"""Memory accounting: every part measured and modeled, and the two agree."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.kv import make_cache
from kvpareto.memory.measure import (
    measure_phases,
    measure_prefill,
    weights_bytes_measured,
    weights_bytes_modeled,
)
from kvpareto.memory.model import modeled_activation_peak
from tests.conftest import TINY

# One tolerance for every modeled-vs-measured point (the grid below, packed weights, one KV
# head): the widest gap is int8 packed weights' dequantization, 20% above the model (see
# test_packed_weight_temporaries_are_measured_and_modeled); the grid itself stays within 7%.
GRID_TOLERANCE = 0.25


def _ids(n, vocab=40000):
    return torch.randint(100, vocab, (1, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("chunk", [0, 512])
def test_smollm2_activation_peak_measured_agrees_with_modeled(smollm2, length, chunk):
    cfg = Config(k_bits=4, v_bits=4, chunk_size=chunk)
    measured, kv = measure_prefill(smollm2.model, _ids(length), cfg)
    modeled = modeled_activation_peak(smollm2.model.config, cfg, length, torch.bfloat16)
    assert abs(modeled - measured) <= 0.10 * measured, (measured, modeled)
    cache = make_cache(smollm2.model, cfg, torch.bfloat16)
    assert kv == cache.modeled_nbytes(length)


def test_chunked_prefill_shrinks_the_measured_activation_peak(smollm2):
    full, _ = measure_prefill(smollm2.model, _ids(2048), Config())
    chunked, _ = measure_prefill(smollm2.model, _ids(2048), Config(chunk_size=256))
    assert chunked < 0.5 * full


@pytest.mark.parametrize(
    "embed",
    [
        "none",
        pytest.param("int8", marks=pytest.mark.slow),
        pytest.param("int4", marks=pytest.mark.slow),
    ],
)
def test_weights_bytes_count_tied_embeddings_once(smollm2, embed):
    """SmolLM2's tied 49152 x 576 table, held once: in bf16, or packed (int8: a byte a value and
    a bf16 scale per row; int4: half a byte a value and a 2-byte scale and zero per 32)."""
    from kvpareto.weights.quantize import quantized_model

    assert smollm2.model.config.tie_word_embeddings
    model = quantized_model(smollm2, Config(embed_weights=embed)).model
    assert weights_bytes_measured(model) == weights_bytes_modeled(model)
    buffers = sum(b.nbytes for b in model.model.rotary_emb.buffers())  # the inv_freq tables
    values = 49152 * 576
    table = {"none": values * 2, "int8": values + 49152 * 2, "int4": values // 2 + values // 8}
    bf16_rest = (134_515_008 - values) * 2
    assert weights_bytes_measured(model) == bf16_rest + table[embed] + buffers


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_memory_figures(tiny_models, name, record_property):
    model = tiny_models[name].model
    cfg = Config(k_bits=4, v_bits=2, chunk_size=64)
    measured, kv = measure_prefill(model, _ids(256, vocab=259), cfg)
    modeled = modeled_activation_peak(model.config, cfg, 256, torch.bfloat16)
    record_property("activation_measured", measured)
    record_property("activation_modeled", modeled)
    record_property("kv_bytes", kv)
    assert kv == make_cache(model, cfg, torch.bfloat16).modeled_nbytes(256)
    assert measured > 0 and modeled > 0


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_packed_weight_temporaries_are_measured_and_modeled(smollm2, weights):
    """Packed weights are dequantized one layer at a time on the prefill path this machine's probe
    picks; with small chunks that temporary (down_proj: 0.9 M weights) sets the activation peak,
    and the model must say so, within the grid's one tolerance. Measured at 512 tokens, chunk 32,
    allocator level, decode step included, with a fresh probe (prefill: dequantize for both):
    unquantized 2.02 MB; int4 3.02 MB; int8 2.46 MB against 2.05 MB modeled (the model counts one
    full-size temporary for int8's dequantization; the 0.4 MB more is not yet explained). On a
    Xeon with AMX, where bf16 SDPA also packs K and V, the unquantized peak is 2.13 MB and int8's
    2.38 MB: its temporary still sets the peak, by 0.25 MB rather than 0.44 MB."""
    from kvpareto.weights.quantize import quantized_model

    cfg = Config(weights=weights, k_bits=4, v_bits=4, chunk_size=32)
    model = quantized_model(smollm2, cfg).model
    measured, _ = measure_prefill(model, _ids(512), cfg)
    unquantized, _ = measure_prefill(
        smollm2.model, _ids(512), Config(k_bits=4, v_bits=4, chunk_size=32)
    )
    modeled = modeled_activation_peak(model.config, cfg, 512, torch.bfloat16)
    # The probe times the paths, so a busy machine may pick a kernel path, which leaves no
    # dequantized temporary: the temporary is required only where the dequantize path runs.
    from kvpareto.memory.model import widest_linear_path

    if widest_linear_path(model.config, cfg, 32, torch.bfloat16) == "dequantize":
        assert measured > unquantized + (2**19 if weights == "int4" else 0)
    assert abs(modeled - measured) <= GRID_TOLERANCE * modeled, (measured, modeled)


@pytest.mark.parametrize(
    "config",
    [Config(embed_weights="int8"), Config(embed_weights="int4", k_bits=4, v_bits=4, chunk_size=32)],
    ids=lambda c: c.label(),
)
@pytest.mark.parametrize("name", TINY)
def test_packed_embedding_activation_peak_agrees_with_modeled(tiny_models, name, config):
    from kvpareto.weights.quantize import quantized_model

    model = quantized_model(tiny_models[name], config).model
    measured, _ = measure_prefill(model, _ids(512, vocab=259), config)
    modeled = modeled_activation_peak(model.config, config, 512, torch.bfloat16)
    assert abs(measured - modeled) <= GRID_TOLERANCE * modeled, (measured, modeled)


GRID = [
    Config(),
    Config(chunk_size=128),
    Config(k_bits=4, v_bits=4),
    Config(k_bits=4, v_bits=4, chunk_size=128),
    Config(k_bits=2, v_bits=2, k_granularity="per-channel", residual_length=32, chunk_size=64),
    Config(k_bits=4, v_bits=2, rotation="hadamard", k_smooth=True),
    Config(k_bits=4, v_bits=4, rotation="hadamard", k_smooth=True, chunk_size=128),
    Config(k_bits=4, v_bits=4, prune_rate=0.5, chunk_size=128),
    Config(k_bits=2, v_bits=4, v_granularity="per-block", prune_rate=0.5),
]


@pytest.mark.parametrize("config", GRID, ids=lambda c: c.label())
@pytest.mark.parametrize("name", TINY)
def test_activation_peak_measured_agrees_with_modeled_over_the_grid(
    tiny_models, name, config, record_property
):
    model = tiny_models[name].model
    measured, _ = measure_prefill(model, _ids(512, vocab=259), config)
    modeled = modeled_activation_peak(model.config, config, 512, torch.bfloat16)
    record_property("measured_over_modeled", measured / modeled)
    assert abs(measured - modeled) <= GRID_TOLERANCE * modeled, (measured, modeled)


@pytest.mark.slow
@pytest.mark.parametrize(
    "length,config",
    [(2048, Config(k_bits=4, v_bits=4, chunk_size=1024)), (1024, GRID[6]), (1024, GRID[7])],
    ids=lambda v: v.label() if isinstance(v, Config) else str(v),
)
def test_smollm2_activation_peak_counts_sdpa_mask_conversion(smollm2, length, config):
    """SDPA turns the bool mask into a float one inside one op (aten::where); an op-output hook
    missed it: at 2048 tokens, chunk 1024, k4v4, 31.38 MB where the allocator saw 34.49 MB."""
    measured, _ = measure_prefill(smollm2.model, _ids(length), config)
    modeled = modeled_activation_peak(smollm2.model.config, config, length, torch.bfloat16)
    assert abs(measured - modeled) <= GRID_TOLERANCE * modeled, (measured, modeled)


@pytest.fixture(scope="module")
def tiny_gemma3_one_kv_head():
    """Tiny Gemma3 with Gemma3-270M's attention shape: 4 query heads over one KV head of
    head_dim 256, run as `load_model` runs it (the "kvpareto" attention)."""
    from kvpareto.kernels import fused_decode
    from kvpareto.models.tiny import build_tiny

    model, _, _ = build_tiny("gemma3", torch.bfloat16, num_key_value_heads=1, head_dim=256)
    fused_decode.install(model)
    return model


@pytest.mark.parametrize(
    "config",
    [
        Config(k_bits=4, v_bits=4, chunk_size=128),
        Config(chunk_size=128),
        Config(k_bits=4, v_bits=4),
    ],
    ids=lambda c: c.label(),
)
def test_activation_peak_with_one_kv_head_agrees_with_modeled(tiny_gemma3_one_kv_head, config):
    """With one KV head, transformers' repeat_kv under a mask is a view, not a copy: the model
    counted a copy of k and v for every query head, 2.1x the measured peak on Gemma3-270M at
    2048 tokens, chunk 256, k4v4 (14.94 MiB modeled, 7.13 MiB measured)."""
    model = tiny_gemma3_one_kv_head
    measured, _ = measure_prefill(model, _ids(1024, vocab=259), config)
    modeled = modeled_activation_peak(model.config, config, 1024, torch.bfloat16)
    assert abs(measured - modeled) <= GRID_TOLERANCE * modeled, (measured, modeled)


@pytest.mark.parametrize("config", [Config(), Config(k_bits=4, v_bits=4)], ids=lambda c: c.label())
def test_a_decode_step_is_measured_apart_from_the_prefill(tiny_models, config):
    """Each phase on its own allocator timeline: the decode step's peak is what each generated
    token needs (a fused step reads the packed history in place), well below the prefill's."""
    model = tiny_models["tiny-llama"].model
    ids = _ids(512, vocab=259)
    prefill_peak, step_peak = measure_phases(model, ids, config)
    together, _ = measure_prefill(model, ids, config)
    assert 0 < step_peak < prefill_peak <= together
