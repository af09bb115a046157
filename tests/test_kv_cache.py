"""The packed KV cache: exactness at 16 bits, faithful chunking, byte accounting, storage rules."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from kvpareto.codec import dequantize, quantize, tile_shape
from kvpareto.config import Config
from kvpareto.hf_compat import with_cache
from kvpareto.kv.static import KVStream, QuantizedKVCache, StreamSpec
from tests.conftest import TINY


def _run_chunks(model, ids, cache, chunk):
    step = chunk or ids.shape[1]
    outs = [
        model(ids[:, i : i + step], **with_cache(cache)).logits
        for i in range(0, ids.shape[1], step)
    ]
    return torch.cat(outs, dim=1)


def _ids(n=100, seed=0):
    return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("chunk", [0, 16, 37])
def test_16_bit_cache_matches_dynamic_cache(tiny_models, name, chunk):
    model = tiny_models[name].model
    ids = _ids()
    ref = _run_chunks(model, ids, DynamicCache(config=model.config), chunk)
    ours = _run_chunks(model, ids, QuantizedKVCache(model.config, Config(), torch.bfloat16), chunk)
    assert (ref.float() - ours.float()).abs().max() <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_chunked_prefill_with_16_bit_cache_matches_unchunked(tiny_models, name):
    # bf16 matmuls of different shapes round differently, so "same" means: same next token, and
    # logits within the gap that DynamicCache itself shows between chunked and unchunked runs.
    model = tiny_models[name].model
    ids = _ids(120, seed=1)
    full = _run_chunks(model, ids, QuantizedKVCache(model.config, Config(), torch.bfloat16), 0)[
        :, -1
    ]
    chunked = _run_chunks(model, ids, QuantizedKVCache(model.config, Config(), torch.bfloat16), 32)[
        :, -1
    ]
    assert torch.equal(full.argmax(-1), chunked.argmax(-1))
    assert (full.float() - chunked.float()).abs().max() <= 2e-2


def test_quantized_chunks_attend_to_their_own_kv_in_full_precision(tiny_models):
    # With R = 0 and one chunk, the whole prompt sees only full-precision K/V: logits equal the
    # 16-bit run. Split into two chunks, the second reads the first back quantized: they differ.
    model = tiny_models["tiny-llama"].model
    ids = _ids(64)
    cfg = Config(k_bits=2, v_bits=2)
    ref = _run_chunks(model, ids, DynamicCache(config=model.config), 0)
    one = _run_chunks(model, ids, QuantizedKVCache(model.config, cfg, torch.bfloat16), 0)
    two = _run_chunks(model, ids, QuantizedKVCache(model.config, cfg, torch.bfloat16), 32)
    assert torch.equal(one, ref)
    assert torch.equal(two[:, :32], ref[:, :32])
    assert (two[:, 32:].float() - ref[:, 32:].float()).abs().max() > 1e-3


def test_low_bit_cache_really_holds_packed_integers(tiny_models):
    model = tiny_models["tiny-llama"].model
    cache = QuantizedKVCache(model.config, Config(k_bits=4, v_bits=2), torch.bfloat16)
    _run_chunks(model, _ids(256), cache, 0)
    layer = cache.layers[0]
    assert layer.k.packed.codes.dtype == torch.uint8
    assert layer.k.packed.codes.shape[-1] == 64 * 4 // 8
    assert layer.v.packed.codes.shape[-1] == 64 * 2 // 8
    assert layer.k.packed.scale.dtype == torch.float16
    # 4-bit K + 2-bit V with fp16 scale/zero per 32 values: (4 + 2*16/32) + (2 + 2*16/32) bits.
    values = 2 * 256 * 64  # kv_heads x tokens x head_dim, per stream
    expected_per_layer = values * (4 + 1) // 8 + values * (2 + 1) // 8
    assert cache.nbytes() == expected_per_layer * len(cache.layers)


def test_history_is_never_requantized(tiny_models):
    model = tiny_models["tiny-llama"].model
    cache = QuantizedKVCache(
        model.config, Config(k_bits=4, v_bits=4, residual_length=8), torch.bfloat16
    )
    _run_chunks(model, _ids(64), cache, 16)
    before = cache.layers[1].k.packed
    codes, scale = before.codes.clone(), before.scale.clone()
    for step in range(20):
        model(_ids(1, seed=step), **with_cache(cache))
    after = cache.layers[1].k.packed
    assert torch.equal(after.codes[..., : codes.shape[-2], :], codes)
    assert torch.equal(after.scale[..., : scale.shape[-2], :], scale)


def test_residual_window_keeps_the_last_r_tokens_exact(tiny_models):
    model = tiny_models["tiny-llama"].model
    r = 10
    cache = QuantizedKVCache(
        model.config, Config(k_bits=2, v_bits=2, residual_length=r), torch.bfloat16
    )
    ref = DynamicCache(config=model.config)
    ids = _ids(50)
    model(ids, **with_cache(cache))
    model(ids, **with_cache(ref))
    stream = cache.layers[2].k
    assert stream.tail.shape[-2] == r and stream.n_q == 40
    assert torch.equal(stream.tail, ref.layers[2].keys[..., -r:, :])
    # R = 0: nothing stays in full precision with per-token quantization.
    zero = QuantizedKVCache(model.config, Config(k_bits=2, v_bits=2), torch.bfloat16)
    model(ids, **with_cache(zero))
    assert zero.layers[2].k.tail.shape[-2] == 0


def test_per_layer_bits_override_the_default(tiny_models):
    model = tiny_models["tiny-llama"].model
    cfg = Config.from_dict(
        {"k_bits": 4, "v_bits": 4, "layer_bits": {1: {"k_bits": 8, "v_bits": 2}}}
    )
    cache = QuantizedKVCache(model.config, cfg, torch.bfloat16)
    assert [(layer.k_spec.bits, layer.v_spec.bits) for layer in cache.layers] == [
        (4, 4),
        (8, 2),
        (4, 4),
        (4, 4),
    ]


def test_sliding_layers_hold_only_their_window(tiny_models):
    model = tiny_models["tiny-gemma3"].model  # layers 0-2 slide over 32 tokens, layer 3 is global
    cache = QuantizedKVCache(model.config, Config(), torch.bfloat16)
    _run_chunks(model, _ids(200), cache, 50)
    assert [layer.k.tail.shape[-2] for layer in cache.layers] == [31, 31, 31, 200]
    assert cache.get_seq_length() == 200


def test_rotation_and_smoothing_reduce_nothing_at_full_precision_residual(tiny_models):
    # Both transforms are exactly invertible: with every token in the residual window, logits are
    # those of the 16-bit cache; once tokens are quantized they still track it closely at 8 bits.
    model = tiny_models["tiny-qwen2"].model
    ids = _ids(40)
    ref = _run_chunks(model, ids, DynamicCache(config=model.config), 8)
    cfg = Config(k_bits=8, v_bits=8, k_smooth=True, rotation="hadamard", residual_length=64)
    same = _run_chunks(model, ids, QuantizedKVCache(model.config, cfg, torch.bfloat16), 8)
    assert torch.equal(same, ref)
    cfg8 = Config(k_bits=8, v_bits=8, k_smooth=True, rotation="hadamard")
    close = _run_chunks(model, ids, QuantizedKVCache(model.config, cfg8, torch.bfloat16), 8)
    assert (close.float() - ref.float()).abs().max() < 0.1


# --- storage against a reference that concatenates, and the cost of an append --------------------


def _spec(granularity, bits=4, residual=0, window=None, smooth=False, symmetric=False):
    tile = tile_shape(granularity, 32, 64)
    return StreamSpec(bits, tile, symmetric, residual, smooth, False, window, 2)


def _reference_visible(stream, written, new):
    """[history | new] recomputed from every token written so far, kept whole and concatenated:
    the quantized tokens of `layout` encoded in one batch (each tile is coded on its own, so
    batching does not change codes), then the full-precision tail, cut to a sliding window."""
    spec, dtype = stream.spec, stream.dtype
    q_start, n_q, n_tail = spec.layout(written.shape[-2])
    parts = []
    if n_q > q_start:
        x = written[..., q_start:n_q, :].float()
        if stream.mean is None:
            q = quantize(x, spec.bits, spec.tile, spec.symmetric)
            parts.append(dequantize(q, spec.bits, spec.tile, dtype))
        else:
            q = quantize(x - stream.mean.float(), spec.bits, spec.tile, spec.symmetric)
            x = dequantize(q, spec.bits, spec.tile, torch.float32) + stream.mean.float()
            parts.append(x.to(dtype))
    parts.append(written[..., written.shape[-2] - n_tail :, :].to(stream.tail_dtype).to(dtype))
    history = torch.cat(parts, dim=-2)
    if spec.window is not None:
        history = history[..., max(history.shape[-2] - (spec.window - 1), 0) :, :]
    return torch.cat([history, new], dim=-2)


_SPECS = [
    _spec("per-token", bits=16),
    _spec("per-token", bits=16, window=32),
    _spec("per-token"),
    _spec("per-token", bits=2, residual=20, symmetric=True),
    _spec("per-channel", bits=2, residual=5, smooth=True),
    _spec("per-block", residual=3),
    _spec("per-tensor", bits=8),
    _spec("per-token", window=32, residual=7),
    _spec("per-channel", window=32),
    _spec("per-block", bits=2, window=40, residual=9, smooth=True),
]


@pytest.mark.parametrize(
    "spec",
    _SPECS,
    ids=lambda s: f"b{s.bits}-t{s.tile.tokens}x{s.tile.channels}-r{s.residual_length}-w{s.window}",
)
@pytest.mark.parametrize("chunks", [[300] + [1] * 40, [37] * 8 + [1] * 40, [5] * 30])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stream_reads_what_a_concatenating_store_would_hold(spec, chunks, dtype):
    # Storage = compute here: the tail is held in that dtype, or in fp16 by a 16-bit fp32 stream.
    spec = replace(spec, fp_bytes=2 if dtype == torch.bfloat16 or not spec.quantized else 4)
    stream = KVStream(spec, dtype, dtype)
    generator = torch.Generator().manual_seed(0)
    written = torch.empty(1, 2, 0, 64, dtype=dtype)
    for n in chunks:
        new = torch.randn(1, 2, n, 64, generator=generator).to(dtype)
        visible = stream.update(new)
        assert torch.equal(visible, _reference_visible(stream, written, new))
        written = torch.cat([written, new], dim=-2)
        assert stream.nbytes() == spec.modeled_bytes(stream.total, 1, 2, 64)


@pytest.mark.parametrize(
    ("spec", "moves"),
    [
        # The packed store grows from 100 tokens (room for 112) to 164: it moves at 113, 129,
        # 145 and 161 tokens, and every other step writes its one token in place.
        (_spec("per-token"), 4),
        # A residual window of 20 keeps the tail at 20 tokens (room for 32): the tail never moves.
        (_spec("per-token", residual=20), 4),
        # 16 bits: the tail alone grows as the packed store did.
        (_spec("per-token", bits=16), 4),
        # A sliding window holds 31 tokens (room for 32) of either store, as a ring: nothing moves.
        (_spec("per-token", bits=16, window=32), 0),
        (_spec("per-token", window=32), 0),
    ],
    ids=["packed", "packed-and-residual", "16-bit", "16-bit-window", "packed-window"],
)
def test_decode_appends_in_place_and_moves_the_history_once_a_block(spec, moves):
    stream = KVStream(spec, torch.bfloat16, torch.bfloat16)
    stream.update(torch.randn(1, 2, 100, 64).to(torch.bfloat16))
    held = [t.data_ptr() for t in stream.tensors()]
    moved = 0
    for _ in range(64):
        visible = stream.update(torch.randn(1, 2, 1, 64).to(torch.bfloat16))
        now = [t.data_ptr() for t in stream.tensors()]
        moved += now != held
        held = now
    assert moved == moves
    if spec.window is None and not spec.quantized:
        # DynamicCache's fast path: attention reads the stored tail itself, not a copy.
        assert visible.data_ptr() == stream.tensors()[0].data_ptr()
