"""Train an adaptive KV controller: label tokens on calibration prompts, then fit the MLP.

Calibration prompts are the seeded task generators (niah, qa, vt, niah-mk) at seed 1000 + s, so
they never coincide with evaluation prompts (seed 0 unless asked). Each prompt is prefilled in
one chunk through an all-16-bit adaptive cache whose observer sees every layer's write: the
token features (kv/features.py), and the label.

Label. For each token and width w in {2, 4, 8}: quantize that token's K and V alone at w (as the
cache would), and measure the relative change of the layer's attention output for the prompt's
last 32 queries, averaged over query heads and over the queries that see the token. One token's
change has a closed form (its softmax weight p becomes p' = p e^(s' - s); the output moves by
(p'(v' - o) - p(v - o)) / (1 - p + p')), so every token and width costs a few matmuls, not a
forward. The label is the smallest w whose error stays under `threshold`, else 16.

Fit. Features are standardized; a 2-hidden-layer MLP (32 units) is trained by cross-entropy on
the labels (Adam, seeded); the file keeps 64 quantiles of its scores on the calibration tokens,
which set the width mix for a target (kv/controller.py). Seeded, so re-running the command
gives the same file up to float non-determinism across thread counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvpareto.codec import TileShape, dequantize, quantize
from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.kv import make_cache
from kvpareto.kv.controller import FORMAT, VERSION, WIDTHS, LearnedController, build_mlp
from kvpareto.kv.features import FEATURES
from kvpareto.tasks import get_task

CALIBRATION_TASKS = ("niah", "qa", "vt", "niah-mk")
LABEL_QUERIES = 32
DEFAULT_THRESHOLD = 0.002
_HIDDEN, _STEPS, _BATCH, _QUANTILES = 32, 400, 4096, 64


def calibration_prompts(tokenizer, samples: int, context_length: int, seed: int) -> list[list[int]]:
    return [
        s.input_ids
        for name in CALIBRATION_TASKS
        for s in get_task(name).samples(tokenizer, context_length, samples, 1000 + seed)
    ]


@torch.inference_mode()
def label_tokens(model, prompts: list[list[int]], threshold: float, group_size: int = 32):
    """(features [N, F], labels [N] as indices into WIDTHS) over every prompt, layer, token."""
    feats, labels = [], []

    def observe(layer, k, v, k_visible, v_visible):
        feats.append(layer.features(k, v, k_visible))
        probes = layer.probe_queries(min(LABEL_QUERIES, k.shape[-2]))
        errors = attention_error(probes, k_visible, v_visible, layer.tile)
        under = errors < threshold  # [3, n]: widths 2, 4, 8
        first = torch.where(under.any(dim=0), under.float().argmax(dim=0), len(WIDTHS) - 1)
        labels.append(first)

    dtype = next(model.parameters()).dtype
    config = Config(kv_scheme="rule", target_mean_bits=16.0, group_size=group_size)
    for ids in prompts:
        with make_cache(model, config, dtype, observer=observe) as cache:
            prefill(model, torch.tensor([ids]), cache, 0)
    return torch.cat(feats), torch.cat(labels)


def attention_error(
    probes: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: TileShape
) -> torch.Tensor:
    """[len(WIDTHS) - 1, T]: relative attention-output change when token t alone is stored at
    2, 4 or 8 bits (see the module docstring). probes [1, Hq, L, D] are the last L positions."""
    heads, n_probes, t = probes.shape[1], probes.shape[2], k.shape[-2]
    groups = heads // k.shape[1]
    q = probes[0].float()

    def wide(x):  # [1, H, T, D] -> [Hq, T, D]
        return x[0].float().repeat_interleave(groups, dim=0)

    keys, values = wide(k), wide(v)
    sees = torch.arange(t)[None, :] <= torch.arange(t - n_probes, t)[:, None]  # [L, T]
    logits = (q @ keys.transpose(-1, -2)).masked_fill(~sees, float("-inf"))
    p = logits.softmax(dim=-1)  # [Hq, L, T]
    o = p @ values  # [Hq, L, D]
    oo = (o * o).sum(-1, keepdim=True)  # [Hq, L, 1]
    vo = o @ values.transpose(-1, -2)  # [Hq, L, T]
    vv = (values * values).sum(-1)[:, None, :]  # [Hq, 1, T]
    out = []
    for bits in WIDTHS[:-1]:
        kq = wide(dequantize(quantize(k.float(), bits, tile), bits, tile, torch.float32))
        vq = wide(dequantize(quantize(v.float(), bits, tile), bits, tile, torch.float32))
        shift = (q @ kq.transpose(-1, -2)) - (q @ keys.transpose(-1, -2))
        p2 = torch.where(sees, p * shift.exp(), torch.zeros_like(p))
        vqo = o @ vq.transpose(-1, -2)
        vqvq = (vq * vq).sum(-1)[:, None, :]
        vqv = (vq * values).sum(-1)[:, None, :]
        moved = (
            p2**2 * (vqvq - 2 * vqo + oo)
            + p**2 * (vv - 2 * vo + oo)
            - 2 * p * p2 * (vqv - vqo - vo + oo)
        )
        rel = moved.clamp_min(0).sqrt() / (1 - p + p2) / oo.sqrt().clamp_min(1e-6)
        seen_by = sees.float().sum(dim=0) * heads  # [T]
        out.append(rel.sum(dim=(0, 1)) / seen_by)
    return torch.stack(out)


def fit_controller(
    features: torch.Tensor, labels: torch.Tensor, seed: int, meta: dict
) -> LearnedController:
    features, labels = features.clone(), labels.clone()  # out of inference mode, for autograd
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    x = (features - mean) / std
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = build_mlp(len(FEATURES), _HIDDEN)
    with torch.enable_grad():
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
        for _ in range(_STEPS):
            batch = torch.randint(0, len(x), (_BATCH,), generator=gen)
            loss = torch.nn.functional.cross_entropy(mlp(x[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    state = {
        "format": FORMAT,
        "version": VERSION,
        "features": list(FEATURES),
        "hidden": _HIDDEN,
        "weights": {k: t.detach().clone() for k, t in mlp.state_dict().items()},
        "mean": mean,
        "std": std,
        "score_quantiles": torch.zeros(_QUANTILES),
        "label_counts": torch.bincount(labels, minlength=len(WIDTHS)),
        **meta,
    }
    controller = LearnedController(state)
    scores = controller.score(features)
    sample = scores[torch.randperm(len(scores), generator=gen)[:100_000]]
    state["score_quantiles"] = torch.quantile(sample, torch.linspace(0, 1, _QUANTILES))
    return controller


def train_controller(
    loaded,
    out: Path,
    samples: int = 1,
    context_length: int = 1024,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> dict:
    """Calibrate on `loaded`, fit, save to `out`; return a summary for the CLI."""
    prompts = calibration_prompts(loaded.tokenizer, samples, context_length, seed)
    features, labels = label_tokens(loaded.model, prompts, threshold)
    meta = {
        "trained_on": loaded.spec.name,
        "threshold": threshold,
        "samples": samples,
        "context_length": context_length,
        "seed": seed,
    }
    controller = fit_controller(features, labels, seed, meta)
    predicted = controller.score(features)
    agreement = _rank_agreement(predicted, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    controller.save(out)
    counts = controller.state["label_counts"].tolist()
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "prompts": len(prompts),
        "tokens": len(labels),
        "label_counts": dict(zip(map(str, WIDTHS), counts, strict=True)),
        "rank_agreement": agreement,
        "mix_at_3": controller.mix(3.0),
        "mix_at_4": controller.mix(4.0),
    }


def _rank_agreement(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of token pairs with different labels that the scores order the same way
    (a sampled concordance: 0.5 is chance)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, len(labels), (200_000,), generator=gen)
    b = torch.randint(0, len(labels), (200_000,), generator=gen)
    differ = labels[a] != labels[b]
    same_way = (scores[a] > scores[b]) == (labels[a] > labels[b])
    return float(same_way[differ].float().mean()) if differ.any() else 0.5
