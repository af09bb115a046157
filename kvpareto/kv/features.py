"""Per-token features that tell an adaptive KV cache how much precision a token needs.

Computed once per layer for the tokens of one write (a prefill chunk), before they are stored,
from what the layer has at hand: their ids, K and V, and a few of the chunk's own queries. Batch 1.

    feature        what                                                        cost per layer
    log_freq       log of how often the token id occurred in the context so     O(n), a dict of
                   far, itself included (rare ids carry the facts a task asks   ids seen (not KV
                   for; repeated filler does not)                               memory)
    k_err2, v_err2 relative RMS reconstruction error of the token's K (V) at     4 extra quantize
    k_err4, v_err4 2 and 4 bits, mean over KV heads (the quality score: how     + dequantize
                   badly the token survives a low width)                        passes of the chunk
    attn           log of the attention the token receives from the chunk's     m q_proj rows and
                   last m = 8 queries, relative to uniform, mean over query     m x T x H dot
                   heads and probes                                             products (m/n of
    attn_var       log variance of that relative attention over the m x H       the chunk's own
                   (probe, head) pairs: a token some heads need badly           attention: ~0.4%
    attn_entropy   entropy of the token's share of attention across those       at n = 2048)
                   pairs, normalized to [0, 1]: low = attended by few heads
    position       log1p of the absolute position (lets a model learn sinks)    O(n)
    recency        log1p of the distance to the end of the write                O(n)
    depth          layer index / (layers - 1)                                   O(1)

Measured on SmolLM2 (1024-token unchunked prefill, 1 thread, a busy machine): features plus the
per-width writes made prefill 15-35% slower than the static k4v2 cache; decode skips features.

The probes are the chunk's last queries, which SDPA never exposes: the cache recomputes them from
the attention module's input (q_proj, q_norm where the family has one, RoPE), so it needs
llama-style attention. In an unchunked prefill the probes are the prompt's last tokens (the
question); in a chunked one they are whatever ends each chunk, a weaker signal.
"""

from __future__ import annotations

import torch

from kvpareto.codec import TileShape, dequantize, quantize

FEATURES = (
    "log_freq",
    "k_err2",
    "v_err2",
    "k_err4",
    "v_err4",
    "attn",
    "attn_var",
    "attn_entropy",
    "position",
    "recency",
    "depth",
)
PROBE_QUERIES = 8
_EPS = 1e-6


def token_features(
    *,
    freq: torch.Tensor,
    start: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    probes: torch.Tensor,
    k_visible: torch.Tensor,
    depth: float,
    tile: TileShape,
) -> torch.Tensor:
    """Features [n, len(FEATURES)] of the n tokens written at absolute positions start.. .

    freq: [n] occurrences of each token id so far; k_new, v_new: [1, H, n, D]; probes: [1, Hq,
    m, D] scaled post-RoPE queries of the chunk's last m tokens; k_visible: [1, H, T, D], the
    keys attention reads (history, then this chunk).
    """
    n = k_new.shape[-2]
    attn, attn_var, attn_entropy = _attention_received(probes, k_visible, n)
    position = torch.arange(start, start + n, dtype=torch.float32)
    columns = {
        "log_freq": freq.float().log(),
        "k_err2": _relative_error(k_new, 2, tile),
        "v_err2": _relative_error(v_new, 2, tile),
        "k_err4": _relative_error(k_new, 4, tile),
        "v_err4": _relative_error(v_new, 4, tile),
        "attn": attn,
        "attn_var": attn_var,
        "attn_entropy": attn_entropy,
        "position": position.log1p(),
        "recency": torch.arange(n - 1, -1, -1, dtype=torch.float32).log1p(),
        "depth": torch.full((n,), float(depth)),
    }
    return torch.stack([columns[name] for name in FEATURES], dim=1)


def _relative_error(x: torch.Tensor, bits: int, tile: TileShape) -> torch.Tensor:
    x = x.float()
    back = dequantize(quantize(x, bits, tile), bits, tile, torch.float32)
    err = (back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(_EPS)
    return err.mean(dim=(0, 1))


def _attention_received(
    probes: torch.Tensor, k_visible: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attn, attn_var, attn_entropy) of the last n visible keys, as in the module docstring."""
    heads, m, t = probes.shape[1], probes.shape[2], k_visible.shape[-2]
    keys = k_visible.repeat_interleave(heads // k_visible.shape[1], dim=1).float()
    logits = probes.float() @ keys.transpose(-1, -2)  # [1, Hq, m, T]
    probe_at = torch.arange(t - m, t)  # probe i is the visible token t - m + i
    sees = torch.arange(t)[None, :] <= probe_at[:, None]  # causal: [m, T]
    probs = logits.masked_fill(~sees, float("-inf")).softmax(dim=-1)[0, :, :, t - n :]
    sees_new = sees[:, t - n :].expand(heads, m, n).reshape(-1, n).float()  # [Hq*m, n]
    rel = (probs * (probe_at + 1)[:, None]).reshape(-1, n)  # attention x what the probe sees
    count = sees_new.sum(dim=0)
    mean = rel.sum(dim=0) / count
    var = ((rel - mean) ** 2 * sees_new).sum(dim=0) / count
    share = rel / rel.sum(dim=0).clamp_min(_EPS)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(dim=0)
    entropy = entropy / count.clamp_min(2).log()
    return (mean + _EPS).log(), (var + _EPS).log(), entropy


def frequency_counts(ids: list[int], seen: dict[int, int]) -> torch.Tensor:
    """Occurrences of each id in `ids` counting everything before it; updates `seen`."""
    out = []
    for token in ids:
        seen[token] = seen.get(token, 0) + 1
        out.append(seen[token])
    return torch.tensor(out, dtype=torch.float32)
