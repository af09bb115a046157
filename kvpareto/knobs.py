"""The knob table: every setting a `Config` holds, described once.

A `Knob` says a setting's name, type, allowed values, default, group, when it applies, its piece
of the label, its command-line help, when the sampler is asked for it and whether the key names
it at its default. `Config` (fields, checks, key, label), the search-space schema and the
sampler's questions, the `eval` options, the lm-eval model args and the report's knob chart all
read this table, so a new knob is one entry here plus the code that implements it.

Rules between knobs work on a dict of values: every knob by name, and `layer_bits` as plain data
(layer index -> {k_bits, v_bits}). A knob that does not apply (k_granularity when keys stay at
16 bits) keeps its default; `canonical` resets it. A knob whose `needs` rule fails (k_bits under
kv_scheme adaptive) must stay at its default: anything else is an error, not a silent no-op.

Knows nothing of torch or optuna; imports nothing of kvpareto but its errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvpareto.errors import UserError

GROUPS = ("kv", "weights", "pruning", "prefill", "scheme")
KV_BITS = (2, 4, 8, 16)
GRANULARITIES = ("per-token", "per-channel", "per-tensor", "per-block")
_GRAN_SHORT = {"per-token": "tok", "per-channel": "ch", "per-tensor": "ten", "per-block": "blk"}
_WEIGHTS_SHORT = {"none": "w16", "int8": "w8", "int4": "w4", "awq4": "awq4"}
_EMBED_SHORT = {"none": "", "int8": "e8", "int4": "e4"}  # no piece at the default: labels stay
# The sampler asks for a space's per-layer K/V pairs (search/space.py) at this point of `ask_at`,
# and the label shows how many layers have their own bits (L3) at this point of `piece_at`.
LAYER_PAIRS_ASKED_AT = 11
LAYER_BITS_PIECE_AT = 90


@dataclass(frozen=True)
class Rule:
    """A condition on other knobs that a knob needs before it may leave its default."""

    holds: Callable[[dict], bool]
    what: str  # the condition, in words: "kv_scheme static"
    instead: Callable[[dict], str]  # what to do when it fails


@dataclass(frozen=True)
class Knob:
    """One setting of a Config: what it takes, when it matters, how it shows and is asked for."""

    name: str
    type: type  # int, float, bool or str; ints given for a float knob are stored as floats
    default: object
    group: str  # one of GROUPS
    help: str  # the `eval` option's help
    choices: tuple = ()  # the allowed values, when they are few (bool knobs: true or false)
    within: Callable[[object], bool] | None = None  # else this check of a value ...
    must: str = ""  # ... and what it asks, for the error: "an integer in 0..4096"
    applies: Callable[[dict], bool] = lambda d: True  # elsewhere the default stands
    needs: Rule | None = None  # a non-default value where this fails is an error
    piece: Callable[[dict], str] | None = None  # its part of the label ("" for none) ...
    piece_at: int = 0  # ... and where that part goes
    ask_at: int = 99  # when the sampler is asked for it: it pins the proposals of a seed
    flag: str = ""  # the option's spelling, where it is not --x-y (or --x-y/--no-x-y for bools)
    # Knobs added after the first release are left out of the key while at their default, so
    # trial caches written before they existed stay valid.
    keyed_at_default: bool = True
    # Why a value that passes the checks cannot run in this environment ("" where it can):
    # checked where a value is chosen to run (a space file, a weight quantization), not by Config.
    runs_here: Callable[[object], str] | None = None

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"knob {self.name}: group must be one of {GROUPS}")
        if self.type is not bool and bool(self.choices) == (self.within is not None):
            raise ValueError(f"knob {self.name}: give choices or a `within` check, not both")

    @property
    def option(self) -> str:
        """The command-line spelling: --k-bits, --symmetric/--asymmetric."""
        if self.flag:
            return self.flag
        dashed = self.name.replace("_", "-")
        return f"--{dashed}/--no-{dashed}" if self.type is bool else f"--{dashed}"

    def check(self, value: object, name: str = "") -> None:
        """One line naming the knob (or `name`), what it takes and what it got, for a value it
        cannot take."""
        if self.type is bool:
            ok, must = isinstance(value, bool), "true or false"
        elif self.choices:
            ok, must = value in self.choices, f"one of {', '.join(map(str, self.choices))}"
        else:
            ok, must = self.within(value), self.must
        if not ok:
            raise UserError(f"{name or self.name} must be {must}, got {value!r}")

    def check_runs_here(self, value: object) -> None:
        why = self.runs_here(value) if self.runs_here else ""
        if why:
            raise UserError(why)


# --- conditions ----------------------------------------------------------------------------------


def _static(d: dict) -> bool:
    return d["kv_scheme"] == "static"


def _layers(d: dict) -> list[dict]:
    return list((d.get("layer_bits") or {}).values())


def _k_quantized(d: dict) -> bool:
    """Whether any layer quantizes K (global bits or a per-layer override), under static."""
    return _static(d) and (d["k_bits"] < 16 or any(b["k_bits"] < 16 for b in _layers(d)))


def _v_quantized(d: dict) -> bool:
    return _static(d) and (d["v_bits"] < 16 or any(b["v_bits"] < 16 for b in _layers(d)))


def _quantized(d: dict) -> bool:
    return _k_quantized(d) or _v_quantized(d)


def _pool_tile(d: dict) -> bool:
    """Tile knobs apply to quantized static streams and to the adaptive/rule pools."""
    return _quantized(d) or not _static(d)


def _tiles_shown(d: dict) -> bool:
    """Whether the label shows the tile knobs: a static cache with K or V below 16 bits."""
    return _static(d) and (d["k_bits"] < 16 or d["v_bits"] < 16)


def _whole(value: object) -> bool:
    return isinstance(value, int)


def _number(value: object, lo: float, hi: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and lo <= value <= hi


# kv_scheme adaptive/rule choose per-token bits themselves: these knobs belong to static caches.
STATIC = Rule(
    _static,
    "kv_scheme static",
    lambda d: f"kv_scheme {d['kv_scheme']} chooses per-token bits from --target-mean-bits",
)


def _awq_backend_runs_here(backend: object) -> str:
    # "native" is kvpareto's own AWQ (kvpareto/weights/awq.py); neither external package can run
    # beside the transformers release kvpareto needs, so asking for one fails in one line.
    if backend == "llmcompressor":
        return (
            "awq_backend llmcompressor cannot run here: llm-compressor pins transformers <= 5.17 "
            "and kvpareto needs >= 5.23 for its Cache API; use awq_backend native"
        )
    if backend == "autoawq":
        return (
            "awq_backend autoawq cannot run here: AutoAWQ 0.2.9 is deprecated and yields a broken "
            "model on torch 2.13 + transformers 5 (see docs/findings.md); use awq_backend native"
        )
    return ""


def _kv_piece(d: dict) -> str:
    if _static(d):
        return f"k{d['k_bits']}v{d['v_bits']}"
    return f"{d['kv_scheme']}{d['target_mean_bits']:g}b"


def _granularity_piece(d: dict) -> str:
    k, v = _GRAN_SHORT[d["k_granularity"]], _GRAN_SHORT[d["v_granularity"]]
    return (k if k == v else f"{k}/{v}") if _tiles_shown(d) else ""


def _weights_piece(d: dict) -> str:
    grouped = d["weights"] in ("int4", "awq4")
    return _WEIGHTS_SHORT[d["weights"]] + (f"g{d['weight_group_size']}" if grouped else "")


def _flag_piece(name: str, text: str) -> Callable[[dict], str]:
    return lambda d: text if _tiles_shown(d) and d[name] else ""


# --- the table (its order is Config's field order, and so the order of to_dict) -------------------

# fmt: off
KNOBS: tuple[Knob, ...] = (
    Knob(
        "k_bits", int, 16, "kv", "Key bits: 2, 4, 8 or 16.",
        choices=KV_BITS, applies=_static, needs=STATIC, ask_at=4,
    ),
    Knob(
        "v_bits", int, 16, "kv", "Value bits: 2, 4, 8 or 16.",
        choices=KV_BITS, applies=_static, needs=STATIC, ask_at=5,
    ),
    Knob(
        "k_granularity", str, "per-token", "kv", "per-token, per-channel, per-tensor or per-block.",
        choices=GRANULARITIES, applies=_k_quantized, needs=STATIC, ask_at=12,
        piece=_granularity_piece, piece_at=30,
    ),
    Knob(
        "v_granularity", str, "per-token", "kv", "per-token, per-channel, per-tensor or per-block.",
        choices=GRANULARITIES, applies=_v_quantized, needs=STATIC, ask_at=14,
    ),
    Knob(
        "group_size", int, 32, "kv", "32, 64 or 128 (clipped to head_dim).",
        choices=(32, 64, 128), applies=_pool_tile, ask_at=15,
        piece=lambda d: f"g{d['group_size']}" if _tiles_shown(d) else "", piece_at=40,
    ),
    Knob(
        "symmetric", bool, False, "kv", "Symmetric RTN (no zero point).",
        applies=_pool_tile, ask_at=17, flag="--symmetric/--asymmetric",
        piece=_flag_piece("symmetric", "sym"), piece_at=60,
    ),
    Knob(
        "residual_length", int, 0, "kv", "Most recent tokens kept in full precision.",
        within=lambda v: _whole(v) and 0 <= v <= 4096, must="an integer in 0..4096",
        applies=_quantized, needs=STATIC, ask_at=16,
        piece=lambda d: f"r{d['residual_length']}" if _tiles_shown(d) else "", piece_at=50,
    ),
    Knob(
        "k_smooth", bool, False, "kv", "Subtract per-channel key mean.",
        applies=_k_quantized, needs=STATIC, ask_at=13,
        piece=_flag_piece("k_smooth", "ks"), piece_at=70,
    ),
    Knob(
        "rotation", str, "none", "kv", "none or hadamard.",
        choices=("none", "hadamard"), applies=_quantized, needs=STATIC, ask_at=18,
        piece=lambda d: "rot" if _tiles_shown(d) and d["rotation"] != "none" else "", piece_at=80,
    ),
    Knob(
        "chunk_size", int, 0, "prefill", "Prefill chunk in tokens; 0 = unchunked.",
        within=lambda v: _whole(v) and v >= 0, must="0 (unchunked) or a positive integer",
        ask_at=1, piece=lambda d: f"c{d['chunk_size']}", piece_at=100,
    ),
    Knob(
        "weights", str, "none", "weights", "Weight quantization: none, int8, int4, awq4.",
        choices=tuple(_WEIGHTS_SHORT), ask_at=2, keyed_at_default=False,
        piece=_weights_piece, piece_at=10,
    ),
    Knob(
        "weight_group_size", int, 64, "weights", "int4/awq4 group: 32, 64 or 128.",
        choices=(32, 64, 128), applies=lambda d: d["weights"] in ("int4", "awq4"), ask_at=6,
        keyed_at_default=False,
    ),
    Knob(
        "awq_backend", str, "native", "weights", "native, llmcompressor or autoawq.",
        choices=("native", "llmcompressor", "autoawq"), applies=lambda d: d["weights"] == "awq4",
        ask_at=7, keyed_at_default=False, runs_here=_awq_backend_runs_here,
    ),
    Knob(
        "prune_rate", float, 0.0, "pruning",
        "Fraction of prompt tokens evicted as prefill chunks arrive, 0..0.9.",
        within=lambda v: _number(v, 0, 0.9), must="a number in 0..0.9",
        applies=_static, needs=STATIC, ask_at=3, keyed_at_default=False,
        piece=lambda d: (
            f"p{round(100 * d['prune_rate'])}{d['prune_scorer']}" if d["prune_rate"] else ""
        ),
        piece_at=110,
    ),
    Knob(
        "prune_scorer", str, "snapkv", "pruning", "snapkv, knorm, streaming or random.",
        choices=("snapkv", "knorm", "streaming", "random"), applies=lambda d: d["prune_rate"] > 0,
        ask_at=8, keyed_at_default=False,
    ),
    Knob(
        "kv_scheme", str, "static", "scheme",
        "static (k/v bits), adaptive (learned per-token bits) or rule.",
        choices=("static", "adaptive", "rule"), ask_at=0, keyed_at_default=False,
        piece=_kv_piece, piece_at=20,
    ),
    Knob(
        "target_mean_bits", float, 4.0, "scheme", "Mean KV bits for --kv-scheme adaptive/rule.",
        within=lambda v: _number(v, 2, 16), must="a number in 2..16",
        applies=lambda d: not _static(d), ask_at=9, keyed_at_default=False,
    ),
    Knob(
        "controller", str, "default", "scheme", "Adaptive controller name or file.",
        within=lambda v: isinstance(v, str) and bool(v), must="a name or a path",
        applies=lambda d: d["kv_scheme"] == "adaptive", ask_at=10, keyed_at_default=False,
    ),
    Knob(
        "k_clip", float, 1.0, "kv",
        "Key clipping: each key tile's range shrinks to this fraction of itself and values "
        "outside are clamped: 1.0 (none), 0.95, 0.9 or 0.85.",
        choices=(1.0, 0.95, 0.9, 0.85), applies=_k_quantized, needs=STATIC, keyed_at_default=False,
        piece=lambda d: f"kc{round(100 * d['k_clip'])}" if d["k_clip"] != 1 and _k_quantized(d)
        else "",
        piece_at=85,
    ),
    Knob(
        "embed_weights", str, "none", "weights",
        "Token embedding and LM head (tied: one table): none, int8 (a scale per row) or int4 "
        "(a scale and zero per 32 values of a row).",
        choices=("none", "int8", "int4"), ask_at=19, keyed_at_default=False,
        piece=lambda d: _EMBED_SHORT[d["embed_weights"]], piece_at=15,
    ),
)
# fmt: on

KNOB = {k.name: k for k in KNOBS}
DEFAULTS = {k.name: k.default for k in KNOBS}


# --- rules over a dict of values -----------------------------------------------------------------


def check_rules(d: dict) -> None:
    """The rules between knobs, on values that passed their own checks."""
    for rule in dict.fromkeys(k.needs for k in KNOBS if k.needs):
        if rule.holds(d):
            continue
        used = [k.name for k in KNOBS if k.needs is rule and d[k.name] != k.default]
        if rule is STATIC and d.get("layer_bits"):
            used.append("layer_bits")
        if used:
            verb = "applies" if len(used) == 1 else "apply"
            raise UserError(f"{', '.join(used)} {verb} to {rule.what} only; {rule.instead(d)}")


def canonical(d: dict) -> dict:
    """These values with every knob that does not apply reset to its default (and per-layer bits
    dropped outside kv_scheme static), so equal behaviour means equal values."""
    d = {**DEFAULTS, **d}
    if not _static(d):
        d["layer_bits"] = {}
    changed = True
    while changed:  # a reset can make another knob stop applying (prune_rate, then its scorer)
        changed = False
        for knob in KNOBS:
            if d[knob.name] != knob.default and not knob.applies(d):
                d[knob.name], changed = knob.default, True
    return d


def label_pieces(d: dict) -> list[tuple[int, str]]:
    """(place, piece) of every knob that shows in the label; empty pieces left out."""
    shown = [(k.piece_at, k.piece(d)) for k in KNOBS if k.piece]
    return [(at, text) for at, text in shown if text]
