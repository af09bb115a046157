"""Compute dtype vs storage dtype: the `auto` rule, and memory that depends on storage alone."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate, prefill
from kvpareto.errors import UserError
from kvpareto.hardware import auto_compute_dtype, resolve_compute_dtype
from kvpareto.kernels import build, decode_linear
from kvpareto.kv import make_cache
from kvpareto.memory.measure import measure_prefill, weights_bytes_measured, weights_bytes_modeled
from kvpareto.memory.model import modeled_activation_peak
from kvpareto.models import load_model
from kvpareto.models.storage_dtype import (
    CastLinear,
    cast_elements,
    compute_dtype,
    compute_in,
    storage_dtype,
)
from kvpareto.weights.quantize import quantized_model
from tests.conftest import TINY

AVX2_EPYC = "fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2"
SAPPHIRE_RAPIDS = AVX2_EPYC + " avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
CONFIGS = [Config(), Config(k_bits=4, v_bits=2, chunk_size=64, residual_length=16)]


def _ids(n, vocab=259):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize(
    "flags,device,expected",
    [
        (AVX2_EPYC, "cpu", "float32"),
        (AVX2_EPYC + " avx512_bf16", "cpu", "bfloat16"),
        (AVX2_EPYC + " amx_bf16", "cpu", "bfloat16"),
        (SAPPHIRE_RAPIDS, "cpu", "bfloat16"),
        ("", "cpu", "float32"),
        (AVX2_EPYC, "cuda", "bfloat16"),
    ],
)
def test_auto_picks_bf16_only_where_it_is_native(flags, device, expected):
    name, reason = auto_compute_dtype(flags, device)
    assert name == expected
    assert reason.startswith("auto:")
    if expected == "bfloat16" and device == "cpu":
        assert "bf16" in reason.split("(")[1]  # names the flag it saw


def test_a_flag_name_inside_another_flag_does_not_count():
    assert auto_compute_dtype("avx512_bf16x avx2")[0] == "float32"


def test_an_explicit_dtype_is_kept_and_auto_resolves_to_a_real_dtype():
    assert resolve_compute_dtype("float32").to_dict() == {
        "compute_dtype": "float32",
        "compute_dtype_requested": "float32",
        "compute_dtype_reason": "set explicitly",
    }
    auto = resolve_compute_dtype("auto")
    assert auto.requested == "auto" and auto.name in ("bfloat16", "float32")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_memory_is_of_the_storage_dtype_whatever_the_compute_dtype(tiny_models, name, config):
    """Weights and KV, measured and modeled, are the same bytes under fp32 and bf16 compute."""
    stored_bf16 = tiny_models[name].model
    fp32 = load_model(name, dtype=torch.float32, storage_dtype=torch.bfloat16).model
    figures = []
    for model in (stored_bf16, fp32):
        _, kv = measure_prefill(model, _ids(256), config)
        modeled_kv = make_cache(model, config, storage_dtype(model)).modeled_nbytes(256)
        assert kv == modeled_kv
        assert weights_bytes_measured(model) == weights_bytes_modeled(model)
        figures.append((kv, weights_bytes_measured(model)))
    assert figures[0] == figures[1]


@pytest.mark.parametrize("name", TINY)
def test_bf16_storage_computes_close_to_fp32_storage_in_fp32(name):
    stored_bf16 = load_model(name, dtype=torch.float32, storage_dtype=torch.bfloat16).model
    stored_fp32 = load_model(name, dtype=torch.float32).model
    config = CONFIGS[1]
    logits = []
    for model in (stored_bf16, stored_fp32):
        cache = make_cache(model, config, storage_dtype(model), prompt_length=256)
        with torch.inference_mode():
            logits.append(prefill(model, _ids(256), cache, config.chunk_size))
    assert logits[0].dtype == torch.float32 and torch.isfinite(logits[0]).all()
    # bf16 keeps 8 bits of mantissa: weights and the KV tail each round by up to 2^-9.
    assert torch.allclose(logits[0], logits[1], atol=0.05, rtol=0.05)


def test_equal_dtypes_install_no_casts(tiny_models):
    model = tiny_models["tiny-llama"].model
    assert compute_dtype(model) == storage_dtype(model) == torch.bfloat16
    assert not any(isinstance(m, CastLinear) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


def test_fp32_compute_holds_every_float_weight_in_storage_dtype():
    model = load_model("tiny-gemma3", dtype=torch.float32, storage_dtype=torch.bfloat16).model
    assert compute_dtype(model) == torch.float32
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == torch.bfloat16 for p in floats)
    assert isinstance(model.get_output_embeddings(), CastLinear)


def test_packed_weights_with_biases_compute_in_fp32_from_bf16_storage():
    """Qwen2 has q/k/v biases: a packed linear's bias is held in storage dtype and cast too."""
    loaded = load_model("tiny-qwen2", dtype=torch.float32, storage_dtype=torch.bfloat16)
    config = Config(weights="int4", weight_group_size=32, k_bits=4, v_bits=4)
    model = quantized_model(loaded, config).model
    gen = generate(model, loaded.tokenizer, _ids(128), config, max_new_tokens=4)
    assert len(gen.new_tokens) >= 1


def test_a_layer_type_that_cannot_cast_is_a_user_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8)).bfloat16()
    with pytest.raises(UserError, match="--storage-dtype float32"):
        compute_in(model, torch.float32)


@pytest.fixture(scope="module")
def smollm2_fp32_compute():
    return load_model("smollm2-135m", dtype=torch.float32, storage_dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize(
    "length,config",
    [
        (1024, Config(k_bits=4, v_bits=4)),
        (512, Config(k_bits=4, v_bits=4, chunk_size=32)),
        (512, Config(weights="int4", k_bits=4, v_bits=4, chunk_size=32)),
    ],
    ids=lambda v: v.label() if isinstance(v, Config) else str(v),
)
def test_smollm2_cast_temporaries_are_measured_and_modeled(smollm2_fp32_compute, length, config):
    """Storage bf16, compute fp32: the per-layer weight casts are activation, and with small
    chunks the LM head's cast block (1820 x 576 in fp32, 4.2 MB) sets the peak, unless the head's
    one-row call takes the compiled decode linear (where this machine measured it faster),
    which reads the bf16 table in place."""
    model = quantized_model(smollm2_fp32_compute, config).model
    ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(length))
    measured, _ = measure_prefill(model, ids, config)
    modeled = modeled_activation_peak(model.config, config, length, torch.float32, torch.bfloat16)
    assert abs(modeled - measured) <= 0.10 * measured, (measured, modeled)
    if config.chunk_size:
        head_cast = cast_elements(49152, 576) * 4
        if decode_linear.kernel_faster(torch.float32):
            # The head's one row read the bf16 table in place; through torch it casts a block.
            with build.torch_only():
                casting, _ = measure_prefill(model, ids, config)
            assert measured <= casting and casting > head_cast
        else:
            assert measured > head_cast


@pytest.mark.slow
def test_smollm2_finds_pass_keys_computing_in_fp32_from_bf16_storage(smollm2_fp32_compute):
    """Four 1k-token niah prompts (seed 0) under a k4v4 cache: measured 4/4 (bf16 compute: 4/4)."""
    from kvpareto.tasks import get_task

    loaded, task = smollm2_fp32_compute, get_task("niah")
    found = 0
    for sample in task.samples(loaded.tokenizer, 1024, 4, seed=0):
        ids = torch.tensor([sample.input_ids])
        gen = generate(loaded.model, loaded.tokenizer, ids, Config(k_bits=4, v_bits=4), 8)
        found += task.score(sample, gen.text)
    assert found >= 3
