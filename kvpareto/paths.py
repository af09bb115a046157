"""Where kvpareto keeps what it builds once per machine: converted models, quantized weights,
compiled kernels, probe records. One root, $KVPARETO_HOME (default ~/.cache/kvpareto)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("KVPARETO_HOME", Path.home() / ".cache" / "kvpareto"))
