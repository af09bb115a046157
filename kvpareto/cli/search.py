"""`kvpareto search` and the commands that read what it wrote: `frontier` and `report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from kvpareto.cli import options
from kvpareto.cli.console import err
from kvpareto.cli.tables import print_frontier
from kvpareto.errors import UserError
from kvpareto.hardware import COMPUTE_DTYPES, STORAGE_DTYPES, dtype_choice


def search_command(
    model: list[str] = options.models(),
    space: Path = typer.Option(Path("search_spaces/default.yaml"), help="Search-space YAML."),
    baseline: list[Path] = typer.Option(
        [], help="A config file to evaluate first, beside the space's baselines; repeatable."
    ),
    tasks: str = options.tasks(),
    context_length: int = typer.Option(2048, help="Context length at which memory is compared."),
    perplexity: bool = options.perplexity(
        "Also measure held-out perplexity per trial (not an objective)."
    ),
    task_lengths: str | None = typer.Option(
        None, help="Prompt lengths for tasks (default: context)."
    ),
    samples: int = options.samples("Samples per task and length, at full fidelity."),
    min_samples: int | None = typer.Option(
        None,
        min=0,
        help="Racing's first rung: a trial first runs this many samples per task and length and "
        "stops there when a cheaper finished trial is already shown more accurate on them. "
        "Default: half of --samples, at least 2; 0 or --samples turns racing off.",
    ),
    knee_samples: int | None = typer.Option(
        None,
        min=0,
        help="After the last trial, run the knee, its frontier neighbours, the most accurate "
        "point and the baseline again with this many samples per task and length (more than "
        "--samples), so the knee's paired intervals narrow. Their first --samples are read from "
        "their own trials, not answered again. Default: 2 x --samples; 0 turns it off.",
    ),
    trials: int = typer.Option(24, help="Distinct configs the study should finish."),
    sampler: str = typer.Option("tpe", help="tpe (multivariate), nsga2, gp, grid or random."),
    seed: int = options.seed("Sampler and task-data seed."),
    budget_mb: float | None = typer.Option(None, help="Memory budget in MB (a constraint)."),
    study: str = typer.Option("default", help="Study name; re-running it resumes."),
    storage: str | None = typer.Option(
        None, help="sqlite:///FILE, journal:FILE or postgresql://..."
    ),
    workers: int = typer.Option(1, help="Local worker processes."),
    out: Path = typer.Option(Path("results"), help="Output folder."),
    objectives: str = typer.Option(
        "memory,accuracy",
        help="Two or three of memory, accuracy, kld (fidelity to the 16-bit baseline's answers) "
        "and latency, in that order, e.g. memory,kld.",
    ),
    dtype: str = options.dtype(),
    storage_dtype: str = options.storage_dtype(),
    threads: int | None = options.threads("Torch CPU threads per worker."),
    device: str = options.device(),
) -> None:
    """Search the memory/accuracy frontier of a model over a search space.

    Example: kvpareto search --model smollm2-135m --space search_spaces/default.yaml --trials 24
    """
    from kvpareto.search.space import load_space
    from kvpareto.search.study import SearchSettings

    task_names = options.task_names(tasks)
    load_space(space)  # fail fast on a bad file, before any model loads
    lengths = options.csv_ints(task_lengths, "--task-lengths") if task_lengths else []
    runs = [
        SearchSettings(
            model=m,
            space_path=str(space),
            tasks=task_names,
            context_length=context_length,
            trials=trials,
            sampler=sampler,
            seed=seed,
            budget_mb=budget_mb,
            study=study,
            storage=storage,
            workers=workers,
            out=str(out),
            objectives=[o.strip() for o in objectives.split(",")],
            samples=samples,
            min_samples=min_samples,
            knee_samples=knee_samples,
            lengths=lengths,
            dtype=dtype_choice(dtype, "--dtype", COMPUTE_DTYPES),
            storage_dtype=dtype_choice(storage_dtype, "--storage-dtype", STORAGE_DTYPES),
            threads=threads,
            device=device,
            perplexity=perplexity,
            baselines=[options.config_file(path) for path in baseline],
        )
        for m in model
    ]
    from kvpareto.search.space import load_space
    from kvpareto.search.study import Search

    for settings in runs:
        settings.validate()
        # A study resumed with other settings fails here, before any bar is drawn or model
        # loaded, and before the first of several models spends its hour (run_search checks
        # again for callers that skip the CLI).
        Search(settings, load_space(settings.space_path)).check_resumable()
    for settings in runs:
        _search_one(settings)


def _search_one(settings) -> None:
    """One model's study under a progress bar, then its frontier table and report."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from kvpareto.report import write_report
    from kvpareto.search.study import run_search

    with Progress(
        TextColumn("[bold]{task.fields[model]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("HV {task.fields[hv]:.3f}  {task.fields[last]}"),
        console=err,
    ) as bar:
        job = bar.add_task("search", total=None, model=settings.model, hv=0.0, last="")

        def progress(done, total, summary, label):
            bar.update(
                job, completed=done, total=total, hv=summary["hypervolume"], last=label or ""
            )

        summary = run_search(settings, sys.argv, progress=progress)
    print_frontier(settings.model, summary)
    page = write_report([settings.study_dir()], settings.study_dir() / "report.html")
    typer.echo(f"results: {settings.study_dir()}")
    typer.echo(f"report: {page}")


def frontier_command(
    folder: Path = typer.Argument(..., help="A study folder: results/<model>/<study>."),
    compare_grid: Path | None = typer.Option(None, help="A grid study folder of the same model."),
    as_json: bool = options.as_json("Print frontier.json."),
) -> None:
    """Print a study's frontier table. Example: kvpareto frontier results/smollm2-135m/default"""
    summary = _read_frontier(folder)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_frontier(folder.parent.name, summary)
    if compare_grid is not None:
        from kvpareto.search.compare import compare_to_grid

        result = compare_to_grid(folder, compare_grid)
        typer.echo(
            f"sampler reached {result['fraction']:.1%} of the grid's hypervolume "
            f"({result['grid_hypervolume']:.4f} over {result['grid_trials']} configs)"
            + (
                f"; 95% of it after {result['trials_to_95']} trials"
                if result["trials_to_95"] is not None
                else "; never 95% of it"
            )
        )


def report_command(
    folders: list[Path] = typer.Argument(..., help="Study folders: results/<model>/<study> ..."),
    output: Path = typer.Option(Path("results/report.html"), "--output", "-o", help="HTML file."),
) -> None:
    """Write one self-contained HTML report (plotly.js embedded, works offline).

    Example: kvpareto report results/smollm2-135m/default -o report.html
    """
    for folder in folders:
        if not (folder / "frontier.json").is_file():
            raise UserError(f"{folder} has no frontier.json; run kvpareto search first")
    from kvpareto.report import write_report

    path = write_report(folders, output)
    typer.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _read_frontier(folder: Path) -> dict:
    path = folder / "frontier.json"
    if not path.is_file():
        raise UserError(f"{folder} has no frontier.json; run kvpareto search first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON") from None
