"""Tables more than one command prints: a study's frontier (`search`, `frontier`), and MiB."""

from __future__ import annotations

from rich.table import Table

from kvpareto.cli.console import out


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_frontier(model: str, summary: dict) -> None:
    from kvpareto.search.outputs import GRID_NOTE

    base = summary.get("baseline")
    source = summary.get("source_precision")
    rebuilt = any(e.get("reproduces_source_grid") for e in summary["frontier"])
    table = Table(
        title=f"{model}: Pareto frontier ({summary['complete']} complete, "
        f"{summary['failed']} failed, {summary['infeasible']} over budget"
        + (f", {summary['raced_out']} raced out" if summary.get("raced_out") else "")
        + ")"
        + (f"\nsource precision: {source}" if source else ""),
        caption=f"hypervolume {summary['hypervolume']:.4f} (reference: 1.1 x baseline memory, "
        "accuracy 0); Δ acc and its CI are paired with the baseline on the same samples, p is "
        "McNemar's exact test; KLD from the baseline's next-token distributions (nats/token); "
        "K = knee; ~ = the paired test cannot tell it from a cheaper frontier point"
        + (f"; G = {GRID_NOTE}" if rebuilt else ""),
    )
    table.add_column("")
    table.add_column("config", no_wrap=True)
    with_ppl = any(e.get("perplexity") is not None for e in summary["frontier"])
    columns = ("MB", "vs base", "acc", "95% CI", "Δ acc", "paired 95% CI", "p", "KLD")
    for col in columns + (("Δ ppl",) if with_ppl else ()):
        table.add_column(col, no_wrap=True)
    for e in summary["frontier"]:
        mark = (
            ("K" if e["knee"] else "")
            + ("~" if e["indistinguishable"] else "")
            + ("G" if e.get("reproduces_source_grid") else "")
        )
        lo, hi = e["accuracy_ci"]
        delta_ci, p, kld = e.get("delta_accuracy_ci"), e.get("mcnemar_p"), e.get("kld")
        table.add_row(
            mark,
            e["label"],
            f"{e['total_bytes'] / 1e6:.1f}",
            f"-{e['memory_reduction']:.1%}"
            if e["memory_reduction"] >= 0
            else f"+{-e['memory_reduction']:.1%}",
            f"{e['accuracy']:.3f}",
            f"[{lo:.2f}, {hi:.2f}]",
            _delta(e["delta_accuracy"]),
            "" if delta_ci is None else f"[{delta_ci[0]:+.2f}, {delta_ci[1]:+.2f}]",
            "" if p is None else f"{p:.3g}",
            "" if kld is None else f"{kld:.2e}",
            *([_delta(e.get("delta_perplexity"))] if with_ppl else []),
        )
    out.print(table)
    if base:
        out.print(
            f"baseline {base['label']}: {base['total_bytes'] / 1e6:.1f} MB, "
            f"accuracy {base['accuracy']:.3f}"
        )


def _delta(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"
