"""The device and compute dtype this machine should run on, and why.

`--device auto` runs on CUDA where torch sees a GPU, else on the CPU; asking for `cuda` without
one is a user error, not a silent fallback.

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
DEVICES = ("auto", "cpu", "cuda")


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


def cpu_only(choices: dict) -> list[str]:
    """The knob values among `choices` (knob name -> the values a run may take) whose code runs
    on the CPU only, as "knob=value": weight quantization (the packed layouts are those of
    torch's CPU int4/int8 kernels and of our CPU extension) and the adaptive and rule KV schemes
    (their controller and token features are built on the CPU)."""
    found = {
        f"{knob}={value}"
        for knob, values in choices.items()
        for value in values
        if (knob in ("weights", "embed_weights") and value != "none")
        or (knob == "kv_scheme" and value in ("adaptive", "rule"))
    }
    return sorted(found)


def resolve_device(requested: str, choices: dict | None = None) -> str:
    """The device type `requested` (one of DEVICES) stands for on this machine, cpu or cuda, for
    a run whose knobs may take `choices` (see `cpu_only`). `auto` stays on the CPU for a run
    with CPU-only parts, so the default never turns into an error on a machine with a GPU;
    `cuda` refuses them."""
    if requested not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}; got {requested!r}")
    import torch

    has_cuda = torch.cuda.is_available()
    needs_cpu = cpu_only(choices or {})
    if requested == "auto":
        return "cuda" if has_cuda and not needs_cpu else "cpu"
    if requested == "cuda" and not has_cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UserError(f"--device cuda: torch ({build}) sees no CUDA GPU; use --device cpu")
    check_device(choices or {}, requested)
    return requested


def check_device(choices: dict, device: str) -> None:
    """Refuse CPU-only knob values (`cpu_only`) on another device."""
    needs_cpu = cpu_only(choices)
    if device != "cpu" and needs_cpu:
        raise UserError(
            f"{', '.join(needs_cpu)} runs on the CPU only; use --device cpu, or leave "
            f"{' and '.join(sorted({c.split('=')[0] for c in needs_cpu}))} at the default on "
            f"{device}"
        )


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
