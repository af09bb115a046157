"""Quantize/dequantize/pack primitives: round-trip bounds, known answers, packing density."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpareto.codec import (
    dequantize,
    hadamard,
    pack,
    quantize,
    tile_shape,
    unpack,
)
from kvpareto.knobs import GRANULARITIES

BITS = (2, 4, 8)


def _per_value_scale(q, tile, shape):
    s = q.scale.double()[..., :, None, :, None]
    t, d = shape[-2], shape[-1]
    s = s.expand(*s.shape[:-4], t // tile.tokens, tile.tokens, d // tile.channels, tile.channels)
    return s.reshape(shape)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    granularity=st.sampled_from(GRANULARITIES),
    group=st.sampled_from((32, 64, 128)),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from((1e-3, 1.0, 30.0)),
    tiles=st.integers(1, 3),
)
def test_round_trip_error_is_within_half_a_step_of_a_float64_reference(
    bits, granularity, group, symmetric, seed, magnitude, tiles
):
    head_dim = 64
    tile = tile_shape(granularity, group, head_dim)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tile.tokens * tiles, head_dim, generator=gen) * magnitude
    x[0, 0, :3] = magnitude * 7  # an outlier, as real keys have
    q = quantize(x, bits, tile, symmetric)
    y = dequantize(q, bits, tile, torch.float32).double()
    ref = x.double()
    bound = _per_value_scale(q, tile, x.shape) / 2
    # fp32 arithmetic in the dequantizer adds at most a few ulps on top of half a step.
    slack = 4 * torch.finfo(torch.float32).eps * (ref.abs() + bound * 2**bits)
    assert ((y - ref).abs() <= bound + slack).all()
    # The step itself is what the analytic formula says: range / (2^b - 1), rounded up to fp16.
    levels = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    assert (q.scale.float() > 0).all()
    assert q.scale.dtype == torch.float16 and (q.zero is None) == symmetric
    assert float(q.scale.float().max()) <= float(ref.abs().max() * 2 / levels) * 1.01 + 1e-7


def test_per_token_known_answer():
    # One token, 32 channels: values 0..31; 2-bit asymmetric gives step 31/3 and zero 0.
    x = torch.arange(32, dtype=torch.float32).reshape(1, 32)
    tile = tile_shape("per-token", 32, 32)
    q = quantize(x, 2, tile)
    assert q.zero.item() == 0.0
    assert q.scale.float().item() == pytest.approx(31 / 3, rel=1e-3)
    codes = unpack(q.codes, 2)
    expected = torch.round(x / q.scale.float()).to(torch.uint8)
    assert torch.equal(codes, expected)
    assert codes[0, 0] == 0 and codes[0, -1] == 3


def test_per_channel_known_answer():
    # 32 tokens x 2 channels; channel 0 is constant 5, channel 1 ramps: one scale per channel.
    x = torch.stack([torch.full((32,), 5.0), torch.linspace(-1, 1, 32)], dim=1)
    tile = tile_shape("per-channel", 32, 2)
    q = quantize(x, 4, tile)
    assert q.scale.shape == (1, 2)
    assert q.scale[0, 0].item() == 0.0 and q.zero[0, 0].item() == 5.0
    y = dequantize(q, 4, tile, torch.float32)
    assert torch.equal(y[:, 0], x[:, 0])
    assert (y[:, 1] - x[:, 1]).abs().max() <= q.scale[0, 1].float() / 2 + 1e-6


def test_per_block_known_answer():
    # A 32x32 block with a single non-zero value: symmetric 8-bit keeps it, scale = v / 127.
    x = torch.zeros(32, 32)
    x[3, 4] = 2.54
    tile = tile_shape("per-block", 32, 32)
    q = quantize(x, 8, tile, symmetric=True)
    assert q.scale.shape == (1, 1)
    y = dequantize(q, 8, tile, torch.float32)
    assert y[3, 4].item() == pytest.approx(2.54, abs=q.scale.float().item() / 2)
    assert y.abs().sum() - y[3, 4].abs() == 0


def test_per_tensor_known_answer():
    # 128 tokens x 4 channels in {-1, +1}: symmetric 2-bit maps them to codes 1 and 3 exactly.
    x = torch.where(torch.arange(512).reshape(128, 4) % 3 == 0, 1.0, -1.0)
    tile = tile_shape("per-tensor", 32, 4)
    q = quantize(x, 2, tile, symmetric=True)
    assert q.scale.shape == (1, 1)
    assert torch.equal(dequantize(q, 2, tile, torch.float32), x)


@pytest.mark.parametrize("bits", BITS)
def test_packing_density_and_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_group_size_is_clipped_to_head_dim():
    assert tile_shape("per-token", 128, 64).channels == 64
    assert tile_shape("per-block", 128, 64).tokens == 128


def test_hadamard_is_orthonormal():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError):
        hadamard(96)
