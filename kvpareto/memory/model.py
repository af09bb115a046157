"""The modeled (analytic) activation peak of a chunked prefill and one decode step, for the
decoder-only families here; what `memory.measure_prefill` reads from the allocator.

For every prefill chunk of c tokens (p prompt tokens before it; each attention pattern, global
or one sliding window, sees t tokens: those its layers store plus the chunk, a sliding layer at
most its window), with e bytes per compute element, the peak is the largest of these moments,
each derived in its helper. Every pattern has its own RoPE table (cos/sin) and, where it needs
one, its own bool c x t mask, both held through the whole layer stack: a mask is needed past
the first chunk, and on it only where the chunk reaches a sliding window (else SDPA's
is_causal does it).
- RoPE on the chunk: the residual stream (3 h c), q with its two rotated halves and their
  product, k, the tables and the masks;
- q/k normalization, where the model has it (Gemma3): q, k and v as projected, q in fp32 and
  its square;
- the attention call of the widest layer kind (`_attention_kinds`, `_attention_call`): the
  residual stream, q and the output, the chunk's k/v, the tables and masks; the [history |
  chunk] K and V the cache hands back (a fresh copy of each stream that is quantized, cast,
  windowed or pruned; else read in place, which is KV memory); with its pattern's mask, SDPA's
  float copy of it and k/v repeated to every query head (no native grouped-query attention under
  a mask; a view, not a copy, with one KV head); and the CPU flash kernel's per-thread score
  blocks and, where it packs them (bf16 on AMX CPUs), its packed K/V (`_sdpa_scratch`);
- the MLP: three c x I intermediates, four copies of the residual stream, the tables and masks;
- a quantized cache write: the tokens leaving the tail, gathered, then three fp32 copies;
- SnapKV scoring: fp32 logits and softmax of the last 32 queries over t keys;
- packed weights: the widest packed linear on its chunk (its dequantized weight and unpacked
  codes on the dequantize path, its bf16 activations on a kernel path, as measured on this
  machine by `packed_linear.call_path`);
- weights stored in another dtype than the compute dtype: the largest per-call weight cast (the
  LM head's one-row call casts nothing where it takes the compiled decode linear, as measured on
  this machine by `decode_linear.kernel_faster`);
- a packed LM head on the last position (`_head_moment`): its logits and, where it
  dequantizes, one block of rows (the packed lookup's rows stay below the stream's bytes);
- and, once, the decode step after the prompt: each layer rebuilds its whole history in the
  compute dtype (through fp32 when smoothing or rotation must be undone).
Unchunked prefill of a global model has no mask and no repeat, which is why chunking wins twice
at long context.
No term is fitted. tests/test_memory.py checks measured against modeled over a grid of cache
configs, chunk sizes, pruning and the four tiny architectures with one tolerance, on a tiny
Gemma3 of Gemma3-270M's attention shape (one KV head of 256), and on SmolLM2.
"""

from __future__ import annotations

import torch

from kvpareto.config import Config
from kvpareto.kernels import decode_linear
from kvpareto.kv.static import layer_windows
from kvpareto.memory.sdpa_packing import packs_call
from kvpareto.memory.sdpa_packing import sdpa_packs as machine_sdpa_packs
from kvpareto.models.storage_dtype import cast_elements


def modeled_activation_peak(
    model_config,
    config: Config,
    prompt_len: int,
    dtype: torch.dtype,
    storage: torch.dtype | None = None,
    threads: int | None = None,
    sdpa_packs: bool | None = None,
) -> int:
    """The modeled peak in bytes, computing in `dtype` with weights and full-precision K/V held
    in `storage` (default: `dtype`), SDPA running on `threads` threads (default: torch's) and
    packing K/V where its calls are large enough if `sdpa_packs` (default: whether it does on
    this machine, `sdpa_packing.sdpa_packs`)."""
    cfg = model_config.get_text_config()
    casts = storage is not None and storage != dtype
    if sdpa_packs is None:
        sdpa_packs = machine_sdpa_packs(dtype)
    shape = _Shape(cfg, dtype, threads or torch.get_num_threads(), sdpa_packs)
    per_layer = layer_windows(model_config)
    windows = set(per_layer)
    quantized = [spec for i in range(cfg.num_hidden_layers) for spec in _specs(config, shape, i)]
    kinds = _attention_kinds(config, shape, per_layer, casts)
    step = config.chunk_size or prompt_len
    stored = _stored_before(config, prompt_len)
    peak = _decode_moment(shape, stored[-1], windows, quantized)
    for i, p in enumerate(range(0, prompt_len, step)):
        c = min(step, prompt_len - p)
        # A global layer sees the tokens it stores and the chunk; a sliding layer at most its
        # window.
        seen = {w: stored[i] + c if w is None else min(p, w - 1) + c for w in windows}
        peak = max(
            peak,
            _chunk_moments(shape, config, c, p, seen, kinds, quantized),
            _weight_moment(cfg, config, c, dtype),
        )
        if casts:
            peak = max(peak, _cast_moment(cfg, config, c, dtype, storage))
    last = prompt_len - (prompt_len - 1) // step * step  # the chunk whose end the head reads
    return max(peak, _head_moment(cfg, config, last, dtype))


