"""Models: the built-in catalog, loading from any source, and the converted-model cache."""

from kvpareto.models.catalog import CATALOG, DEFAULT_MODEL, ModelSpec, known_names
from kvpareto.models.loader import (
    LoadedModel,
    is_installed,
    load_config,
    load_model,
    pull,
    resolve_ref,
    resolve_spec,
)

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelSpec",
    "is_installed",
    "load_config",
    "known_names",
    "load_model",
    "pull",
    "resolve_ref",
    "resolve_spec",
]
