"""The compute dtype this machine should run in, and why.

`auto` picks bfloat16 where bf16 matmuls are native: on CUDA, or on a CPU with the `avx512_bf16`
or `amx_bf16` flag. Elsewhere bf16 is emulated (an AVX2-only EPYC prefilled 5x slower in bf16 than
in fp32), so `auto` picks float32. The choice changes speed and the activations' size; weight
and KV bytes are those of the storage dtype whatever it is (`kvpareto.models.storage_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpareto.errors import UserError

COMPUTE_DTYPES = ("auto", "bfloat16", "float32", "float16")
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class ComputeDtype:
    """A resolved compute dtype: its torch name, what was asked for, and why it was chosen."""

    name: str
    requested: str
    reason: str

    def to_dict(self) -> dict:
        return {
            "compute_dtype": self.name,
            "compute_dtype_requested": self.requested,
            "compute_dtype_reason": self.reason,
        }


def dtype_choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    """The dtype name an option's value stands for (bf16, fp32 and fp16 accepted)."""
    name = DTYPE_ALIASES.get(value, value)
    if name not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
    return name


def cpu_flags() -> str:
    """The flags line of /proc/cpuinfo ("" where there is none, e.g. on macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return line.partition(":")[2]
    return ""


def auto_compute_dtype(flags: str, device: str = "cpu") -> tuple[str, str]:
    """(dtype name, reason) by the `auto` rule, for a device type and a CPU flags string."""
    if device == "cuda":
        return "bfloat16", "auto: CUDA device"
    native = [f for f in NATIVE_BF16_FLAGS if f in flags.split()]
    if native:
        return "bfloat16", f"auto: CPU has native bf16 ({', '.join(native)})"
    return "float32", f"auto: CPU lacks native bf16 (no {' or '.join(NATIVE_BF16_FLAGS)} flag)"


def resolve_compute_dtype(requested: str, device: str = "cpu") -> ComputeDtype:
    """`requested` (a name from COMPUTE_DTYPES) resolved on this machine for `device`."""
    if requested != "auto":
        return ComputeDtype(requested, requested, "set explicitly")
    name, reason = auto_compute_dtype(cpu_flags(), device)
    return ComputeDtype(name, requested, reason)


def cpu_flag_summary(flags: str | None = None) -> str:
    """The SIMD flags that decide kernel speed (avx*, fma, amx*), sorted: printed beside every
    speed figure, since the same code runs several times faster or slower across these CPUs."""
    words = (cpu_flags() if flags is None else flags).split()
    picked = sorted({w for w in words if w.startswith(("avx", "amx")) or w == "fma"})
    return " ".join(picked) or "unknown"
