"""`kvpareto controller train`: fit an adaptive KV-precision controller on calibration prompts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from kvpareto.cli import options
from kvpareto.cli.console import err, out


def controller_train(
    model: str = options.model("Model to calibrate on."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Controller file to write (.pt)."),
    samples: int = typer.Option(
        1, min=1, help="Calibration prompts per task (niah, qa, vt, niah-mk)."
    ),
    context_length: int = typer.Option(1024, min=64, help="Calibration prompt length in tokens."),
    threshold: float = typer.Option(
        0.002, min=0.0, help="Attention-output error a token's width must keep under."
    ),
    seed: int = options.seed("Seed for prompts and training."),
    threads: int | None = options.threads(),
    as_json: bool = options.as_json(),
) -> None:
    """Label tokens on calibration prompts and fit the controller MLP.

    Example: kvpareto controller train --model smollm2-135m --out my-controller.pt
    """
    import torch

    from kvpareto.evaluation.controller_training import train_controller
    from kvpareto.models import load_model

    if threads:
        torch.set_num_threads(threads)
    with err.status(f"loading {model}"):
        loaded = load_model(model, dtype=torch.bfloat16)
    with err.status("calibrating and fitting"):
        summary = train_controller(loaded, out_file, samples, context_length, threshold, seed)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"controller {summary['out']} ({summary['bytes']} bytes)")
    for col in ("prompts", "tokens", "labels 2/4/8/16", "rank agreement"):
        table.add_column(col)
    table.add_row(
        str(summary["prompts"]),
        str(summary["tokens"]),
        "/".join(str(n) for n in summary["label_counts"].values()),
        f"{summary['rank_agreement']:.3f}",
    )
    out.print(table)
