"""Decode attention read straight from the packed KV cache, by a small C++ kernel.

A decode step (one query token) otherwise dequantizes each layer's whole history into a fresh
tensor for SDPA to read. Here the scores come from the packed K codes and each tile's scale and
zero, and p.v is accumulated from the packed V rows as they are read (csrc/decode_attention.cpp
gives the arithmetic), so the history is never materialized.

How it plugs into transformers: models run the "kvpareto" attention (`install`), which is SDPA
for every call except a decode step that `QuantizedKVCache.update` handed over. For such a step
the cache stores nothing and returns the new K/V tagged with a handoff (`HANDOFF`); the attention
call then runs the kernel over what the cache holds plus the new token, and only then stores it,
so the step reads exactly what the reference path (`KVStream._visible`) reads.

Covered: 2/4/8-bit K per-token or per-channel, V per-token, asymmetric or symmetric, K smoothing,
Hadamard rotation, the full-precision tail, GQA and sliding windows, and 16-bit streams (all
tail, read in place: with a 16-bit cache a step then skips SDPA, which spends more on one query
than reading the bf16 history costs). Other layers keep the reference path. The kernel is
compiled once per CPU kind (AVX-512 or AVX2/FMA intrinsics, by the flags in /proc/cpuinfo,
named in the build directory; plain C++ elsewhere) under $KVPARETO_HOME/kernels; without a
compiler everything still runs on the reference path, after one notice on stderr.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "kvpareto"
HANDOFF = "_kvpareto_decode"  # attribute of a K tensor that a cache handed over to the kernel
_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
_BASE_FLAGS = ["-O3", "-fopenmp"]
_ISA = {
    "avx512": (
        {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"},
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
}


def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The "kvpareto" attention: the fused kernel for a decode step the cache handed over,
    transformers' SDPA for everything else (same arguments, same result)."""
    handoff = getattr(key, HANDOFF, None)
    if handoff is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    return handoff(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None


def install(model) -> None:
    """Make `model` run the "kvpareto" attention (SDPA's masks, SDPA outside fused steps)."""
    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def installed(model_config) -> bool:
    return model_config.get_text_config()._attn_implementation == ATTENTION


def enabled(model_config) -> bool:
    """Whether caches built for this model fuse decode steps by default."""
    return installed(model_config) and kernel() is not None


def covers(k_spec, v_spec) -> bool:
    """Whether the kernel reads streams of these `StreamSpec`s (else the layer keeps SDPA)."""
    k_tile, v_tile = k_spec.tile, v_spec.tile
    return (
        k_spec.bits in (2, 4, 8, 16)
        and v_spec.bits in (2, 4, 8, 16)
        and (k_spec.bits == 16 or k_tile.tokens == 1 or k_tile.channels == 1)
        and (v_spec.bits == 16 or v_tile.tokens == 1)
        and not v_spec.smooth
    )


def attend(k, v, query, k_new, v_new, scaling: float) -> torch.Tensor:
    """Attention of `query` [B, Hq, 1, D] over what the `KVStream`s k and v hold plus the new
    token (k_new, v_new [B, Hkv, 1, D], not yet stored); returns [B, 1, Hq, D] in query's dtype.
    A sliding window's visible part starts at k's first token it can still attend to."""
    k_store, k_layout = k.kernel_view()
    v_store, v_layout = v.kernel_view()
    none = torch.empty(0)
    out = kernel().decode_attention(
        query[:, :, 0].float().contiguous(),
        k_new[:, :, 0].float().contiguous(),
        v_new[:, :, 0].float().contiguous(),
        k_store,
        k_layout,
        v_store,
        v_layout,
        none if k.mean is None else k.mean.contiguous(),
        none if k.rotation is None else k.rotation,
        none if v.rotation is None else v.rotation,
        k.first_visible(),
        k.kept,
        scaling,
    )
    return out.to(query.dtype)[:, None]


def isa() -> tuple[str, list[str]]:
    """The widest instruction set this CPU has that the kernel is built for, and its flags."""
    from kvpareto.hardware import cpu_flags

    have = set(cpu_flags().split())
    for name, (needs, flags) in _ISA.items():
        if needs <= have:
            return name, flags
    return "generic", []


def build_dir() -> Path:
    """Where this CPU kind's build lives: named by ISA, torch version and the source's hash, so a
    change of any of them builds afresh."""
    from kvpareto.paths import cache_root

    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    torch_version = torch.__version__.replace("+", "_")
    return cache_root() / "kernels" / f"decode_attention_{isa()[0]}_{torch_version}_{digest}"


@functools.cache
def kernel():
    """The compiled extension (built on first use, then loaded from `build_dir`), or None after
    one notice on stderr where it cannot be built: the reference path then serves every step."""
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
            name=f"kvpareto_{where.name.replace('.', '_')}",
            sources=[str(_SOURCE)],
            extra_cflags=[*_BASE_FLAGS, *isa()[1]],
            extra_ldflags=["-fopenmp"],
            build_directory=str(where),
        )
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"kvpareto: fused decode attention unavailable ({reason}); "
            "decode steps read the dequantized history instead",
            file=sys.stderr,
        )
        return None
