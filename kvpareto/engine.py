"""The only place that calls the model: chunked prefill, then greedy decode with a stop rule.

Prefill feeds the prompt in chunks of `chunk_size` tokens (0 = one chunk) through a fresh cache
of the config's scheme (`kvpareto.kv.make_cache`, closed when the call is done), asking for the
last position's logits only (full logits would dominate the activation peak). With token
pruning, the prompt's tokens are evicted chunk by chunk as they arrive (`kvpareto.kv.pruning`),
and a scorer that needs queries gets them from hooks that live only as long as the prefill.
Decode then appends one greedy token at a time until an end-of-sequence token, a stop string,
or `max_new_tokens`; asked to, it also keeps the next-token distribution along a reference answer
(`generate`'s `follow`, for `kvpareto.fidelity`), teacher-forcing the reference on a fork of the
cache from the first step where the greedy choice departs from it. A one-chunk prefill into a
static, unpruned cache is computed once per model and prompt and replayed into later caches
(`kvpareto.prefill_reuse`): its forward pass does not depend on the KV configuration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvpareto.config import Config, LayerBits
from kvpareto.hf_compat import with_cache
from kvpareto.kv import make_cache
from kvpareto.kv.base import KVCache
from kvpareto.kv.pruning import observe_queries
from kvpareto.prefill_reuse import STORE, record_prefill, replay_prefill, reusable

# Bumped when teacher-forced scoring changes what it returns; it enters the cache keys of what
# is scored that way (perplexity, lm-eval loglikelihoods). 2: blocks of at most the residual
# window.
SCORING_VERSION = 2


class NonFiniteLogits(RuntimeError):
    """The model produced NaN or infinite logits under this configuration."""


@dataclass
class Generation:
    prompt_tokens: int
    new_tokens: list[int]
    text: str
    kv_bytes_after_prefill: int  # measured, at the end of the prompt
    prefill_s: float
    decode_s: float
    cache: KVCache  # closed (`KVCache.close`): its bytes are there to read, not to extend
    prefill_reused: bool = False  # replayed from a recorded prefill (see prefill_reuse)
    # With `logprobs`: float32 log-softmax at each answer position, [positions, vocab] (`generate`)
    answer_logprobs: torch.Tensor | None = None

    @property
    def decode_steps(self) -> int:
        return max(len(self.new_tokens) - 1, 0)


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list | tuple | set) else [eos])
    ids.discard(None)
    return ids


def on_device(ids: torch.Tensor, model) -> torch.Tensor:
    """`ids` on the device of the model's weights (`--device`); callers build them on the CPU."""
    return ids.to(next(model.parameters()).device)


def prefill(model, input_ids: torch.Tensor, cache: KVCache, chunk_size: int) -> torch.Tensor:
    """Run the prompt through the cache chunk by chunk; return the last position's logits."""
    input_ids = on_device(input_ids, model)
    step = chunk_size or input_ids.shape[1]
    with observe_queries(model, cache):
        for start in range(0, input_ids.shape[1], step):
            out = model(
                input_ids[:, start : start + step],
                **with_cache(cache),
                use_cache=True,
                logits_to_keep=1,
            )
    return out.logits[:, -1]


def prefill_or_replay(
    model, input_ids: torch.Tensor, cache, config: Config
) -> tuple[torch.Tensor, float | None]:
    """`prefill`, or a replay of this prompt's recorded prefill where the config allows it
    (`kvpareto.prefill_reuse`). Returns the last logits and, for a replay, the seconds the
    recorded forward pass took (None when the forward pass ran here)."""

    def cold() -> torch.Tensor:
        return prefill(model, input_ids, cache, config.chunk_size)

    if not reusable(config, input_ids.shape[1]):
        return cold(), None
    record = STORE.get(model, tuple(input_ids[0].tolist()))
    if record is None:
        return record_prefill(model, input_ids, cache, cold), None
    return replay_prefill(record, cache), record.forward_s


def scoring_block(config: Config, n_layers: int) -> int:
    """The most tokens one teacher-forced forward may take (0: any number), so that scored tokens
    read earlier tokens as the cache holds them, as generated tokens would.

    A block attends to itself in full precision. A lossless cache (16 bits everywhere) holds
    everything in full precision anyway. Otherwise blocks are of at most max(R, 1) tokens, R the
    residual length: with R = 0 every token is quantized on write, and scoring is token by token,
    exactly as decoding. With R > 0 the token at offset j of a block reads the j oldest tokens of
    the cache's full-precision tail at full precision where decoding would have flushed them to
    quantized tiles by then; blocks of R keep that to fewer than R tokens, all just outside the
    window that decoding reads in full precision.
    """
    if config.kv_scheme != "static":
        lossless = config.target_mean_bits == 16
    else:
        lossless = all(config.bits_for_layer(i) == LayerBits(16, 16) for i in range(n_layers))
    return 0 if lossless else max(config.residual_length, 1)


