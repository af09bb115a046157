"""The compiled per-token quantizer equals `codec.quantize` bit for bit, and caches use it.

Bit-identical, not merely close: a stored code that differed would change every later read of
that token, so the kernel must make the same IEEE operation at every step (the directed fp16
rounding of scale and zero included). The inputs span values that round exactly, subnormal
scales, ranges near fp16's limit and exact zeros.
"""

from __future__ import annotations

import pytest
import torch

from kvpareto.codec import TileShape, quantize
from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.hf_compat import with_cache
from kvpareto.kernels import build, quantize_tokens
from kvpareto.kernels.quantize_tokens import quantize_rows
from kvpareto.kv.static import QuantizedKVCache


@pytest.fixture(scope="module")
def kernel():
    if build.kernel() is None:
        pytest.skip("no C++ compiler: the kernels could not be built")
    return build.kernel()


def _rows(seed: int, tokens: int, head_dim: int, magnitude: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, tokens, head_dim, generator=gen) * magnitude
    if seed % 3 == 0:
        x[..., :, :5] = 0.0  # exact zeros, and groups whose range starts at zero
    if seed % 4 == 0:
        x = x.round()  # values on the code grid
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("head_dim,group", [(64, 32), (64, 64), (128, 16), (256, 128), (32, 32)])
@pytest.mark.parametrize("magnitude", [1e-6, 1e-2, 1.0, 40.0, 2e4])
def test_codes_scales_and_zeros_equal_codec_quantize(
    kernel, bits, symmetric, head_dim, group, magnitude
):
    x = _rows(int(magnitude * 1e6) % 97 + head_dim + group, 7, head_dim, magnitude)
    ref = quantize(x, bits, TileShape(1, group), symmetric)
    codes, scale, zero = kernel.quantize_tokens(x, bits, group, symmetric)
    assert torch.equal(codes, ref.codes)
    assert torch.equal(scale, ref.scale)
    assert zero.numel() == 0 if symmetric else torch.equal(zero, ref.zero)


def test_a_nan_row_gives_a_nan_scale(kernel):
    x = torch.randn(1, 1, 2, 64)
    x[0, 0, 1, 3] = float("nan")
    _, scale, zero = kernel.quantize_tokens(x, 4, 32, False)
    assert scale[0, 0, 1, 0].isnan() and zero[0, 0, 1, 0].isnan()
    assert not scale[0, 0, 0].isnan().any() and not scale[0, 0, 1, 1].isnan()


def test_bad_arguments_are_refused(kernel):
    with pytest.raises(RuntimeError, match="bits"):
        kernel.quantize_tokens(torch.randn(2, 64), 3, 32, False)
    with pytest.raises(RuntimeError, match="group"):
        kernel.quantize_tokens(torch.randn(2, 64), 4, 48, False)


def test_other_tiles_and_clipping_go_through_codec(monkeypatch):
    assert quantize_tokens.covers(TileShape(1, 32), 1.0)
    assert not quantize_tokens.covers(TileShape(32, 1), 1.0)
    assert not quantize_tokens.covers(TileShape(1, 32), 0.9)
    monkeypatch.setattr(build, "kernel", lambda: pytest.fail("the kernel was called"))
    x = torch.randn(1, 2, 32, 64)
    q = quantize_rows(x, 4, TileShape(32, 1))
    assert torch.equal(q.codes, quantize(x, 4, TileShape(32, 1)).codes)


@pytest.mark.parametrize(
    "config",
    [
        Config(k_bits=4, v_bits=2, residual_length=3),
        Config(k_bits=2, v_bits=8, k_smooth=True, rotation="hadamard", symmetric=True),
    ],
    ids=lambda c: c.label(),
)
def test_a_cache_stores_the_same_bytes_with_or_without_the_kernel(
    kernel, tiny_models, config, monkeypatch
):
    model = tiny_models["tiny-llama"].model
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(0))
    held, covered, real = {}, [], quantize_tokens.covers
    for path in ("kernel", "codec"):
        if path == "kernel":  # spied on: the kernel path must really have been taken
            spy = lambda tile, clip: covered.append(real(tile, clip)) or covered[-1]  # noqa: E731
            monkeypatch.setattr(quantize_tokens, "covers", spy)
        else:
            monkeypatch.setattr(quantize_tokens, "covers", lambda tile, clip: False)
        cache = QuantizedKVCache(model.config, config, torch.bfloat16, fused=False)
        prefill(model, ids[:, :33], cache, 0)
        for t in range(33, 40):  # decode steps: one token leaves each tail per step
            model(ids[:, t : t + 1], **with_cache(cache), use_cache=True)
        streams = [s for layer in cache.layers for s in (layer.k, layer.v)]
        held[path] = [t.clone() for s in streams for t in [*s.packed.tensors(), s.tail]]
    assert any(covered)
    assert len(held["kernel"]) == len(held["codec"])
    assert all(torch.equal(a, b) for a, b in zip(held["kernel"], held["codec"], strict=True))
