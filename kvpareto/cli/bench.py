"""`kvpareto bench`: speed, memory and accuracy as ratios against baselines of the same run."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from kvpareto.cli import options
from kvpareto.cli.console import err, out
from kvpareto.cli.tables import mib
from kvpareto.errors import UserError
from kvpareto.hardware import cpu_flag_summary

PARTS = ("kv", "weights", "prune", "reuse", "dtype", "samplers", "peers")
MODEL_PARTS = set(PARTS) - {"samplers"}  # samplers replay stored tables: no model is loaded
GPU_PARTS = {"kv", "samplers"}  # the others quantize weights or time CPU kernels


def bench_command(
    model: str = options.model("Model to benchmark."),
    context_lengths: str = typer.Option(
        "1024,4096,8192",
        help="Comma-separated context lengths (the decode targets are read at 4096 and 8192).",
    ),
    steps: int = typer.Option(16, min=1, help="Decode steps per timed run."),
    repeats: int = typer.Option(3, min=1, help="Timed runs per figure (the median is kept)."),
    threads: int | None = options.threads(),
    device: str = typer.Option(
        "cpu",
        help="cpu (the default: the bench measures this CPU's kernels), cuda or auto. On cuda "
        "only the kv part runs (weight quantization and the compiled kernels are CPU code).",
    ),
    dtype: str = options.dtype(),
    storage_dtype: str = options.storage_dtype(),
    parts: str = typer.Option(
        "kv,weights,prune,reuse,dtype",
        help="Which benchmarks: kv, weights, prune, reuse, dtype, samplers, peers "
        "(llama.cpp on the same GGUF; `make bench-peers` installs it).",
    ),
    prune_samples: int = typer.Option(10, min=1, help="NIAH prompts per prune rate."),
    grids: str = typer.Option(
        "benchmarks/samplers",
        "--grids",
        help="samplers: a grid table (.json) or a folder of them to replay the samplers against.",
    ),
    replay_seeds: int = typer.Option(20, min=1, help="samplers: replayed runs per sampler."),
    replay_samplers: str = typer.Option(
        "nsga2,tpe,gp,random", help="samplers: which samplers to replay (gp is the slowest)."
    ),
    as_json: bool = options.as_json(),
) -> None:
    """Measure speed, memory and accuracy as ratios against baselines measured in the same run.

    Example: kvpareto bench --model smollm2-135m --threads 2
    """
    import torch

    lengths = options.csv_ints(context_lengths, "--context-lengths")
    chosen = {p.strip() for p in parts.split(",") if p.strip()}
    if not chosen or chosen - set(PARTS):
        raise UserError(
            f"--parts takes a comma-separated subset of {', '.join(sorted(PARTS))}; got {parts!r}"
        )
    device_type = options.device_type(device)
    if device_type != "cpu" and chosen - GPU_PARTS:
        raise UserError(
            f"--device {device_type} runs --parts {','.join(sorted(GPU_PARTS))} only; got {parts!r}"
        )
    compute, storage = options.dtypes(dtype, storage_dtype, device_type)
    if "peers" in chosen:
        from kvpareto import peers

        peers.require()  # before a model is loaded
    if threads:
        torch.set_num_threads(threads)
    rows: dict = {}
    if chosen & MODEL_PARTS:
        loaded = options.load(model, compute, storage, device_type)
        rows = _measure(loaded, model, chosen, lengths, steps, repeats, prune_samples, storage)
        rows.update(compute.to_dict(), storage_dtype=storage, device=_device_name(device_type))
    if "samplers" in chosen:
        rows["samplers"] = _replay_samplers(grids, replay_samplers, replay_seeds)
    rows["cpu_flags"] = cpu_flag_summary()
    from kvpareto.bench import targets

    rows["targets"] = targets(rows)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if "weights" in rows:
        _print_weights(rows["weights"], min(lengths))
    if "prune" in rows:
        _print_prune(rows["prune"], min(lengths))
    if "decode" in rows:
        _print_kv_bench(rows, compute, storage)
    if "samplers" in rows:
        _print_samplers(rows["samplers"])
    if "peers" in rows:
        _print_peers(rows["peers"], rows["cpu_flags"])
    if rows["targets"]:
        _print_targets(rows)


def _device_name(device: str) -> str:
    """What ran the figures: "cpu", or the GPU's name (the note must name it)."""
    import torch

    return f"cuda: {torch.cuda.get_device_name()}" if device == "cuda" else device


