"""Linear layers whose weights are held as packed integer codes, run by torch's packed CPU kernels.

Weights are quantized along the input dimension in groups. Each layer holds one layout:

    Int4PackLinear  int4 in torch's CPU int4pack layout (`int4pack.py`): uint8 codes [N, K/2]
                    and bf16 scales_and_zeros [K/g, N, 2], run by `_weight_int4pack_mm_for_cpu`;
    Int8PackLinear  int8 codes [N, K] and one bf16 scale per row, run by `_weight_int8pack_mm`;
    TilesLinear     the tile codec of `tiles.py` (fp16 scale and zero per 1 x g tile), for the
                    int4 shapes the kernel refuses (group not 32..256, out width not 16 k).

Scales are bf16 in the kernel layouts because the kernels read them in the activation dtype and a
per-call cast measured as slow as half the matmul. The codes are coded against the stored bf16
grid, so the round-trip error stays at most scale/2 (plus, for int4, half a bf16 ulp of the zero).

Each call takes one of three paths, chosen per machine by measurement (`kernel_path`): the packed
kernel with activations cast to bf16 at the op boundary (`packed-bf16`), the packed kernel in the
activation dtype (`packed`), or dequantizing the layer into a temporary and `F.linear`
(`dequantize`, also the reference and the fallback for layers no kernel accepts). The packed
tensors are all that is held between calls, so `weights_bytes` measured from the module's tensors
is the real footprint; dequantized weights and cast activations are activation memory.

Why our own module: torchao 0.18 has no CPU int4 weight-only path, quanto forces other group
sizes, and llm-compressor checkpoints decompress to fp32 on CPU.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from kvpareto.codec import Quantized, TileShape, dequantize, quantize
from kvpareto.kernels.record import measured
from kvpareto.weights import int4pack

_F16 = 2
_BF16 = 2
PATHS = ("packed-bf16", "packed", "dequantize")
# Calls of up to this many rows (decode steps, small batches) follow the decode probe.
DECODE_ROWS = 8
# The probe's layer: SmolLM2's up_proj (576 -> 1536, g64), at one row and at a prefill chunk
# (the kernels lose to dequantize + GEMM somewhere near 64 rows here, so a chunk must be long).
_PROBE_SHAPE, _PROBE_GROUP = (1536, 576), 64
_PROBE_ROWS = {"decode": 1, "prefill": 256}
# The AVX-512 int8 kernel reads K in whole vectors and crashes (no error) on a ragged tail.
INT8_K_MULTIPLE = 32


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
    """y = x W^T + b with W held as packed `bits`-bit codes per (row, group).

    A subclass owns one storage layout: its buffers (`BUFFERS`, registered in that order),
    `dequantized_weight`, `modeled_nbytes` and, if a packed kernel reads it, `_kernel`.
    """

    BUFFERS: tuple[str, ...] = ()
    # True for the token table of a packed embedding and LM head (`embedding.py`): summaries of
    # the decoder's layers leave it out.
    embedding_table = False

    def __init__(self, bits: int, group: int, shape, bias, dtype, buffers: dict):
        super().__init__()
        self.bits, self.group = bits, group
        self.out_features, self.in_features = shape
        self.compute_dtype = dtype
        for name in self.BUFFERS:
            self.register_buffer(name, _aligned(buffers.get(name)))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(
        cls, weight: torch.Tensor, bias, bits: int, group: int, symmetric: bool
    ) -> PackedLinear:
        """Round-to-nearest `weight` [out, in] into a packed layer, in the fastest layout that
        can hold it."""
        out_features, in_features = weight.shape
        if bits == 8 and symmetric:
            layout = Int8PackLinear
        elif bits == 4 and not symmetric and int4pack.supports(out_features, in_features, group):
            layout = Int4PackLinear
        else:
            layout = TilesLinear
        buffers = layout.encode(weight.detach().float(), bits, group, symmetric)
        return layout(bits, group, tuple(weight.shape), bias, weight.dtype, buffers)

    @property
    def kernel_ok(self) -> bool:
        """Whether a packed kernel accepts this layer; if not, every call dequantizes."""
        return False

    def path(self, dtype: torch.dtype, rows: int) -> str:
        """The path a call with `rows` rows of `dtype` activations takes."""
        return kernel_path(self.bits, dtype, rows) if self.kernel_ok else "dequantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_via(self.path(x.dtype, x.numel() // self.in_features), x)

    def forward_via(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output through `path` (one of `PATHS`), in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)  # held in the storage dtype
        if path == "dequantize":
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        dtype = torch.bfloat16 if path == "packed-bf16" else x.dtype
        rows = x.reshape(-1, self.in_features).to(dtype).contiguous()
        y = self._kernel(rows).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if bias is None else y.add_(bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight [len(ids), in] in `dtype`, only those rows decoded."""
        raise NotImplementedError

    def modeled_nbytes(self) -> int:
        raise NotImplementedError

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _bias_nbytes(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * self.bias.element_size()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, g={self.group}"


class TilesLinear(PackedLinear):
    """The tile codec's layout: codes uint8 [N, K*b/8] two int4 codes per byte, fp16 scale and
    zero [N, K/g] (`tiles.py`); code = round((w - zero) / scale)."""

    BUFFERS = ("codes", "scale", "zero")

    @staticmethod
    def encode(weight, bits, group, symmetric) -> dict:
        packed = quantize(weight, bits, TileShape(1, group), symmetric)
        return {"codes": packed.codes, "scale": packed.scale, "zero": packed.zero}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q = Quantized(self.codes, self.scale, self.zero)
        return dequantize(q, self.bits, TileShape(1, self.group), dtype or self.compute_dtype)

    def dequantized_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        zero = None if self.zero is None else self.zero[ids]
        q = Quantized(self.codes[ids], self.scale[ids], zero)
        return dequantize(q, self.bits, TileShape(1, self.group), dtype)

    def modeled_nbytes(self) -> int:
        """Codes at bits/8 bytes a weight, one fp16 scale (and zero) per group, the bias."""
        groups = self.out_features * (self.in_features // self.group)
        per_group = _F16 * (1 if self.zero is None else 2)
        codes = self.out_features * self.in_features * self.bits // 8
        return codes + groups * per_group + self._bias_nbytes()


class Int4PackLinear(PackedLinear):
    """torch's int4pack layout: codes uint8 [N, K/2] in this build's nibble order, and
    scales_and_zeros bf16 [K/g, N, 2] with w = (q - 8) * scale + zero.

    The kernel's zero is the tile codec's zero (the group's minimum) plus 8 scales, since the
    kernel centres codes on 8. `scale` and `zero` are views of scales_and_zeros, [K/g, N] each.
    """

    BUFFERS = ("codes", "scales_and_zeros")

    @staticmethod
    def encode(weight, bits, group, symmetric) -> dict:
        base = TilesLinear.encode(weight, bits, group, symmetric)
        scale = _round_bf16_up(base["scale"].float())  # [N, K/g]; up keeps the range covered
        zero = (base["zero"].float() + 8 * scale.float()).to(torch.bfloat16)
        n, k = weight.shape
        safe = torch.where(scale > 0, scale.float(), 1.0)[..., None]
        grouped = weight.view(n, k // group, group)
        codes = torch.round((grouped - zero.float()[..., None]) / safe) + 8
        codes = codes.clamp(0, 15).to(torch.uint8).view(n, k)
        return {
            "codes": int4pack.pack(codes),
            "scales_and_zeros": torch.stack([scale.t(), zero.t()], dim=-1).contiguous(),
        }

    @property
    def kernel_ok(self) -> bool:
        return True

    @property
    def scale(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 0]

    @property
    def zero(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 1]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        codes = int4pack.unpack(self.codes, int4pack.layout(), dtype)
        return self._scaled(codes, self.scales_and_zeros, dtype)

    def dequantized_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = int4pack.rows(self.codes, int4pack.layout(), ids).to(dtype)
        return self._scaled(codes, self.scales_and_zeros[:, ids], dtype)

    def _scaled(self, codes: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Codes [R, K] in `dtype` (overwritten) to weights, with their rows' scales_and_zeros
        [K/g, R, 2]."""
        rows, k, g = codes.shape[0], self.in_features, self.group
        w = codes.view(rows, k // g, g)
        scale = sz[..., 0].t()[..., None]
        # (q - 8) s + z as q s + (z - 8 s): one pass fewer over the weight; the small offset is
        # formed in fp32 and rounded once.
        offset = (sz[..., 1].t()[..., None].float() - 8 * scale.float()).to(dtype)
        return w.mul_(scale.to(dtype)).add_(offset).view(rows, k)

    def modeled_nbytes(self) -> int:
        """uint8 [N, K/2] codes (N K / 2 bytes), bf16 [K/g, N, 2] (4 N K / g bytes), the bias."""
        n, k = self.out_features, self.in_features
        return n * k // 2 + (k // self.group) * n * 2 * _BF16 + self._bias_nbytes()

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros.to(rows.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.codes, self.group, sz)


class Int8PackLinear(PackedLinear):
    """Per-row symmetric int8: codes int8 [N, K] = round(w / scale), bf16 scale [N, 1]."""

    BUFFERS = ("codes", "scale")
    zero = None

    @staticmethod
    def encode(weight, bits, group, symmetric) -> dict:
        scale = _round_bf16_up(weight.abs().amax(dim=1, keepdim=True) / 127)
        safe = torch.where(scale > 0, scale.float(), 1.0)
        codes = torch.round(weight / safe).clamp(-127, 127).to(torch.int8)
        return {"codes": codes, "scale": scale}

    @property
    def kernel_ok(self) -> bool:
        return self.in_features % INT8_K_MULTIPLE == 0

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        return self.codes.to(dtype).mul_(self.scale.to(dtype))

    def dequantized_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.codes[ids].to(dtype).mul_(self.scale[ids].to(dtype))

    def modeled_nbytes(self) -> int:
        """int8 [N, K] codes (N K bytes), one bf16 scale per row (2 N bytes), the bias."""
        return self.out_features * (self.in_features + _BF16) + self._bias_nbytes()

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        scale = self.scale.view(-1).to(rows.dtype)
        return torch.ops.aten._weight_int8pack_mm(_aligned(rows), self.codes, scale)


LAYOUTS = {cls.__name__: cls for cls in (TilesLinear, Int4PackLinear, Int8PackLinear)}


# torch 2.13's `_weight_int8pack_mm` dies with a general-protection fault, not an error, when its
# activations or codes do not start on a 64-byte boundary (seen on an AVX-512 CPU): it hit codes
# read back from the weights cache (safetensors aligns tensor data to 8 bytes only). torch's own
# allocations are 64-byte aligned, so a copy fixes a tensor that is not.
_ALIGNMENT = 64


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t`, or a contiguous copy of it at a fresh (64-byte aligned) allocation if it starts
    elsewhere."""
    if t is None or t.data_ptr() % _ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _round_bf16_up(x: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 to the nearest bf16 >= x: one relative bf16 ulp (2^-7) more is enough
    to land above x after rounding to nearest."""
    nearest = x.to(torch.bfloat16)
    return torch.where(nearest.float() < x, (x * (1 + 2**-7)).to(torch.bfloat16), nearest)


# --- choosing a path, by measurement ---------------------------------------------------------


def call_path(bits: int, shape, group: int, dtype: torch.dtype, rows: int) -> str:
    """The path `PackedLinear.path` takes for a `bits`-bit layer of `shape` [out, in], without
    building one (for the memory model)."""
    out_features, in_features = shape
    if bits == 8:
        ok = in_features % INT8_K_MULTIPLE == 0
    else:
        ok = int4pack.supports(out_features, in_features, group)
    return kernel_path(bits, dtype, rows) if ok else "dequantize"


def resolve_kernel_paths(model: torch.nn.Module) -> None:
    """Probe (or read back) now every path choice a forward pass of `model` will ask for, in the
    dtype it computes in, so that no probe runs inside a later, measured forward pass."""
    from kvpareto.models.storage_dtype import compute_dtype

    dtype = compute_dtype(model)
    bits = {m.bits for m in model.modules() if isinstance(m, PackedLinear) and m.kernel_ok}
    for b in bits:
        for phase in _PROBE_ROWS:
            kernel_choice(b, dtype, phase)


def kernel_path(bits: int, dtype: torch.dtype, rows: int) -> str:
    """The fastest path measured on this machine for `bits`-bit weights, `dtype` activations
    and a call of `rows` rows (decode or prefill)."""
    phase = "decode" if rows <= DECODE_ROWS else "prefill"
    return kernel_choice(bits, dtype, phase)["path"]


@functools.cache
def kernel_choice(bits: int, dtype: torch.dtype, phase: str) -> dict:
    """{"path": fastest path, "us": microseconds per call of each candidate}, from the
    per-machine record in $KVPARETO_HOME if there is one, else probed now and recorded."""
    key = f"{bits}|{str(dtype).removeprefix('torch.')}|{phase}"
    return measured(key, lambda: _probe(bits, dtype, _PROBE_ROWS[phase]))


def kernel_summary(model: torch.nn.Module) -> dict:
    """The paths a model's packed decoder linears take in its compute dtype, per phase, and how
    many layers no kernel accepts (those always dequantize), with the same for its packed token
    tables under "embedding"; empty for a model without any."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    layers = [m for m in packed if not m.embedding_table]
    tables = [m for m in packed if m.embedding_table]
    summary = _paths(layers) if layers else {}
    if tables:  # only where embed_weights is set, so records without it keep their shape
        summary["embedding"] = _paths(tables)
    return summary


def _paths(layers: list[PackedLinear]) -> dict:
    bits, dtype = layers[0].bits, layers[0].compute_dtype
    summary = {phase: kernel_choice(bits, dtype, phase)["path"] for phase in _PROBE_ROWS}
    return {**summary, "dequantize_only_layers": sum(not m.kernel_ok for m in layers)}


def _probe(bits: int, dtype: torch.dtype, rows: int) -> dict:
    """Time every path on the probe layer: one first call each, then rounds that time each
    path in turn, so that other load on the machine hits all alike; the best call is kept.

    A path whose first call is 4x slower than the best first call keeps that time and is not
    repeated: it cannot win, and fp32 through the packed kernels can cost 0.5 s a call.
    """
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(_PROBE_SHAPE, generator=gen) * 0.05
    group = _PROBE_GROUP if bits == 4 else _PROBE_SHAPE[1]
    layer = PackedLinear.quantize(weight, None, bits, group, symmetric=bits == 8)
    x = torch.randn(rows, _PROBE_SHAPE[1], generator=gen).to(dtype)
    paths = PATHS if dtype != torch.bfloat16 else PATHS[1:]
    us: dict[str, float] = {}
    with torch.inference_mode():
        for path in paths if layer.kernel_ok else ("dequantize",):
            us[path] = _seconds(layer, path, x) * 1e6
        contenders = [p for p in us if us[p] < 4 * min(us.values())]
        for _ in range(5 if rows == 1 else 3):
            for path in contenders:
                us[path] = min(us[path], _seconds(layer, path, x) * 1e6)
    us = {path: round(t, 1) for path, t in us.items()}
    return {"path": min(us, key=us.get), "us": us}


def _seconds(layer: PackedLinear, path: str, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer.forward_via(path, x)
    return time.perf_counter() - start
