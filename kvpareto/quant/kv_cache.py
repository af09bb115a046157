"""A packed, mixed-precision KV cache that transformers' `model.forward` accepts.

Why not the built-in `QuantizedCache`: it has one bit-width for K and V, no per-layer bits, and it
re-quantizes the whole history at every residual flush. Here each layer holds two independent
`KVStream`s (K and V), each with its own bits, tile shape, residual window and options.

Semantics (ARCHITECTURE.md, "Quantize on write, faithfully"):
- `update()` returns [dequantized history | full-precision tail | this chunk], so a prefill chunk
  attends to its own K/V in full precision and to earlier chunks as a real runtime would read them.
- Then the chunk joins the full-precision tail, and tokens leave the tail oldest first, in whole
  token-tiles, once more than `residual_length` (R) tokens wait. Token-tiled schemes (per-channel,
  per-block: g tokens; per-tensor: 128) therefore keep up to R + tile - 1 tokens in full
  precision; per-channel statistics are gathered over exactly those g tokens. Nothing already
  quantized is ever touched again.
- The state after T tokens depends on T alone, not on chunking: `StreamSpec.modeled_bytes(T)`
  gives the bytes held in closed form, and the tests check it against the tensors to the byte.
- Sliding-window layers (Gemma3 local layers) drop whole tiles once they fall out of the window.
- With `prune_rate` > 0, each prefill chunk's tokens are scored and only the kept ones are stored
  (`kvpareto.quant.pruning` has the policy). Everything above then runs on the kept tokens: a
  stream counts tokens ever written (`total`, the RoPE position of the next token) apart from
  tokens kept (`kept`, what the layout and the mask see). `peak_nbytes` records the most bytes
  the cache ever held, sampled after every layer update, and `modeled_peak_nbytes` gives it in
  closed form.

Storage: packed uint8 codes, fp16 scale and zero per tile, the tail in the storage dtype (the
dtype the model's float weights are held in, which may differ from the compute dtype). A 16-bit
stream stores the storage dtype when it is 16-bit, else fp16. Each step dequantizes (or casts) the
history of one layer straight into the K/V tensor attention reads, in the compute dtype; that
temporary is activation memory, not KV memory. (Keeping a dequantized copy between steps would be
faster, and a lie about bytes.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpareto.config import Config
from kvpareto.quant.pruning import ChunkView, TokenPruner, make_scorer
from kvpareto.quant.tiles import Quantized, TileShape, dequantize, hadamard, quantize, tile_shape

_F16 = 2  # bytes of an fp16 scale, zero point or smoothing mean


def storage_dtype_16(storage: torch.dtype) -> torch.dtype:
    return storage if storage in (torch.float16, torch.bfloat16) else torch.float16


@dataclass(frozen=True)
class StreamSpec:
    """Everything that decides how one K or V stream stores tokens."""

    bits: int
    tile: TileShape
    symmetric: bool
    residual_length: int
    smooth: bool  # subtract the per-channel mean before quantizing (keys only)
    rotate: bool  # Hadamard-rotate channels before quantizing
    window: int | None  # sliding-window size, None for global attention
    fp_bytes: int  # bytes per value of the full-precision tail

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def layout(self, total: int) -> tuple[int, int, int]:
        """(first stored quantized token, quantized tokens ever written, stored tail tokens)."""
        keep_from = 0 if self.window is None else max(total - (self.window - 1), 0)
        if not self.quantized:
            return 0, 0, total - keep_from
        tt = self.tile.tokens
        n_q = max(total - self.residual_length, 0) // tt * tt
        q_start = min(keep_from // tt * tt, n_q)
        return q_start, n_q, total - n_q

    def modeled_bytes(self, total: int, batch: int, heads: int, head_dim: int) -> int:
        q_start, n_q, n_tail = self.layout(total)
        stored_q = n_q - q_start
        per_head = n_tail * head_dim * self.fp_bytes
        if self.quantized:
            tiles = (stored_q // self.tile.tokens) * (head_dim // self.tile.channels)
            per_head += stored_q * head_dim * self.bits // 8
            per_head += tiles * _F16 * (1 if self.symmetric else 2)
            if self.smooth and total > 0:
                per_head += head_dim * _F16
        return batch * heads * per_head


def stream_specs(
    config: Config, layer_idx: int, head_dim: int, window: int | None, dtype: torch.dtype
) -> tuple[StreamSpec, StreamSpec]:
    bits = config.bits_for_layer(layer_idx)
    fp_bytes = torch.finfo(dtype).bits // 8

    def spec(b: int, granularity: str, smooth: bool) -> StreamSpec:
        return StreamSpec(
            bits=b,
            tile=tile_shape(granularity, config.group_size, head_dim),
            symmetric=config.symmetric,
            residual_length=config.residual_length,
            smooth=smooth and b < 16,
            rotate=config.rotation == "hadamard" and b < 16,
            window=window,
            fp_bytes=fp_bytes if b < 16 else torch.finfo(storage_dtype_16(dtype)).bits // 8,
        )

    return (
        spec(bits.k_bits, config.k_granularity, config.k_smooth),
        spec(bits.v_bits, config.v_granularity, False),
    )


class KVStream:
    """The K (or V) history of one layer: packed quantized tiles, then a full-precision tail."""

    def __init__(self, spec: StreamSpec, dtype: torch.dtype, storage: torch.dtype):
        """`dtype` is what attention reads (the compute dtype), `storage` what the tail holds."""
        self.spec = spec
        self.dtype = dtype
        self.tail_dtype = storage if spec.quantized else storage_dtype_16(storage)
        self.total = 0  # tokens ever written
        self.pruned = 0  # tokens written but evicted on arrival, never stored
        # Indices into the sequence of kept tokens (every token written, when nothing is pruned):
        self.q_start = 0  # the first stored quantized token
        self.n_q = 0  # one past the last quantized token
        self.packed: Quantized | None = None
        self.tail: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # fp16 per-channel mean, fixed at first write
        self._rot: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        """Tokens kept: the length of the stored sequence that the layout rules apply to."""
        return self.total - self.pruned

    # --- the entry points ----------------------------------------------------------------------
    def update(self, new: torch.Tensor) -> torch.Tensor:
        """Return what attention sees, [stored history | new], then store `new`."""
        if self.tail is None:
            self._start(new)
        if not self.spec.quantized and self.spec.window is None and self.tail_dtype == self.dtype:
            # Exactly DynamicCache: one concatenation, and the stored tail is what attention sees.
            self.tail = torch.cat([self.tail, new], dim=-2)
            self.total += new.shape[-2]
            return self.tail
        visible = self._visible(new)
        self.append(new)
        return visible

    def read(self, new: torch.Tensor) -> torch.Tensor:
        """What attention sees, [stored history | new], without storing `new` (see `append`)."""
        if self.tail is None:
            self._start(new)
        return self._visible(new)

    def append(self, new: torch.Tensor, written: int | None = None) -> None:
        """Store `new`: all of the `written` tokens just read, or the rows of them kept."""
        written = new.shape[-2] if written is None else written
        self.tail = torch.cat([self.tail, new.to(self.tail_dtype)], dim=-2)
        self.total += written
        self.pruned += written - new.shape[-2]
        self._flush()
        self._evict()

    def tensors(self) -> list[torch.Tensor]:
        held = [] if self.packed is None else self.packed.tensors()
        held += [t for t in (self.tail, self.mean) if t is not None]
        return held

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    # --- reading --------------------------------------------------------------------------------
    def _visible(self, new: torch.Tensor) -> torch.Tensor:
        """Build [history | new] in one preallocated tensor: the history is dequantized straight
        into it, so decode pays one pass over the packed store and no concatenation of it."""
        n_q, n_tail = self.n_q - self.q_start, self.tail.shape[-2]
        history = n_q + n_tail
        keep = history if self.spec.window is None else min(history, self.spec.window - 1)
        *lead, n_new, d = new.shape
        out = torch.empty(*lead, keep + n_new, d, dtype=self.dtype, device=new.device)
        if keep == history:
            if n_q:
                self._decode_into(out[..., :n_q, :])
            out[..., n_q:history, :] = self.tail
        else:  # a sliding window cuts into the history: decode it all, keep the newest part
            full = torch.empty(*lead, history, d, dtype=self.dtype, device=new.device)
            if n_q:
                self._decode_into(full[..., :n_q, :])
            full[..., n_q:, :] = self.tail
            out[..., :keep, :] = full[..., history - keep :, :]
        out[..., keep:, :] = new
        return out

    def _decode_into(self, out: torch.Tensor) -> None:
        bits, tile = self.spec.bits, self.spec.tile
        if self._rot is None and self.mean is None:
            dequantize(self.packed, bits, tile, self.dtype, out=out)
            return
        x = dequantize(self.packed, bits, tile, torch.float32)
        if self._rot is not None:
            x = x @ self._rot.T
        if self.mean is not None:
            x = x + self.mean.float()
        out.copy_(x)

    # --- writing --------------------------------------------------------------------------------
    def _start(self, new: torch.Tensor) -> None:
        self.tail = new[..., :0, :].to(self.tail_dtype)
        if self.spec.smooth:
            self.mean = new.float().mean(dim=-2, keepdim=True).to(torch.float16)
        if self.spec.rotate:
            self._rot = hadamard(new.shape[-1])

    def _flush(self) -> None:
        spec = self.spec
        if not spec.quantized:
            return
        target = max(self.kept - spec.residual_length, 0) // spec.tile.tokens * spec.tile.tokens
        k = target - self.n_q
        if k <= 0:
            return
        leaving, self.tail = self.tail[..., :k, :], self.tail[..., k:, :].clone()
        block = self._encode(leaving)
        if self.packed is None:
            self.packed = block
        else:
            p = self.packed
            self.packed = Quantized(
                torch.cat([p.codes, block.codes], dim=-2),
                torch.cat([p.scale, block.scale], dim=-2),
                None if p.zero is None else torch.cat([p.zero, block.zero], dim=-2),
            )
        self.n_q = target

    def _evict(self) -> None:
        """Drop what a sliding-window layer can never attend to again, in whole tiles."""
        if self.spec.window is None:
            return
        keep_from = max(self.kept - (self.spec.window - 1), 0)
        if not self.spec.quantized:
            drop = keep_from - (self.kept - self.tail.shape[-2])
            if drop > 0:
                self.tail = self.tail[..., drop:, :].clone()
            return
        tt = self.spec.tile.tokens
        new_start = min(keep_from // tt * tt, self.n_q)
        drop = new_start - self.q_start
        if drop > 0:
            p, rows = self.packed, drop // tt
            self.packed = Quantized(
                p.codes[..., drop:, :].clone(),
                p.scale[..., rows:, :].clone(),
                None if p.zero is None else p.zero[..., rows:, :].clone(),
            )
            self.q_start = new_start

    # --- codec ------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> Quantized:
        x = x.float()
        if self.mean is not None:
            x = x - self.mean.float()
        if self._rot is not None:
            x = x @ self._rot
        return quantize(x, self.spec.bits, self.spec.tile, self.spec.symmetric)


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's cache: a K stream and a V stream, pruned on arrival if `pruner`."""

    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        k_spec: StreamSpec,
        v_spec: StreamSpec,
        window: int | None,
        storage: torch.dtype,
        pruner: TokenPruner | None = None,
    ):
        super().__init__()
        self.k_spec, self.v_spec, self.window = k_spec, v_spec, window
        self.storage = storage
        self.is_sliding = window is not None
        self.pruner = pruner
        self.k: KVStream | None = None
        self.v: KVStream | None = None
        # (queries, scaling) of the current chunk's observation window, set by
        # `pruning.observe_queries` just before the attention call, consumed by `update`.
        self.window_queries: tuple[torch.Tensor, float] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k = KVStream(self.k_spec, self.dtype, self.storage)
        self.v = KVStream(self.v_spec, self.dtype, self.storage)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n_new = self.k.total, key_states.shape[-2]
        if self.pruner is None or not self.pruner.prunes(start, n_new):
            return self.k.update(key_states), self.v.update(value_states)
        keys, values = self.k.read(key_states), self.v.read(value_states)
        queries, scaling = self.window_queries or (None, 1.0)
        self.window_queries = None
        chunk = ChunkView(keys, n_new, start, queries, scaling)
        rows = self.pruner.select(chunk, stored=self.k.kept)
        if rows is not None:
            index = rows[..., None].expand(-1, -1, -1, key_states.shape[-1])
            key_states, value_states = key_states.gather(2, index), value_states.gather(2, index)
        self.k.append(key_states, n_new)
        self.v.append(value_states, n_new)
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past = self.get_seq_length()
        if self.window is None:
            # Pruning leaves `kept` of the `past` tokens. The offset puts the new tokens at their
            # true positions (past onwards), so they stay causal among themselves while every
            # stored token, all at earlier positions, stays visible.
            kept = 0 if self.k is None else self.k.kept
            return kept + query_length, past - kept
        # Mirrors DynamicSlidingWindowLayer: the window holds the last window-1 past tokens.
        kv_offset = max(past - self.window + 1, 0)
        kv_length = (self.window - 1 if past >= self.window else past) + query_length
        return kv_length, kv_offset

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.k = self.v = None
        self.is_initialized = False

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes() + self.v.nbytes()


