"""The per-machine record of measured kernel choices ($KVPARETO_HOME/kernels.json).

Which path runs fastest (a packed weight kernel or dequantize + GEMM, the compiled decode linear
or torch's) depends on the CPU, the torch build and the thread count, so it is measured once per
machine by a short probe and kept here; later processes read it back.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable

import torch

_FORMAT = 2  # bump when a probe changes: it enters the machine's key, so every choice re-probes


def measured(key: str, probe: Callable[[], dict]) -> dict:
    """This machine's recorded result for `key`, or `probe()`'s, recorded now."""
    result = _read_record().get(key)
    if result is None:
        result = probe()
        record = _read_record()  # re-read: another process may have probed meanwhile
        record[key] = result
        _write_record(record)
    return result


def record_file():
    from kvpareto.paths import cache_root

    return cache_root() / "kernels.json"


def _machine() -> str:
    """What the choices depend on: torch build, dispatched ISA, threads and the CPU model."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{_FORMAT}|{torch.__version__}|{isa}|{torch.get_num_threads()}t|{cpu}"


def _read_record() -> dict:
    try:
        return json.loads(record_file().read_text()).get(_machine(), {})
    except (OSError, ValueError):
        return {}


def _write_record(record: dict) -> None:
    """Merge this machine's entries into the file, atomically (a rename); a write that fails
    only costs a re-probe in the next process."""
    path = record_file()
    try:
        everything = json.loads(path.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[_machine()] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-")
        with os.fdopen(fd, "w") as f:
            json.dump(everything, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
