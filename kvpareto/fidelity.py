"""Answer fidelity: how far a config's next-token distributions over the baseline's answer sit from
the baseline's own, one sample at a time.

The baseline (unquantized weights, 16-bit cache) answers a prompt greedily; at each position of
its answer it keeps its `TOP_K` likeliest next tokens and their log-probabilities (`Reference`).
A config is then run along the same answer tokens (`engine.generate`'s `follow`), and its
log-softmax at each position is compared with the reference (`compare`):

- KLD, the mean over the answer's positions of KL(baseline || config), taken over the baseline's
  top k tokens and one bucket holding the rest of the vocabulary. Merging outcomes never raises
  a KL divergence, so this is a lower bound of the full-vocabulary KLD (the figure llama.cpp's
  `--kl-divergence` reports), equal to it where the baseline puts no mass outside its top k;
  `Reference.rest_mass` says how much it put there. Two identical distributions give exactly 0.
- The answer's log-probability: log P(answer | prompt) under the config, the sum over its tokens.

Why the top k: a reference is held in memory for every prompt of a run, and k of them cost
k x 12 bytes a position where the full distribution costs 4 bytes per vocabulary entry (49,152
for SmolLM2). Measured on SmolLM2-135M's NIAH answers at 1k tokens (4 prompts, bf16), the most
mass the baseline left outside its top 64 at any position was 2-4% (0.8-1.5% outside its top
256); the rest bucket still counts that mass, so what is missed is only how the config
redistributes it among those tokens.

Resolution: the same config on the same prompt gives exactly 0. An equivalent one does not: a
16-bit cache with the prompt prefilled in chunks of 256 instead of at once measured a KLD of
7e-4 nats/token on SmolLM2-135M in bf16 (2e-8 on tiny-llama), from the changed order of the
bf16 arithmetic alone; differences below that floor are not the cache's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOP_K = 64


@dataclass(frozen=True)
class Reference:
    """The baseline's answer to one prompt: its tokens, and at each position its top k next
    tokens (`top_ids`, [positions, k]) with their log-probabilities (`top_logprobs`, float32)."""

    tokens: tuple[int, ...]
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    @classmethod
    def from_logprobs(
        cls, tokens: Sequence[int], logprobs: torch.Tensor, k: int = TOP_K
    ) -> Reference:
        """From the log-softmax at each answer position, [positions, vocab]."""
        top = logprobs.float().topk(min(k, logprobs.shape[-1]), dim=-1)
        return cls(tuple(tokens), top.indices, top.values)

    @property
    def rest_mass(self) -> float:
        """The most probability the baseline puts outside its top k at any position: how far
        the KLD may sit below the full-vocabulary figure."""
        return float(_rest_log(self.top_logprobs.double()).exp().max())


@dataclass(frozen=True)
class AnswerFidelity:
    kld: float  # mean over the answer's positions, nats (top k + rest, see the module)
    answer_logprob: float  # log P(answer | prompt), nats


def compare(reference: Reference, logprobs: torch.Tensor) -> AnswerFidelity:
    """Fidelity of a config whose log-softmax along the reference answer is `logprobs`
    ([positions, vocab], one row per reference token)."""
    if logprobs.shape[0] != len(reference.tokens):
        raise ValueError(f"{logprobs.shape[0]} positions scored for {len(reference.tokens)}")
    config = logprobs.double()
    p_log = reference.top_logprobs.double()
    q_log = config.gather(-1, reference.top_ids)
    top = (p_log.exp() * (p_log - q_log)).sum(-1)
    p_rest, q_rest = _rest_log(p_log), _rest_log(q_log)
    rest = p_rest.exp() * (p_rest - q_rest)
    # KL is >= 0; rounding can leave a few ulps below it, which read as 0.
    kld = float((top + rest).clamp(min=0).mean())
    answer = torch.tensor(reference.tokens)[:, None]
    return AnswerFidelity(kld, float(config.gather(-1, answer).sum()))


def _rest_log(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - the mass of the given tokens) per position, accurate when that mass is near 1;
    a rest below float64's resolution of 1 (2^-53) reads as 2^-53, never as an empty bucket."""
    covered = top_logprobs.logsumexp(-1).clamp(max=0.0)
    return torch.log(-torch.expm1(covered)).clamp(min=_REST_FLOOR)


_REST_FLOOR = -53 * math.log(2)