def _replay_samplers(grids: str, names: str, seeds: int) -> list[dict]:
    """The named samplers replayed `seeds` times against each stored grid table."""
    from pathlib import Path

    from kvpareto.search.replay import load_table, sampler_table
    from kvpareto.search.samplers import SAMPLERS

    path = Path(grids)
    paths = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not paths or not paths[0].is_file():
        raise UserError(f"--grids {grids}: no grid table (.json) there")
    samplers = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in samplers if n not in SAMPLERS or n == "grid"]
    if not samplers or unknown:
        choices = ", ".join(n for n in SAMPLERS.names() if n != "grid")
        raise UserError(f"--replay-samplers takes a subset of {choices}; got {names!r}")
    from rich.progress import Progress

    rows = []
    with Progress(console=err, transient=True) as bar:
        for table in map(load_table, paths):
            task = bar.add_task(f"replaying on {table.name}", total=len(samplers) * seeds)
            tick = lambda name, seed, task=task: bar.update(task, advance=1, description=name)  # noqa: E731
            rows += sampler_table(table, samplers, seeds, progress=tick)
    return rows


def _print_samplers(rows: list[dict]) -> None:
    table = Table(
        title="samplers replayed on stored grids: hypervolume ÷ the grid's, median [IQR]",
        caption="budget = distinct configs evaluated, as a share of the grid's configs",
    )
    fractions = sorted({r["fraction"] for r in rows})
    for col in ("grid", "sampler", *(f"{f:.0%} of grid" for f in fractions)):
        table.add_column(col)
    for grid, sampler in dict.fromkeys((r["grid"], r["sampler"]) for r in rows):
        cells = {r["fraction"]: r for r in rows if (r["grid"], r["sampler"]) == (grid, sampler)}
        table.add_row(
            grid,
            sampler,
            *(
                f"{c['median']:.3f} [{c['q1']:.3f}, {c['q3']:.3f}] ({c['trials']})"
                for c in (cells[f] for f in fractions)
            ),
        )
    out.print(table)


def _measure(loaded, model, chosen, lengths, steps, repeats, prune_samples, storage) -> dict:
    """The chosen parts, each against its own baseline measured here."""
    import torch

    from kvpareto.bench import (
        dtype_bench,
        peer_bench,
        prune_bench,
        reuse_bench,
        run_bench,
        weight_bench,
    )

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
    if "peers" in chosen:
        rows["peers"] = peer_bench(loaded, model, lengths, steps, repeats, log=log)
    rows["model"], rows["threads"] = loaded.spec.name, torch.get_num_threads()
    return rows


def _print_weights(rows: list[dict], length: int) -> None:
    table = Table(title=f"weights (16-bit KV, decode at {length} tokens)")
    cols = ("weights", "quantize s", "MiB", "÷ none", "decode tok/s", "÷ none ", "kernel")
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["weights"],
            f"{r['quantize_s']:.1f}" if r["quantize_s"] is not None else "",
            mib(r["weights_bytes"]),
            f"{r['bytes_vs_none']:.2f}x",
            f"{r['tokens_per_s']:.1f}",
            f"{r['vs_none']:.2f}x",
            r["kernel"],
        )
    out.print(table)


def _print_prune(rows: list[dict], length: int) -> None:
    table = Table(title=f"KV pruning (snapkv, k4v4, NIAH at {length} tokens)")
    for col in ("prune rate", "accuracy", "95% CI", "KV MiB", "÷ unpruned"):
        table.add_column(col)
    for r in rows:
        lo, hi = r["accuracy_ci"]
        table.add_row(
            f"{r['prune_rate']:.2f}",
            f"{r['accuracy']:.2f}",
            f"[{lo:.2f}, {hi:.2f}]",
            mib(r["kv_bytes"]),
            f"{r['kv_vs_unpruned']:.2f}x",
        )
    out.print(table)


def _where(rows: dict) -> str:
    device = rows.get("device", "cpu")
    return f"{rows['threads']} threads" if device == "cpu" else device


def _print_kv_bench(rows: dict, compute, storage: str) -> None:
    decode = Table(
        title=f"decode tokens/s, {_where(rows)}, compute {compute.name} "
        f"({compute.reason}), storage {storage}"
    )
    cols = ("context", "KV bits", "path", "ours tok/s", "÷ DynamicCache", "÷ quanto-4")
    for col in (*cols, "÷ before kernels"):
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
            mib(a["activation_peak_bytes"]),
        )
    out.print(pre)


def _print_peers(peers: dict, cpu_flags: str) -> None:
    table = Table(
        title=f"decode tokens/s beside llama.cpp on {peers['gguf']}, {peers['threads']} threads "
        f"(CPU flags: {cpu_flags})",
        caption=f"llama.cpp built with: {peers['llama_build']}",
    )
    cols = ("context", "KV", "llama.cpp (GGUF weights)", "ours, float weights", "ours, int4 g32")
    for col in (*cols, "ours int4 ÷ llama.cpp"):
        table.add_column(col)
    for r in peers["rows"]:
        table.add_row(
            str(r["context"]),
            f"{r['kv_bits']}-bit / {r['llama_kv']}",
            f"{r['llama_tokens_per_s']:.1f}",
            f"{r['ours_float_tokens_per_s']:.1f}",
            f"{r['ours_int4_tokens_per_s']:.1f}",
            f"{r['ours_int4_vs_llama']:.2f}x",
        )
    out.print(table)


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
