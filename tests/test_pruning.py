"""KV token pruning: exact when it evicts nothing, honest bytes, true positions and masks, scorers
with known answers, and SnapKV beating random eviction on needle retrieval."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from kvpareto.config import Config
from kvpareto.engine import generate, prefill
from kvpareto.errors import UserError
from kvpareto.hf_compat import with_cache
from kvpareto.kv.pruning import (
    ChunkView,
    KeyNorm,
    Random,
    SnapKV,
    Streaming,
    TokenPruner,
    observe_queries,
)
from kvpareto.kv.static import BLOCK_TOKENS, QuantizedKVCache
from kvpareto.memory.measure import measure_prefill
from kvpareto.models.tiny import build_tiny
from kvpareto.tasks import get_task
from tests.conftest import TINY
from tests.contracts import PRUNE_GRID


def _ids(n, seed=0):
    return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(seed))


def _cache(model, cfg, prompt_length, fused=None):
    """`fused=False` keeps decode steps on SDPA: a comparison with DynamicCache, bit for bit,
    needs the same arithmetic (test_fused_decode.py holds the kernel to that path)."""
    return QuantizedKVCache(
        model.config, cfg, torch.bfloat16, prompt_length=prompt_length, fused=fused
    )


def _run(model, ids, cfg, decode_steps=3, fused=None):
    """Logits of the prompt's last position, then of each decode step; and the cache."""
    cache = _cache(model, cfg, ids.shape[1], fused)
    logits = [prefill(model, ids, cache, cfg.chunk_size)]
    for step in range(decode_steps):
        logits.append(model(_ids(1, seed=step), **with_cache(cache)).logits[:, -1])
    return torch.cat(logits), cache


# --- rate 0 and a rate that evicts nothing are exact -------------------------------------------

_EXACT = [
    Config(),
    Config(chunk_size=24),
    Config(k_bits=4, v_bits=2, chunk_size=24),
    Config(k_bits=2, v_bits=4, k_granularity="per-channel", residual_length=32, chunk_size=40),
    Config(k_bits=8, v_bits=8, k_smooth=True, rotation="hadamard", chunk_size=16),
]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("cfg", _EXACT, ids=lambda c: c.label())
def test_rate_zero_and_a_rate_that_evicts_nothing_give_bit_identical_logits(tiny_models, name, cfg):
    # r = 0.001 keeps ceil(0.999 n) = n of any n <= 100 tokens, so nothing is evicted, but the
    # pruning path runs: query hooks, read-then-append, mask sizes from the kept count.
    model = tiny_models[name].model
    ids = _ids(100)
    plain, plain_cache = _run(model, ids, cfg)
    assert plain_cache.pruner is None
    for scorer in ("snapkv", "knorm"):
        same, cache = _run(model, ids, replace(cfg, prune_rate=0.001, prune_scorer=scorer))
        assert cache.pruner is not None
        assert torch.equal(plain, same)
    if cfg == Config():
        plain, _ = _run(model, ids, cfg, fused=False)
        ref = DynamicCache(config=model.config)
        ref_logits = [model(ids, **with_cache(ref)).logits[:, -1]]
        for step in range(3):
            ref_logits.append(model(_ids(1, seed=step), **with_cache(ref)).logits[:, -1])
        assert torch.equal(plain, torch.cat(ref_logits))


# --- bytes: half the prompt --------------------------------------------------------------------


