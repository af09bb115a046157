"""Round-to-nearest quantization of a (tokens x channels) plane in rectangular tiles, and packing.

Every granularity is a tile shape on the (tokens x head_dim) plane of one KV head; each tile gets
its own fp16 scale (and, when asymmetric, an fp16 zero point):

    granularity   tile (tokens x channels)       what one scale covers
    per-token     1 x min(g, D)                   g consecutive channels of one token
    per-channel   g x 1                           one channel over g consecutive tokens
    per-block     g x min(g, D)                   a g-token by g-channel square
    per-tensor    128 x D                         a whole head over a block of 128 tokens

g is `group_size`; where g exceeds head_dim D it is clipped to D (SmolLM2 has D = 64, so g = 128
acts as 64 there). Tiles never straddle a block of tokens, so history is never re-quantized.

Asymmetric: scale = (max - min) / (2^b - 1), zero = min, code = round((x - zero) / scale).
Symmetric:  scale = max|x| / (2^(b-1) - 1), code = round(x / scale), stored offset by 2^(b-1).
The scale is rounded *up* and the zero *down* to fp16 before coding, so every code fits its range
and the round-trip error of each value is at most scale/2 (the bound the property tests check).
Clipping (`clip` < 1, the keys' `k_clip`): a tile's range shrinks to clip x itself about the
tile's mean (symmetric: max|x| x clip) before the scale is set, and values outside it are clamped
to its ends; the bound holds inside it, and the stored codes, scale and zero are as ever. About
the mean, the end far from the bulk of the values, where an outlier sits, gives up the most;
about zero, a tile that does not span zero (an offset key channel, per-channel) would shift.
Codes are packed along the channel axis: 8 bits one per byte, 4 bits two per byte, 2 bits four.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PER_TENSOR_TOKENS = 128
_F16_MAX = 65504.0


@dataclass(frozen=True)
class TileShape:
    tokens: int
    channels: int


def tile_shape(granularity: str, group_size: int, head_dim: int) -> TileShape:
    g = min(group_size, head_dim)
    if head_dim % g:
        raise ValueError(f"group size {g} does not divide head_dim {head_dim}")
    return {
        "per-token": TileShape(1, g),
        "per-channel": TileShape(group_size, 1),
        "per-block": TileShape(group_size, g),
        "per-tensor": TileShape(PER_TENSOR_TOKENS, head_dim),
    }[granularity]


@dataclass
class Quantized:
    """Packed codes with their per-tile fp16 scale and zero point (zero is None if symmetric).

    codes:  uint8 [..., T, D * bits / 8]
    scale:  fp16  [..., T / tile.tokens, D / tile.channels]
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]


def _round_f16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Round fp32 to fp16 so that the result is >= x when `up`, else <= x.

    Round to nearest, then redo only the values that landed on the wrong side with x nudged by
    one fp16 ulp (2^-10 relative, plus the smallest subnormal); exact values stay exact.
    """
    x = x.clamp(-_F16_MAX, _F16_MAX)
    nearest = x.to(torch.float16)
    nudge = x.abs() * 2**-10 + 2**-24
    if up:
        return torch.where(nearest.float() < x, (x + nudge).to(torch.float16), nearest)
    return torch.where(nearest.float() > x, (x - nudge).to(torch.float16), nearest)


def _tiles(x: torch.Tensor, tile: TileShape) -> torch.Tensor:
    """View [..., T, D] as [..., T/tt, tt, D/tc, tc]."""
    *lead, t, d = x.shape
    return x.reshape(*lead, t // tile.tokens, tile.tokens, d // tile.channels, tile.channels)


def quantize(
    x: torch.Tensor, bits: int, tile: TileShape, symmetric: bool = False, clip: float = 1.0
) -> Quantized:
    """Quantize x [..., T, D] (T a multiple of tile.tokens) to packed codes, each tile's range
    clipped to `clip` x itself."""
    xt = _tiles(x.float(), tile)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = xt.abs().amax(dim=(-3, -1), keepdim=True)
        if clip < 1:
            absmax = absmax * clip
        scale = _round_f16(absmax / qmax, up=True)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))
        codes = torch.round(xt / safe).clamp(-qmax, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        levels = 2**bits - 1
        lo, hi = xt.amin(dim=(-3, -1), keepdim=True), xt.amax(dim=(-3, -1), keepdim=True)
        if clip < 1:
            mean = xt.mean(dim=(-3, -1), keepdim=True)
            lo, hi = mean + (lo - mean) * clip, mean + (hi - mean) * clip
        lo = _round_f16(lo, up=False)
        scale = _round_f16((hi - lo.float()) / levels, up=True)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(hi))
        codes = torch.round((xt - lo.float()) / safe).clamp(0, levels)
        zero = lo.squeeze(-1).squeeze(-2)
    codes = codes.to(torch.uint8).reshape(x.shape)
    return Quantized(pack(codes, bits), scale.squeeze(-1).squeeze(-2), zero)


def _broadcast_views(x: torch.Tensor, tile: TileShape, per_tile: torch.Tensor):
    """Views of x [..., T, D] and of a per-tile tensor [..., T/tt, D/tc] that broadcast with the
    fewest dimensions: CPU kernels vectorize a flat broadcast far better than a 6-d one."""
    *lead, t, d = x.shape
    tt, tc = tile.tokens, tile.channels
    if tt == 1:
        return x.view(*lead, t, d // tc, tc), per_tile.view(*lead, t, d // tc, 1)
    if tc == 1:
        return x.view(*lead, t // tt, tt, d), per_tile.view(*lead, t // tt, 1, d)
    return _tiles(x, tile), per_tile[..., :, None, :, None]


def dequantize(
    q: Quantized, bits: int, tile: TileShape, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes back to values in `dtype`, written into `out` ([..., T, D], may be a slice) if given.

    Computed in `dtype` as code * scale + zero: in bf16 this adds rounding of the order of bf16's
    own resolution, which the output has anyway. In-place ops on `out` avoid temporaries.
    """
    codes = unpack(q.codes, bits)
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    scale = q.scale.to(dtype)
    zero = scale * -(2 ** (bits - 1)) if q.zero is None else q.zero.to(dtype)
    view, scale_b = _broadcast_views(out, tile, scale)
    _, zero_b = _broadcast_views(out, tile, zero)
    view.copy_(codes.view(view.shape))
    view.mul_(scale_b).add_(zero_b)
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits along the last axis, 8 // bits codes per byte."""
    per = 8 // bits
    if per == 1:
        return codes
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    # Fields never overlap, so a sum of shifted codes is their bitwise OR.
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    mask = 2**bits - 1
    words = packed
    if _int32_viewable(packed):
        # Shift and mask four bytes per int32 op: one scalar op per field, 4x fewer elements.
        words, mask = packed.view(torch.int32), int.from_bytes(bytes([mask]) * 4, "little")
    fields = [words & mask] + [(words >> (bits * i)) & mask for i in range(1, per)]
    fields = [f.view(torch.uint8) for f in fields]
    return torch.stack(fields, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _int32_viewable(packed: torch.Tensor) -> bool:
    """Whether rows of bytes can be read four at a time: true of a contiguous tensor, and of a
    view of the filled rows of a larger buffer (the KV caches' stores) when the row is."""
    strides = packed.stride()
    return (
        packed.shape[-1] % 4 == 0
        and strides[-1] == 1
        and all(s % 4 == 0 for s in strides[:-1])
        and packed.storage_offset() % 4 == 0
    )


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)
