"""The `Config` value: one point of the search space, every knob named as in the literature.

A Config is frozen and hashable. Its `key()` is stable across runs and machines (it feeds trial
cache keys), and its `label()` is the short name shown in tables and reports, for example
`w16-k4v2-tok-g32-r0-c256` or `awq4g64-k4v2-tok-g32-r32-c256-p50snapkv`. Its fields, checks,
key and label come from the knob table (kvpareto/knobs.py). Validation happens here, once, rules
between knobs included (kv_scheme adaptive with a prune rate fails when the Config is built), so
every later layer can trust it; `canonical` resets the knobs that do not apply.
Knows nothing of torch or optuna.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from kvpareto import knobs
from kvpareto.errors import UserError
from kvpareto.knobs import KNOB, KNOBS, LAYER_BITS_PIECE_AT


@dataclass(frozen=True)
class LayerBits:
    """A per-layer override of KV bit-widths (KVTuner-style mixed precision)."""

    k_bits: int
    v_bits: int


def _knob_fields(cls):
    """One dataclass field per knob, in table order, ahead of the class's own fields."""
    own = cls.__dict__.get("__annotations__", {})
    cls.__annotations__ = {**{k.name: k.type for k in KNOBS}, **own}
    for knob in KNOBS:
        setattr(cls, knob.name, knob.default)
    return cls


@dataclass(frozen=True)
@_knob_fields
class Config:
    """Every knob of kvpareto/knobs.py as a field, then the per-layer bit overrides."""

    # ((layer_index, LayerBits), ...) sorted by layer; a tuple so the Config stays hashable
    layer_bits: tuple[tuple[int, LayerBits], ...] = field(default=())

    def __post_init__(self) -> None:
        # 0 and 0.0 must give the same key: store the float knobs as floats
        for knob in KNOBS:
            value = getattr(self, knob.name)
            if knob.type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, knob.name, float(value))
        for knob in KNOBS:
            knob.check(getattr(self, knob.name))
        for idx, bits in self.layer_bits:
            if not isinstance(idx, int) or idx < 0:
                raise UserError(f"layer_bits keys must be layer indices >= 0, got {idx!r}")
            for name in ("k_bits", "v_bits"):
                KNOB[name].check(getattr(bits, name), f"layer_bits[{idx}].{name}")
        knobs.check_rules(self.to_dict())

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
        layer_bits = _layer_bits(data.pop("layer_bits", None))
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
        for knob in KNOBS:
            if not knob.keyed_at_default and data[knob.name] == knob.default:
                del data[knob.name]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def bits_for_layer(self, layer_idx: int) -> LayerBits:
        for idx, bits in self.layer_bits:
            if idx == layer_idx:
                return bits
        return LayerBits(self.k_bits, self.v_bits)

    def label(self) -> str:
        """Short human name: weights, KV bits and knobs, chunk, pruning (w16 = unquantized)."""
        pieces = knobs.label_pieces(self.to_dict())
        if self.layer_bits:
            pieces.append((LAYER_BITS_PIECE_AT, f"L{len(self.layer_bits)}"))
        return "-".join(text for _, text in sorted(pieces))


def canonical(config: Config | dict) -> Config:
    """The Config of these values with every knob that does not apply at its default, so equal
    behaviour means equal key. Plain data may pair knobs that a Config refuses together
    (kv_scheme adaptive with k_bits 4): they do not apply, so they are reset first."""
    data = config.to_dict() if isinstance(config, Config) else dict(config)
    layer_bits = _layer_bits(data.pop("layer_bits", None))
    for name, value in data.items():
        if name in KNOB:
            KNOB[name].check(value)
    data["layer_bits"] = {str(i): asdict(b) for i, b in layer_bits}
    return Config.from_dict(knobs.canonical(data))


def _layer_bits(raw) -> tuple[tuple[int, LayerBits], ...]:
    """Per-layer bits from plain data: a mapping (or pairs) of layer index to {k_bits, v_bits}."""
    raw = raw or {}
    if isinstance(raw, dict):
        raw = raw.items()
    try:
        return tuple(
            sorted((int(i), LayerBits(int(b["k_bits"]), int(b["v_bits"]))) for i, b in raw)
        )
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(
            "layer_bits must map layer index to {k_bits: N, v_bits: N}, "
            f"e.g. {{0: {{k_bits: 8, v_bits: 4}}}} ({e})"
        ) from e
