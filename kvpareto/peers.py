"""llama.cpp, the runtime edge users deploy: its decode speed on a GGUF file, the peer to beat.

`make bench-peers` installs llama-cpp-python (the `peers` extra: pip compiles llama.cpp for this
CPU, once) and `kvpareto bench --parts peers` times it beside ours (`bench.peer_bench`).
llama.cpp is called as a library; none of its code is in this project.
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import time
from pathlib import Path

from kvpareto.errors import UserError

KV_TYPES = {16: "f16", 8: "q8_0", 4: "q4_0"}  # llama.cpp's cache type closest to our KV bits


def require() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            "--parts peers needs llama-cpp-python: run `make bench-peers` (it installs the "
            "peers extra, compiling llama.cpp once: several minutes on 2 cores)"
        )


def gguf_file(ref: str) -> Path:
    """The GGUF file behind a model reference (a catalog name or a .gguf path)."""
    from kvpareto.models import sources
    from kvpareto.models.loader import resolve_ref
    from kvpareto.paths import cache_root

    kind, value = resolve_ref(ref)
    if kind == "gguf":
        return value
    if kind == "catalog" and not value.tiny:
        return sources.materialize(value.gguf, cache_root() / "gguf")
    raise UserError(f"--parts peers runs llama.cpp on a GGUF file; {ref} has none")


def llama_decode_rate(
    path: Path, prompt: list[int], kv_type: str, threads: int, steps: int, rounds: int
) -> float:
    """llama.cpp's decode tokens/s after `prompt`: the median over `rounds` of `steps` steps.

    Each step feeds the next prompt token rather than the argmax: llama-cpp-python keeps no
    logits unless every position's are kept, and a token's identity does not change a step's
    work (the last position's logits are computed either way)."""
    import llama_cpp

    kv = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(prompt) + (rounds + 1) * steps,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        type_k=kv,
        type_v=kv,
        verbose=False,
    )
    try:
        llm.eval(prompt)
        feed = iter(prompt * 2)
        llm.eval([next(feed)])  # warm-up, as ours gets
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                llm.eval([next(feed)])
            rates.append(steps / (time.perf_counter() - start))
    finally:
        llm.close()
        del llm
        gc.collect()
    return statistics.median(rates)


def llama_build() -> str:
    """The instruction sets llama.cpp was compiled for (its own system-info line)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()
