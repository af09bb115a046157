"""llama.cpp, the runtime edge users deploy: its decode speed on a GGUF file, the peer to beat.

`make bench-peers` installs llama-cpp-python (the `peers` extra: pip compiles llama.cpp for this
CPU, once) and `kvpareto bench --parts peers` times it beside ours (`bench.peer_bench`).
llama.cpp is called as a library; none of its code is in this project. Each timing runs in a
child process (`decode_rate`): llama.cpp is native code that pip compiled for this CPU, and a
build that uses an instruction the CPU or its VM does not allow dies on a signal (SIGILL was seen
on an AMX Xeon VM); that ends as one clear error instead of taking the bench down with it.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kvpareto.errors import UserError

KV_TYPES = {16: "f16", 8: "q8_0", 4: "q4_0"}  # llama.cpp's cache type closest to our KV bits
# The child that times llama.cpp: this module run as a script (see the end of the file).
CHILD = [sys.executable, "-m", "kvpareto.peers"]


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


def decode_rate(
    path: Path, prompt: list[int], kv_type: str, threads: int, steps: int, rounds: int
) -> float:
    """`llama_decode_rate` in a child process; a crash or failure there is a `UserError`."""
    job = {"path": str(path), "prompt": prompt, "kv_type": kv_type, "threads": threads}
    job.update(steps=steps, rounds=rounds)
    done = subprocess.run(CHILD, input=json.dumps(job), capture_output=True, text=True)
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        why = (
            "pip's build of it uses an instruction this CPU or VM does not allow; rebuild it for "
            "a baseline ISA, e.g. CMAKE_ARGS=-DGGML_NATIVE=OFF pip install --force-reinstall "
            "--no-cache-dir llama-cpp-python"
            if name == "SIGILL"
            else f"its last words: {last}"
        )
        raise UserError(f"llama.cpp died on {name} while decoding with {kv_type} KV: {why}")
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise UserError(f"llama.cpp failed while decoding with {kv_type} KV: {last}")
    return float(json.loads(lines[-1])["tokens_per_s"])


def llama_build() -> str:
    """The instruction sets llama.cpp was compiled for (its own system-info line)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


if __name__ == "__main__":  # the child of `decode_rate`: one job on stdin, its rate on stdout
    job = json.load(sys.stdin)
    rate = llama_decode_rate(
        Path(job["path"]),
        job["prompt"],
        job["kv_type"],
        job["threads"],
        job["steps"],
        job["rounds"],
    )
    print(json.dumps({"tokens_per_s": rate}))
