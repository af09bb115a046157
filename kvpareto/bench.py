"""Speed and memory benchmarks, reported as ratios against baselines measured in the same run.

Targets live here, not in tests: tests check behaviour, wall time belongs to benchmarks.
- decode tokens/s of our cache at 16/8/4/2 bits over transformers' DynamicCache;
- ours at 4 bits over transformers' QuantizedCache with the quanto backend at 4 bits;
- prefill tokens/s chunked over unchunked;
- the measured activation peak against chunk size.
Each decode rate is the median of `repeats` timed runs of `steps` greedy steps after one prefill.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.memory import measure_prefill
from kvpareto.quant.kv_cache import QuantizedKVCache

KV_BITS = (16, 8, 4, 2)
CHUNKS = (0, 256, 512, 1024)


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(100, 30000, (1, length), generator=torch.Generator().manual_seed(length))


def _quanto_cache(model_config):
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return None
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=model_config, nbits=4)


@torch.inference_mode()
def decode_rate(
    model, make_cache: Callable, prompt: torch.Tensor, steps: int, repeats: int
) -> float:
    cache = make_cache()
    token = prefill(model, prompt, cache, 0).argmax(-1)
    model(token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


@torch.inference_mode()
def prefill_rate(model, config: Config, prompt: torch.Tensor, repeats: int) -> float:
    dtype = next(model.parameters()).dtype
    times = []
    for _ in range(repeats):
        cache = QuantizedKVCache(model.config, config, dtype)
        start = time.perf_counter()
        prefill(model, prompt, cache, config.chunk_size)
        times.append(time.perf_counter() - start)
    return prompt.shape[1] / statistics.median(times)


def run_bench(model, lengths: list[int], steps: int = 16, repeats: int = 3, log=print) -> dict:
    dtype = next(model.parameters()).dtype
    rows: dict = {"decode": [], "prefill": [], "activation": []}
    for length in lengths:
        prompt = _prompt(length)
        base = decode_rate(model, lambda: DynamicCache(config=model.config), prompt, steps, repeats)
        log(f"{length}: DynamicCache decode {base:.1f} tok/s")
        quanto = None
        if _quanto_cache(model.config) is not None:
            quanto = decode_rate(model, lambda: _quanto_cache(model.config), prompt, steps, repeats)
            log(f"{length}: quanto-4 decode {quanto:.1f} tok/s")
        for bits in KV_BITS:
            cfg = Config(k_bits=bits, v_bits=bits)
            ours = decode_rate(
                model,
                lambda c=cfg: QuantizedKVCache(model.config, c, dtype),
                prompt,
                steps,
                repeats,
            )
            log(f"{length}: ours k{bits}v{bits} decode {ours:.1f} tok/s")
            rows["decode"].append(
                {
                    "context": length,
                    "kv_bits": bits,
                    "tokens_per_s": ours,
                    "dynamic_tokens_per_s": base,
                    "vs_dynamic": ours / base,
                    "quanto4_tokens_per_s": quanto,
                    "vs_quanto4": ours / quanto if quanto and bits == 4 else None,
                }
            )
        unchunked = prefill_rate(model, Config(k_bits=4, v_bits=4), prompt, repeats)
        for chunk in CHUNKS:
            cfg = Config(k_bits=4, v_bits=4, chunk_size=chunk)
            rate = unchunked if chunk == 0 else prefill_rate(model, cfg, prompt, repeats)
            peak, _ = measure_prefill(model, prompt, cfg)
            mib = peak / 2**20
            log(f"{length}: prefill chunk {chunk} {rate:.0f} tok/s, activation peak {mib:.1f} MiB")
            rows["prefill"].append(
                {
                    "context": length,
                    "chunk_size": chunk,
                    "tokens_per_s": rate,
                    "vs_unchunked": rate / unchunked,
                }
            )
            rows["activation"].append(
                {"context": length, "chunk_size": chunk, "activation_peak_bytes": peak}
            )
    return rows
