"""`kvpareto eval`: one configuration, from knob options and/or a --config file, on some tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from kvpareto.cli import options
from kvpareto.cli.console import err, out
from kvpareto.cli.tables import mib

if TYPE_CHECKING:
    from kvpareto.evaluation.result import TrialResult


@options.with_knob_options
def eval_command(
    model: str = options.model(),
    config_file: Path | None = typer.Option(
        None, "--config", help="YAML/JSON file of config keys."
    ),
    tasks: str = options.tasks(),
    context_lengths: str = typer.Option("1024", help="Comma-separated prompt lengths in tokens."),
    perplexity: bool = options.perplexity("Also measure held-out perplexity (a separate metric)."),
    samples: int = options.samples("Samples per task and context length."),
    seed: int = options.seed("Seed for the generated task data."),
    dtype: str = options.dtype(),
    storage_dtype: str = options.storage_dtype(),
    threads: int | None = options.threads(),
    device: str = options.device(),
    as_json: bool = options.as_json(),
    **knobs,
) -> None:
    """Evaluate one configuration.

    Example: kvpareto eval --k-bits 4 --v-bits 2 --chunk-size 256 --json
    """
    from kvpareto.config import Config

    # Everything the command line says is checked before the model loads.
    config = Config.from_dict({**options.config_file(config_file), **options.given(knobs)})
    lengths = options.csv_ints(context_lengths, "--context-lengths")
    device_type = options.device_type(device, config)
    compute, storage = options.dtypes(dtype, storage_dtype, device_type)
    task_names = options.task_names(tasks)
    if config.kv_scheme == "adaptive":  # a bad controller file fails before the model loads
        from kvpareto.kv.controller import load_controller

        load_controller(config.kv_scheme, config.controller)
    if threads:
        import torch

        torch.set_num_threads(threads)
    loaded = options.load(model, compute, storage, device_type)
    result = _run(loaded, config, task_names, lengths, samples, seed, perplexity)
    if as_json:
        facts = {**compute.to_dict(), "device": result.device}
        typer.echo(json.dumps({**result.to_dict(), **facts}, indent=2))
        return
    _print_result(result)


def _run(loaded, config, task_names, lengths, samples, seed, perplexity) -> dict:
    """run_trial under a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from kvpareto.evaluation.trial import run_trial

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        job = bar.add_task(config.label(), total=None)
        return run_trial(
            loaded,
            config,
            task_names,
            lengths,
            samples,
            seed,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
            perplexity=perplexity,
        )


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
        mem.add_row(part.removesuffix("_bytes"), mib(measured), mib(modeled))
    out.print(mem)
    prefill, decode = r.timing.prefill_tokens_per_s, r.timing.decode_ms_per_token
    nominal, effective = r.nominal_kv_bits, r.effective_kv_bits
    where = f"{r.threads} threads" if r.device == "cpu" else r.device
    out.print(
        "prefill "
        + (f"{prefill:.0f} tokens/s" if prefill else "n/a")
        + ", decode "
        + (f"{decode:.1f} ms/token" if decode else "n/a")
        + f" ({where}, compute {r.compute_dtype}, storage {r.storage_dtype})"
        + (f"; nominal KV bits {nominal:.2f}" if nominal is not None else "")
        + (f", effective {effective:.2f}" if effective else "")
    )
    if r.fidelity:
        f = r.fidelity
        out.print(
            f"fidelity to the 16-bit baseline's answers over {f.n} samples: KLD {f.kld:.3e} "
            f"[{f.kld_ci[0]:.3e}, {f.kld_ci[1]:.3e}] nats/token, answer log-prob "
            f"{f.answer_logprob:.3f} [{f.answer_logprob_ci[0]:.3f}, {f.answer_logprob_ci[1]:.3f}]"
        )
    if r.perplexity:
        ppl = r.perplexity
        out.print(
            f"perplexity {ppl.value:.3f} ({ppl.delta_vs_baseline:+.3f} vs the 16-bit "
            f"baseline {ppl.baseline:.3f}) on {ppl.tokens} tokens of {ppl.text}"
        )
