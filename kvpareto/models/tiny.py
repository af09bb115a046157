"""Tiny random-init models, built in code and seeded, for tests that must run in about a second.

Each keeps the structural traits that matter to a KV cache: grouped-query attention (4 query
heads over 2 KV heads), a head_dim of 64 like SmolLM2, and for Gemma3 the interleaved
sliding-window layers. The tokenizer is byte-level (one token per UTF-8 byte), built from the
`tokenizers` library with no files, so nothing is downloaded. Their accuracy is chance by design.
"""

from __future__ import annotations

import hashlib
import json

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY_SEED = 0
TINY_VERSION = 1  # bump when a config below changes: it enters the model hash
_SPECIAL = ["<pad>", "<s>", "</s>"]
_VOCAB = 320  # 3 specials + 256 bytes, rounded up

_COMMON = dict(
    vocab_size=_VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str, tied: bool = True, **shape):
    """The transformers config of the tiny model of `arch` (`tied`: the LM head is the
    embedding; `shape`: config fields that replace the common ones, e.g. num_key_value_heads=1
    and head_dim=256 for Gemma3-270M's attention shape)."""
    common = {**_COMMON, "tie_word_embeddings": tied, **shape}
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gemma3":
        return Gemma3TextConfig(
            **common,
            sliding_window=32,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
        )
    raise ValueError(f"no tiny config for arch {arch!r}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is one token, so any text round-trips."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(_SPECIAL + alphabet)}
    core = Tokenizer(BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_tiny(arch: str, dtype: torch.dtype = torch.float32, tied: bool = True, **shape):
    """Return (model, tokenizer, identity hash) for a tiny random model of `arch`; with
    `tied=False` its LM head is a matrix of its own, as in models that do not tie it; `shape`
    as in `tiny_config`."""
    config = tiny_config(arch, tied, **shape)
    config._attn_implementation = "sdpa"
    # Seed a private generator so building a model never disturbs the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    identity = hashlib.sha256(
        json.dumps(
            {"arch": arch, "seed": TINY_SEED, "version": TINY_VERSION, "config": config.to_dict()},
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    return model, byte_tokenizer(), identity
