"""A linear layer whose weight is held as packed integer codes and dequantized on the fly.

Weights are quantized along the input dimension in groups: each output row is a "token" of the
tile plane in `tiles.py`, so int4 uses 1 x g tiles (two codes per byte, an fp16 scale and zero per
group) and int8 one 1 x in_features tile per row (symmetric: an fp16 scale, no zero). This reuses
the KV codec, with its fp16 rounding rule and its tested error bound.

Why our own module: torchao 0.18 has no CPU int4 weight-only path, quanto forces other group
sizes, and llm-compressor checkpoints decompress to fp32 on CPU (FINDINGS.md). Here the forward
pass dequantizes one layer's weight into a temporary of the compute dtype, runs `F.linear`, and
lets the temporary go: the packed codes are all that is held between calls, so `weights_bytes`
measured from the module's tensors is the real footprint. The temporary is activation memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpareto.quant.tiles import Quantized, TileShape, dequantize, quantize

_F16 = 2


def weight_group(requested: int, in_features: int) -> int:
    """The group size actually used for a layer of `in_features` inputs.

    Rule: the largest power of two <= the requested size that divides the input width, so no
    group straddles the end of a row. SmolLM2's hidden size 576 = 9 x 64 makes g=128 act as 64
    on q/k/v/gate/up (its down_proj, 1536 wide, keeps 128).
    """
    g = requested
    while g > 1 and in_features % g:
        g //= 2
    return g


class PackedLinear(torch.nn.Module):
    """y = x W^T + b with W stored as packed `bits`-bit codes per (row, group)."""

    def __init__(self, packed: Quantized, bits: int, group: int, shape, bias, dtype):
        super().__init__()
        self.bits, self.group = bits, group
        self.out_features, self.in_features = shape
        self.compute_dtype = dtype
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("zero", packed.zero)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, bias, bits: int, group: int, symmetric: bool
    ) -> PackedLinear:
        """Round-to-nearest `weight` [out, in] into a packed layer."""
        tile = TileShape(1, group)
        packed = quantize(weight.float(), bits, tile, symmetric)
        return cls(packed, bits, group, tuple(weight.shape), bias, weight.dtype)

    @property
    def tile(self) -> TileShape:
        return TileShape(1, self.group)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q = Quantized(self.codes, self.scale, self.zero)
        return dequantize(q, self.bits, self.tile, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)  # held in the storage dtype
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def modeled_nbytes(self) -> int:
        """Closed form: codes, one fp16 scale (and zero) per group, the bias."""
        groups = self.out_features * (self.in_features // self.group)
        per_group = _F16 * (1 if self.zero is None else 2)
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * self.in_features * self.bits // 8 + groups * per_group + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, g={self.group}"
