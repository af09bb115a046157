"""`kvpareto export`: one frontier point of a finished study, written for where it will run.

- `json`: the point's `Config` as kvpareto's own canonical dict, which `kvpareto eval --config`
  and `kvpareto search --baseline` read back to the same config key;
- `llama.cpp`: the closest llama.cpp flags (KV cache types, flash attention, batch sizes) and a
  weight-quantization hint;
- `transformers`: a snippet that builds the closest `QuantizedCache`.

The two foreign formats list every way they differ from the measured config, and say what the
study's memory figure is to them: a measurement of kvpareto's scheme, so only an approximation
of theirs. The facts about llama.cpp and transformers' caches are in docs/findings.md.
Knows nothing of torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvpareto.config import Config, canonical
from kvpareto.errors import UserError
from kvpareto.search.outputs import StudyFolder, read_study

FORMATS = ("json", "llama.cpp", "transformers")

# llama.cpp's KV cache types: bits per value, the fp16 scale (q*_1: and minimum) of each block of
# 32 values along one token's head dim included. It has no 2-bit type.
_GGML_BITS = {"q4_0": 4.5, "q4_1": 5.0, "q8_0": 8.5, "f16": 16, "bf16": 16, "f32": 32}
_GGML_FLOAT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def export_point(folder: Path, point: str, fmt: str) -> str:
    """The text `kvpareto export` prints for `point` ("knee" or a frontier label) of the study in
    `folder`, in format `fmt`."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    study = read_study(folder)
    entry = pick_point(study.frontier, point)
    config = canonical(Config.from_dict(entry["config"]))
    if fmt == "json":
        return json.dumps(config.to_dict(), indent=2) + "\n"
    if fmt == "llama.cpp":
        return _llama_cpp(config, entry, study)
    return _transformers(config, entry, study)


def pick_point(frontier: dict, point: str) -> dict:
    """The frontier entry called `point`: "knee", or a label from the frontier table."""
    entries = frontier["frontier"]
    labels = ", ".join(e["label"] for e in entries)
    if point == "knee":
        knee = next((e for e in entries if e["knee"]), None)
        if knee is None:
            raise UserError(
                "this frontier has no knee (under three points, or all on one line); "
                f"pick one with --point LABEL: {labels}"
            )
        return knee
    match = next((e for e in entries if e["label"] == point), None)
    if match is None:
        raise UserError(f"no frontier point labelled {point!r}; choose knee or one of: {labels}")
    return match


# --- llama.cpp -----------------------------------------------------------------------------------


def _llama_cpp(config: Config, entry: dict, study: StudyFolder) -> str:
    storage = study.facts.get("storage_dtype", "bfloat16")
    k_bits, v_bits = _stream_bits(config)
    k_type = _ggml_type(k_bits, config.symmetric, storage)
    v_type = _ggml_type(v_bits, config.symmetric, storage)
    quantized = min(k_bits, v_bits) < 16
    batch = config.chunk_size or study.context_length  # unchunked: the prompt in one ubatch
    env = "LLAMA_ATTN_ROT_DISABLE=1 " if quantized and config.rotation == "none" else ""
    command = (
        f"{env}llama-server -m MODEL.gguf -c {study.context_length} -ctk {k_type} -ctv {v_type}"
        f" -fa on -b {batch} -ub {batch}"
    )
    differs = _llama_kv_differences(config, k_bits, v_bits) + _common(config)
    differs += _llama_weight_differences(config)
    bits = (_GGML_BITS[k_type] + _GGML_BITS[v_type]) / 2
    row = next(r for r in study.rows if r["config_key"] == entry["config_key"])
    measured = row.get("effective_kv_bits")
    return _render(
        entry,
        study,
        [command, f"# weights: {_llama_weights(config, storage)}"],
        differs,
        f"these llama.cpp types hold {bits:.2f} bits per K/V value"
        + (f" (the measured scheme {measured:.2f})" if measured else "")
        + ", and llama.cpp allocates all -c tokens at start",
    )


def _ggml_type(bits: int, symmetric: bool, storage: str) -> str:
    if bits == 16:
        return _GGML_FLOAT[storage]
    if bits == 8:
        return "q8_0"
    if bits == 2:
        return "q4_0"  # no 2-bit type: the smallest llama.cpp has
    return "q4_0" if symmetric else "q4_1"  # q4_1 keeps a minimum per block, like a zero point


