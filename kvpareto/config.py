"""The `Config` value: one point of the search space, every knob named as in the literature.

A Config is frozen and hashable. Its `key()` is stable across runs and machines (it feeds trial
cache keys), and its `label()` is the short name shown in tables and reports, for example
`w16-k4v2-tok-g32-r0-c256` or `awq4g64-k4v2-tok-g32-r32-c256-p50snapkv`. Validation happens
here, once, so every later layer can trust it.
Knows nothing of torch or optuna.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from kvpareto.errors import UserError

KV_BITS = (2, 4, 8, 16)
GRANULARITIES = ("per-token", "per-channel", "per-tensor", "per-block")
GROUP_SIZES = (32, 64, 128)
ROTATIONS = ("none", "hadamard")
WEIGHT_METHODS = ("none", "int8", "int4", "awq4")
WEIGHT_GROUP_SIZES = (32, 64, 128)
# "native" is kvpareto's own AWQ (kvpareto/weights/awq.py); the others are external packages that
# run only where they install (see that module for why native is the default).
AWQ_BACKENDS = ("native", "llmcompressor", "autoawq")
PRUNE_SCORERS = ("snapkv", "knorm", "streaming", "random")
MAX_PRUNE_RATE = 0.9
KV_SCHEMES = ("static", "adaptive", "rule")
_GRAN_SHORT = {"per-token": "tok", "per-channel": "ch", "per-tensor": "ten", "per-block": "blk"}


@dataclass(frozen=True)
class LayerBits:
    """A per-layer override of KV bit-widths (KVTuner-style mixed precision)."""

    k_bits: int
    v_bits: int


@dataclass(frozen=True)
class Config:
    k_bits: int = 16
    v_bits: int = 16
    k_granularity: str = "per-token"
    v_granularity: str = "per-token"
    group_size: int = 32
    symmetric: bool = False
    residual_length: int = 0
    k_smooth: bool = False
    rotation: str = "none"
    chunk_size: int = 0  # 0 = unchunked prefill (the whole prompt is one chunk)
    weights: str = "none"  # none = the model's own dtype; int8 / int4 RTN; awq4
    weight_group_size: int = 64  # int4/awq4 group along the input dimension
    awq_backend: str = "native"
    prune_rate: float = 0.0  # fraction of prompt tokens evicted after prefill, per layer and head
    prune_scorer: str = "snapkv"
    kv_scheme: str = "static"  # static = k_bits/v_bits; adaptive/rule = per-token bit-widths
    target_mean_bits: float = 4.0  # only for kv_scheme adaptive/rule
    controller: str = "default"  # adaptive controller: a name or a file path
    # ((layer_index, LayerBits), ...) sorted by layer; a tuple so the Config stays hashable
    layer_bits: tuple[tuple[int, LayerBits], ...] = field(default=())

    def __post_init__(self) -> None:
        # 0 and 0.0 must give the same key: store the float knobs as floats
        for name in ("prune_rate", "target_mean_bits"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        _check_bits("k_bits", self.k_bits)
        _check_bits("v_bits", self.v_bits)
        for name in ("k_granularity", "v_granularity"):
            if getattr(self, name) not in GRANULARITIES:
                raise UserError(
                    f"{name} must be one of {', '.join(GRANULARITIES)}, got {getattr(self, name)!r}"
                )
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        if not isinstance(self.residual_length, int) or not 0 <= self.residual_length <= 4096:
            raise UserError(
                f"residual_length must be an integer in 0..4096, got {self.residual_length!r}"
            )
        if self.rotation not in ROTATIONS:
            raise UserError(
                f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}"
            )
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise UserError(
                f"chunk_size must be 0 (unchunked) or a positive integer, got {self.chunk_size!r}"
            )
        _one_of("weights", self.weights, WEIGHT_METHODS)
        _one_of("weight_group_size", self.weight_group_size, WEIGHT_GROUP_SIZES)
        _one_of("awq_backend", self.awq_backend, AWQ_BACKENDS)
        _number_in("prune_rate", self.prune_rate, 0, MAX_PRUNE_RATE)
        _one_of("prune_scorer", self.prune_scorer, PRUNE_SCORERS)
        _one_of("kv_scheme", self.kv_scheme, KV_SCHEMES)
        _number_in("target_mean_bits", self.target_mean_bits, 2, 16)
        if not isinstance(self.controller, str) or not self.controller:
            raise UserError(f"controller must be a name or a path, got {self.controller!r}")
        for idx, bits in self.layer_bits:
            if not isinstance(idx, int) or idx < 0:
                raise UserError(f"layer_bits keys must be layer indices >= 0, got {idx!r}")
            _check_bits(f"layer_bits[{idx}].k_bits", bits.k_bits)
            _check_bits(f"layer_bits[{idx}].v_bits", bits.v_bits)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Build from plain data (a --config file, a results row); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        data = dict(data)
        raw_layers = data.pop("layer_bits", None) or {}
        if isinstance(raw_layers, dict):
            raw_layers = raw_layers.items()
        try:
            layer_bits = tuple(
                sorted(
                    (int(i), LayerBits(int(b["k_bits"]), int(b["v_bits"]))) for i, b in raw_layers
                )
            )
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(
                "layer_bits must map layer index to {k_bits: N, v_bits: N}, "
                f"e.g. {{0: {{k_bits: 8, v_bits: 4}}}} ({e})"
            ) from e
        return cls(**data, layer_bits=layer_bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_bits"] = {str(i): asdict(b) for i, b in self.layer_bits}
        return d

    @property
    def weight_method(self) -> tuple[str, int, str]:
        """What decides the weights: (method, group size, AWQ backend), defaults where unused."""
        group = self.weight_group_size if self.weights in ("int4", "awq4") else 0
        return self.weights, group, self.awq_backend if self.weights == "awq4" else ""

    # --- identity -----------------------------------------------------------------------------
    def key(self) -> str:
        """A stable hash of every knob: equal configs share trial-cache entries.

        Knobs added after the first release are left out while at their default, so trial caches
        written before they existed stay valid.
        """
        data = self.to_dict()
        for name, default in _LATER_KNOBS.items():
            if data[name] == default:
                del data[name]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def bits_for_layer(self, layer_idx: int) -> LayerBits:
        for idx, bits in self.layer_bits:
            if idx == layer_idx:
                return bits
        return LayerBits(self.k_bits, self.v_bits)

    def label(self) -> str:
        """Short human name: weights, KV bits and knobs, chunk, pruning (w16 = unquantized)."""
        weights = {"none": "w16", "int8": "w8", "int4": "w4", "awq4": "awq4"}[self.weights]
        if self.weights in ("int4", "awq4"):
            weights += f"g{self.weight_group_size}"
        if self.kv_scheme == "static":
            kv = f"k{self.k_bits}v{self.v_bits}"
        else:
            kv = f"{self.kv_scheme}{self.target_mean_bits:g}b"
        parts = [weights, kv]
        if self.kv_scheme == "static" and (self.k_bits < 16 or self.v_bits < 16):
            k, v = _GRAN_SHORT[self.k_granularity], _GRAN_SHORT[self.v_granularity]
            parts.append(k if k == v else f"{k}/{v}")
            parts.append(f"g{self.group_size}")
            parts.append(f"r{self.residual_length}")
            if self.symmetric:
                parts.append("sym")
            if self.k_smooth:
                parts.append("ks")
            if self.rotation != "none":
                parts.append("rot")
        if self.layer_bits:
            parts.append(f"L{len(self.layer_bits)}")
        parts.append(f"c{self.chunk_size}")
        if self.prune_rate:
            parts.append(f"p{round(100 * self.prune_rate)}{self.prune_scorer}")
        return "-".join(parts)


_LATER_KNOBS = {
    "weights": "none",
    "weight_group_size": 64,
    "awq_backend": "native",
    "prune_rate": 0.0,
    "prune_scorer": "snapkv",
    "kv_scheme": "static",
    "target_mean_bits": 4.0,
    "controller": "default",
}


def _one_of(name: str, value: object, options: tuple) -> None:
    if value not in options:
        raise UserError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")


def _number_in(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise UserError(f"{name} must be a number in {lo}..{hi}, got {value!r}")


def _check_bits(name: str, value: object) -> None:
    if value not in KV_BITS:
        raise UserError(f"{name} must be one of {', '.join(map(str, KV_BITS))}, got {value!r}")
