"""Weight quantization: packed storage, byte accounting, the disk cache, and AWQ on real weights."""

from __future__ import annotations

import copy
import statistics
from dataclasses import replace

import pytest
import torch

from kvpareto.config import Config
from kvpareto.engine import generate
from kvpareto.errors import UserError
from kvpareto.evaluation.calibration_data import calibration, calibration_ids
from kvpareto.memory.measure import weights_bytes_measured, weights_bytes_modeled
from kvpareto.tasks import get_task
from kvpareto.weights import embedding
from kvpareto.weights import quantize as weights_module
from kvpareto.weights.packed_linear import PackedLinear, weight_group
from kvpareto.weights.quantize import linear_output_errors, quantized_model


def test_int4_known_answer_on_a_hand_made_row():
    # One row, one group of 4: min 0, max 3 -> scale 3/15 = 0.2, stored as the fp16 just above
    # it (0.20007), zero 0: codes 0, 5, 10, 15, two per byte.
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    layer = PackedLinear.quantize(w, None, bits=4, group=4, symmetric=False)
    assert layer.codes.tolist() == [[0 | 5 << 4, 10 | 15 << 4]]
    scale = layer.scale.float().item()
    assert 0.2 < scale < 0.2002
    assert torch.equal(
        layer.dequantized_weight(torch.float32), torch.tensor([[0, 5, 10, 15]]) * scale
    )
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(layer(x), torch.tensor([[6.0]]), atol=1e-2)


def test_int8_per_channel_keeps_one_scale_per_row_and_no_zero():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    layer = PackedLinear.quantize(w, torch.zeros(6), bits=8, group=32, symmetric=True)
    assert layer.codes.shape == (6, 32) and layer.scale.shape == (6, 1) and layer.zero is None
    err = (layer.dequantized_weight(torch.float32) - w).abs()
    assert (err <= layer.scale.float() / 2 + 1e-6).all()


def test_group_size_rule_for_widths_the_group_does_not_divide():
    assert weight_group(128, 576) == 64  # SmolLM2's hidden size
    assert weight_group(128, 1536) == 128
    assert weight_group(64, 96) == 32


@pytest.mark.parametrize(
    "method,embed",
    [("int8", "none"), ("int4", "none"), ("awq4", "none"), ("none", "int8"), ("none", "int4")]
    + [("int4", "int8"), ("awq4", "int4")],
)
def test_measured_weight_bytes_equal_modeled_on_every_tiny_arch(tiny_models, method, embed):
    for loaded in tiny_models.values():
        config = Config(weights=method, weight_group_size=32, embed_weights=embed)
        q = quantized_model(loaded, config, calibration)
        assert weights_bytes_measured(q.model) == weights_bytes_modeled(q.model)
        assert weights_bytes_measured(q.model) < weights_bytes_measured(loaded.model)
        x = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(q.model(x).logits).all()


@pytest.mark.parametrize(
    "cfg",
    [
        Config(weights="awq4", weight_group_size=32),
        Config(embed_weights="int4"),
        Config(weights="int8", embed_weights="int8"),
    ],
    ids=lambda c: c.label(),
)
def test_quantized_weights_reload_from_disk_with_identical_outputs(tiny_models, cfg):
    loaded = tiny_models["tiny-llama"]
    first = quantized_model(loaded, cfg, calibration)
    weights_module._LAST.clear()  # forget the in-process copy: the next call reads the disk
    second = quantized_model(loaded, cfg, calibration)
    assert second.from_cache
    x = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(2))
    assert torch.equal(first.model(x).logits, second.model(x).logits)
    assert weights_bytes_measured(second.model) == weights_bytes_measured(first.model)
    assert second.weights_info.keys() == first.weights_info.keys()
    for kind, scales in first.weights_info.items():
        assert second.weights_info[kind].keys() == scales.keys()


def test_awq_is_calibrated_once_across_embed_weights_and_gives_the_same_model(
    tiny_models, tmp_path, monkeypatch
):
    """awq4 with a quantized embedding reuses awq4's decoder (no second calibration), and
    equals quantizing that table on top of a fresh AWQ run."""
    loaded = tiny_models["tiny-llama"]
    awq = weights_module.QUANTIZERS.get("awq4")
    runs = []
    original = type(awq).quantize

    def counted(self, *args, **kwargs):
        runs.append(1)
        return original(self, *args, **kwargs)

    cfg = Config(weights="awq4", weight_group_size=32, embed_weights="int8")
    monkeypatch.setenv("KVPARETO_HOME", str(tmp_path))  # an empty weights cache
    weights_module._LAST.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(awq), "quantize", counted)
        decoder = quantized_model(loaded, replace(cfg, embed_weights="none"), calibration)
        for embed in ("int8", "int4"):
            both = quantized_model(loaded, replace(cfg, embed_weights=embed), calibration)
        weights_module._LAST.clear()
        both = quantized_model(loaded, cfg, calibration)  # int8 again, now from the disk
    assert len(runs) == 1 and both.from_cache
    fresh = copy.deepcopy(loaded.model)
    awq.quantize(fresh, 32, calibration(loaded.tokenizer).ids, None)
    embedding.quantize_embeddings(fresh, "int8")
    x = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    assert torch.equal(both.model(x).logits, fresh(x).logits)
    assert not torch.equal(both.model(x).logits, decoder.model(x).logits)
    assert weights_bytes_measured(both.model) == weights_bytes_measured(fresh)


