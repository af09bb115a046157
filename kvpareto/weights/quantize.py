"""Weight quantization of a loaded model, cached on disk: none, int8, int4 and AWQ int4.

Each method is a small `WeightQuantizer` with one `quantize` method that replaces the decoder's
linear layers by `PackedLinear`s:

    int8   per-output-channel symmetric round-to-nearest (one bf16 scale per row)
    int4   group-wise asymmetric round-to-nearest (a bf16 scale and zero per group of g inputs;
           fp16 in the tile codec, for the few shapes torch's int4 kernel refuses)
    awq4   AWQ scales searched on calibration activations (`awq.py`), then int4 as above

These methods quantize the linears inside decoder layers. The token embedding and the LM head
(one table where tied, as in SmolLM2 and Gemma3) are a knob of their own, `embed_weights`,
packed by rows in `embedding.py`; at its default they stay in the storage dtype. Group sizes
that do not divide a layer's width follow `packed_linear.weight_group`.

A method that calibrates (AWQ) is given its data by the caller, as a `Calibration`: token ids and
a name of their source. Both are hashed into the cache key with the model hash, method, group
size and backend, so a second use reloads the packed tensors from disk in about a second instead
of repeating the AWQ search. The embedding setting enters the key only where it is set, so the
entries written before it existed stay valid; its tables are stored beside the decoder's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvpareto.config import Config
from kvpareto.hardware import check_device
from kvpareto.knobs import KNOB
from kvpareto.registry import Registry
from kvpareto.weights import embedding, int4pack
from kvpareto.weights.packed_linear import LAYOUTS, PackedLinear, weight_group

CACHE_FORMAT = 3  # 3: kernel layouts (int4pack, int8 codes, bf16 scales)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Calibration:
    """What a calibrating quantizer is fitted on: token ids [sequences, tokens], and a name of
    the text they were cut from, which the weight-cache key carries beside the ids' hash."""

    source: str
    ids: torch.Tensor


@dataclass(frozen=True)
class WeightQuantizer:
    bits: int
    symmetric: bool
    grouped: bool  # False: one group per output row (per-channel)
    needs_calibration: bool = False

    def quantize(self, model, group: int, calibration, progress: Progress | None) -> dict:
        """Replace the decoder linears in place; return facts worth keeping (e.g. AWQ scales)."""
        for _, parent, attr, linear in _decoder_linears(model):
            g = weight_group(group, linear.in_features) if self.grouped else linear.in_features
            packed = PackedLinear.quantize(
                linear.weight.detach(), linear.bias, self.bits, g, self.symmetric
            )
            setattr(parent, attr, packed)
        return {}


@dataclass(frozen=True)
class AWQQuantizer(WeightQuantizer):
    def quantize(self, model, group: int, calibration, progress: Progress | None) -> dict:
        from kvpareto.weights.awq import apply_awq

        scales = apply_awq(model, calibration, lambda width: weight_group(group, width), progress)
        super().quantize(model, group, calibration, None)
        return scales


QUANTIZERS: Registry[WeightQuantizer] = Registry("weight quantizer")
QUANTIZERS.add("int8", WeightQuantizer(bits=8, symmetric=True, grouped=False))
QUANTIZERS.add("int4", WeightQuantizer(bits=4, symmetric=False, grouped=True))
QUANTIZERS.add("awq4", AWQQuantizer(bits=4, symmetric=False, grouped=True, needs_calibration=True))


# One quantized model is kept per process: a search tries many KV settings on the same weights.
# The key names the weights, not the float model they were copied from: that model's compute
# dtype lives in the copy (a packed embedding returns rows in it), so the base must match too.
_LAST: dict[str, tuple] = {}  # cache key -> (base model, LoadedModel)