def _stream_token_bytes(stream) -> float:
    """One token's worth of one stream per KV head: its values, plus its share of tile scales."""
    spec, d = stream.spec, stream.tail.shape[-1]
    if not spec.quantized:
        return d * spec.fp_bytes
    per_tile = 2 * (1 if spec.symmetric else 2)
    return d * spec.bits / 8 + per_tile * d / spec.tile.channels / spec.tile.tokens


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("cfg", PRUNE_GRID, ids=lambda c: c.label())
def test_half_rate_holds_half_the_prompt(tiny_models, name, cfg):
    # That the bytes held equal the modeled bytes, peak included, is the contract that
    # tests/contracts.py checks for these configs; here, what pruning keeps.
    model = tiny_models[name].model
    length = 300
    ids = _ids(length)
    for chunk in (0, 50):
        pruned_cfg = replace(cfg, prune_rate=0.5, prune_scorer="knorm", chunk_size=chunk)
        _, pruned = _run(model, ids, pruned_cfg, decode_steps=0)
        _, full = _run(model, ids, replace(cfg, chunk_size=chunk), decode_steps=0)
        # Protected question tokens in the last chunk may push the kept count past T/2.
        kept = pruned.pruner.schedule(chunk)[-1][1]
        assert kept == (150 if chunk == 0 else 157)  # 250 -> 125, then all 32 of the question
        for layer, whole in zip(pruned.layers, full.layers, strict=True):
            if layer.pruner is None:  # a sliding-window layer: never pruned
                assert layer.nbytes() == whole.nbytes()
                continue
            for stream in (layer.k, layer.v):
                stored = stream.tail.shape[-2] + stream.n_q - stream.q_start
                assert stored == kept and stream.total == length
            if chunk == 0:
                # Half the tokens, half the bytes, to one token per head and stream, plus the
                # slack: a residual window or an unfilled tile, which stays in full precision,
                # and the unfilled rows of each store's last block (BLOCK_TOKENS tokens for the
                # tail, whole tiles for the packed store), which either cache may hold.
                for ours, theirs in ((layer.k, whole.k), (layer.v, whole.v)):
                    heads = ours.tail.shape[1]
                    tt = ours.spec.tile.tokens
                    slack = ours.spec.residual_length + tt
                    slack += BLOCK_TOKENS + ours.spec.block_tiles * tt
                    if ours.spec.smooth:
                        slack += 1  # the per-channel mean is held once, not per token
                    gap = abs(ours.nbytes() - theirs.nbytes() / 2)
                    assert gap <= heads * slack * (_stream_token_bytes(theirs) + 64 * 2), gap
                    if tt == 1 and not ours.spec.residual_length:
                        # One store (the tail at 16 bits, else the packed tiles, the tail being
                        # empty), growing by BLOCK_TOKENS whole tokens.
                        per_token = _stream_token_bytes(theirs)
                        assert gap <= heads * (1 + BLOCK_TOKENS) * per_token + 64, gap
        # The peak shrinks with the kept tokens wherever no full-precision tail (a residual
        # window, an unfilled token tile) or unpruned sliding layer dominates at this length.
        # Each store holds room for whole blocks of BLOCK_TOKENS: at most BLOCK_TOKENS - 1 rows
        # more than the kept tokens, and never fewer than the full cache's tokens.
        per_token = cfg.k_granularity == cfg.v_granularity == "per-token"
        if per_token and not cfg.residual_length and name == "tiny-llama":
            bound = (kept + 1 + BLOCK_TOKENS) / length
            assert pruned.peak_nbytes <= bound * full.peak_nbytes
        # Decode tokens are stored, never pruned, and the model follows them token by token.
        for step in range(3):
            model(_ids(1, seed=step), **with_cache(pruned))
        assert all(layer.k.kept == kept + 3 for layer in pruned.layers if layer.pruner)


def test_without_pruning_the_peak_is_the_final_bytes_when_tiles_divide_the_chunk(tiny_models):
    model = tiny_models["tiny-llama"].model
    for cfg in (Config(k_bits=4, v_bits=2, chunk_size=64), Config(chunk_size=0)):
        peak_kv = measure_prefill(model, _ids(256), cfg)[1]
        cache = _cache(model, cfg, 256)
        assert peak_kv == cache.modeled_peak_nbytes() == cache.modeled_nbytes(256)


def test_peak_catches_a_full_precision_tail_flushed_before_the_end(tiny_models):
    # Per-channel tiles of 32 tokens with chunks of 31: after 62 tokens, 30 wait in full
    # precision; at 64 they are all quantized, so the end holds less than the moment before.
    model = tiny_models["tiny-llama"].model
    cfg = Config(k_bits=2, v_bits=2, k_granularity="per-channel", chunk_size=31)
    _, cache = _run(model, _ids(64), cfg, decode_steps=0)
    assert cache.peak_nbytes == cache.modeled_peak_nbytes() > cache.nbytes()


# --- positions and masks --------------------------------------------------------------------------


