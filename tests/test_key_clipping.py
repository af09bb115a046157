"""k_clip: each key tile's quantization range shrinks to k_clip x itself and values outside are
clamped to it; the stored format (codes, fp16 scale and zero) and so the bytes do not change."""

from __future__ import annotations

import pytest
import torch

from kvpareto.codec import TileShape, dequantize, quantize
from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.hf_compat import with_cache
from kvpareto.kv.static import QuantizedKVCache
from tests.test_fused_decode import TOLERANCE, _worst_step_gap, kernel  # noqa: F401

TILE = TileShape(1, 32)  # per-token, group 32


def _keys_with_outliers(tokens: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normal keys with one large value in each token's tile, and the mask of the others."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens, 32, generator=gen)
    outlier = torch.zeros_like(x, dtype=torch.bool)
    outlier[..., torch.arange(tokens), torch.randint(0, 32, (tokens,), generator=gen)] = True
    x[outlier] = 12.0
    return x, ~outlier


def _round_trip(x, bits, clip, symmetric=False):
    return dequantize(quantize(x, bits, TILE, symmetric, clip), bits, TILE, torch.float32)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clipping_lowers_the_error_of_the_values_that_are_not_outliers(symmetric):
    x, inliers = _keys_with_outliers()
    errors = {
        clip: (_round_trip(x, 4, clip, symmetric) - x)[inliers].abs().mean().item()
        for clip in (1.0, 0.9)
    }
    assert errors[0.9] < 0.95 * errors[1.0]


def test_a_clipped_value_comes_back_at_the_clip_bound():
    x, _ = _keys_with_outliers()
    mean, hi = x.mean(-1), x.amax(-1)
    bound = mean + (hi - mean) * 0.9  # the range kept, about the tile's mean
    back = _round_trip(x, 4, 0.9).amax(-1)
    assert torch.allclose(back, bound, rtol=2e-3)
    assert (back < hi - 0.5).all()  # well short of the outlier it stands for
    sym = _round_trip(x, 4, 0.9, symmetric=True).amax(-1)
    assert torch.allclose(sym, 0.9 * x.abs().amax(-1), rtol=2e-3)


def test_no_clipping_is_the_codec_as_it_was():
    x, _ = _keys_with_outliers()
    for symmetric in (False, True):
        default, unclipped = quantize(x, 4, TILE, symmetric), quantize(x, 4, TILE, symmetric, 1.0)
        for a, b in zip(default.tensors(), unclipped.tensors(), strict=True):
            assert torch.equal(a, b)


def test_the_knob_keeps_every_key_at_its_default_and_names_itself_in_the_label():
    base = Config(k_bits=4, v_bits=2)
    assert Config(k_bits=4, v_bits=2, k_clip=1.0).key() == base.key()
    clipped = Config(k_bits=4, v_bits=2, k_clip=0.9)
    assert clipped.key() != base.key()
    assert clipped.label() == "w16-k4v2-tok-g32-r0-kc90-c0"
    assert canonical(Config(k_bits=16, v_bits=2, k_clip=0.9)).k_clip == 1.0  # keys not quantized
    with pytest.raises(UserError, match="k_clip applies to kv_scheme static only"):
        Config(kv_scheme="adaptive", k_clip=0.9)
    with pytest.raises(UserError, match="k_clip must be one of"):
        Config(k_clip=0.5)


def test_the_cache_clips_keys_only_and_holds_the_modeled_bytes(tiny_models):
    model = tiny_models["tiny-llama"].model
    ids = torch.randint(3, 259, (1, 100), generator=torch.Generator().manual_seed(0))
    held = {}
    for clip in (1.0, 0.9):
        cache = QuantizedKVCache(
            model.config, Config(k_bits=4, v_bits=4, k_clip=clip), torch.bfloat16
        )
        model(ids, **with_cache(cache))
        assert cache.nbytes() == cache.modeled_nbytes(100)
        first = cache.layers[0]  # later layers see the clipped keys' attention, so differ
        held[clip] = first.k.packed.tensors(), first.v.packed.tensors()  # the filled rows
    (k1, v1), (k9, v9) = held[1.0], held[0.9]
    assert all(torch.equal(a, b) for a, b in zip(v1, v9, strict=True))
    assert [t.shape for t in k1] == [t.shape for t in k9]
    assert not all(torch.equal(a, b) for a, b in zip(k1, k9, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_fused_decode_reads_clipped_keys_as_the_reference_path_does(kernel, tiny_models, dtype):  # noqa: F811
    model = tiny_models["tiny-llama"].model
    cache = QuantizedKVCache(
        model.config, Config(k_bits=4, v_bits=4, k_clip=0.85), dtype, fused=True
    )
    assert _worst_step_gap(model, cache) <= TOLERANCE[dtype]
