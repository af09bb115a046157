"""Building and loading the compiled kernels (csrc/): one extension, compiled once per CPU kind.

The extension is built with torch.utils.cpp_extension for the widest instruction set this CPU
has that the sources are written for (AVX-512 or AVX2/FMA intrinsics, by the flags in
/proc/cpuinfo, named in the build directory; plain C++ elsewhere), under $KVPARETO_HOME/kernels.
Without a compiler everything still runs: the callers fall back to their torch paths, after one
notice on stderr.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
# -ffp-contract=off: no multiply-add is fused unless written so (intrinsics), so that scalar code
# rounds where torch does (quantize_tokens.cpp is bit-identical to codec.quantize).
_BASE_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
_ISA = {
    "avx512": (
        {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"},
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
}


_torch_only = False


@contextlib.contextmanager
def torch_only():
    """Within this block, linears and per-token quantization take torch's paths even where the
    kernels are built (the bench times the decode step as it was before them). Fused decode
    attention is chosen per cache instead (`fused=False`)."""
    global _torch_only
    before, _torch_only = _torch_only, True
    try:
        yield
    finally:
        _torch_only = before


def torch_only_now() -> bool:
    return _torch_only


def isa() -> tuple[str, list[str]]:
    """The widest instruction set this CPU has that the kernels are built for, and its flags."""
    from kvpareto.hardware import cpu_flags

    have = set(cpu_flags().split())
    for name, (needs, flags) in _ISA.items():
        if needs <= have:
            return name, flags
    return "generic", []


def sources() -> list[Path]:
    return sorted(_CSRC.glob("*.cpp"))


def build_dir() -> Path:
    """Where this CPU kind's build lives: named by ISA, torch version and a hash of the sources
    and flags, so a change of any of them builds afresh."""
    from kvpareto.paths import cache_root

    digest = hashlib.sha256(" ".join(_BASE_FLAGS + isa()[1]).encode())
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    torch_version = torch.__version__.replace("+", "_")
    return (
        cache_root() / "kernels" / f"kvpareto_{isa()[0]}_{torch_version}_{digest.hexdigest()[:12]}"
    )


@functools.cache
def kernel():
    """The compiled extension (built on first use, then loaded from `build_dir`), or None after
    one notice on stderr where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        venv_bin = str(Path(sys.executable).parent)
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            # torch runs `ninja` from PATH; pip installs it beside this interpreter, which a
            # venv used without activating it leaves off PATH.
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        where = build_dir()
        where.mkdir(parents=True, exist_ok=True)
        return load(
            name=where.name.replace(".", "_"),
            sources=[str(p) for p in sources()],
            extra_cflags=[*_BASE_FLAGS, *isa()[1]],
            extra_ldflags=["-fopenmp"],
            build_directory=str(where),
        )
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"kvpareto: compiled kernels unavailable ({reason}); decode steps read the "
            "dequantized history and run torch's linears instead",
            file=sys.stderr,
        )
        return None