def test_positions_count_every_token_while_masks_count_the_stored(tiny_models):
    model = tiny_models["tiny-llama"].model
    cfg = Config(k_bits=4, v_bits=4, prune_rate=0.5, prune_scorer="random", chunk_size=64)
    cache = _cache(model, cfg, 256)
    prefill(model, _ids(256), cache, cfg.chunk_size)
    assert cache.get_seq_length() == 256
    assert cache.get_mask_sizes(1, 0) == (128 + 1, 256 - 128)
    model(_ids(1), **with_cache(cache))
    assert cache.get_seq_length() == 257
    assert cache.get_mask_sizes(5, 0) == (129 + 5, 257 - 129)


def _as_dynamic(model, cache) -> DynamicCache:
    """A DynamicCache holding exactly the rows our 16-bit cache stores (all in its tail)."""
    ref = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        ref.update(layer.k.tail.clone(), layer.v.tail.clone(), idx)
    return ref


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_after_pruning_a_chunk_sees_all_history_and_itself_causally_at_true_positions(
    tiny_models, name
):
    # The reference holds the same kept rows in a plain DynamicCache and is told the true
    # positions explicitly; the next chunk and a decode step must give the very same logits.
    model = tiny_models[name].model
    ids = _ids(256, seed=3)
    cfg = Config(prune_rate=0.5, prune_scorer="snapkv", chunk_size=64)
    cache = _cache(model, cfg, 256, fused=False)
    prefill(model, ids[:, :192], cache, cfg.chunk_size)
    assert cache.layers[0].k.kept < 192
    ref = _as_dynamic(model, cache)
    positions = torch.arange(192, 256)[None]
    with observe_queries(model, cache):  # this chunk is still prompt: it is pruned too
        ours = model(ids[:, 192:], **with_cache(cache)).logits
    theirs = model(ids[:, 192:], **with_cache(ref), position_ids=positions).logits
    assert torch.equal(ours, theirs)
    ref = _as_dynamic(model, cache)
    token = _ids(1, seed=9)
    ours = model(token, **with_cache(cache)).logits
    theirs = model(token, **with_cache(ref), position_ids=torch.tensor([[256]])).logits
    assert torch.equal(ours, theirs)


# --- the query hook -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_observed_queries_reproduce_the_models_own_attention(monkeypatch, arch):
    # Eager attention returns its probabilities: the last w rows must be what SnapKV recomputes
    # from the hooked queries (q_proj, q_norm on Gemma3, RoPE, the attention's own scale).
    model, _, _ = build_tiny(arch, torch.bfloat16)
    model.set_attn_implementation("eager")
    seen = {}
    original = SnapKV.score

    def record(self, chunk):
        seen[len(seen)] = chunk
        return original(self, chunk)

    monkeypatch.setattr(SnapKV, "score", record)
    ids = _ids(80)
    cache = _cache(model, Config(prune_rate=0.5, prune_scorer="snapkv"), 80)
    with observe_queries(model, cache):
        out = model(ids, **with_cache(cache), output_attentions=True)
    pruned = [i for i, layer in enumerate(cache.layers) if layer.pruner]
    assert len(seen) == len(pruned)
    for (_, chunk), idx in zip(sorted(seen.items()), pruned, strict=True):
        q, k = chunk.queries.float(), chunk.keys.float()
        w, groups = q.shape[2], q.shape[1] // k.shape[1]
        logits = q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2) * chunk.scaling
        rows = torch.arange(k.shape[2])
        logits = logits.masked_fill(rows[None, :] > rows[-w:, None], float("-inf"))
        expected = out.attentions[idx][:, :, -w:, :].float()
        assert (logits.softmax(-1) - expected).abs().max() < 2e-2


def test_a_scorer_that_needs_queries_on_a_model_without_q_proj_is_a_user_error(tiny_models):
    model = tiny_models["tiny-llama"].model
    cache = _cache(model, Config(prune_rate=0.5, prune_scorer="snapkv"), 10)
    with pytest.raises(UserError, match="knorm"), observe_queries(torch.nn.Linear(2, 2), cache):
        pass


# --- scorers on hand-made tensors ---------------------------------------------------------------