# Model types whose attention RMS-normalizes q and k per head, in fp32 (Gemma3's q_norm/k_norm).
_QK_NORM = ("gemma3",)


class _Shape:
    """The sizes the terms are written in: h hidden, inter MLP, H query heads, kv KV heads, d
    head_dim, e bytes per element of the compute dtype; whether q and k are normalized
    (`_QK_NORM`)."""

    def __init__(self, cfg, dtype: torch.dtype, threads: int, sdpa_packs: bool):
        self.qk_norm = cfg.model_type.startswith(_QK_NORM)
        self.h, self.inter = cfg.hidden_size, cfg.intermediate_size
        self.heads = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.d = getattr(cfg, "head_dim", None) or self.h // self.heads
        self.dtype, self.e, self.threads = dtype, torch.finfo(dtype).bits // 8, threads
        self.sdpa_packs = sdpa_packs


def _stored_before(config: Config, prompt_len: int) -> list[int]:
    """Prompt tokens a global layer stores before each chunk, and after the last one."""
    from kvpareto.kv.pruning import TokenPruner

    step = config.chunk_size or prompt_len
    if config.prune_rate == 0:
        return list(range(0, prompt_len, step)) + [prompt_len]
    schedule = TokenPruner(config.prune_rate, None, prompt_len).schedule(config.chunk_size)
    return [0] + [kept for _, kept in schedule]


def _specs(config: Config, shape: _Shape, layer: int):
    from kvpareto.kv.static import stream_specs

    return [s for s in stream_specs(config, layer, shape.d, None, torch.float32) if s.quantized]


def _attention_kinds(config: Config, shape: _Shape, windows, casts: bool) -> set:
    """The distinct (window, copies) of the layers: copies is how many of a layer's K and V
    the cache hands back as a fresh [history | chunk] tensor, in the compute dtype. A 16-bit
    stream of the compute dtype without a window is read in place instead (`KVStream.update`),
    which is KV memory, unless a pruner reads the chunk first (`QuantizedKVLayer.update`)."""
    from kvpareto.kv.static import stream_specs

    fresh = casts or config.prune_rate > 0
    return {
        (w, sum(s.quantized or fresh or w is not None for s in specs))
        for i, w in enumerate(windows)
        for specs in [stream_specs(config, i, shape.d, w, torch.float32)]
    }


def _sdpa_scratch(shape: _Shape, c: int, t: int, masked: bool) -> int:
    """The CPU flash-attention kernel's buffers: per thread, a q block of qs rows by a kv block
    of ks columns of fp32 scores plus fp32 row state (d + 2 columns), and a reduced-precision
    copy of the scores when computing in 16 bits; the fp32 log-sum-exp of every query row.
    Where the call packs K and V (`sdpa_packing`: bf16 on AMX CPUs), their packed copies (each
    kv block's rows padded to even; under a mask K and V come repeated to every query head) and
    a per-thread transpose block of ks x d."""
    qs = min(256 if c >= 768 else 64 if c >= 192 else 32, c)
    ks = min(512, t)
    per_thread = qs * (ks + shape.d + 2) * 4 + (qs * ks * shape.e if shape.e < 4 else 0)
    scratch = shape.threads * per_thread + c * shape.heads * 4
    kv_heads = shape.heads if masked else shape.kv
    if packs_call(
        shape.sdpa_packs,
        shape.dtype,
        shape.heads,
        kv_heads,
        shape.d,
        c,
        t,
        qs,
        shape.threads,
        causal=not masked,
    ):
        even = lambda n: n + n % 2  # noqa: E731
        d = even(shape.d)
        padded = (t - 1) // ks * even(ks) + even((t - 1) % ks + 1)
        scratch += (kv_heads * (d * t + padded * shape.d) + shape.threads * ks * shape.d) * shape.e
        if shape.d % 2:  # queries padded to an even width, per thread
            scratch += shape.threads * qs * d * shape.e
    return scratch


