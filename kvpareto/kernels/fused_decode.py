"""Decode attention read straight from the packed KV cache, by a small C++ kernel.

A decode step (one query token) otherwise dequantizes each layer's whole history into a fresh
tensor for SDPA to read. Here the scores come from the packed K codes and each tile's scale and
zero, and p.v is accumulated from the packed V rows as they are read (csrc/decode_attention.cpp
gives the arithmetic), so the history is never materialized.

How it plugs into transformers: models run the "kvpareto" attention (`install`), which is SDPA
for every call except a decode step that `QuantizedKVCache.update` handed over. For such a step
the cache stores nothing and returns the new K/V tagged with a handoff (`HANDOFF`); the attention
call then runs the kernel over what the cache holds plus the new token, and only then stores it,
so the step reads exactly what the reference path (`KVStream._visible`) reads.

Covered: 2/4/8-bit K per-token or per-channel, V per-token, asymmetric or symmetric, K smoothing,
Hadamard rotation, the full-precision tail, GQA and sliding windows, and 16-bit streams (all
tail, read in place: with a 16-bit cache a step then skips SDPA, which spends more on one query
than reading the bf16 history costs). Other layers keep the reference path. The kernel is
compiled once per CPU kind (`build.py`); without a compiler everything still runs on the
reference path, after one notice on stderr.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from kvpareto.kernels import build

ATTENTION = "kvpareto"
HANDOFF = "_kvpareto_decode"  # attribute of a K tensor that a cache handed over to the kernel


def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The "kvpareto" attention: the fused kernel for a decode step the cache handed over,
    transformers' SDPA for everything else (same arguments, same result)."""
    handoff = getattr(key, HANDOFF, None)
    if handoff is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    return handoff(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None


def install(model) -> None:
    """Make `model` run the "kvpareto" attention (SDPA's masks, SDPA outside fused steps)."""
    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def installed(model_config) -> bool:
    return model_config.get_text_config()._attn_implementation == ATTENTION


def enabled(model_config) -> bool:
    """Whether caches built for this model fuse decode steps by default."""
    return installed(model_config) and build.kernel() is not None


def covers(k_spec, v_spec) -> bool:
    """Whether the kernel reads streams of these `StreamSpec`s (else the layer keeps SDPA)."""
    k_tile, v_tile = k_spec.tile, v_spec.tile
    return (
        k_spec.bits in (2, 4, 8, 16)
        and v_spec.bits in (2, 4, 8, 16)
        and (k_spec.bits == 16 or k_tile.tokens == 1 or k_tile.channels == 1)
        and (v_spec.bits == 16 or v_tile.tokens == 1)
        and not v_spec.smooth
    )


def attend(k, v, query, k_new, v_new, scaling: float) -> torch.Tensor:
    """Attention of `query` [B, Hq, 1, D] over what the `KVStream`s k and v hold plus the new
    token (k_new, v_new [B, Hkv, 1, D], not yet stored); returns [B, 1, Hq, D] in query's dtype.
    A sliding window's visible part starts at k's first token it can still attend to."""
    k_store, k_layout = k.kernel_view()
    v_store, v_layout = v.kernel_view()
    none = torch.empty(0)
    out = build.kernel().decode_attention(
        query[:, :, 0].float().contiguous(),
        k_new[:, :, 0].float().contiguous(),
        v_new[:, :, 0].float().contiguous(),
        k_store,
        k_layout,
        v_store,
        v_layout,
        none if k.mean is None else k.mean.contiguous(),
        none if k.rotation is None else k.rotation,
        none if v.rotation is None else v.rotation,
        k.first_visible(),
        k.kept,
        scaling,
    )
    return out.to(query.dtype)[:, None]