def test_the_weight_cache_key_names_embed_weights_only_where_set():
    args = ("hash", "int4", 64, "", None)
    assert weights_module._cache_key(*args) == weights_module._cache_key(*args, "none")
    assert weights_module._cache_key(*args, "int8") != weights_module._cache_key(*args)


def test_the_unquantized_model_is_left_untouched(tiny_models):
    loaded = tiny_models["tiny-qwen2"]
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    quantized_model(loaded, Config(weights="awq4", weight_group_size=32), calibration)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("backend", ["llmcompressor", "autoawq"])
def test_external_awq_backends_that_cannot_run_say_so_in_one_line(tiny_models, backend):
    with pytest.raises(UserError) as e:
        config = Config(weights="awq4", awq_backend=backend)
        quantized_model(tiny_models["tiny-llama"], config, calibration)
    assert "\n" not in str(e.value) and "native" in str(e.value)


def test_a_quantizer_that_calibrates_refuses_to_run_without_calibration_data(tiny_models):
    with pytest.raises(ValueError, match="calibration"):
        quantized_model(tiny_models["tiny-llama"], Config(weights="awq4", weight_group_size=32))


# --- SmolLM2: real weights ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_int4(smollm2):
    return quantized_model(smollm2, Config(weights="int4", weight_group_size=64))


@pytest.fixture(scope="module")
def smollm2_awq4(smollm2):
    return quantized_model(smollm2, Config(weights="awq4", weight_group_size=64), calibration)


def test_int4_g64_bytes_are_measured_modeled_and_under_30_percent_of_fp16(smollm2, smollm2_int4):
    model = smollm2_int4.model
    assert weights_bytes_measured(model) == weights_bytes_modeled(model)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 30 * 7
    held = sum(t.nbytes for m in packed for t in (m.codes, m.scale, m.zero))
    fp16 = sum(m.out_features * m.in_features * 2 for m in packed)
    assert held < 0.30 * fp16


def _ngrams(ids: list[int], n: int = 8) -> set[tuple[int, ...]]:
    return {tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)}


def test_calibration_text_shares_no_8_gram_with_evaluation_prompts_or_perplexity_text(smollm2):
    """AWQ must not be fitted to what it is scored on: the default tasks' prompts (1024 tokens,
    seeds 0-2) and the perplexity text."""
    from kvpareto.tasks.perplexity import held_out_ids

    tok = smollm2.tokenizer
    calibration = _ngrams(calibration_ids(tok).flatten().tolist())
    evaluated = [held_out_ids(tok, 4096, seed) for seed in range(3)]
    for name in ("niah", "qa", "vt", "niah-mk"):
        for seed in range(3):
            evaluated += [s.input_ids for s in get_task(name).samples(tok, 1024, 5, seed)]
    shared = set().union(*(calibration & _ngrams(ids) for ids in evaluated))
    assert not shared, [tok.decode(list(g)) for g in sorted(shared)[:5]]


def test_awq_has_lower_output_error_per_linear_than_rtn(smollm2, smollm2_int4, smollm2_awq4):
    """AWQ's reason to exist. Measured on 512 tokens of the perplexity text, disjoint from the
    calibration text: mean relative error 0.0665 (AWQ) vs 0.0800 (RTN), g64."""
    from kvpareto.tasks.perplexity import held_out_ids

    held_out = torch.tensor(held_out_ids(smollm2.tokenizer, 512, seed=0)).reshape(2, 256)
    awq = linear_output_errors(smollm2, smollm2_awq4, held_out)
    rtn = linear_output_errors(smollm2, smollm2_int4, held_out)
    assert statistics.mean(awq.values()) < 0.9 * statistics.mean(rtn.values())


def test_awq4_smollm2_still_retrieves_pass_keys_and_knows_paris(smollm2_awq4):
    model, tok = smollm2_awq4.model, smollm2_awq4.tokenizer
    task = get_task("niah")
    prompts = task.samples(tok, 1024, 10, seed=0)
    hits = [
        task.score(s, generate(model, tok, torch.tensor([s.input_ids]), Config(), 8).text)
        for s in prompts
    ]
    assert sum(hits) >= 8
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    assert "Paris" in generate(model, tok, ids, Config(), 16).text