def layer_windows(model_config) -> list[int | None]:
    """The sliding window of each decoder layer (None for global attention)."""
    cfg = model_config.get_text_config()
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    window = getattr(cfg, "sliding_window", None)
    return [window if t == "sliding_attention" and window else None for t in types]


class QuantizedKVCache(Cache):
    """The cache for one sequence batch under one `Config`."""

    def __init__(
        self, model_config, config: Config, dtype: torch.dtype, prompt_length: int | None = None
    ):
        """`dtype` is the storage dtype (what full-precision K/V are held in); `prompt_length`
        tells pruning where the prompt ends, and is needed when prune_rate > 0."""
        cfg = model_config.get_text_config()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.config = config
        self.prompt_length = prompt_length
        self.pruner: TokenPruner | None = None
        if config.prune_rate > 0:
            if prompt_length is None:
                raise ValueError("token pruning needs the prompt length: pass prompt_length")
            scorer = make_scorer(config.prune_scorer)
            self.pruner = TokenPruner(config.prune_rate, scorer, prompt_length)
        layers = []
        for idx, window in enumerate(layer_windows(model_config)):
            k_spec, v_spec = stream_specs(config, idx, self.head_dim, window, dtype)
            pruner = self.pruner if window is None else None
            layers.append(QuantizedKVLayer(k_spec, v_spec, window, dtype, pruner))
        super().__init__(layers=layers)
        self.peak_nbytes = 0  # measured: the most bytes held after any layer update
        self._held = 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        before = layer.nbytes()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._held += layer.nbytes() - before
        self.peak_nbytes = max(self.peak_nbytes, self._held)
        return out

    def nbytes(self) -> int:
        """Measured: the sum of `nbytes` of every tensor the cache holds."""
        return sum(layer.nbytes() for layer in self.layers)

    def _stored(self, layer: QuantizedKVLayer, total: int) -> int:
        """Tokens `layer` stores after `total` tokens, the prompt pruned as its chunks arrived."""
        if layer.pruner is None:
            return total
        if total < self.prompt_length:
            raise ValueError(f"{total} tokens is short of the {self.prompt_length}-token prompt")
        _, kept = layer.pruner.schedule(self.config.chunk_size)[-1]
        return kept + total - self.prompt_length

    def _layer_bytes(self, layer: QuantizedKVLayer, stored: int, batch: int) -> int:
        return sum(
            spec.modeled_bytes(stored, batch, self.kv_heads, self.head_dim)
            for spec in (layer.k_spec, layer.v_spec)
        )

    def mean_bits(self) -> float:
        """Nominal code bits per cached K/V value, averaged over layers (per-layer bits count)."""
        bits = [(layer.k_spec.bits + layer.v_spec.bits) / 2 for layer in self.layers]
        return sum(bits) / len(bits)

    def modeled_nbytes(self, total: int, batch: int = 1) -> int:
        """Modeled: the closed-form bytes after `total` tokens (see `StreamSpec.modeled_bytes`)."""
        return sum(
            self._layer_bytes(layer, self._stored(layer, total), batch) for layer in self.layers
        )

    def modeled_peak_nbytes(self, batch: int = 1) -> int:
        """Modeled: the most bytes held after any layer update while the prompt is prefilled.

        Layers update one after another, so after layer l of chunk i, layers up to l hold their
        state after chunk i and the rest their state after chunk i - 1. Without pruning, and with
        tiles that divide the chunk, this is the bytes at the end of the prompt; it can exceed
        them when a full-precision tail is flushed into quantized tiles, or a window slides.
        """
        if self.prompt_length is None:
            raise ValueError("the modeled peak needs the prompt length: pass prompt_length")
        step = self.config.chunk_size or self.prompt_length
        ends = [
            min(start + step, self.prompt_length) for start in range(0, self.prompt_length, step)
        ]
        kept = ends
        if self.pruner is not None:
            kept = [stored for _, stored in self.pruner.schedule(self.config.chunk_size)]
        held = peak = 0
        now = [0] * len(self.layers)
        for end, stored in zip(ends, kept, strict=True):
            for i, layer in enumerate(self.layers):
                layer_bytes = self._layer_bytes(
                    layer, end if layer.pruner is None else stored, batch
                )
                held += layer_bytes - now[i]
                now[i] = layer_bytes
                peak = max(peak, held)
        return peak
