"""`kvpareto export`: one frontier point written for llama.cpp, transformers or kvpareto itself."""

from __future__ import annotations

from pathlib import Path

import typer

from kvpareto.cli.console import err


def export_command(
    folder: Path = typer.Argument(..., help="A study folder: results/<model>/<study>."),
    point: str = typer.Option("knee", help="knee, or a config label from the frontier table."),
    fmt: str = typer.Option("json", "--format", help="json, llama.cpp or transformers."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to FILE, not stdout."),
) -> None:
    """Export a frontier point: kvpareto's own config (json), llama.cpp flags or a transformers
    snippet, with what differs from the measured config.

    Example: kvpareto export results/smollm2-135m/default --point knee --format llama.cpp
    """
    from kvpareto.export import export_point

    text = export_point(folder, point, fmt)
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text)
    err.print(f"wrote {output}", highlight=False)