def _pruner(scorer, length, rate=0.5, sinks=0, window=0):
    return TokenPruner(rate, scorer, length, sinks=sinks, window=window)


def test_key_norm_keeps_the_keys_with_the_lowest_norm():
    norms = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0, 0.1])
    keys = torch.zeros(1, 1, 6, 4)
    keys[0, 0, :, 1] = -norms  # the sign must not matter, only the norm
    rows = _pruner(KeyNorm(), 6).select(ChunkView(keys, 6, 0), stored=0)
    assert rows.tolist() == [[[1, 3, 5]]]


def test_streaming_keeps_the_sinks_and_the_most_recent_tokens():
    keys = torch.randn(1, 2, 10, 4)
    rows = _pruner(Streaming(), 10, sinks=2).select(ChunkView(keys, 10, 0), stored=0)
    assert rows.tolist() == [[[0, 1, 7, 8, 9]] * 2]


def test_protected_tokens_survive_any_score():
    # Key-norm would evict the large-norm sinks and question; the policy keeps them anyway.
    keys = torch.ones(1, 1, 12, 4)
    keys[..., :2, :] = 100
    keys[..., -3:, :] = 100
    rows = _pruner(KeyNorm(), 12, sinks=2, window=3).select(ChunkView(keys, 12, 0), stored=0)
    assert {0, 1, 9, 10, 11} <= set(rows[0, 0].tolist()) and rows.shape[-1] == 6


def test_snapkv_votes_follow_the_window_queries_and_respect_causality():
    keys = torch.zeros(1, 1, 8, 4)
    keys[..., 3, 0] = 5.0  # the token the first window query looks for
    keys[..., 7, 0] = 5.0  # the same key, but in that query's future
    queries = torch.zeros(1, 2, 2, 4)  # two query heads share the one KV head; window of 2
    queries[:, :, 0, 0] = 5.0  # row 6 of the sequence: sees keys 0..6 only
    chunk = ChunkView(keys, 8, 0, queries, scaling=1.0)
    votes = SnapKV(kernel_size=1).score(chunk)[0, 0]
    assert votes.argmax() == 3
    assert votes[3] > 1.9  # ~1 from each query head's first window query
    assert votes[7] < 0.5  # the last query sees it only as one of eight equal keys
    pooled = SnapKV(kernel_size=3).score(chunk)[0, 0]
    assert pooled[2] == pooled[3] == pooled[4] == votes[3]


def test_random_scorer_is_seeded_and_rates_are_exact_fractions():
    keys = torch.randn(1, 2, 50, 4)
    a = _pruner(Random(seed=1), 50).select(ChunkView(keys, 50, 0), stored=0)
    b = _pruner(Random(seed=1), 50).select(ChunkView(keys, 50, 0), stored=0)
    assert torch.equal(a, b) and a.shape == (1, 2, 25)
    assert _pruner(KeyNorm(), 10, rate=0.7).budget(10) == 3
    assert _pruner(KeyNorm(), 100, rate=0.29).budget(100) == 71
    assert math.ceil((1 - 0.7) * 10) == 4  # why the rate is read as a decimal fraction


# --- the point of it all: a question-aware scorer keeps the needle -------------------------------


@pytest.mark.slow
def test_snapkv_keeps_the_needle_far_more_often_than_random_eviction(smollm2):
    # SmolLM2, 20 pass-key prompts of ~1k tokens, needle depth 0-100%, half the prompt evicted
    # in one chunk. Measured (seed 0): SnapKV 20/20, random 10/20; each head keeps a random half,
    # so the needle often survives somewhere, but SnapKV never loses it.
    task = get_task("niah")
    samples = task.samples(smollm2.tokenizer, 1024, 20, seed=0)
    hits = {}
    for scorer in ("snapkv", "random"):
        cfg = Config(prune_rate=0.5, prune_scorer=scorer)
        hits[scorer] = sum(
            task.score(
                s,
                generate(
                    smollm2.model,
                    smollm2.tokenizer,
                    torch.tensor([s.input_ids]),
                    cfg,
                    task.max_new_tokens,
                ).text,
            )
            for s in samples
        )
    assert hits["snapkv"] >= 18 and hits["snapkv"] - hits["random"] >= 6, hits
