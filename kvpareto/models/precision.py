"""The precision a model's weights had before this tool dequantized them, read from its source.

A GGUF stores each tensor in a ggml type (Q4_1, Q8_0, F32, ...) and an HF folder may carry a
`quantization_config`. When the decoder linears were quantized upstream, the float model that
loads here is a dequantized low-bit model: its "16-bit baseline" already carries that noise.
`SourcePrecision` says so per role (decoder linears, embedding and LM head, everything else), and
travels with the model into trial records, study.json, the frontier table and the report.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

_FLOAT_TYPES = {"F64", "F32", "F16", "BF16"}
# K-quants share one scale (and min) per sub-block of their 256-weight super-block: the
# sub-block is the grid a weight group could rebuild.
_SCALE_BLOCK = {"Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16, "IQ4_XS": 32}
_ROLES = ("decoder_linears", "embedding", "other")


@dataclass(frozen=True)
class TensorType:
    """One storage type within a role: how many of the role's tensors use it."""

    name: str  # a ggml type (Q4_1, Q8_0, F32) or an HF quant_method (gptq, awq, ...)
    bits: int  # nominal bits per weight; 16 or more for float, 0 when quantized to unknown bits
    block: int  # weights along the input that share one scale; 0 for float or per-channel
    tensors: int = 0  # tensors of this type in the role; 0 when the source does not say

    def text(self) -> str:
        return f"{self.name} (block {self.block})" if self.block else self.name


@dataclass(frozen=True)
class SourcePrecision:
    """Upstream precision per role. `origin`: gguf, quantization_config, float or unknown."""

    origin: str
    decoder_linears: tuple[TensorType, ...] = ()
    embedding: tuple[TensorType, ...] = ()  # the token embedding and an untied LM head
    other: tuple[TensorType, ...] = ()  # norms, biases

    @property
    def quantized(self) -> bool:
        """Whether any decoder linear was stored below 16 bits upstream."""
        return any(t.bits < 16 for t in self.decoder_linears)

    def block(self, bits: int) -> int:
        """The declared block of decoder linears stored at `bits` bits or fewer (0: none): the
        grid that an int-`bits` weight group of that size rebuilds."""
        return max((t.block for t in self.decoder_linears if t.bits <= bits), default=0)

    @property
    def description(self) -> str:
        """One line for tables and reports."""
        if self.origin == "unknown":
            return "unknown (the GGUF this model was converted from is not reachable)"
        if not self.quantized:
            stored = _types(self.decoder_linears)
            return "float (no upstream quantization)" + (
                f": decoder linears {stored}" if stored else ""
            )
        parts = [f"decoder linears {_types(self.decoder_linears)}"]
        if any(t.bits < 16 for t in self.embedding):
            parts.append(f"embedding {_types(self.embedding)}")
        bits = sorted({t.bits for t in self.decoder_linears if t.bits < 16})
        width = "low" if 0 in bits else "/".join(str(b) for b in bits)
        return (
            f"{', '.join(parts)} upstream; the 16-bit baseline is a dequantized {width}-bit model"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "quantized": self.quantized, "description": self.description}

    @classmethod
    def from_dict(cls, data: dict) -> SourcePrecision:
        roles = {r: tuple(TensorType(**t) for t in data.get(r) or ()) for r in _ROLES}
        return cls(origin=data["origin"], **roles)


FLOAT = SourcePrecision("float")
UNKNOWN = SourcePrecision("unknown")


def _types(types: tuple[TensorType, ...]) -> str:
    return " + ".join(t.text() for t in types)


def _ggml_type(name: str, block: int, tensors: int) -> TensorType:
    bits = int(re.search(r"\d+", name).group())
    if name in _FLOAT_TYPES:
        block = 0
    return TensorType(name, bits, _SCALE_BLOCK.get(name, block), tensors)


def _role(tensor_name: str, n_dims: int) -> str:
    if tensor_name.startswith("blk."):
        return "decoder_linears" if n_dims == 2 else "other"
    if tensor_name.startswith(("token_embd.", "output.")):
        return "embedding"
    return "other"


def from_gguf(path: Path) -> SourcePrecision:
    """Read every tensor's ggml type from a GGUF file (its header only; no weights are read)."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    counts: dict[str, dict[str, list]] = {r: {} for r in _ROLES}
    for tensor in GGUFReader(path).tensors:
        kind = tensor.tensor_type
        seen = counts[_role(tensor.name, len(tensor.shape))].setdefault(
            kind.name, [GGML_QUANT_SIZES[kind][0], 0]
        )
        seen[1] += 1
    roles = {
        role: tuple(_ggml_type(name, block, n) for name, (block, n) in sorted(found.items()))
        for role, found in counts.items()
    }
    return SourcePrecision("gguf", **roles)


def from_quantization_config(config) -> SourcePrecision:
    """Read an HF config's `quantization_config` (a dict or a transformers config object); a
    config without one is a float model."""
    if config is None:
        return FLOAT
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    bits = (
        data.get("bits")
        or data.get("w_bit")
        or (4 if data.get("load_in_4bit") else 8 if data.get("load_in_8bit") else None)
        or (8 if "fp8" in str(data.get("quant_method", "")).lower() else 0)
    )
    group = data.get("group_size") or data.get("q_group_size") or 0
    method = str(data.get("quant_method") or "quantized")
    linear = TensorType(method, int(bits), max(int(group), 0))
    return SourcePrecision("quantization_config", decoder_linears=(linear,))