def _llama_kv_differences(config: Config, k_bits: int, v_bits: int) -> list[str]:
    out = []
    if 2 in (k_bits, v_bits):
        out.append("llama.cpp has no 2-bit KV cache type: q4_0 (4.5 bits per value) stands in")
    for name, bits in (("K", k_bits), ("V", v_bits)):
        if bits == 8 and not config.symmetric:
            out.append(f"{name}: q8_0 is symmetric (a scale, no zero point); measured asymmetric")
    quantized = [
        (name, gran)
        for name, bits, gran in (
            ("K", k_bits, config.k_granularity),
            ("V", v_bits, config.v_granularity),
        )
        if bits < 16
    ]
    if quantized:
        out.append(
            "its quantized blocks are 32 values along one token's head dim with one fp16 scale "
            f"(q4_1: and a minimum); measured: {_groups(config, quantized)}"
        )
        if config.k_granularity == "per-channel" and k_bits < 16:
            out.append("no per-channel keys: llama.cpp quantizes each token's keys on their own")
        if config.residual_length:
            out.append(
                f"no full-precision window: the most recent {config.residual_length} tokens, "
                "kept in 16-bit when measured, are quantized too"
            )
        out.append(
            "a prompt batch attends to its own K/V after they are quantized (kvpareto: in full "
            "precision within a prefill chunk)"
        )
        if config.rotation == "none":
            out.append(
                "llama.cpp rotates quantized K and V (Hadamard) by default since about April "
                "2026; this point was measured without rotation, so the flags turn it off "
                "(LLAMA_ATTN_ROT_DISABLE=1). Keeping it on is likely more accurate, unmeasured"
            )
        else:
            out.append("rotation: llama.cpp's default Hadamard rotation, not kvpareto's own")
    return out


# The token-embedding/output types closest to `embed_weights` (int4: a scale and a zero per 32
# values of a row, as q4_1 keeps a scale and a minimum per block of 32).
_GGML_EMBED = {"int8": "q8_0", "int4": "q4_1"}


def _llama_weights(config: Config, storage: str) -> str:
    method, embed = config.weights, config.embed_weights
    if method == "none" and embed == "none":
        return f"a {_GGML_FLOAT[storage]} GGUF (measured unquantized)"
    kind = {"int8": "Q8_0", "int4": "Q4_1", "awq4": "Q4_1"}.get(
        method, _GGML_FLOAT[storage].upper()
    )
    table = _GGML_EMBED.get(embed, "f16")
    imatrix = " --imatrix FILE" if method == "awq4" else ""
    return (
        f"llama-quantize{imatrix} --token-embedding-type {table} --output-tensor-type {table} "
        f"MODEL-f16.gguf MODEL-{kind}.gguf {kind}"
    )


def _llama_weight_differences(config: Config) -> list[str]:
    method, group, _ = config.weight_method
    out = []
    if method == "int8":
        out.append("weights: Q8_0 has an fp16 scale per 32 weights; measured: a bf16 scale per row")
    if method in ("int4", "awq4"):
        out.append(f"weights: Q4_1 blocks are 32 weights; measured: groups of {group}")
        if method == "awq4":
            out.append(
                "weights: llama.cpp has no AWQ scales; an importance matrix (llama-imatrix) is "
                "its activation-aware stand-in"
            )
    if config.embed_weights == "int8":
        out.append(
            "token_embd/output: q8_0 has an fp16 scale per 32 values; measured: a bf16 scale "
            "per row"
        )
    elif config.embed_weights == "int4":
        out.append(
            "token_embd/output: q4_1 keeps an fp16 scale and minimum per 32 values; measured: "
            "a bf16 scale and zero per 32 values"
        )
    return out


# --- transformers --------------------------------------------------------------------------------


def _transformers(config: Config, entry: dict, study: StudyFolder) -> str:
    k_bits, v_bits = _stream_bits(config)
    quantized = [b for b in (k_bits, v_bits) if b < 16]
    chunk = f", prefill_chunk_size={config.chunk_size}" if config.chunk_size else ""
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer, QuantizedCache",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("MODEL_FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("MODEL_FOLDER", dtype="bfloat16")',
        f"# weights: {_transformers_weights(config)}",
        'inputs = tokenizer("PROMPT", return_tensors="pt")',
    ]
    differs = []
    if quantized:
        nbits = max(quantized)  # one bit-width for K and V: the wider keeps accuracy
        backend = "quanto" if nbits in (2, 4) else "hqq"  # quanto has 2 and 4 bits only
        axis_key = _axis(backend, config.k_granularity)
        axis_value = _axis(backend, config.v_granularity)
        lines += [
            "cache = QuantizedCache(",
            f'    backend="{backend}", config=model.config, nbits={nbits},',
            f"    axis_key={axis_key}, axis_value={axis_value},",
            f"    q_group_size={config.group_size}, residual_length={config.residual_length},",
            ")",
            f"out = model.generate(**inputs, past_key_values=cache{chunk}, max_new_tokens=64)",
        ]
        differs = _transformers_kv_differences(config, k_bits, v_bits, nbits)
    else:
        lines.append(f"out = model.generate(**inputs{chunk}, max_new_tokens=64)  # 16-bit cache")
    differs += _common(config) + _transformers_weight_differences(config)
    return _render(
        entry,
        study,
        lines,
        differs,
        "QuantizedCache holds its own layout and re-quantizes at every flush",
    )