def _chunk_moments(
    shape: _Shape, config: Config, c: int, p: int, seen: dict, kinds: set, quantized
) -> int:
    """The largest of the moments of one prefill chunk (see the module docstring): `seen` maps
    each attention pattern (window) to the tokens its layers attend to, `kinds` as in
    `_attention_kinds`."""
    h, inter, heads, kv, d, e = shape.h, shape.inter, shape.heads, shape.kv, shape.d, shape.e
    t = max(seen.values())
    # Each pattern has its own RoPE table (cos/sin) and, where it needs one, its own bool mask,
    # all held through the whole layer stack. The first chunk needs none but where it reaches a
    # window (transformers' `_ignore_causal_mask_sdpa`: SDPA's is_causal does the rest).
    masked = {w: p > 0 or (w is not None and c >= w) for w in seen}
    bool_masks = sum(c * n for w, n in seen.items() if masked[w])
    stream = 3 * h * c * e
    tables = 2 * len(seen) * c * d * e
    rope = stream + c * (4 * heads * d + 2 * kv * d) * e + tables
    # The [history | chunk] K/V a layer gets back, where the cache copies it (`_attention_kinds`).
    returned = max(n * seen[w] * kv * d * e for w, n in kinds)
    at_attention = stream + c * (2 * heads * d + 2 * kv * d) * e + tables + bool_masks
    at_attention += max(_attention_call(shape, c, seen[w], n, masked[w]) for w, n in kinds)
    mlp = c * (3 * inter + 4 * h) * e + tables + bool_masks
    moments = [rope, at_attention, mlp, _scorer_moment(shape, config, c, t, stream)]
    if shape.qk_norm:
        # q, k and v as projected, then q in fp32 and its square (Gemma3RMSNorm.forward).
        fp32 = c * heads * d * 4
        moments.append(
            stream + c * (heads * d + 2 * kv * d) * e + tables + bool_masks + fp32 * (1 + (e < 4))
        )
    if quantized:
        moments.append(
            stream
            + c * (heads * d + 2 * kv * d) * e
            + tables
            + returned
            + _encode(shape, config, c, p)
        )
    return max(moments)


def _attention_call(shape: _Shape, c: int, t: int, copies: int, masked: bool) -> int:
    """Bytes a layer of one kind adds inside its attention call over t tokens: the K/V the cache
    handed back (`copies` of them fresh), the kernel's scratch, and with a mask, SDPA's float
    copy of it (the compute dtype, made inside the call) and k/v repeated to every query head
    (no native grouped-query attention under a mask; `_repeated`)."""
    moment = copies * t * shape.kv * shape.d * shape.e + _sdpa_scratch(shape, c, t, masked)
    if masked:
        moment += c * t * shape.e + _repeated(shape, t)
    return moment


def _repeated(shape: _Shape, t: int) -> int:
    """Bytes of k and v repeated from kv to every query head over t tokens (transformers'
    `repeat_kv`: an expand, then a reshape). With one KV head the reshape only merges a size-1
    dimension into the expanded one, so it is a view and nothing is copied (Gemma3-270M)."""
    if shape.kv == 1 or shape.heads == shape.kv:
        return 0
    return 2 * t * shape.heads * shape.d * shape.e


def _encode(shape: _Shape, config: Config, c: int, p: int) -> int:
    """Bytes live while a stream quantizes the tokens leaving its tail during one chunk: those
    tokens gathered in the compute dtype, then fp32 copies: the input, x - lo and the scaled
    codes before rounding (smoothing and rotation each replace the fp32 input, adding none)."""
    leaving = max(p + c - config.residual_length, 0) - max(p - config.residual_length, 0)
    return leaving * shape.kv * shape.d * (shape.e + 3 * 4)


def _scorer_moment(shape: _Shape, config: Config, c: int, t: int, stream: int) -> int:
    """SnapKV's attention of the last w queries over the t keys, in fp32: logits, their softmax
    and the keys cast to fp32 (other scorers hold [kv, c] tensors, far below the other moments)."""
    if config.prune_rate == 0 or config.prune_scorer != "snapkv":
        return 0
    w = min(32, c)
    return stream + 2 * shape.heads * w * t * 4 + t * shape.kv * shape.d * 4


