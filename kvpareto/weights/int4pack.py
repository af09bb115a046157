"""torch's CPU int4pack weight layout: which order this build packs nibbles in, and unpacking.

`torch.ops.aten._convert_weight_to_int4pack_for_cpu` turns int32 codes [N, K] in 0..15 into uint8
[N, K / 2] whose byte order depends on the CPU capability the kernels were dispatched for. Rows
are cut into blocks of `block` output channels, each stored as [K, block / 2] bytes:

    lanes   a full block pairs row j (low nibble) with row j + block / 2 (high nibble)
    pairs   rows 2j (low) and 2j + 1 (high); also every partial block in the lanes format

AVX-512 builds use 64-row lane blocks, AVX2 32-row lane blocks, the scalar build 32-row pairs.
`layout()` finds which one this process packs by round-tripping a small probe, so the order is
checked here, not assumed; it is None when the op is missing or no known order matches, and then
no layer uses the int4pack layout. The layout name enters the weight cache key: a cache written
on an AVX-512 machine must never be read on an AVX2 one.
"""

from __future__ import annotations

import functools

import torch

# The kernels' own limits (torch 2.13): they reject other group sizes, and the packer rejects an
# output width that is not a multiple of 16.
GROUPS = (32, 64, 128, 256)
ROW_MULTIPLE = 16
_CANDIDATES = {"lanes64": (64, True), "lanes32": (32, True), "pairs32": (32, False)}


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> torch's packed uint8 [N, K / 2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def unpack(packed: torch.Tensor, name: str, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The inverse of `pack` for the layout called `name`: codes [N, K] in `dtype`.

    Bytes are transposed to row order first, at half the size of the codes, and each nibble
    plane is then written straight into the output with contiguous rows: about 3x faster than
    transposing the unpacked codes.
    """
    block, lanes = _CANDIDATES[name]
    n, k = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype)
    flat = packed.reshape(-1)
    full = n - n % block
    if full:
        _put(flat[: full * k // 2].view(full // block, k, block // 2), out[:full], lanes)
    if n > full:
        _put(flat[full * k // 2 :].view(1, k, (n - full) // 2), out[full:], False)
    return out


def rows(packed: torch.Tensor, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [len(ids), K] of the rows `ids` of `packed` in the layout called `name`,
    read in place: row r of a block is one byte column of its [K, S] bytes, in one nibble plane.
    What an embedding lookup reads from the table its tied head multiplies with."""
    block, lanes = _CANDIDATES[name]
    n, k = packed.shape[0], packed.shape[1] * 2
    full = n - n % block
    flat = packed.reshape(-1)
    out = torch.empty(len(ids), k, dtype=torch.uint8)
    in_full = ids < full
    if in_full.any():
        r = ids[in_full] % block
        half = block // 2
        column, high = (r % half, r // half) if lanes else (r // 2, r % 2)
        blocks = flat[: full * k // 2].view(full // block, k, half)
        out[in_full] = _nibbles(blocks[ids[in_full] // block, :, column], high)
    if not in_full.all():
        r = ids[~in_full] - full
        tail = flat[full * k // 2 :].view(k, (n - full) // 2)
        out[~in_full] = _nibbles(tail[:, r // 2].t(), r % 2)
    return out


def _nibbles(bytes_: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Each row of `bytes_` [R, K] to its low (high = 0) or high (high = 1) nibbles."""
    return (bytes_ >> (4 * high).to(torch.uint8)[:, None]) & 15


def _put(blocks: torch.Tensor, out: torch.Tensor, lanes: bool) -> None:
    """Bytes [B, K, S] of B blocks of 2 S rows -> their codes in `out` [2 B S, K]."""
    b, k, s = blocks.shape
    rows = blocks.transpose(1, 2).contiguous()  # [B, S, K]: byte j of every k, in row order
    low, high = out.view(b, 2, s, k).unbind(1) if lanes else out.view(b, s, 2, k).unbind(2)
    low.copy_(rows & 15)
    high.copy_(rows >> 4)


@functools.cache
def layout() -> str | None:
    """The name of the order this process packs in, or None if int4pack is unusable here."""
    # 112 rows = a full and a partial block for 64-row layouts, three full and a partial for 32.
    codes = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(0))
    codes = codes.to(torch.uint8)
    try:
        packed = pack(codes)
    except (AttributeError, RuntimeError):
        return None
    for name in _CANDIDATES:
        if torch.equal(unpack(packed, name), codes):
            return name
    return None


def supports(out_features: int, in_features: int, group: int) -> bool:
    """Whether a layer of this shape can be held in the int4pack layout in this process."""
    return (
        layout() is not None
        and group in GROUPS
        and in_features % group == 0
        and out_features % ROW_MULTIPLE == 0
    )
