"""KV token pruning: score the importance of each prompt token per KV head, store only the best.

Policy, per prefill chunk. The prompt of T tokens arrives in chunks [a, b) (one chunk when
chunk_size is 0). In each global-attention layer, once attention has read the chunk, the layer
keeps `keep` of the chunk's b - a tokens per KV head and stores only those:

    keep = min(b - a, max(P, ceil((1 - r) * b) - S))

S is the number of prompt tokens the layer already stores, P the number of the chunk's protected
tokens: the attention sinks (positions 0 .. sinks-1) and the question (the last `window` positions
of the prompt, T - window .. T - 1), which are always kept; the scorer ranks the rest. So after
every chunk a layer stores at most ceil((1 - r) * b) prompt tokens per KV head, unless protected
tokens force more, in which case later chunks keep fewer to catch up. Every head keeps the same
count, so tensors stay rectangular, and the count depends on positions only, so every pruned layer
stores the same number of tokens and one attention mask fits them all.

Why evict on arrival: evicted tokens never enter the store, so the cache never holds more than
the kept tokens, not even at the end of prefill (the chunk's own full-precision K/V is activation
memory, the same as without pruning), and nothing quantized is ever touched again, so tiles whose
scale spans g tokens stay valid under every granularity. The price: a token is judged once, when
its chunk arrives, against the queries at that chunk's end; with chunk_size 0 the whole prompt is
judged at once against the question, as in SnapKV. Decode tokens are never pruned, nor are
sliding-window layers (Gemma3's local layers), which already hold at most their window.

Scorers follow kvpress's shape: a small dataclass with one `score` method, found by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvpareto.errors import UserError
from kvpareto.kv.probes import CacheHooks, QueryProbe, attention_modules
from kvpareto.registry import Registry


@dataclass
class ChunkView:
    """What a scorer sees of one layer during one prefill chunk."""

    keys: torch.Tensor  # [B, kv_heads, N, D] post-RoPE keys attention read: history, then chunk
    n_new: int  # the chunk is the last n_new rows of `keys`; these are the tokens to score
    start: int  # absolute position of the chunk's first token
    queries: torch.Tensor | None = None  # [B, heads, w, D] post-RoPE queries of the last w tokens
    scaling: float = 1.0  # the attention's softmax scale

    @property
    def new_keys(self) -> torch.Tensor:
        return self.keys[..., -self.n_new :, :]


class Scorer:
    """Importance of each chunk token per KV head, [B, kv_heads, n_new]: higher means keep."""

    needs_queries: ClassVar[bool] = False

    def score(self, chunk: ChunkView) -> torch.Tensor:
        raise NotImplementedError


SCORERS: Registry[type[Scorer]] = Registry("prune scorer")


def make_scorer(name: str) -> Scorer:
    return SCORERS.get(name)()


@SCORERS.register("knorm")
@dataclass
class KeyNorm(Scorer):
    """Keys with a low L2 norm draw the most attention, so they are kept (Devoto et al., "A Simple
    and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430)."""

    def score(self, chunk: ChunkView) -> torch.Tensor:
        return -chunk.new_keys.float().norm(dim=-1)


@SCORERS.register("streaming")
@dataclass
class Streaming(Scorer):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453): keep the sinks and the most recent tokens. The policy always keeps the
    sinks, so the score is just the position."""

    def score(self, chunk: ChunkView) -> torch.Tensor:
        b, h = chunk.keys.shape[:2]
        positions = torch.arange(chunk.start, chunk.start + chunk.n_new, device=chunk.keys.device)
        return positions.float().expand(b, h, -1)


@SCORERS.register("random")
@dataclass
class Random(Scorer):
    """Uniform random importance: the control that a real scorer must beat. One seeded generator
    per cache, so layers and chunks draw afresh while every run draws the same."""

    seed: int = 0
    _generator: torch.Generator | None = field(default=None, repr=False)

    def score(self, chunk: ChunkView) -> torch.Tensor:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        b, h = chunk.keys.shape[:2]
        return torch.rand(b, h, chunk.n_new, generator=self._generator).to(chunk.keys.device)