def quantized_model(
    loaded,
    config: Config,
    calibration: Callable[[object], Calibration] | None = None,
    progress: Progress | None = None,
):
    """`loaded` with its weights quantized as `config` says (the same object when neither the
    decoder's weights nor the embeddings are).

    `calibration(tokenizer)` gives the data of a method that calibrates (awq4); it is called
    for such a method only, and such a method needs it."""
    method, group, backend = config.weight_method
    embed = config.embed_weights
    if method == "none" and embed == "none":
        return loaded
    # The packed layouts are those of torch's CPU kernels: refused elsewhere (`check_device`).
    device = next(loaded.model.parameters()).device.type
    check_device({"weights": [method], "embed_weights": [embed]}, device)
    if backend:
        KNOB["awq_backend"].check_runs_here(backend)
    quantizer = QUANTIZERS.get(method) if method != "none" else None
    data = None
    if quantizer and quantizer.needs_calibration:
        if calibration is None:
            raise ValueError(f"{method} is fitted on calibration data: pass calibration=")
        data = calibration(loaded.tokenizer)
    key = _cache_key(loaded.model_hash, method, group, backend, data, embed)
    base, result = _LAST.get(key, (None, None))
    if base is loaded.model:
        return result
    folder = _cache_dir(key)
    if (folder / "weights.json").exists():
        model, info = _load(loaded.model, folder)
        from_cache = True
    else:
        if quantizer and embed != "none":
            # The decoder's quantization never reads the embedding table (AWQ calibrates on the
            # float model's activations), so it is shared across embed_weights: built (and
            # cached) once, then each table quantized on a copy. A search of both axes
            # otherwise repeats AWQ's calibration for every embed_weights choice.
            decoder = quantized_model(loaded, replace(config, embed_weights="none"), calibration)
            model, info = copy.deepcopy(decoder.model), decoder.weights_info
        else:
            model = copy.deepcopy(loaded.model)
            ids = data.ids if data else None
            bar = progress or _bar(method)
            info = quantizer.quantize(model, group, ids, bar) if quantizer else {}
        if embed != "none":
            embedding.quantize_embeddings(model, embed)
        _save(model, info, folder)
        from_cache = False
    result = replace(loaded, model=model, from_cache=from_cache, weights_info=info)
    _LAST.clear()
    _LAST[key] = (loaded.model, result)
    return result


@torch.inference_mode()
def linear_output_errors(base, quantized, ids: torch.Tensor) -> dict[str, float]:
    """Relative output error ||y_q - y|| / ||y|| of every quantized linear on the float model's
    own inputs for `ids`, AWQ's folded scales undone so each layer is compared with its original.
    """
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        linear.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
        for name, _, _, linear in _decoder_linears(base.model)
    ]
    try:
        base.model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    info = quantized.weights_info or {}
    in_scales, out_scales = info.get("input_scales", {}), info.get("output_scales", {})
    decoder = quantized.model.get_decoder()
    errors = {}
    for name, _, _, linear in _decoder_linears(base.model):
        x = inputs[name].float()
        reference = x @ linear.weight.float().T
        packed = decoder.get_submodule(name)
        x_q = x / in_scales[name] if name in in_scales else x
        y = x_q @ packed.dequantized_weight(torch.float32).T
        if name in out_scales:
            y = y * out_scales[name]
        errors[name] = ((y - reference).norm() / reference.norm()).item()
    return errors


def _decoder_linears(model):
    """(name, parent module, attribute, linear) for every nn.Linear inside the decoder layers."""
    from kvpareto.weights.awq import decoder_layers

    found = []
    for i, layer in enumerate(decoder_layers(model)):
        for parent_name, parent in layer.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    name = f"layers.{i}.{parent_name}.{attr}".replace("..", ".")
                    found.append((name, parent, attr, child))
    return found


def _cache_key(
    model_hash, method, group, backend, calibration: Calibration | None, embed: str = "none"
) -> str:
    calib = None
    if calibration is not None:
        calib = [calibration.source, hashlib.sha256(calibration.ids.numpy()).hexdigest()]
    # int4pack's byte order follows the CPU's ISA: a cache from another ISA must not be read.
    identity = [CACHE_FORMAT, int4pack.layout(), model_hash, method, group, backend, calib]
    if embed != "none":  # only where set: entries written before the knob keep their keys
        identity.append({"embed_weights": embed, "group": embedding.EMBED_GROUP})
    blob = json.dumps(identity)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_dir(key: str) -> Path:
    from kvpareto.paths import cache_root

    return cache_root() / "weights" / key


