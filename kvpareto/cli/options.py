"""Options that several commands share, declared once, and the option of every knob.

Each shared option is a function that returns its `typer.Option`: its flag, default and type
are fixed here, and a command may word its help for what the option means to it. The knob
options of `eval` are generated from kvpareto/knobs.py (`with_knob_options`), so a new knob is
an `eval` option without an edit here. The helpers below turn option values into what the
commands need (parsed lengths, resolved dtypes, a loaded model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import typer

from kvpareto.cli.console import err
from kvpareto.errors import UserError
from kvpareto.hardware import (
    COMPUTE_DTYPES,
    STORAGE_DTYPES,
    dtype_choice,
    resolve_compute_dtype,
    resolve_device,
)
from kvpareto.knobs import KNOBS

# The catalog's default model, restated: importing kvpareto.models loads torch (seconds), and
# --help must stay instant. tests/test_models.py checks the two agree.
DEFAULT_MODEL = "smollm2-135m"
_DTYPE_HELP = (
    "Compute dtype: auto (bfloat16 on CUDA or a CPU with native bf16, else float32), "
    "bfloat16, float32 or float16. Changes speed and activations, not weight or KV bytes."
)
_STORAGE_HELP = (
    "Dtype the float weights and full-precision KV are held in, which memory figures count: "
    "bfloat16, float16 or float32."
)
_DEVICE_HELP = (
    "Where weights, KV cache and compute live: auto (cuda where torch sees a GPU, else cpu), "
    "cpu or cuda. Weight quantization and the compiled kernels run on the CPU only."
)
_TASKS_HELP = "Comma-separated task names; lm-eval:NAME runs an lm-eval task."


def model(help: str = "Catalog name, .gguf path, HF folder or hub id."):
    return typer.Option(DEFAULT_MODEL, "--model", "-m", help=help)


def models(help: str = "Model(s); repeat the flag."):
    return typer.Option([DEFAULT_MODEL], "--model", "-m", help=help)


def dtype():
    return typer.Option("auto", help=_DTYPE_HELP)


def storage_dtype():
    return typer.Option("bfloat16", help=_STORAGE_HELP)


def device():
    return typer.Option("auto", help=_DEVICE_HELP)


def threads(help: str = "Torch CPU threads (default: all cores)."):
    return typer.Option(None, min=1, help=help)


def as_json(help: str = "Print one JSON object."):
    return typer.Option(False, "--json", help=help)


def tasks():
    return typer.Option("niah", help=_TASKS_HELP)


def samples(help: str):
    return typer.Option(5, min=1, help=help)


def seed(help: str):
    return typer.Option(0, help=help)


def perplexity(help: str):
    return typer.Option(False, "--perplexity", help=help)


# --- from option values to what commands use -----------------------------------------------------


def csv_ints(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers (--context-lengths 1024,2048)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{flag} takes comma-separated integers, e.g. 1024,2048; got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag} needs at least one positive integer; got {text!r}")
    return values


def task_names(text: str) -> list[str]:
    """--tasks as names, each one checked before any model loads."""
    from kvpareto.evaluation import get_task

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        get_task(name)
    return names


def dtypes(compute: str, storage: str, device: str = "cpu"):
    """(resolved compute dtype, storage dtype name) from --dtype and --storage-dtype, for a
    resolved device (`auto` picks bf16 on CUDA)."""
    choice = dtype_choice(compute, "--dtype", COMPUTE_DTYPES)
    resolved = resolve_compute_dtype(choice, device)
    return resolved, dtype_choice(storage, "--storage-dtype", STORAGE_DTYPES)


def device_type(requested: str, config=None) -> str:
    """--device resolved on this machine (cpu or cuda) for a run of `config` (a Config, or None
    for one that sets no knob): `auto` keeps CPU-only knob values on the CPU, and `cuda`
    refuses them (`hardware.resolve_device`)."""
    choices = {} if config is None else {k: [v] for k, v in config.to_dict().items()}
    return resolve_device(requested, choices)


def load(name: str, compute, storage: str, device: str = "cpu"):
    """The model of --model in the compute and storage dtypes on `device`, with a status line
    meanwhile."""
    import torch

    from kvpareto.models import load_model

    with err.status(f"loading {name}" + (f" onto {device}" if device != "cpu" else "")):
        return load_model(
            name,
            dtype=getattr(torch, compute.name),
            storage_dtype=getattr(torch, storage),
            device=device,
        )


def config_file(path: Path | None) -> dict:
    """The config keys of a YAML or JSON file (`eval --config`, `search --baseline`); a
    `config:` section is read where there is one."""
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


# --- the knob options ----------------------------------------------------------------------------


def with_knob_options(command: Callable) -> Callable:
    """Give `command` one option per knob (--k-bits, --symmetric/--asymmetric, ...), after its
    first option, in table order. It receives them in `**knobs`, None where not given."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    own = [p.replace(kind=p.KEYWORD_ONLY) for p in own if p.kind is not p.VAR_KEYWORD]
    generated = [
        inspect.Parameter(
            knob.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=knob.type | None,
            default=typer.Option(None, knob.option, help=knob.help),
        )
        for knob in KNOBS
    ]
    command.__signature__ = inspect.signature(command).replace(
        parameters=own[:1] + generated + own[1:]
    )
    return command


def given(knobs: dict) -> dict:
    """The knob options that were given on the command line."""
    return {name: value for name, value in knobs.items() if value is not None}
