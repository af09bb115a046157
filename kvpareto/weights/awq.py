"""Activation-aware weight quantization (AWQ, arXiv 2306.00978), kvpareto's own implementation.

AWQ protects the weights that meet large activations: for each group of linears that read the
same input, it searches a per-input-channel scale s = mean|x|^alpha (alpha on a grid), multiplies
the weight columns by s and divides the op that produces x by s, so the float model is unchanged
while the salient channels get finer int4 steps. The alpha kept is the one with the smallest
output error of the group's linears on calibration activations.

Why not a library (docs/findings.md): AutoAWQ 0.2.9 is deprecated and produces a broken
model on torch 2.13 + transformers 5.x; llm-compressor's AWQModifier works but pins transformers
<= 5.17 (kvpareto runs 5.23), needs a CPU patch, and its checkpoints do not reload under 5.23.
The algorithm itself is small, so it lives here, on the same int4 codec as everything else.

Scaling pairs, per decoder layer (the standard AWQ mapping):
    input norm              -> q_proj, k_proj, v_proj
    post-attention norm     -> gate_proj, up_proj     (Gemma3: pre_feedforward_layernorm)
    up_proj                 -> down_proj
v_proj -> o_proj is skipped: with grouped-query attention v_proj has fewer output channels than
o_proj has inputs, so no per-channel scale can pass between them (llm-compressor skips it too).
Layers run one after another on the float outputs of the layer before, as in the paper; clipping
search (AutoAWQ's `auto_clip`) is not done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvpareto.hf_compat import without_cache
from kvpareto.weights.packed_linear import PackedLinear

ALPHA_GRID = 20  # alpha in 0, 0.05, ..., 0.95, as in the paper
LOSS_TOKENS = 1024  # calibration tokens the alpha search evaluates its loss on


@dataclass
class ScalingPair:
    prev_name: str
    prev: torch.nn.Module  # the op whose output feeds the linears (a norm or a linear)
    linears: list[tuple[str, torch.nn.Linear]]


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def scaling_pairs(layer) -> list[ScalingPair]:
    attn, mlp = layer.self_attn, layer.mlp
    ffn_norm = "pre_feedforward_layernorm"
    if getattr(layer, ffn_norm, None) is None:
        ffn_norm = "post_attention_layernorm"
    return [
        ScalingPair(
            "input_layernorm",
            layer.input_layernorm,
            [(f"self_attn.{n}", getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")],
        ),
        ScalingPair(
            ffn_norm,
            getattr(layer, ffn_norm),
            [(f"mlp.{n}", getattr(mlp, n)) for n in ("gate_proj", "up_proj")],
        ),
        ScalingPair("mlp.up_proj", mlp.up_proj, [("mlp.down_proj", mlp.down_proj)]),
    ]


@torch.inference_mode()
def apply_awq(
    model,
    calibration: torch.Tensor,
    group_size: Callable[[int], int],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Search and fold AWQ scales into `model` in place; the caller then quantizes it.

    `calibration` is [batch, tokens] of token ids; `group_size(in_features)` gives the int4 group
    of a layer. Returns {"input_scales": {linear: s}, "output_scales": {linear: s}}: a linear's
    input now arrives divided by its input scale, and an up_proj's output leaves divided by its
    output scale (`linear_output_errors` needs both to compare a layer with its float original).
    """
    layers = decoder_layers(model)
    hidden, layer_kwargs = _layer_inputs(model, calibration, layers)
    scales: dict[str, torch.Tensor] = {}
    out_scales: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        inputs, out = _linear_inputs(layer, hidden, layer_kwargs[i])
        for pair in scaling_pairs(layer):
            first = pair.linears[0][1]
            x = inputs[id(first)]
            weights = [lin.weight for _, lin in pair.linears]
            s = search_scale(x, weights, group_size(first.in_features))
            _fold(pair, s)
            for name, _ in pair.linears:
                scales[f"layers.{i}.{name}"] = s
            if isinstance(pair.prev, torch.nn.Linear):
                out_scales[f"layers.{i}.{pair.prev_name}"] = s
        hidden = out
        if progress:
            progress(i + 1, len(layers))
    return {"input_scales": scales, "output_scales": out_scales}


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group: int) -> torch.Tensor:
    """The per-input-channel scale with the smallest int4 output error on activations x."""
    x = x.reshape(-1, x.shape[-1]).float()
    x_mean = x.abs().mean(dim=0)
    if x.shape[0] > LOSS_TOKENS:  # an evenly spaced subset keeps the search cheap
        x = x[torch.linspace(0, x.shape[0] - 1, LOSS_TOKENS).long()]
    w = torch.cat([t.float() for t in weights])
    reference = x @ w.T
    best_err, best = float("inf"), torch.ones_like(x_mean)
    for step in range(ALPHA_GRID):
        s = x_mean.pow(step / ALPHA_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = (x @ (fake_int4(w * s, group) / s).T - reference).pow(2).mean().item()
        if err < best_err:
            best_err, best = err, s
    return best


def fake_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Quantize-dequantize with exactly the codec and layout PackedLinear stores for `w`."""
    return PackedLinear.quantize(w, None, 4, group, symmetric=False).dequantized_weight(
        torch.float32
    )


def _fold(pair: ScalingPair, s: torch.Tensor) -> None:
    """Divide the producing op's output by s and multiply the linears' input columns by s."""
    prev = pair.prev
    if isinstance(prev, torch.nn.Linear):
        prev.weight.copy_(prev.weight.float() / s[:, None])
        if prev.bias is not None:
            prev.bias.copy_(prev.bias.float() / s)
    elif _adds_one(prev):  # Gemma's RMSNorm multiplies by (1 + weight)
        prev.weight.copy_((1 + prev.weight.float()) / s - 1)
    else:
        prev.weight.copy_(prev.weight.float() / s)
    for _, lin in pair.linears:
        lin.weight.copy_(lin.weight.float() * s)


def _adds_one(norm) -> bool:
    return "Gemma" in type(norm).__name__


def _layer_inputs(model, calibration: torch.Tensor, layers) -> tuple[torch.Tensor, list[dict]]:
    """One float forward pass, recording layer 0's input and every layer's keyword arguments."""
    kwargs_seen: list[dict] = [{} for _ in layers]
    first: list[torch.Tensor] = []

    def record(i):
        def hook(module, args, kwargs):
            kept = without_cache(kwargs)
            if "hidden_states" in kept:
                hidden = kept.pop("hidden_states")
            else:
                hidden = args[0]
            kwargs_seen[i] = kept
            if i == 0:
                first.append(hidden)

        return hook

    handles = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        model(calibration, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return first[0], kwargs_seen


def _linear_inputs(layer, hidden: torch.Tensor, kwargs: dict):
    """Run one layer; return ({id(linear): its input}, the layer's output)."""
    inputs: dict[int, torch.Tensor] = {}

    def keep(module, args):
        inputs[id(module)] = args[0]

    handles = [
        m.register_forward_pre_hook(keep) for m in layer.modules() if isinstance(m, torch.nn.Linear)
    ]
    try:
        out = layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return inputs, out[0] if isinstance(out, tuple) else out
