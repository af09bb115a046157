"""A packed, mixed-precision KV cache that transformers' `model.forward` accepts.

Why not the built-in `QuantizedCache`: it has one bit-width for K and V, no per-layer bits, and it
re-quantizes the whole history at every residual flush. Here each layer holds two independent
`KVStream`s (K and V), each with its own bits, tile shape, residual window and options.

Semantics (docs/architecture.md, "Quantize on write, faithfully"):
- `update()` returns [dequantized history | full-precision tail | this chunk], so a prefill chunk
  attends to its own K/V in full precision and to earlier chunks as a real runtime would read them.
- Then the chunk joins the full-precision tail, and tokens leave the tail oldest first, in whole
  token-tiles, once more than `residual_length` (R) tokens wait. Token-tiled schemes (per-channel,
  per-block: g tokens; per-tensor: 128) therefore keep up to R + tile - 1 tokens in full
  precision; per-channel statistics are gathered over exactly those g tokens. Nothing already
  quantized is ever quantized again.
- The state after T tokens depends on T alone, not on chunking: `StreamSpec.modeled_bytes(T)`
  gives the bytes held in closed form, and the tests check it against the tensors to the byte.
- Sliding-window layers (Gemma3 local layers) drop whole tiles once they fall out of the window.
- With `prune_rate` > 0, each prefill chunk's tokens are scored and only the kept ones are stored
  (`kvpareto.kv.pruning` has the policy). Everything above then runs on the kept tokens: a
  stream counts tokens ever written (`total`, the RoPE position of the next token) apart from
  tokens kept (`kept`, what the layout and the mask see). `peak_nbytes` records the most bytes
  the cache ever held, sampled after every layer update, and `modeled_peak_nbytes` gives it in
  closed form.

Storage: packed uint8 codes, fp16 scale and zero per tile, the tail in the storage dtype (the
dtype the model's float weights are held in, which may differ from the compute dtype). A 16-bit
stream stores the storage dtype when it is 16-bit, else fp16. Each step dequantizes (or casts) the
history of one layer straight into the K/V tensor attention reads, in the compute dtype; that
temporary is activation memory, not KV memory. (Keeping a dequantized copy between steps would be
faster, and a lie about bytes.) A decode step of a scheme that `fused_decode` covers skips the
temporary: `update` hands the step to the attention call, which reads the stores in place.

Growth: every store (the packed tiles, the tail) is a `RowRing`, rows preallocated in blocks, so
an append writes only its new rows, in place, and tokens leave the front (into tiles, or out of a
sliding window) by moving a start index; a step never concatenates the history. A store of n
units (token tiles of the packed store, tokens of the tail) holds room for exactly ceil(n / b) * b
of them, b = ceil(BLOCK_TOKENS / tile tokens) tiles or BLOCK_TOKENS tokens: the slack depends on
n alone, `StreamSpec.modeled_bytes` counts it, and measured bytes are those of the whole buffers.
A store is reallocated (what it holds copied once) only when n crosses a multiple of b: once per
16 tokens of a growing history, and at most once per step for a store that a residual window or a
sliding window bounds. So a 16-bit cache holds DynamicCache's values, not its bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvpareto.codec import Quantized, TileShape, dequantize, hadamard, tile_shape
from kvpareto.config import Config
from kvpareto.kernels import fused_decode
from kvpareto.kernels.quantize_tokens import quantize_rows
from kvpareto.kv.base import KVCache, KVLayer
from kvpareto.kv.pruning import ChunkView, TokenPruner, make_scorer

_F16 = 2  # bytes of an fp16 scale, zero point or smoothing mean
# Stores grow by this many tokens: vLLM's default page size. Slack of at most 15 tokens per store
# costs little beside a long context, and a growing history is copied once per 16 tokens, a
# sixteenth of what the per-step dequantization of the history already reads.
BLOCK_TOKENS = 16


def storage_dtype_16(storage: torch.dtype) -> torch.dtype:
    return storage if storage in (torch.float16, torch.bfloat16) else torch.float16


def capacity(n: int, block: int) -> int:
    """Units a store of n units has room for: whole blocks."""
    return -(-n // block) * block


class RowRing:
    """Rows along dim -2 of tensors that fill and empty together, in a ring of whole blocks.

    One unit is `per[i]` rows of tensor i (a token tile: `tile.tokens` rows of codes, one row of
    scale and of zero). The buffers always have room for exactly `capacity(n, block)` units;
    `update` drops units from the front by moving `start`, writes new units in place after the
    last, and reallocates (copying the n units held, in order) only when the capacity changes.
    `tensors()` are the buffers themselves, so their bytes include the slack.
    """

    def __init__(self, like: list[torch.Tensor], per: list[int], block: int):
        self.per, self.block = per, block
        self.bufs = [x.new_empty(*x.shape[:-2], 0, x.shape[-1]) for x in like]
        self.start = self.n = 0

    @property
    def cap(self) -> int:
        return self.bufs[0].shape[-2] // self.per[0]

    def update(self, drop: int, new: list[torch.Tensor]) -> None:
        """Drop the first `drop` units, then append the rows of `new` (one tensor per buffer)."""
        m = new[0].shape[-2] // self.per[0]
        self.start, self.n = self._slot(drop), self.n - drop
        if capacity(self.n + m, self.block) != self.cap:
            self._reallocate(capacity(self.n + m, self.block))
        at = self._slot(self.n)
        split = min(m, self.cap - at)
        self._write(at, new, 0, split)
        self._write(0, new, split, m)
        self.n += m

    def runs(self, lo: int = 0, hi: int | None = None) -> list[tuple[int, list[torch.Tensor]]]:
        """Filled units [lo, hi) in order, as (offset from lo, one view per buffer): one run, or
        two where the ring wraps."""
        hi = self.n if hi is None else hi
        first = self._slot(lo)
        split = min(hi - lo, self.cap - first)
        pieces = ((0, first, first + split), (split, 0, hi - lo - split))
        return [
            (
                offset,
                [buf[..., a * p : b * p, :] for buf, p in zip(self.bufs, self.per, strict=True)],
            )
            for offset, a, b in pieces
            if b > a
        ]

    def filled(self, i: int) -> torch.Tensor:
        """The filled rows of buffer i in order: a view unless the ring wraps."""
        runs = self.runs()
        if len(runs) == 1:
            return runs[0][1][i]
        if not runs:
            return self.bufs[i][..., :0, :]
        return torch.cat([views[i] for _, views in runs], dim=-2)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.bufs)

    def _slot(self, unit: int) -> int:
        """Where the filled unit `unit` sits in the buffers."""
        return (self.start + unit) % self.cap if self.cap else 0

    def _write(self, at: int, new: list[torch.Tensor], lo: int, hi: int) -> None:
        """Units [lo, hi) of `new` into the buffers from unit `at` on."""
        if hi <= lo:
            return
        for buf, x, p in zip(self.bufs, new, self.per, strict=True):
            buf[..., at * p : (at + hi - lo) * p, :] = x[..., lo * p : hi * p, :]

    def _reallocate(self, units: int) -> None:
        runs = self.runs()
        bufs = [
            b.new_empty(*b.shape[:-2], units * p, b.shape[-1])
            for b, p in zip(self.bufs, self.per, strict=True)
        ]
        for at, views in runs:
            for buf, view, p in zip(bufs, views, self.per, strict=True):
                buf[..., at * p : at * p + view.shape[-2], :] = view
        self.bufs, self.start = bufs, 0


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
    clip: float = 1.0  # each tile's range kept before coding (keys: k_clip)

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

    @property
    def block_tiles(self) -> int:
        """The packed store's growth block, in token tiles: BLOCK_TOKENS rounded up to tiles."""
        return capacity(BLOCK_TOKENS, self.tile.tokens) // self.tile.tokens

    def modeled_bytes(self, total: int, batch: int, heads: int, head_dim: int) -> int:
        """Bytes held after `total` tokens: each store's whole blocks, filled or not."""
        q_start, n_q, n_tail = self.layout(total)
        per_head = capacity(n_tail, BLOCK_TOKENS) * head_dim * self.fp_bytes
        if self.quantized:
            tiles = capacity((n_q - q_start) // self.tile.tokens, self.block_tiles)
            per_head += tiles * self.tile.tokens * head_dim * self.bits // 8
            per_head += (
                tiles * (head_dim // self.tile.channels) * _F16 * (1 if self.symmetric else 2)
            )
            if self.smooth and total > 0:
                per_head += head_dim * _F16
        return batch * heads * per_head


def stream_specs(
    config: Config, layer_idx: int, head_dim: int, window: int | None, dtype: torch.dtype
) -> tuple[StreamSpec, StreamSpec]:
    bits = config.bits_for_layer(layer_idx)
    fp_bytes = torch.finfo(dtype).bits // 8

    def spec(b: int, granularity: str, smooth: bool, clip: float) -> StreamSpec:
        return StreamSpec(
            bits=b,
            tile=tile_shape(granularity, config.group_size, head_dim),
            symmetric=config.symmetric,
            residual_length=config.residual_length,
            smooth=smooth and b < 16,
            rotate=config.rotation == "hadamard" and b < 16,
            window=window,
            fp_bytes=fp_bytes if b < 16 else torch.finfo(storage_dtype_16(dtype)).bits // 8,
            clip=clip if b < 16 else 1.0,
        )

    return (
        spec(bits.k_bits, config.k_granularity, config.k_smooth, config.k_clip),
        spec(bits.v_bits, config.v_granularity, False, 1.0),
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
        self._packed: RowRing | None = None  # units: token tiles, from q_start to n_q
        self._tail: RowRing | None = None  # units: tokens, from n_q to the last kept
        self.mean: torch.Tensor | None = None  # fp16 per-channel mean, fixed at first write
        self._rot: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        """Tokens kept: the length of the stored sequence that the layout rules apply to."""
        return self.total - self.pruned

    @property
    def tail(self) -> torch.Tensor | None:
        """The full-precision tail in order (a copy only where its ring wraps)."""
        return None if self._tail is None else self._tail.filled(0)

    @property
    def packed(self) -> Quantized | None:
        """The stored quantized tiles in order (a copy only where their ring wraps)."""
        if self._packed is None:
            return None
        return _quantized([self._packed.filled(i) for i in range(len(self._packed.bufs))])

    # --- the entry points ----------------------------------------------------------------------
    def update(self, new: torch.Tensor) -> torch.Tensor:
        """Return what attention sees, [stored history | new], then store `new`."""
        if self._tail is None:
            self._start(new)
        if not self.spec.quantized and self.spec.window is None and self.tail_dtype == self.dtype:
            # DynamicCache's values, appended in place; attention reads a view of the stored tail.
            # Not DynamicCache's bytes: the tail holds whole blocks of BLOCK_TOKENS rows.
            self._tail.update(0, [new])
            self.total += new.shape[-2]
            return self._tail.filled(0)
        visible = self._visible(new)
        self.append(new)
        return visible

    def read(self, new: torch.Tensor) -> torch.Tensor:
        """What attention sees, [stored history | new], without storing `new` (see `append`)."""
        if self._tail is None:
            self._start(new)
        return self._visible(new)

    def append(self, new: torch.Tensor, written: int | None = None) -> None:
        """Store `new`: all of the `written` tokens just read, or the rows of them kept."""
        written = new.shape[-2] if written is None else written
        first = self.kept - self._tail.n  # the tail's first token, before this write
        self.total += written
        self.pruned += written - new.shape[-2]
        new = new.to(self.tail_dtype)
        if self.spec.quantized:
            self._write_quantized(new)
            return
        # A 16-bit stream keeps only what a sliding window can still see.
        drop = max(self._keep_from() - first, 0)
        skip = max(drop - self._tail.n, 0)
        self._tail.update(drop - skip, [new[..., skip:, :]])

    @property
    def rotation(self) -> torch.Tensor | None:
        """The Hadamard matrix R the stored codes were rotated by (x R), if any."""
        return self._rot

    def first_visible(self) -> int:
        """The first kept token that attention reads: where a sliding window starts, else 0."""
        return self._keep_from()

    def kernel_view(self) -> tuple[list[torch.Tensor], list[int]]:
        """The stores as the fused decode kernel reads them, in place: [codes, scale, zero, tail]
        (empty tensors where absent) and [bits, tile tokens, tile channels, first tile's slot in
        its ring, q_start, n_q, tail's first slot, tail's first token]. A 16-bit stream is all
        tail: no codes, n_q = 0."""
        none = torch.empty(0)
        held, start = [none, none, none], 0
        if self._packed is not None:
            held, start = self._packed.bufs + held[len(self._packed.bufs) :], self._packed.start
        tile = self.spec.tile
        layout = [self.spec.bits, tile.tokens, tile.channels, start, self.q_start, self.n_q]
        tail = [self._tail.start, self.kept - self._tail.n]
        return [*held, self._tail.bufs[0]], [*layout, *tail]

    def tensors(self) -> list[torch.Tensor]:
        held = [] if self._packed is None else self._packed.tensors()
        held += [] if self._tail is None else self._tail.tensors()
        return held + ([] if self.mean is None else [self.mean])

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    # --- reading --------------------------------------------------------------------------------
    def _visible(self, new: torch.Tensor) -> torch.Tensor:
        """Build [history | new] in one preallocated tensor: the history is dequantized straight
        into it, so decode pays one pass over the packed store and no concatenation of it."""
        n_q, n_tail = self.n_q - self.q_start, self._tail.n
        history = n_q + n_tail
        keep = history if self.spec.window is None else min(history, self.spec.window - 1)
        *lead, n_new, d = new.shape
        out = torch.empty(*lead, keep + n_new, d, dtype=self.dtype, device=new.device)
        if keep == history:
            self._history_into(out[..., :history, :], n_q)
        else:  # a sliding window cuts into the history: decode it all, keep the newest part
            full = torch.empty(*lead, history, d, dtype=self.dtype, device=new.device)
            self._history_into(full, n_q)
            out[..., :keep, :] = full[..., history - keep :, :]
        out[..., keep:, :] = new
        return out

    def _history_into(self, out: torch.Tensor, n_q: int) -> None:
        if n_q:
            self._decode_into(out[..., :n_q, :])
        for at, (rows,) in self._tail.runs():
            out[..., n_q + at : n_q + at + rows.shape[-2], :] = rows

    def _decode_into(self, out: torch.Tensor) -> None:
        bits, tile = self.spec.bits, self.spec.tile
        # Dequantizing is elementwise, so a wrapped ring is decoded run by run; the rotation is
        # one matmul over the whole history, as its rounding may depend on the rows it is given.
        x = out
        if self._rot is not None or self.mean is not None:
            x = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        for at, held in self._packed.runs():
            rows = slice(at * tile.tokens, at * tile.tokens + held[0].shape[-2])
            dequantize(_quantized(held), bits, tile, x.dtype, out=x[..., rows, :])
        if x is out:
            return
        if self._rot is not None:
            x = x @ self._rot.T
        if self.mean is not None:
            x = x + self.mean.float()
        out.copy_(x)

    # --- writing --------------------------------------------------------------------------------
    def _start(self, new: torch.Tensor) -> None:
        self._tail = RowRing([new.to(self.tail_dtype)], [1], BLOCK_TOKENS)
        if self.spec.smooth:
            self.mean = new.float().mean(dim=-2, keepdim=True).to(torch.float16)
        if self.spec.rotate:
            self._rot = hadamard(new.shape[-1])

    def _keep_from(self) -> int:
        """The first kept token that a sliding window can still attend to (0 without one)."""
        if self.spec.window is None:
            return 0
        return max(self.kept - (self.spec.window - 1), 0)

    def _write_quantized(self, new: torch.Tensor) -> None:
        """Tokens leave the tail oldest first, in whole tiles, once more than R wait; a sliding
        window then drops whole tiles that it can never attend to again."""
        spec, tt = self.spec, self.spec.tile.tokens
        target = max(self.kept - spec.residual_length, 0) // tt * tt
        k = target - self.n_q  # tokens leaving: the old tail's first, then the new ones
        from_tail = min(k, self._tail.n)
        tiles: list[torch.Tensor] = []
        if k > 0:
            # Encoded before the tail moves on: the new tokens may land in the rows leaving it.
            leaving = [rows for _, (rows,) in self._tail.runs(0, from_tail)]
            tiles = self._encode(torch.cat([*leaving, new[..., : k - from_tail, :]], dim=-2))
            tiles = tiles.tensors()
        self._tail.update(from_tail, [new[..., k - from_tail :, :]])
        if tiles and self._packed is None:
            per = [tt] + [1] * (len(tiles) - 1)  # codes have a row per token, the rest per tile
            self._packed = RowRing(tiles, per, spec.block_tiles)
        new_start = min(self._keep_from() // tt * tt, target)
        if self._packed is not None:
            # Tiles that the window has already passed were encoded with the rest (one batch, as
            # ever) but are not stored.
            skip = max(new_start - self.n_q, 0) // tt
            drop = (min(new_start, self.n_q) - self.q_start) // tt
            tiles = tiles or [buf[..., :0, :] for buf in self._packed.bufs]
            per = self._packed.per
            self._packed.update(
                drop, [t[..., skip * p :, :] for t, p in zip(tiles, per, strict=True)]
            )
        self.n_q, self.q_start = target, max(new_start, self.q_start)

    # --- codec ------------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> Quantized:
        x = x.float()
        if self.mean is not None:
            x = x - self.mean.float()
        if self._rot is not None:
            x = x @ self._rot
        spec = self.spec
        return quantize_rows(x, spec.bits, spec.tile, spec.symmetric, spec.clip)


def _quantized(held: list[torch.Tensor]) -> Quantized:
    """A packed ring's buffers (or views of them) as codes, scale and zero."""
    return Quantized(held[0], held[1], held[2] if len(held) > 2 else None)


class QuantizedKVLayer(KVLayer):
    """One attention layer's cache: a K stream and a V stream, pruned on arrival if `pruner`.

    With `fused`, a decode step of one sequence can be handed over to the fused kernel
    (`fusable`, then `decode_attention`) instead of returning the dequantized history.
    """

    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        k_spec: StreamSpec,
        v_spec: StreamSpec,
        window: int | None,
        storage: torch.dtype,
        pruner: TokenPruner | None = None,
        fused: bool = False,
    ):
        super().__init__()
        self.k_spec, self.v_spec, self.window = k_spec, v_spec, window
        self.fused = fused and fused_decode.covers(k_spec, v_spec)
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

    def fusable(self, key_states: torch.Tensor) -> bool:
        """Whether this update is a decode step that the fused kernel can serve: one token of one
        sequence (a padded batch would need the mask) on the CPU (the kernel's only device),
        after a prefill, not pruned on arrival."""
        batch, _, n_new, _ = key_states.shape
        return (
            self.fused
            and key_states.device.type == "cpu"
            and self.is_initialized
            and batch == 1
            and n_new == 1
            and (self.pruner is None or not self.pruner.prunes(self.k.total, 1))
        )

    def decode_attention(self, query, key_states, value_states, scaling: float) -> torch.Tensor:
        """Attention of a decode step's query over the history and the new token, read from the
        stores by the fused kernel; then the new token is stored, as `update` would have."""
        out = fused_decode.attend(self.k, self.v, query, key_states, value_states, scaling)
        self.k.append(key_states)
        self.v.append(value_states)
        return out

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

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer's K and V streams hold (their buffers, slack included)."""
        return [] if self.k is None else self.k.tensors() + self.v.tensors()


def layer_windows(model_config) -> list[int | None]:
    """The sliding window of each decoder layer (None for global attention)."""
    cfg = model_config.get_text_config()
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    window = getattr(cfg, "sliding_window", None)
    return [window if t == "sliding_attention" and window else None for t in types]


class QuantizedKVCache(KVCache):
    """The cache for one sequence batch under one `Config`."""

    @classmethod
    def for_model(
        cls,
        model,
        config: Config,
        dtype: torch.dtype,
        prompt_length: int | None = None,
        fused: bool | None = None,
    ) -> QuantizedKVCache:
        return cls(model.config, config, dtype, prompt_length=prompt_length, fused=fused)

    def __init__(
        self,
        model_config,
        config: Config,
        dtype: torch.dtype,
        prompt_length: int | None = None,
        fused: bool | None = None,
    ):
        """`dtype` is the storage dtype (what full-precision K/V are held in); `prompt_length`
        tells pruning where the prompt ends, and is needed when prune_rate > 0. `fused` says
        whether decode steps may run the fused kernel (`kvpareto.kernels.fused_decode`): None
        for this machine's default, where the model runs the "kvpareto" attention."""
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
        windows = layer_windows(model_config)
        specs = [stream_specs(config, i, self.head_dim, w, dtype) for i, w in enumerate(windows)]
        if fused is None:  # the kernel is loaded (or built) only for a cache that can use it
            fused = any(fused_decode.covers(*kv) for kv in specs)
            fused = fused and fused_decode.enabled(model_config)
        if fused and not fused_decode.installed(model_config):
            raise ValueError("fused decode needs the model to run the kvpareto attention")
        layers = []
        for window, (k_spec, v_spec) in zip(windows, specs, strict=True):
            pruner = self.pruner if window is None else None
            layers.append(QuantizedKVLayer(k_spec, v_spec, window, dtype, pruner, fused))
        super().__init__(layers=layers)
        self._peak = self._held = 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.fusable(key_states):
            # Nothing is stored yet: the attention call reads the stores, then stores the token.
            setattr(key_states, fused_decode.HANDOFF, functools.partial(self._fused, layer_idx))
            return key_states, value_states
        before = layer.nbytes()
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._count(layer, before)
        return out

    def _fused(self, layer_idx: int, query, key_states, value_states, scaling: float):
        layer = self.layers[layer_idx]
        before = layer.nbytes()
        out = layer.decode_attention(query, key_states, value_states, scaling)
        self._count(layer, before)
        return out

    def _count(self, layer: QuantizedKVLayer, before: int) -> None:
        self._held += layer.nbytes() - before
        self._peak = max(self._peak, self._held)

    @property
    def peak_nbytes(self) -> int:
        """Measured: the most bytes held after any layer update."""
        return self._peak

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

    def stored_values(self, total: int, batch: int = 1) -> int:
        """The K and V values held after `total` tokens, quantized or in the tail: each layer's
        stored tokens (after pruning and its window) x KV heads x head_dim, for K and for V."""
        tokens = 0
        for layer in self.layers:
            stored = self._stored(layer, total)
            for spec in (layer.k_spec, layer.v_spec):
                q_start, n_q, n_tail = spec.layout(stored)
                tokens += n_q - q_start + n_tail
        return batch * tokens * self.kv_heads * self.head_dim

    def mean_bits(self) -> float:
        """Nominal code bits per cached K/V value, averaged over layers (per-layer bits count):
        no scales, zeros or full-precision tail (`stored_values` gives what the bytes buy)."""
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