def _decode_moment(shape: _Shape, n: int, windows, quantized) -> int:
    """One decode step after n stored prompt tokens: each layer rebuilds [history | token]
    (t = n + 1 rows, a sliding layer its window) in the compute dtype, dequantizing through fp32
    when smoothing or rotation must be undone (the fp32 rows and their rotated copy)."""
    t = max(n + 1 if w is None else min(n, w - 1) + 1 for w in windows)
    kv, d = shape.kv, shape.d
    moment = 2 * t * kv * d * shape.e if quantized else 0
    if any(s.rotate or s.smooth for s in quantized):
        moment += 2 * t * kv * d * 4
    return moment


def _cast_moment(cfg, config: Config, c: int, dtype: torch.dtype, storage: torch.dtype) -> int:
    """Bytes live while the largest weight cast copy exists (see the module docstring)."""
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    e = torch.finfo(dtype).bits // 8
    head_block = cast_elements(vocab, h)
    if storage == torch.bfloat16 and decode_linear.kernel_faster(dtype):
        head = (c * h + vocab) * e  # the head's one row reads the bf16 table in place
    else:
        head = (head_block + c * h + vocab + head_block // h) * e
    if config.embed_weights != "none":  # a packed head never casts its table (`_head_moment`)
        head = 0
    if config.weights != "none":  # packed decoder linears never cast their weights
        return head
    heads = cfg.num_attention_heads
    q = heads * (getattr(cfg, "head_dim", None) or h // heads)
    widest = max(cast_elements(o, i) for o, i in ((inter, h), (h, inter), (q, h), (h, q)))
    return max(head, widest * e + c * (2 * inter + 3 * h) * e)


def _head_moment(cfg, config: Config, c: int, dtype: torch.dtype) -> int:
    """Bytes live while a packed LM head (`weights.embedding`) turns the last position of a
    chunk of c tokens into logits: the chunk's hidden states and their norm, the logits, and
    on a kernel path the bf16 row and logits; on the dequantize path one block of dequantized
    rows and their codes (one byte each for int8; int4 rows pass through three byte planes:
    the gathered bytes, the shifted ones and the masked nibbles)."""
    from kvpareto.weights.embedding import BITS, head_block_rows, table_group
    from kvpareto.weights.packed_linear import call_path

    if config.embed_weights == "none":
        return 0
    h, vocab, e = cfg.hidden_size, cfg.vocab_size, torch.finfo(dtype).bits // 8
    bits = BITS[config.embed_weights]
    path = call_path(bits, (vocab, h), table_group(config.embed_weights, h), dtype, 1)
    held = 2 * c * h * e + vocab * e
    if path == "packed-bf16":
        return held + (h + vocab) * 2
    if path == "packed":
        return held
    codes = 1 if bits == 8 else 3
    return held + head_block_rows(vocab, h) * h * (e + codes)


def _widest_linear(cfg, config: Config) -> tuple[int, int, int, int]:
    """(bits, output width h, input width, group) of the widest packed linear (down_proj)."""
    from kvpareto.weights.packed_linear import weight_group

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or h // heads
    width = max(cfg.intermediate_size, heads * d)  # the widest linear's input; its output is h
    bits = 8 if config.weights == "int8" else 4
    group = weight_group(config.weight_group_size, width) if bits == 4 else width
    return bits, h, width, group


def widest_linear_path(cfg, config: Config, c: int, dtype: torch.dtype) -> str:
    """The call path (`packed_linear.call_path`) the widest packed linear takes on a chunk of c
    tokens on this machine: what decides its temporaries."""
    from kvpareto.weights.packed_linear import call_path

    bits, h, width, group = _widest_linear(cfg, config)
    return call_path(bits, (h, width), group, dtype, c)


def _weight_moment(cfg, config: Config, c: int, dtype: torch.dtype) -> int:
    """Bytes live while the widest packed linear (down_proj) runs on a chunk of c tokens."""
    from kvpareto.weights import int4pack

    if config.weights == "none":
        return 0
    bits, h, width, group = _widest_linear(cfg, config)
    e = torch.finfo(dtype).bits // 8
    chunk = c * (cfg.intermediate_size + 3 * h) * e
    path = widest_linear_path(cfg, config, c, dtype)
    if path == "packed-bf16":
        return chunk + c * (width + h) * 2
    if path == "packed":
        return chunk
    # The dequantized weight, plus the codes unpacked beside it: none for int8; for int4, one
    # byte a weight from torch's int4pack layout, 1.5 from the tile codec's (the tail of its
    # shifted fields; measured on SmolLM2's down_proj: 3.15 MB in bf16).
    codes = 0 if bits == 8 else 1.0 if int4pack.supports(h, width, group) else 1.5
    return int(h * width * (e + codes)) + chunk
