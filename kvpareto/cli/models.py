"""`kvpareto models`: list the catalog, and `models pull` to install one."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from kvpareto.cli import options
from kvpareto.cli.console import err, out


def models_list(
    ctx: typer.Context,
    as_json: bool = options.as_json("Print a JSON list instead of a table."),
) -> None:
    """List the built-in models. Example: kvpareto models --json"""
    if ctx.invoked_subcommand is not None:
        return
    from kvpareto.models import CATALOG, DEFAULT_MODEL, is_installed

    rows = [{**spec.summary(), "installed": is_installed(spec)} for spec in CATALOG.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="kvpareto models", caption="* default model")
    table.add_column("name", no_wrap=True)
    for col in ("arch", "params", "layers", "heads/kv", "head_dim", "context", "installed"):
        table.add_column(col)
    for r in rows:
        name = r["name"] + ("*" if r["name"] == DEFAULT_MODEL else "")
        name += " (opt-in)" if r["opt_in"] else ""
        table.add_row(
            name,
            r["arch"],
            f"{r['params'] / 1e6:.1f}M",
            str(r["layers"]),
            f"{r['heads']}/{r['kv_heads']}",
            str(r["head_dim"]),
            str(r["max_context"]),
            "yes" if r["installed"] else "no",
        )
    out.print(table)


def models_pull(name: str = typer.Argument(..., help="A catalog name, e.g. smollm2-135m.")) -> None:
    """Install, verify (sha256) and convert a catalog model.

    Example: kvpareto models pull gemma3-270m
    """
    from kvpareto.models import pull

    with err.status(f"pulling {name} (install, verify sha256, convert; first time only)"):
        path = pull(name)
    typer.echo(f"{name}: ready at {path}")
