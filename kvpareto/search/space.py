"""Search spaces: a YAML file mapped to the knobs a sampler may choose.

A space file is a mapping with a `params` section (and optional `name`, `description`,
`baselines`). Each param is a `Config` field whose value is either one fixed value or a list of
choices:

    params:
      k_bits: [2, 4, 8, 16]
      v_bits: [2, 4, 8, 16]
      k_granularity: [per-token, per-channel]
      group_size: 32                # fixed
      chunk_size: [0, 256, 512]

Per-layer mixed precision (KVTuner-style): `layer_groups: G` splits the decoder layers into G
contiguous groups and `layer_pairs: [k8v4, k4v2, ...]` lists the K/V pairs each group may take.

Knobs are conditional, as the knob table (kvpareto/knobs.py) says: a quantization knob
(granularity, group size, residual window, symmetric, smoothing, rotation) is only chosen for a
stream that is actually quantized, the weight group size only for int4/awq4 weights, the AWQ
backend only for awq4, and the pruning scorer only for a prune rate above 0; kv_scheme
adaptive/rule replace k_bits, v_bits, layer pairs and pruning by target_mean_bits (and
controller, for adaptive), keeping only group_size and symmetric of the quantization knobs;
where a knob does not apply, the Config default stands. So two proposals that differ only in
knobs that do not apply are the same Config, and the trial cache serves the second one for free.
The sampler is asked for knobs in the table's `ask_at` order, which pins the proposals of a seed.

Errors name the key and its line in the file. Knows nothing of models or optuna internals beyond
the `suggest_categorical` call.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.knobs import DEFAULTS, KNOB, KNOBS, LAYER_PAIRS_ASKED_AT, Knob

# The sampler's questions, in `ask_at` order (sorted() is stable: ties keep table order), before
# and after a space's per-layer K/V pairs.
_ASKED = sorted(KNOBS, key=lambda k: k.ask_at)
_BEFORE_LAYERS = [k for k in _ASKED if k.ask_at < LAYER_PAIRS_ASKED_AT]
_AFTER_LAYERS = [k for k in _ASKED if k.ask_at > LAYER_PAIRS_ASKED_AT]


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    choices: dict[str, tuple]  # every knob, in Config order; fixed knobs have one choice
    baselines: tuple[Config, ...]
    source_hash: str
    layer_groups: int = 0
    layer_pairs: tuple[tuple[int, int], ...] = ()

    def suggest(self, trial, n_layers: int = 0) -> Config:
        """Ask an Optuna trial for one Config, choosing only the knobs that apply."""
        picked: dict = {}
        self._ask(trial, _BEFORE_LAYERS, picked)
        self._ask_layers(trial, n_layers, picked)
        self._ask(trial, _AFTER_LAYERS, picked)
        return canonical(picked)

    def params_of(self, config: Config, n_layers: int = 0) -> dict | None:
        """The sampler params that make `suggest` return `config`, or None when the space
        cannot express it (a value outside its choices, or per-layer bits it does not ask)."""
        asked = _Answers(config.to_dict())
        try:
            found = self.suggest(asked, n_layers)
        except _OffSpace:
            return None
        return asked.params if found.key() == config.key() else None

    def _ask(self, trial, knobs: list[Knob], picked: dict) -> None:
        """Each knob of the space that applies to what is picked so far, in turn."""
        for knob in knobs:
            options = self.choices.get(knob.name)
            if options is None or not knob.applies({**DEFAULTS, **picked}):
                continue
            if len(options) == 1:
                picked[knob.name] = options[0]
            else:
                picked[knob.name] = trial.suggest_categorical(knob.name, list(options))

    def _ask_layers(self, trial, n_layers: int, picked: dict) -> None:
        """Per-layer K/V pairs, one per contiguous group of layers (static caches only)."""
        if not self.layer_groups or picked.get("kv_scheme", "static") != "static":
            return
        names = [_pair_name(p) for p in self.layer_pairs]
        pairs = [
            _parse_pair(trial.suggest_categorical(f"layer_group_{g}", names))
            for g in range(self.layer_groups)
        ]
        picked["k_bits"], picked["v_bits"] = pairs[0]
        picked["layer_bits"] = {
            layer: {"k_bits": k, "v_bits": v}
            for layer, (k, v) in _spread(pairs, n_layers).items()
            if (k, v) != pairs[0]
        }

    def without_weight_groups(self, groups) -> SearchSpace:
        """This space with the int4/awq4 group sizes in `groups` left out, unless they are all
        it offers: a space that names only those asks for them."""
        offered = self.choices.get("weight_group_size", ())
        kept = tuple(g for g in offered if g not in groups)
        if not kept or kept == offered:
            return self
        return replace(self, choices={**self.choices, "weight_group_size": kept})

    def grid(self) -> list[Config]:
        """Every distinct Config in the space (what `--sampler grid` evaluates)."""
        if self.layer_groups:
            raise UserError("--sampler grid does not enumerate per-layer spaces; use nsga2 or tpe")
        keys = list(self.choices)
        seen: dict[str, Config] = {}
        for combo in itertools.product(*(self.choices[k] for k in keys)):
            cfg = canonical(dict(zip(keys, combo, strict=True)))
            seen.setdefault(cfg.key(), cfg)
        return list(seen.values())


class _OffSpace(Exception):
    pass


class _Answers:
    """Answers `suggest`'s questions from a config's own values, recording them as params."""

    def __init__(self, values: dict):
        self.values, self.params = values, {}

    def suggest_categorical(self, name: str, choices: list):
        if name not in self.values or self.values[name] not in choices:
            raise _OffSpace(name)
        self.params[name] = self.values[name]
        return self.values[name]


def _pair_name(pair: tuple[int, int]) -> str:
    return f"k{pair[0]}v{pair[1]}"


def _parse_pair(text) -> tuple[int, int]:
    import re

    found = re.fullmatch(r"k(\d+)v(\d+)", str(text).strip())
    if not found:
        raise UserError(f"a layer pair looks like k8v4, got {text!r}")
    pair = int(found.group(1)), int(found.group(2))
    Config(k_bits=pair[0], v_bits=pair[1])  # validates the bit-widths
    return pair


def _spread(pairs: list[tuple[int, int]], n_layers: int) -> dict[int, tuple[int, int]]:
    """Give each of n_layers the pair of its contiguous group (group sizes differ by at most 1)."""
    groups = len(pairs)
    return {
        layer: pairs[min(layer * groups // max(n_layers, 1), groups - 1)]
        for layer in range(n_layers)
    }


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, for error messages."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        mapping[key] = loader.construct_object(value_node, deep=deep)
        lines[key] = key_node.start_mark.line + 1
    mapping = _Mapping(mapping)
    mapping.lines = lines
    return mapping


class _Mapping(dict):
    lines: dict


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _options(knob: Knob, value) -> tuple:
    """A knob's choices in a space file: one value or a list, each one the knob can take and
    that can run here."""
    options = tuple(value) if isinstance(value, list) else (value,)
    if not options:
        raise UserError("needs at least one value")
    for option in options:
        if isinstance(option, dict | list):
            raise UserError(f"values must be scalars, got {option!r}")
        knob.check(option)
        knob.check_runs_here(option)
    if len(set(options)) != len(options):
        raise UserError("lists a value twice")
    return options


def load_space(path: Path | str) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a search space must be a mapping with a 'params' section")

    def fail(key: str, message: str, where: dict | None = None) -> UserError:
        line = getattr(where if where is not None else data, "lines", {}).get(key)
        at = f" (line {line})" if line else ""
        return UserError(f"{path}: {key}{at}: {message}")

    sections = {"name", "description", "params", "baselines", "layer_groups", "layer_pairs"}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise fail(unknown[0], f"unknown section; use {', '.join(sorted(sections))}")
    layer_groups = data.get("layer_groups", 0)
    if not isinstance(layer_groups, int) or isinstance(layer_groups, bool) or layer_groups < 0:
        raise fail("layer_groups", f"must be a whole number of layer groups, got {layer_groups!r}")
    raw_pairs = data.get("layer_pairs") or []
    if layer_groups and (not isinstance(raw_pairs, list) or len(raw_pairs) < 2):
        raise fail("layer_pairs", "needs a list of at least two K/V pairs such as [k8v4, k4v2]")
    if raw_pairs and not layer_groups:
        raise fail("layer_pairs", "needs layer_groups (how many contiguous groups of layers)")
    try:
        layer_pairs = tuple(_parse_pair(p) for p in raw_pairs)
    except UserError as e:
        raise fail("layer_pairs", str(e)) from None
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise fail("params", "must be a non-empty mapping of config keys to a value or a list")
    choices: dict[str, tuple] = {}
    for knob in KNOBS:
        if knob.name in params:
            try:
                choices[knob.name] = _options(knob, params[knob.name])
            except UserError as e:
                raise fail(knob.name, str(e), params) from None
    unknown = sorted(set(params) - set(KNOB))
    if unknown:
        raise fail(unknown[0], f"not a searchable knob; known: {', '.join(KNOB)}", params)

    baselines = []
    for i, raw in enumerate(data.get("baselines") or []):
        if not isinstance(raw, dict):
            raise fail("baselines", f"entry {i + 1} must be a mapping of config keys")
        try:
            baselines.append(canonical(Config.from_dict(dict(raw))))
        except (UserError, TypeError) as e:
            raise fail("baselines", f"entry {i + 1}: {e}") from None
    return SearchSpace(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description") or ""),
        choices=choices,
        baselines=tuple(baselines),
        source_hash=hashlib.sha256(text.encode()).hexdigest()[:16],
        layer_groups=layer_groups,
        layer_pairs=layer_pairs,
    )