def _axis(backend: str, granularity: str) -> int:
    """The axis that gives per-token groups (along the head dim) or per-channel ones (along
    tokens): quanto groups along the head dim on axis 0, HQQ on axis 1."""
    per_channel = granularity == "per-channel"
    if backend == "quanto":
        return -1 if per_channel else 0
    return 0 if per_channel else 1


def _transformers_kv_differences(config: Config, k_bits: int, v_bits: int, nbits: int) -> list[str]:
    out = []
    if k_bits != v_bits:
        out.append(
            f"QuantizedCache has one bit-width for K and V: {nbits} for both "
            f"(measured K {k_bits}, V {v_bits})"
        )
    odd = {config.k_granularity, config.v_granularity} - {"per-token", "per-channel"}
    if odd:
        out.append(f"no {', '.join(sorted(odd))} groups: per-token groups stand in")
    if config.symmetric:
        out.append("its quantizers keep a zero point; measured symmetric (scale only)")
    out.append(
        "QuantizedCache quantizes the whole prefill at once (no full-precision window over the "
        "prompt) and re-quantizes the dequantized history at every flush of its residual window; "
        "kvpareto quantizes each token once"
    )
    out.append("QuantizedCache accepts only models whose layers all use full attention")
    return out


def _transformers_weights(config: Config) -> str:
    method, group, _ = config.weight_method
    if method == "none":
        return "unquantized, as measured"
    if method == "int8":
        return 'quantization_config=QuantoConfig(weights="int8") is the closest'
    return f"quantization_config=HqqConfig(nbits=4, group_size={group}) is the closest"


def _transformers_weight_differences(config: Config) -> list[str]:
    out = []
    if config.weights == "awq4":
        out.append("weights: AWQ needs a checkpoint quantized by an AWQ tool; HQQ stands in")
    elif config.weights != "none":
        out.append("weights: quanto/HQQ have their own scale layout and kernels, not kvpareto's")
    if config.embed_weights != "none":
        out.append(
            f"the token embedding and LM head stay in float (measured {config.embed_weights}): "
            "the quantization configs above leave them out"
        )
    return out


# --- shared --------------------------------------------------------------------------------------


def _stream_bits(config: Config) -> tuple[int, int]:
    """K and V bits; for adaptive and rule caches, the nearest fixed width to their mean."""
    if config.kv_scheme == "static":
        return config.k_bits, config.v_bits
    bits = min((2, 4, 8, 16), key=lambda b: abs(b - config.target_mean_bits))
    return bits, bits


def _groups(config: Config, quantized: list[tuple[str, str]]) -> str:
    return ", ".join(f"{name} {gran} groups of {config.group_size}" for name, gran in quantized)


def _common(config: Config) -> list[str]:
    """What neither runtime has."""
    out = []
    if config.kv_scheme != "static":
        out.append(
            f"no adaptive per-token precision (kv_scheme {config.kv_scheme}, mean "
            f"{config.target_mean_bits:g} bits): one fixed width stands in"
        )
    if config.layer_bits:
        out.append("one KV type for every layer: the measured per-layer bits are not kept")
    if config.prune_rate:
        out.append(
            f"no token pruning: every prompt token is kept (measured: {config.prune_rate:.0%} "
            f"evicted by {config.prune_scorer}), so the KV cache is larger"
        )
    if config.k_smooth:
        out.append("no key smoothing (per-channel key mean subtracted before quantizing)")
    if config.k_clip != 1:
        out.append(f"no key clipping (measured: tile ranges shrunk to {config.k_clip:g})")
    return out


def _render(
    entry: dict,
    study: StudyFolder,
    body: list[str],
    differs: list[str],
    runtime_memory: str,
) -> str:
    """The body, then what was measured, how the body differs, and what its memory means."""
    lo, hi = entry["accuracy_ci"]
    memory = entry["memory"]
    comment = "#"  # a comment in both a shell and Python
    head = [
        f"{comment} kvpareto export of {entry['label']} ({study.model}, study {study.path}):",
        f"{comment} measured at {study.context_length} tokens: "
        f"{memory['total_bytes'] / 1e6:.1f} MB total (weights {memory['weights_bytes'] / 1e6:.1f}, "
        f"KV {memory['kv_bytes'] / 1e6:.1f}, activations "
        f"{memory['activation_peak_bytes'] / 1e6:.1f}), "
        f"accuracy {entry['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]",
    ]
    tail = [f"{comment} differs from the measured config:"]
    tail += [f"{comment}  - {line}" for line in differs] or [f"{comment}  (nothing)"]
    tail.append(
        f"{comment} memory: the figure above was measured for kvpareto's scheme of this point, "
        f"not for this one, so here it is only an approximation: {runtime_memory}"
    )
    return "\n".join(head + body + tail) + "\n"
