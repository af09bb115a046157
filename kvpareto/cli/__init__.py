"""The `kvpareto` command line: parse, call, print. No math lives here.

Each command lives in a module of its own (search, frontier and report share one) and is
registered here, in the order `kvpareto --help` lists them. Options that several commands share,
and the `eval` option of every knob, come from `cli/options.py`.
Every `UserError` becomes one line on stderr and exit code 2; `--json` output goes to stdout
alone so that machines can read it.
"""

from __future__ import annotations

import os
import sys

import typer

from kvpareto.cli import (
    bench,
    build_kernels,
    controller,
    evaluate,
    export,
    lm_eval,
    models,
    project,
    search,
)
from kvpareto.cli.console import err
from kvpareto.errors import UserError

try:  # typer >= 0.26 vendors its own click; older releases use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

app = typer.Typer(
    help="Find the memory/accuracy Pareto frontier of KV-cache and weight settings.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("eval")(evaluate.eval_command)
app.command("bench")(bench.bench_command)
app.command("search")(search.search_command)
app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)(lm_eval.lm_eval_command)
app.command("build-kernels")(build_kernels.build_kernels_command)
app.command("frontier")(search.frontier_command)
app.command("report")(search.report_command)
app.command("export")(export.export_command)
app.command("project")(project.project_command)

models_app = typer.Typer(help="List, inspect and install models.", invoke_without_command=True)
models_app.callback()(models.models_list)
models_app.command("pull")(models.models_pull)
app.add_typer(models_app, name="models")

controller_app = typer.Typer(help="Train adaptive KV-precision controllers (--kv-scheme adaptive).")
controller_app.command("train")(controller.controller_train)
app.add_typer(controller_app, name="controller")


def main() -> None:
    _offline()
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


def _offline() -> None:
    """kvpareto never reaches a model or data hub at run time. Set once here, at the entry,
    before any command imports transformers, datasets or huggingface_hub (they read these at
    import): a download then fails at once instead of retrying. An explicit setting wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _fail(message: str, code: int) -> None:
    err.print(f"error: {message}", highlight=False, soft_wrap=True, markup=False)
    sys.exit(code)
