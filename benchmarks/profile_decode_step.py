"""Where one decode step of a catalog model goes: the torch profiler over a few steps after a
prompt, per context length and KV width (issue #14, item 2).

    .venv/bin/python benchmarks/profile_decode_step.py [model]

Prints, per setting, the unprofiled step time, the ops a step dispatches, the profiled self
time of all aten ops, and the ops that take most of it. Unprofiled step time minus the aten
self time approximates what runs outside aten ops: Python, the cache's bookkeeping and the
fused decode kernel (an extension function, not a profiled torch op).
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from kvpareto.bench import _prompt
from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.hf_compat import with_cache
from kvpareto.kv import make_cache
from kvpareto.models import load_model

TIMED, PROFILED = 8, 4


def main(ref: str) -> None:
    torch.set_num_threads(2)
    model = load_model(ref, dtype=torch.bfloat16).model
    for length in (1024, 4096):
        for bits in (16, 4):
            profile_step(model, length, bits)


@torch.inference_mode()
def profile_step(model, length: int, bits: int) -> None:
    with make_cache(model, Config(k_bits=bits, v_bits=bits), torch.bfloat16) as cache:
        token = prefill(model, _prompt(length, model), cache, 0).argmax(-1)

        def step(token):
            out = model(token[:, None], **with_cache(cache), use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].argmax(-1)

        for _ in range(3):
            token = step(token)
        start = time.perf_counter()
        for _ in range(TIMED):
            token = step(token)
        wall = (time.perf_counter() - start) / TIMED * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED):
                token = step(token)
    events = prof.key_averages()
    aten = sum(e.self_cpu_time_total for e in events) / PROFILED / 1e3
    ops = sum(e.count for e in events) / PROFILED
    print(f"{length} tokens, {bits}-bit KV: step {wall:.1f} ms; {ops:.0f} ops a step; ", end="")
    print(f"aten self time {aten:.1f} ms")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]:
        per_step = e.self_cpu_time_total / PROFILED / 1e3
        print(f"  {e.key[:48]:48s} {e.count / PROFILED:6.0f} a step  {per_step:6.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
