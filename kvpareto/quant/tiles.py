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
    """Round fp32 to fp16 toward +inf (up) or -inf, so the fp16 value bounds x from that side."""
    h = x.clamp(-_F16_MAX, _F16_MAX).to(torch.float16)
    direction = torch.full_like(h, float("inf") if up else float("-inf"))
    wrong_side = (h.float() < x) if up else (h.float() > x)
    return torch.where(wrong_side, torch.nextafter(h, direction), h)


def _tiles(x: torch.Tensor, tile: TileShape) -> torch.Tensor:
    """View [..., T, D] as [..., T/tt, tt, D/tc, tc]."""
    *lead, t, d = x.shape
    return x.reshape(*lead, t // tile.tokens, tile.tokens, d // tile.channels, tile.channels)


def quantize(x: torch.Tensor, bits: int, tile: TileShape, symmetric: bool = False) -> Quantized:
    """Quantize x [..., T, D] (T a multiple of tile.tokens) to packed codes."""
    xt = _tiles(x.float(), tile)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        absmax = xt.abs().amax(dim=(-3, -1), keepdim=True)
        scale = _round_f16(absmax / qmax, up=True)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(absmax))
        codes = torch.round(xt / safe).clamp(-qmax, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        levels = 2**bits - 1
        lo = _round_f16(xt.amin(dim=(-3, -1), keepdim=True), up=False)
        hi = xt.amax(dim=(-3, -1), keepdim=True)
        scale = _round_f16((hi - lo.float()) / levels, up=True)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(hi))
        codes = torch.round((xt - lo.float()) / safe).clamp(0, levels)
        zero = lo.squeeze(-1).squeeze(-2)
    codes = codes.to(torch.uint8).reshape(x.shape)
    return Quantized(pack(codes, bits), scale.squeeze(-1).squeeze(-2), zero)


def dequantize(q: Quantized, bits: int, tile: TileShape, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(q.codes, bits)
    ct = _tiles(codes, tile).float()
    scale = q.scale.float()[..., :, None, :, None]
    if q.zero is None:
        out = (ct - 2 ** (bits - 1)) * scale
    else:
        out = ct * scale + q.zero.float()[..., :, None, :, None]
    return out.reshape(codes.shape).to(dtype)


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
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)
