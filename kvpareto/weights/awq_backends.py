"""Which AWQ implementations can run in this environment (kept free of torch for space loading).

`native` is kvpareto's own (`awq.py`). The two external packages are named by the design card and
the issue, but neither can run beside transformers 5.23 here; asking for one fails in one line
that says why and what to use instead.
"""

from __future__ import annotations

from kvpareto.errors import UserError


def check_backend(backend: str) -> None:
    """Fail in one line where an external AWQ backend cannot run in this environment."""
    if backend == "llmcompressor":
        raise UserError(
            "awq_backend llmcompressor cannot run here: llm-compressor pins transformers <= 5.17 "
            "and kvpareto needs >= 5.3 with its 5.23 Cache API; use awq_backend native"
        )
    if backend == "autoawq":
        raise UserError(
            "awq_backend autoawq cannot run here: AutoAWQ 0.2.9 is deprecated and yields a broken "
            "model on torch 2.13 + transformers 5 (see docs/findings.md); use awq_backend native"
        )