def _save(model, info: dict, folder: Path) -> None:
    """Write the decoder's tensors (packed buffers, folded norms) where its linears were
    quantized, and the packed token tables where they were, to a temp dir, then rename."""
    from safetensors.torch import save_file

    from kvpareto.weights.awq import decoder_layers

    layers = decoder_layers(model)
    linears = {name: _spec(m) for name, m in layers.named_modules() if isinstance(m, PackedLinear)}
    # An embeddings-only entry holds no copy of the float decoder.
    tensors = {k: v.contiguous() for k, v in layers.state_dict().items()} if linears else {}
    for kind, scales in info.items():  # AWQ's scales: {"input_scales": {linear: s}, ...}
        tensors.update({f"{kind}:{name}": s.clone() for name, s in scales.items()})
    meta = {"format": CACHE_FORMAT, "linears": linears}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    found = embedding.tables(model)
    if found:
        table, head = found
        named = {"embedding": table} if head is table else {"embedding": table, "head": head}
        meta["embedding"] = {name: _spec(t) for name, t in named.items()}
        held = {f"{n}.{k}": v.contiguous() for n, t in named.items() for k, v in _tensors(t)}
        save_file(held, str(tmp / "embedding.safetensors"))
    save_file(tensors, str(tmp / "weights.safetensors"))
    (tmp / "weights.json").write_text(json.dumps(meta))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def _spec(m: PackedLinear) -> dict:
    return {
        "layout": type(m).__name__,
        "bits": m.bits,
        "group": m.group,
        "shape": [m.out_features, m.in_features],
    }


def _tensors(m: PackedLinear):
    return [(k, v) for k, v in m.state_dict().items() if v is not None]


def _build(spec: dict, tensors: dict, name: str, dtype: torch.dtype) -> PackedLinear:
    """The packed layer `spec` describes, holding `tensors` named `name.buffer`."""
    layout = LAYOUTS[spec["layout"]]
    buffers = {b: tensors.get(f"{name}.{b}") for b in layout.BUFFERS}
    bias = tensors.get(f"{name}.bias")
    return layout(spec["bits"], spec["group"], spec["shape"], bias, dtype, buffers)


def _load(base, folder: Path):
    from safetensors.torch import load_file

    from kvpareto.weights.awq import decoder_layers

    meta = json.loads((folder / "weights.json").read_text())
    tensors = load_file(str(folder / "weights.safetensors"))
    model = copy.deepcopy(base)
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    for name, spec in meta["linears"].items():
        parent_name, _, attr = name.rpartition(".")
        setattr(layers.get_submodule(parent_name), attr, _build(spec, tensors, name, dtype))
    info: dict[str, dict] = {}
    for key, value in tensors.items():
        if ":" in key:
            kind, name = key.split(":", 1)
            info.setdefault(kind, {})[name] = value
    if meta["linears"]:
        layers.load_state_dict({k: v for k, v in tensors.items() if ":" not in k}, strict=True)
    if "embedding" in meta:
        held = load_file(str(folder / "embedding.safetensors"))
        built = {n: _build(spec, held, n, dtype) for n, spec in meta["embedding"].items()}
        embedding.install(model, built["embedding"], built.get("head", built["embedding"]))
    return model, info


def _bar(method: str) -> Progress:
    """A transient progress bar on stderr, for runs that did not bring their own."""
    from rich.console import Console
    from rich.progress import Progress as Bar

    state: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Bar(console=Console(stderr=True), transient=True)
            state["bar"].start()
            state["job"] = state["bar"].add_task(f"{method}: calibrating layers", total=total)
        state["bar"].update(state["job"], completed=done)
        if done >= total:
            state["bar"].stop()

    return update
