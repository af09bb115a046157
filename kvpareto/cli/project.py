"""`kvpareto project`: a study's frontier at another context length, batch or budget."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from kvpareto.cli import options
from kvpareto.cli.console import err, out
from kvpareto.errors import UserError


def project_command(
    folder: Path = typer.Argument(..., help="A study folder: results/<model>/<study>."),
    context_length: int = typer.Option(..., min=1, help="The context length to project to."),
    batch: int = typer.Option(1, min=1, help="Sequences held at once."),
    budget_mb: float | None = typer.Option(
        None, help="Memory budget in MB (default: the study's own)."
    ),
    verify: int = typer.Option(
        0, min=0, help="Measure the K most accurate projected points at the new length."
    ),
    verify_samples: int | None = typer.Option(
        None,
        min=1,
        help="Samples per task for --verify (default: the study's). Long prompts are slow: "
        "a 16k prompt on a 0.5B model takes minutes on 2 CPU cores.",
    ),
    as_json: bool = options.as_json("Print the projection as JSON."),
) -> None:
    """Re-rank a study's configs by memory modeled at another context length or batch.

    Example: kvpareto project results/smollm2-135m/default --context-length 16384 --verify 3
    """
    import torch

    from kvpareto.memory.projection import modeled_memory, shell_model
    from kvpareto.models import load_config
    from kvpareto.project import most_accurate, project
    from kvpareto.search.outputs import read_study
    from kvpareto.search.study import check_fits

    if budget_mb is not None and not budget_mb > 0:
        raise UserError(f"--budget-mb must be a positive number of MB; got {budget_mb}")
    if verify and batch != 1:
        raise UserError("--verify measures one sequence: drop --batch or --verify")
    study = read_study(folder)
    model_config, limit = load_config(study.model)
    check_fits(study.model, context_length, limit)
    shell = shell_model(model_config)
    facts = study.facts
    compute, storage = (
        getattr(torch, facts["compute_dtype"]),
        getattr(torch, facts["storage_dtype"]),
    )
    threads = facts["hardware"]["threads"]  # the activation model's SDPA scratch is per thread
    # Whether the study's machine packed K/V in SDPA; studies from before it was recorded were
    # modeled without packing.
    packs = facts["hardware"].get("sdpa_packs", False)

    def memory_at(config, weights_bytes: int) -> dict:
        parts = modeled_memory(
            shell, config, context_length, weights_bytes, compute, storage, threads, batch, packs
        )
        return parts.to_dict()

    projection = project(study, context_length, batch, budget_mb, memory_at)
    samples = verify_samples or study.facts["samples"]
    checked = [
        _verify(study, entry, context_length, samples)
        for entry in most_accurate(projection, verify)
    ]
    if as_json:
        payload = {
            "context_length": projection.length,
            "batch": projection.batch,
            "accuracy_measured_at": projection.searched_length,
            "budget_mb": projection.budget_mb,
            "memory": projection.memory,
            **projection.summary,
            "verified": checked,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    _print(study.model, projection, checked)


def _verify(study, entry: dict, length: int, samples: int) -> dict:
    """One projected point run through `eval`'s path at `length`: measured memory and accuracy."""
    from kvpareto.config import Config
    from kvpareto.evaluation.trial import run_trial
    from kvpareto.hardware import resolve_compute_dtype

    facts = study.facts
    compute = resolve_compute_dtype(facts["compute_dtype"])
    loaded = options.load(study.model, compute, facts["storage_dtype"])
    with err.status(f"verifying {entry['label']} at {length} tokens"):
        result = run_trial(
            loaded,
            Config.from_dict(entry["config"]),
            facts["tasks"],
            [length],
            samples,
            facts["seed"],
            memory_length=length,
        )
    return {
        "label": entry["label"],
        "projected_total_bytes": entry["total_bytes"],
        "measured": result.memory.measured.to_dict(),
        "modeled": result.memory.modeled.to_dict(),
        "accuracy": result.accuracy,
        "accuracy_ci": list(result.accuracy_ci),
        "n": result.n,
    }


def _print(model: str, projection, checked: list[dict]) -> None:
    summary, source = projection.summary, projection.memory
    budget = f", budget {projection.budget_mb:g} MB" if projection.budget_mb else ""
    table = Table(
        title=f"{model}: frontier projected to {projection.length} tokens, batch "
        f"{projection.batch}{budget}",
        caption=f"accuracy measured at {projection.searched_length} tokens; memory {source}"
        + (
            " (closed form: weights, KV at this length, activation peak"
            + (" x batch, an upper bound" if projection.batch > 1 else "")
            + ")"
            if source == "modeled"
            else " by the study"
        )
        + "; K = knee; ~ = CI overlaps a cheaper point",
    )
    for col in ("", "config", "MB", "memory", "vs base", "acc", "95% CI", "Δ acc"):
        table.add_column(col, no_wrap=True)
    for e in summary["frontier"]:
        lo, hi = e["accuracy_ci"]
        delta = e["delta_accuracy"]
        table.add_row(
            ("K" if e["knee"] else "") + ("~" if e["indistinguishable"] else ""),
            e["label"],
            f"{e['total_bytes'] / 1e6:.1f}",
            e["memory_source"],
            f"{-e['memory_reduction']:+.1%}",
            f"{e['accuracy']:.3f}",
            f"[{lo:.2f}, {hi:.2f}]",
            "" if delta is None else f"{delta:+.3f}",
        )
    out.print(table)
    base = summary.get("baseline")
    if base:
        out.print(
            f"baseline {base['label']}: {base['total_bytes'] / 1e6:.1f} MB ({source}), "
            f"accuracy {base['accuracy']:.3f}"
        )
    if checked:
        _print_checked(projection, checked)


def _print_checked(projection, checked: list[dict]) -> None:
    searched, length = projection.searched_length, projection.length
    table = Table(title=f"verified: measured at {length} tokens, batch 1")
    columns = ("config", "projected MB", "measured MB", f"acc at {searched}", f"acc at {length}")
    for col in columns + ("95% CI", "n"):
        table.add_column(col, no_wrap=True)
    accuracy = {e["label"]: e["accuracy"] for e in projection.summary["frontier"]}
    for c in checked:
        lo, hi = c["accuracy_ci"]
        table.add_row(
            c["label"],
            f"{c['projected_total_bytes'] / 1e6:.2f}",
            f"{c['measured']['total_bytes'] / 1e6:.2f}",
            f"{accuracy[c['label']]:.3f}",
            f"{c['accuracy']:.3f}",
            f"[{lo:.2f}, {hi:.2f}]",
            str(c["n"]),
        )
    out.print(table)
