"""`kvpareto build-kernels`: compile the fused decode kernel for this CPU ahead of its first use."""

from __future__ import annotations

import typer


def build_kernels_command() -> None:
    """Build the fused decode attention kernel for this CPU now, not at its first use (`make`
    runs this). Exit code 1 if it cannot be built; decoding then reads the dequantized history.

    Example: kvpareto build-kernels
    """
    from kvpareto.kernels import fused_decode

    if fused_decode.kernel() is None:
        raise typer.Exit(1)
    typer.echo(f"fused decode kernel ({fused_decode.isa()[0]}): {fused_decode.build_dir()}")
