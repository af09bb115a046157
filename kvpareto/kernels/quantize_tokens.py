"""Quantizing K/V rows in per-token tiles by the compiled kernel, bit-identical to `codec.quantize`.

Each decode step moves a token from every stream's full-precision tail into its packed store;
through `codec.quantize` that costs a few dozen small torch ops per stream, and the kernel
(csrc/quantize_tokens.cpp) does it in one call with the same arithmetic, operation for
operation. It covers per-token tiles (1 x g) without clipping, on the CPU; other tiles (several
tokens per tile, encoded once per g tokens), clipping (its tile mean is a torch reduction whose
summation order C++ would not reproduce) and other devices go through `codec.quantize`.
"""

from __future__ import annotations

import torch

from kvpareto.codec import Quantized, TileShape, quantize
from kvpareto.kernels import build


def covers(tile: TileShape, clip: float) -> bool:
    return tile.tokens == 1 and tile.channels <= 256 and clip == 1.0


def quantize_rows(
    x: torch.Tensor, bits: int, tile: TileShape, symmetric: bool = False, clip: float = 1.0
) -> Quantized:
    """`codec.quantize(x, bits, tile, symmetric, clip)`, by the kernel where it applies."""
    if (
        not covers(tile, clip)
        or x.device.type != "cpu"
        or build.torch_only_now()
        or build.kernel() is None
    ):
        return quantize(x, bits, tile, symmetric, clip)
    codes, scale, zero = build.kernel().quantize_tokens(
        x.float().contiguous(), bits, tile.channels, symmetric
    )
    return Quantized(codes, scale, None if symmetric else zero)