@torch.inference_mode()
def score_tokens(
    model, input_ids: torch.Tensor, config: Config, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced scoring of input_ids[0, start:] (start >= 1) under `config`.

    input_ids[:start] is the prompt: `prefill` runs it into a fresh cache, chunked (and pruned)
    as the config says, and its last logits score token `start`. The rest is then fed like
    decoding, but with the given tokens, `scoring_block` tokens at a time, each block reading
    everything before it as the cache holds it. So a scored token always reads the prompt
    quantized, even with unchunked prefill, as a generated answer would. Each block's logits are
    reduced at once.
    Returns (log-probability of each scored token, whether it was the greedy choice).
    """
    dtype = next(model.parameters()).dtype
    input_ids = on_device(input_ids, model)
    logprobs, greedy = [], []

    def take(logits: torch.Tensor, first: int) -> None:
        """Score tokens first, first+1, ... with logits [positions, vocab]."""
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogits(f"non-finite logits while scoring under {config.label()}")
        targets = input_ids[0, first : first + logits.shape[0]]
        logprobs.append(logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0])
        greedy.append(logits.argmax(-1) == targets)

    with make_cache(model, config, dtype, prompt_length=start) as cache:
        take(prefill(model, input_ids[:, :start], cache, config.chunk_size), start)
        rest = input_ids[:, start:-1]  # the last token predicts nothing that is scored
        for begin, logits in teacher_force(model, rest, cache, config):
            take(logits, start + begin + 1)
    return torch.cat(logprobs), torch.cat(greedy)


def teacher_force(
    model, tokens: torch.Tensor, cache: KVCache, config: Config
) -> Iterator[tuple[int, torch.Tensor]]:
    """Feed `tokens` ([1, n]) through `cache` as decoding would, `scoring_block` tokens per
    forward; yield each block's offset in `tokens` and its logits, [block, vocab]."""
    step = scoring_block(config, len(cache.layers)) or max(tokens.shape[1], 1)
    for begin in range(0, tokens.shape[1], step):
        out = model(tokens[:, begin : begin + step], **with_cache(cache), use_cache=True)
        yield begin, out.logits[0]


class _AlongAnswer:
    """The log-softmax at each answer position: along the generated tokens, or along `follow`.

    While the greedy choice agrees with `follow`, a decode step's logits are the teacher-forced
    ones. At the first step that departs, the rest of `follow` is fed through a fork of the cache
    in `scoring_block` blocks (one small forward, not a second prefill), and decoding goes on
    with the generated token."""

    def __init__(self, model, config: Config, follow: Sequence[int] | None):
        self.model, self.config, self.follow = model, config, follow
        self.rows: list[torch.Tensor] = []
        self.on_path = True
        self.seconds = 0.0  # spent here during decoding, which decode timing leaves out

    def step(self, logits: torch.Tensor, token: int, cache: KVCache) -> None:
        """`logits` ([1, vocab]) predict answer position len(rows); `token` is the greedy pick."""
        if not self.on_path:
            return
        start = time.perf_counter()
        self.rows.append(logits.float().log_softmax(-1))
        at = len(self.rows) - 1
        if self.follow is not None and at == len(self.follow) - 1:
            self.on_path = False
        elif self.follow is not None and token != self.follow[at]:
            self._force_rest(cache)
        self.seconds += time.perf_counter() - start

    def finish(self, cache: KVCache) -> torch.Tensor:
        """The rows, [positions, vocab]. A generation that stopped on `follow`'s path before its
        end (under another stop rule than the one that made it) is forced to the end here."""
        if self.follow is not None and self.on_path:
            self._force_rest(cache)
        return torch.cat(self.rows)

    def _force_rest(self, cache: KVCache) -> None:
        """Score the rest of `follow` on a fork of `cache`, which holds the prompt and
        follow[:at], at the last position scored."""
        at = len(self.rows) - 1
        rest = on_device(torch.tensor([list(self.follow[at:-1])]), self.model)
        with cache.fork() as fork:
            for _, logits in teacher_force(self.model, rest, fork, self.config):
                self.rows.append(logits.float().log_softmax(-1))
        self.on_path = False


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    config: Config,
    max_new_tokens: int = 16,
    stop_strings: tuple[str, ...] = (),
    logprobs: bool = False,
    follow: Sequence[int] | None = None,
) -> Generation:
    """Greedy answer to `input_ids` under `config`. With `logprobs`, the result also carries the
    next-token log-softmax at each answer position (`answer_logprobs`): along the generated
    tokens, or, given `follow` (a reference answer), along its tokens (`_AlongAnswer`)."""
    dtype = next(model.parameters()).dtype
    input_ids = on_device(input_ids, model)
    stops = stop_token_ids(model, tokenizer)
    along = _AlongAnswer(model, config, follow) if logprobs else None
    with make_cache(model, config, dtype, prompt_length=input_ids.shape[1]) as cache:
        t0 = time.perf_counter()
        logits, recorded_forward_s = prefill_or_replay(model, input_ids, cache, config)
        if not torch.isfinite(logits).all():
            raise NonFiniteLogits(f"non-finite logits after prefill under {config.label()}")
        kv_bytes = cache.nbytes()
        t1 = time.perf_counter()
        # A replay's own time is only its cache writes: add the forward pass it stands for.
        prefill_s = (t1 - t0) + (recorded_forward_s or 0.0)

        new: list[int] = []
        token = logits.argmax(dim=-1)
        while True:
            if along:
                along.step(logits, int(token), cache)
            new.append(int(token))
            if int(token) in stops or len(new) >= max_new_tokens:
                break
            if stop_strings and any(s in tokenizer.decode(new) for s in stop_strings):
                break
            out = model(token[:, None], **with_cache(cache), use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            token = logits.argmax(dim=-1)
        t2 = time.perf_counter() - (along.seconds if along else 0.0)
        rows = along.finish(cache) if along else None

    text = tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)
    reused = recorded_forward_s is not None
    return Generation(
        input_ids.shape[1], new, text, kv_bytes, prefill_s, t2 - t1, cache, reused, rows
    )
