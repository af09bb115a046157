"""`kvpareto build-kernels`: compile the kernels for this CPU ahead of their first use."""

from __future__ import annotations

import typer


def build_kernels_command() -> None:
    """Build the compiled kernels (fused decode attention, decode linear) for this CPU now, not
    at their first use (`make` runs this). Exit code 1 if they cannot be built; decoding then
    reads the dequantized history and runs torch's linears.

    Example: kvpareto build-kernels
    """
    from kvpareto.kernels import build

    if build.kernel() is None:
        raise typer.Exit(1)
    typer.echo(f"kernels ({build.isa()[0]}): {build.build_dir()}")
