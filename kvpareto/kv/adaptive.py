"""Adaptive per-token KV precision: every token's K and V are stored at 2, 4, 8 or 16 bits.

kv_scheme adaptive (a learned controller) and rule (the hand-written baseline) use this cache;
see kv/controller.py for who decides and kv/features.py for what they look at.

Decisions. Bits are chosen once, when a token is written, per token and layer, and shared by its
K and V in every KV head (so each width's store stays rectangular). Never re-quantized.

Budget. After N tokens a layer holds exactly `quota(mix, N)` tokens of each width, where
mix = controller.mix(target_mean_bits): the count at or above each width is floor(N x its
upper-tail fraction). Each write takes the difference of the quotas before and after it, and
gives the widest widths to its highest-scoring tokens. So the realized mean is the target minus
less than 14 / N bits, and the bytes held depend on N alone (not on chunking), as for the static
cache: `modeled_nbytes(N)` is exact. A write whose quota is one width (every decode step, for
instance) skips the features entirely.

Storage. Per layer, one pool per width: packed per-token tiles (1 x g channels, fp16 scale and
zero, `tiles.quantize`) for 2/4/8 bits, the 16-bit storage dtype (fp16 under fp32) for 16. Each
pool preallocates rows in blocks of BLOCK_TOKENS tokens and writes appends in place, as the static
cache's stores do (kv_cache.py, "Growth"); `modeled_nbytes` counts that slack.

Reading. Keys are cached after RoPE, and a chunk sees the whole history (transformers' mask for
a past of p tokens and a chunk of c is all-visible over the first p columns and causal over the
last c; `get_mask_sizes` says (p + c, 0) as for `DynamicLayer`). Attention over the history is
therefore order-invariant, and `update` returns [pool 2 | pool 4 | pool 8 | pool 16 | chunk]
without restoring positions (tests/test_adaptive.py checks this against transformers' masks).
No residual window: the chunk attends to itself in full precision, history is read as stored.

Limits: batch 1, global attention only (pools carry no positions, so a sliding window could not
drop the right tokens), llama-style attention modules (q_proj, RoPE) for the probe queries.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable

import torch

from kvpareto.codec import Quantized, TileShape, dequantize, quantize
from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.kv.base import KVCache, KVLayer
from kvpareto.kv.controller import WIDTHS, LearnedController, RuleController, load_controller
from kvpareto.kv.features import (
    PROBE_QUERIES,
    frequency_counts,
    token_features,
)
from kvpareto.kv.probes import CacheHooks, QueryProbe
from kvpareto.kv.static import (
    BLOCK_TOKENS,
    RowRing,
    capacity,
    layer_windows,
    storage_dtype_16,
)

_F16 = 2  # bytes of an fp16 scale or zero point


def quota(mix: dict[int, float], total: int) -> dict[int, int]:
    """Tokens of each width after `total` writes (see the module docstring)."""
    counts, above = {}, total
    widths = sorted(mix)
    for i, width in enumerate(widths):
        tail = sum(mix[w] for w in widths[i + 1 :])
        next_above = math.floor(total * tail + 1e-9)
        counts[width], above = above - next_above, next_above
    return counts


class _Pool:
    """One layer's tokens at one width: K and V, packed below 16 bits, in one `RowRing` that
    grows in blocks of BLOCK_TOKENS tokens (pools never drop tokens, so it never wraps)."""

    def __init__(self, bits: int, tile: TileShape, symmetric: bool, dtype: torch.dtype):
        self.bits, self.tile, self.symmetric, self.dtype = bits, tile, symmetric, dtype
        self.n = 0
        self._rows: RowRing | None = None  # K's tensors, then V's

    @property
    def k(self) -> Quantized | torch.Tensor | None:
        return self._held()[0]

    @property
    def v(self) -> Quantized | torch.Tensor | None:
        return self._held()[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.shape[-2] == 0:
            return
        parts = self._encode(k) + self._encode(v)
        if self._rows is None:
            self._rows = RowRing(parts, [1] * len(parts), BLOCK_TOKENS)
        self._rows.update(0, parts)
        self.n += k.shape[-2]

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.bits == 16:
            return [x.to(self.dtype)]
        return quantize(x, self.bits, self.tile, self.symmetric).tensors()

    def _held(self) -> tuple:
        """Views of the filled rows, as (K, V)."""
        if self._rows is None:
            return None, None
        ((_, views),) = self._rows.runs()
        half = len(views) // 2
        if self.bits == 16:
            return views[0], views[1]
        return tuple(
            Quantized(*part, None) if len(part) == 2 else Quantized(*part)
            for part in (views[:half], views[half:])
        )

    def read_into(self, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        for held, out in zip(self._held(), (k_out, v_out), strict=True):
            if self.bits == 16:
                out.copy_(held)
            else:
                dequantize(held, self.bits, self.tile, out.dtype, out=out)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self._rows is None else self._rows.tensors()

    def modeled_bytes(self, n: int, heads: int, head_dim: int) -> int:
        """Bytes of n tokens in this pool, K and V, all KV heads (batch 1), with the slack of
        its last block."""
        if self.bits == 16:
            per_token = head_dim * torch.finfo(self.dtype).bits // 8
        else:
            tiles = head_dim // self.tile.channels
            per_token = head_dim * self.bits // 8 + tiles * _F16 * (1 if self.symmetric else 2)
        return 2 * heads * capacity(n, BLOCK_TOKENS) * per_token


class _Writes:
    """What every layer of one forward shares: the ids being written and their frequencies."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.freq: torch.Tensor | None = None

    def observe(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is None or input_ids.shape[0] != 1:
            self.freq = None
            return
        self.freq = frequency_counts(input_ids[0].tolist(), self.seen)


class AdaptiveKVLayer(KVLayer):
    """One attention layer's pools, and the per-write decision of which token goes where."""

    is_croppable = False
    supports_early_init = False

    def __init__(self, idx: int, n_layers: int, config: Config, cache: AdaptiveKVCache):
        super().__init__()
        self.idx, self.depth = idx, idx / max(n_layers - 1, 1)
        self.config = config
        self.controller, self.mix, self.writes = cache.controller, cache.mix, cache.writes
        self.tile, self.store16 = cache.tile, cache.store16
        self.observer = cache.observer
        self.pools: dict[int, _Pool] = {}
        self.total = 0
        self.probe: QueryProbe | None = None  # this write's attention input, set by the hook

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise UserError("kv_scheme adaptive/rule runs batch 1 only")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.pools = {
            w: _Pool(w, self.tile, self.config.symmetric, self.store16 if w == 16 else self.dtype)
            for w in WIDTHS
        }
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_visible, v_visible = self._visible(key_states, value_states)
        if self.observer is not None:
            self.observer(self, key_states, value_states, k_visible, v_visible)
        widths = self._decide(key_states, value_states, k_visible)
        for w, pool in self.pools.items():
            chosen = (widths == w).nonzero().squeeze(-1)
            pool.append(key_states[..., chosen, :], value_states[..., chosen, :])
        self.total += key_states.shape[-2]
        self.probe = None
        return k_visible, v_visible

    def _visible(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[pool 2 | pool 4 | pool 8 | pool 16 | new], built in place in one tensor each."""
        *lead, n_new, d = k.shape
        k_out = torch.empty(*lead, self.total + n_new, d, dtype=self.dtype, device=k.device)
        v_out = torch.empty_like(k_out)
        at = 0
        for pool in self.pools.values():
            if pool.n:
                pool.read_into(k_out[..., at : at + pool.n, :], v_out[..., at : at + pool.n, :])
                at += pool.n
        k_out[..., at:, :], v_out[..., at:, :] = k, v
        return k_out, v_out

    def _decide(self, k: torch.Tensor, v: torch.Tensor, k_visible: torch.Tensor) -> torch.Tensor:
        """The width of each new token: this write's quotas, widest to the highest scores."""
        n = k.shape[-2]
        before, after = quota(self.mix, self.total), quota(self.mix, self.total + n)
        take = {w: after[w] - before[w] for w in after if after[w] > before[w]}
        if len(take) == 1:
            return torch.full((n,), next(iter(take)), dtype=torch.int64)
        order = self.controller.score(self.features(k, v, k_visible)).argsort(
            descending=True, stable=True
        )
        widths = torch.empty(n, dtype=torch.int64)
        at = 0
        for w in sorted(take, reverse=True):
            widths[order[at : at + take[w]]] = w
            at += take[w]
        return widths

    def features(self, k: torch.Tensor, v: torch.Tensor, k_visible: torch.Tensor) -> torch.Tensor:
        if self.writes.freq is None or self.probe is None:
            raise UserError(
                "adaptive KV precision needs the model's input_ids and its llama-style attention "
                "modules: build the cache with make_cache(model, ...), then call model(input_ids) "
                "before closing it"
            )
        return token_features(
            freq=self.writes.freq,
            start=self.total,
            k_new=k,
            v_new=v,
            probes=self.probe_queries(min(PROBE_QUERIES, k.shape[-2])),
            k_visible=k_visible,
            depth=self.depth,
            tile=self.tile,
        )

    def probe_queries(self, m: int) -> torch.Tensor:
        """The scaled, rotated queries of the write's last m tokens, [1, Hq, m, D]."""
        return self.probe.queries(m) * self.probe.scaling

    def code_bits(self) -> int:
        """Sum over written tokens of their width (one token's K and V share it)."""
        return sum(w * pool.n for w, pool in self.pools.items())

    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.pools, self.total, self.is_initialized = {}, 0, False

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer's pools hold (their buffers, slack included)."""
        return [t for pool in self.pools.values() for t in pool.tensors()]


class AdaptiveKVCache(KVCache):
    """Per-token mixed-precision KV cache for kv_scheme adaptive or rule (batch 1).

    From construction to `close()`, it hooks the model to see, for calls that carry this cache
    only, the input ids (token frequency) and each attention module's input (the probe queries).
    A cache dropped without `close()` loses its hooks when it is collected. `observer`, if given,
    sees every write first (calibration uses it).
    """

    @classmethod
    def for_model(
        cls,
        model,
        config: Config,
        dtype: torch.dtype,
        prompt_length: int | None = None,
        observer: Callable | None = None,
    ) -> AdaptiveKVCache:
        return cls(model, config, dtype, prompt_length=prompt_length, observer=observer)

    def __init__(
        self,
        model,
        config: Config,
        dtype: torch.dtype,
        prompt_length: int | None = None,
        observer: Callable | None = None,
    ):
        _check_config(model.config, config)
        self.prompt_length = prompt_length
        cfg = model.config.get_text_config()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.config = config
        self.controller: LearnedController | RuleController = load_controller(
            config.kv_scheme, config.controller
        )
        self.mix = self.controller.mix(config.target_mean_bits)
        self.tile = TileShape(1, min(config.group_size, self.head_dim))
        self.store16 = storage_dtype_16(dtype)
        self.writes = _Writes()
        self.observer = observer
        n = cfg.num_hidden_layers
        super().__init__(layers=[AdaptiveKVLayer(i, n, config, self) for i in range(n)])
        self._hooks = CacheHooks(model, self, _see_attention, _see_input_ids)
        weakref.finalize(self, self._hooks.remove)

    def close(self) -> None:
        self._hooks.remove()

    def fork(self) -> AdaptiveKVCache:
        """A copy of the pools and counts that shares the controller and observer, with hooks of
        its own on the same model."""
        hooks, self._hooks = self._hooks, None
        try:
            twin = copy.deepcopy(
                self, {id(self.controller): self.controller, id(self.observer): self.observer}
            )
        finally:
            self._hooks = hooks
        twin._hooks = hooks.for_cache(twin)
        weakref.finalize(twin, twin._hooks.remove)
        return twin

    def modeled_nbytes(self, total: int, batch: int = 1) -> int:
        """Modeled: the closed form of the per-width quotas after `total` tokens."""
        counts = quota(self.mix, total)
        per_layer = sum(
            _Pool(w, self.tile, self.config.symmetric, self.store16).modeled_bytes(
                counts.get(w, 0), self.kv_heads, self.head_dim
            )
            for w in WIDTHS
        )
        return batch * per_layer * len(self.layers)

    @property
    def peak_nbytes(self) -> int:
        """The most bytes ever held: the pools only grow, so what they hold now."""
        return self.nbytes()

    def modeled_peak_nbytes(self, batch: int = 1) -> int:
        if self.prompt_length is None:
            raise ValueError("the modeled peak needs the prompt length: pass prompt_length")
        return self.modeled_nbytes(self.prompt_length, batch)

    def stored_values(self, total: int, batch: int = 1) -> int:
        """The K and V values held after `total` tokens: every token, in every layer."""
        return batch * 2 * total * len(self.layers) * self.kv_heads * self.head_dim

    def mean_bits(self) -> float:
        """Realized mean code width over every token written, in every layer (no scales)."""
        tokens = sum(layer.total for layer in self.layers)
        return sum(layer.code_bits() for layer in self.layers) / tokens if tokens else 0.0


def _see_input_ids(cache: AdaptiveKVCache, input_ids: torch.Tensor | None) -> None:
    cache.writes.observe(input_ids)


def _see_attention(cache: AdaptiveKVCache, probe: QueryProbe) -> None:
    cache.layers[probe.layer_idx].probe = probe


def _check_config(model_config, config: Config) -> None:
    if any(window is not None for window in layer_windows(model_config)):
        raise UserError(
            f"kv_scheme {config.kv_scheme} needs global attention in every layer; this model has "
            "sliding-window layers (use kv_scheme static)"
        )
