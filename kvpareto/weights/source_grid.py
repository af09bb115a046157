"""Whether a weight config rebuilds the grid its source model was stored on, measured on weights.

A model dequantized from Q4_1 holds at most 16 distinct values in each 32-weight block along the
input (`source_block` finds that block). Min-max int4 at group 32 then finds each block's own
minimum, maximum and step and rebuilds the source values, up to the bf16 rounding of the kernel
layout's scales and zeros: relative weight error 0.013 on SmolLM2, against about 0.08 for float
weights, so its accuracy cost is not a 16->4-bit cost. Other groups do not rebuild it: a group
of 64 spans two blocks with two grids (0.08-0.09), and a group of 16 re-fits the range of half a
block, whose levels then fall between the source's (0.055, against 0.065 for float weights). Nor
does int8 per channel, although a SmolLM2 row holds at most 256 distinct values: they lie on 18
grids, not on one.

So a config reproduces the source grid when its own round trip leaves almost no error: less than
a tenth of the step**2/12 per weight that rounding leaves on weights off its grid. Both are
measured on a few rows of the decoder linears of the first, middle and last layers, so they read
the weights that load, whatever their file said.
"""

from __future__ import annotations

import torch

from kvpareto.codec import TileShape, dequantize, quantize
from kvpareto.config import Config
from kvpareto.weights.awq import decoder_layers
from kvpareto.weights.packed_linear import weight_group
from kvpareto.weights.quantize import QUANTIZERS

SAMPLE_ROWS = 64  # blocks run along the input, so a few output rows show them all
# Round-trip error over rounding noise: about (g - 2) / g for float weights (each group's minimum
# and maximum come back exact) and under 0.01 for Q4_1 weights in bf16 at g32.
REBUILT = 0.1


def source_block(weight: torch.Tensor, bits: int) -> int:
    """The largest block along the input (a power of two that divides the width, or the whole
    row) above 2**bits weights in which every block of `weight` holds at most 2**bits distinct
    values; 0 when none does, as in float weights."""
    rows = weight.detach()[:SAMPLE_ROWS].float()
    width = rows.shape[1]
    levels = 2**bits
    sizes = {b for b in _powers_of_two(width) if b > levels and width % b == 0}
    if width > levels:
        sizes.add(width)
    found = 0
    for block in sorted(sizes):
        if _most_distinct(rows, block) > levels:
            break
        found = block
    return found


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(1, limit.bit_length())]


def _most_distinct(rows: torch.Tensor, block: int) -> int:
    """The largest number of distinct values in any `block`-wide slice of a row."""
    ordered = rows.reshape(-1, block).sort(dim=1).values
    return int((ordered.diff(dim=1) != 0).sum(dim=1).max()) + 1


def sampled_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The decoder linears of the first, middle and last layers."""
    layers = decoder_layers(model)
    picks = sorted({0, len(layers) // 2, len(layers) - 1})
    return [
        (f"layers.{i}.{name}", module)
        for i in picks
        for name, module in layers[i].named_modules()
        if isinstance(module, torch.nn.Linear)
    ]


def measured_block(model, bits: int = 4) -> int:
    """The `source_block` most sampled decoder linears share (0: float weights)."""
    blocks = [source_block(linear.weight, bits) for _, linear in sampled_linears(model)]
    return max(set(blocks), key=blocks.count)


def rounding_noise_ratio(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> float:
    """The round-trip error energy of `bits`-bit RTN at `group` on a few rows of `weight`, over
    the step**2/12 per weight that rounding leaves on weights off the quantizer's grid."""
    rows = weight.detach()[:SAMPLE_ROWS].float()
    tile = TileShape(1, group)
    packed = quantize(rows, bits, tile, symmetric)
    error = (dequantize(packed, bits, tile, torch.float32) - rows).pow(2).sum()
    noise = packed.scale.float().pow(2).mean() / 12 * rows.numel()
    return (error / noise.clamp_min(torch.finfo(torch.float32).tiny)).item()


def reproduces_source_grid(model, config: Config) -> bool:
    """Whether `config`'s weight quantizer rebuilds the weights of some sampled decoder linear of
    the unquantized `model`. AWQ counts too: on such weights its scale search keeps alpha = 0
    (no scaling), since any scaling moves them off the grid, and quantizes them as int4 does."""
    method, group, _ = config.weight_method
    if method not in QUANTIZERS:  # "none": nothing is quantized
        return False
    quantizer = QUANTIZERS.get(method)
    for _, linear in sampled_linears(model):
        width = linear.in_features
        used = weight_group(group, width) if quantizer.grouped else width
        ratio = rounding_noise_ratio(linear.weight, quantizer.bits, used, quantizer.symmetric)
        if ratio < REBUILT:
            return True
    return False


def aligned_groups(model, groups) -> list[int]:
    """The int4 group sizes among `groups` that reproduce `model`'s source grid."""
    return [
        g
        for g in groups
        if reproduces_source_grid(model, Config(weights="int4", weight_group_size=g))
    ]
