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

Knobs are conditional: a quantization knob (granularity, group size, residual window, symmetric,
smoothing, rotation) is only chosen for a stream that is actually quantized (bits < 16); where it
does not apply, the Config default stands. So two proposals that differ only in knobs that do not
apply are the same Config, and the trial cache serves the second one for free.

Errors name the key and its line in the file. Knows nothing of models or optuna internals beyond
the `suggest_categorical` call.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from kvpareto.config import Config
from kvpareto.errors import UserError

_CONFIG_KEYS = [f.name for f in fields(Config) if f.name != "layer_bits"]
_K_KNOBS = ("k_granularity", "k_smooth")
_V_KNOBS = ("v_granularity",)
_SHARED_KNOBS = ("group_size", "residual_length", "symmetric", "rotation")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    choices: dict[str, tuple]  # every knob, in Config order; fixed knobs have one choice
    baselines: tuple[Config, ...]
    source_hash: str

    def suggest(self, trial) -> Config:
        """Ask an Optuna trial for one Config, choosing only the knobs that apply."""
        picked = {}

        def choose(key):
            options = self.choices.get(key)
            if options is None:
                return
            picked[key] = (
                options[0] if len(options) == 1 else trial.suggest_categorical(key, list(options))
            )

        for key in ("k_bits", "v_bits", "chunk_size"):
            choose(key)
        k_q = picked.get("k_bits", 16) < 16
        v_q = picked.get("v_bits", 16) < 16
        for key in _K_KNOBS if k_q else ():
            choose(key)
        for key in _V_KNOBS if v_q else ():
            choose(key)
        for key in _SHARED_KNOBS if (k_q or v_q) else ():
            choose(key)
        return canonical(Config(**picked))

    def grid(self) -> list[Config]:
        """Every distinct Config in the space (what `--sampler grid` evaluates)."""
        keys = list(self.choices)
        seen: dict[str, Config] = {}
        for combo in itertools.product(*(self.choices[k] for k in keys)):
            cfg = canonical(Config(**dict(zip(keys, combo, strict=True))))
            seen.setdefault(cfg.key(), cfg)
        return list(seen.values())


def canonical(cfg: Config) -> Config:
    """Reset the knobs that do not apply to their defaults, so equal behaviour means equal key."""
    default = Config()
    data = cfg.to_dict()
    k_q, v_q = cfg.k_bits < 16, cfg.v_bits < 16
    if not k_q:
        for key in _K_KNOBS:
            data[key] = getattr(default, key)
    if not v_q:
        for key in _V_KNOBS:
            data[key] = getattr(default, key)
    if not (k_q or v_q):
        for key in _SHARED_KNOBS:
            data[key] = getattr(default, key)
    return Config.from_dict(data)


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

    unknown = sorted(set(data) - {"name", "description", "params", "baselines"})
    if unknown:
        raise fail(unknown[0], "unknown section; use name, description, params, baselines")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise fail("params", "must be a non-empty mapping of config keys to a value or a list")
    choices: dict[str, tuple] = {}
    for key in _CONFIG_KEYS:
        if key not in params:
            continue
        value = params[key]
        options = tuple(value) if isinstance(value, list) else (value,)
        if not options:
            raise fail(key, "needs at least one value", params)
        for option in options:
            if isinstance(option, dict | list):
                raise fail(key, f"values must be scalars, got {option!r}", params)
            try:
                Config(**{key: option})
            except UserError as e:
                raise fail(key, str(e), params) from None
            except TypeError:
                raise fail(key, f"invalid value {option!r}", params) from None
        if len(set(options)) != len(options):
            raise fail(key, "lists a value twice", params)
        choices[key] = options
    unknown = sorted(set(params) - set(_CONFIG_KEYS))
    if unknown:
        raise fail(unknown[0], f"not a searchable knob; known: {', '.join(_CONFIG_KEYS)}", params)

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
    )