@SCORERS.register("snapkv")
@dataclass
class SnapKV(Scorer):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You Are Looking for Before Generation",
    arXiv 2404.14469): the attention that the last w queries (the observation window) pay each
    token, summed over the window and over the query heads sharing the KV head, then max-pooled
    over neighbouring tokens, so that a fact spread over several tokens is kept whole."""

    kernel_size: int = 7
    needs_queries: ClassVar[bool] = True

    def score(self, chunk: ChunkView) -> torch.Tensor:
        if chunk.queries is None:
            raise ValueError("SnapKV needs the observation-window queries (see observe_queries)")
        k, q = chunk.keys.float(), chunk.queries.float()
        b, heads, w, d = q.shape
        kv_heads, n = k.shape[1], k.shape[2]
        # Query head j reads KV head j // (heads / kv_heads), as in transformers' repeat_kv.
        q = q.view(b, kv_heads, heads // kv_heads, w, d)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", q, k) * chunk.scaling
        # Window query i is row n - w + i of the keys: causal, it sees rows up to its own.
        rows = torch.arange(n, device=k.device)
        logits.masked_fill_(rows[None, :] > rows[n - w :, None], float("-inf"))
        votes = logits.softmax(dim=-1).sum(dim=(2, 3))[..., n - chunk.n_new :]
        return F.max_pool1d(votes, self.kernel_size, stride=1, padding=self.kernel_size // 2)


@dataclass
class TokenPruner:
    """The per-chunk eviction policy of one cache (see the module docstring)."""

    rate: float
    scorer: Scorer
    prompt_length: int
    sinks: int = 4
    window: int = 32

    def prunes(self, start: int, n_new: int) -> bool:
        """Only prompt tokens are ever evicted."""
        return start + n_new <= self.prompt_length

    def budget(self, seen: int) -> int:
        # The rate as written (0.7, not 0.69999...), so the budget of 10 tokens is exactly 3.
        return math.ceil((1 - Fraction(repr(self.rate))) * seen)

    def protected(self, start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        return (positions < self.sinks) | (positions >= self.prompt_length - self.window)

    def keep_count(self, stored: int, start: int, end: int) -> int:
        forced = int(self.protected(start, end).sum())
        return min(end - start, max(forced, self.budget(end) - stored))

    def schedule(self, chunk_size: int) -> list[tuple[int, int]]:
        """(prompt tokens seen, tokens a pruned layer stores) after each prefill chunk."""
        step = chunk_size or self.prompt_length
        out, stored = [], 0
        for start in range(0, self.prompt_length, step):
            end = min(start + step, self.prompt_length)
            stored += self.keep_count(stored, start, end)
            out.append((end, stored))
        return out

    def select(self, chunk: ChunkView, stored: int) -> torch.Tensor | None:
        """Rows of the chunk to store, [B, kv_heads, keep] in order, or None to store them all."""
        keep = self.keep_count(stored, chunk.start, chunk.start + chunk.n_new)
        if keep == chunk.n_new:
            return None
        scores = self.scorer.score(chunk).float()
        protected = self.protected(chunk.start, chunk.start + chunk.n_new).to(scores.device)
        scores = scores.masked_fill(protected, float("inf"))
        return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


@contextmanager
def observe_queries(model, cache) -> Iterator[None]:
    """While prefill runs, hand each pruned layer the queries of its chunk's last `window` tokens.

    The cache sees only keys and values, so a scorer that needs queries gets them from a query
    probe of each attention call (`kvpareto.kv.probes`), computed only for a chunk being pruned,
    so decode pays nothing; the hooks are removed when the block ends.
    """
    pruner = getattr(cache, "pruner", None)
    if pruner is None or not pruner.scorer.needs_queries:
        yield
        return
    if not attention_modules(model):
        raise UserError(
            f"prune_scorer {type(pruner.scorer).__name__} needs attention modules with a q_proj, "
            "which this model lacks; use --prune-scorer knorm, streaming or random"
        )
    with CacheHooks(model, cache, _hand_queries):
        yield


def _hand_queries(cache, probe: QueryProbe) -> None:
    """Give a layer that prunes this chunk its observation window's queries, for `update`."""
    layer, pruner = cache.layers[probe.layer_idx], cache.pruner
    n_new = probe.hidden.shape[1]
    if layer.pruner is None or not pruner.prunes(layer.get_seq_length(), n_new):
        return
    layer.window_queries = (probe.queries(min(pruner.window, n_new)), probe.scaling)
