"""What a KV cache may see of a model call besides keys and values: its input ids and queries.

A cache's `update` receives keys and values only. A scheme that ranks tokens by the attention
they draw (SnapKV pruning, the adaptive controller's features) also needs queries, and the
adaptive controller needs the input ids (token frequencies). `CacheHooks` hooks the model for
them: pre-hooks on the decoder and on every attention module that act only for calls carrying
its cache, until `remove()` or the end of a `with` block. An attention hook hands over a
`QueryProbe`, the attention's input, from which the queries of the last m tokens are recomputed
on demand: q_proj, q_norm where the architecture has one (Gemma3, Qwen3), then RoPE from the
`position_embeddings` the layer was given. So only llama-style attention modules (a q_proj, a
layer index) can be probed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import rotate_half

from kvpareto.hf_compat import cache_of


@dataclass(frozen=True)
class QueryProbe:
    """One attention call's input, from which its queries can be recomputed."""

    module: torch.nn.Module  # the attention module
    hidden: torch.Tensor  # [B, T, hidden size]: its input
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), [B, T, D] each

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def scaling(self) -> float:
        """The attention's softmax scale."""
        return self.module.scaling

    def queries(self, m: int) -> torch.Tensor:
        """The post-RoPE queries of the last m tokens, [B, heads, m, D], not yet scaled."""
        module, hidden = self.module, self.hidden
        q = module.q_proj(hidden[:, -m:]).view(hidden.shape[0], m, -1, module.head_dim)
        q = q.transpose(1, 2)
        if getattr(module, "q_norm", None) is not None:
            q = module.q_norm(q)
        cos, sin = (t[:, None, -m:] for t in self.position_embeddings)
        return q * cos + rotate_half(q) * sin


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules that a `QueryProbe` can read."""
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]


class CacheHooks:
    """Pre-hooks on `model` that act for calls carrying `cache` only: `on_attention(cache, probe)`
    before each attention module, and `on_input_ids(cache, input_ids)` (if given) before the
    decoder. They hold the cache weakly, so hooking a cache never keeps it alive; `remove()`
    takes them off (leaving a `with` block does too)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache,
        on_attention: Callable[[object, QueryProbe], None],
        on_input_ids: Callable[[object, torch.Tensor | None], None] | None = None,
    ):
        self._model = weakref.ref(model)
        self._callbacks = (on_attention, on_input_ids)
        hooked = weakref.ref(cache)

        def attention(module, args, kwargs):
            cache = hooked()
            if cache is not None and cache_of(kwargs) is cache:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                on_attention(cache, QueryProbe(module, hidden, kwargs["position_embeddings"]))

        def decoder(module, args, kwargs):
            cache = hooked()
            if cache is not None and cache_of(kwargs) is cache:
                on_input_ids(cache, kwargs.get("input_ids", args[0] if args else None))

        self._handles = [
            m.register_forward_pre_hook(attention, with_kwargs=True)
            for m in attention_modules(model)
        ]
        if on_input_ids is not None:
            self._handles.append(
                model.get_decoder().register_forward_pre_hook(decoder, with_kwargs=True)
            )

    def for_cache(self, cache) -> CacheHooks:
        """The same hooks, on the same model, for another cache (a fork of this one's)."""
        return CacheHooks(self._model(), cache, *self._callbacks)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> CacheHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
