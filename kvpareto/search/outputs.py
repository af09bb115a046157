"""What a study leaves on disk under `results/<model>/<study>/`, and the frontier summary.

- `trials.parquet` and `trials.csv`: one row per trial (config columns, accuracy and CI, its
  difference from the 16-bit baseline paired on the same samples with its CI and McNemar p,
  the fidelity scores (KLD, answer log-probability) with their CIs, memory parts measured and
  modeled, timing, held-out perplexity and its change from the baseline when measured, status,
  error, whether it came from the trial cache, and racing's columns (`search.racing`): samples run
  per task and length, the trial that raced it out and their paired difference, the trial a knee
  top-up gives more samples to);
- `frontier.json`: the Pareto-optimal feasible trials run to full fidelity (never one raced out;
  a config's run with the most samples), cheapest first, with the baseline, the knee,
  the "indistinguishable" marks (both from the paired test, `search.frontier`) and the
  hypervolume;
- `study.json` (gathered by `study.study_facts`): the command, versions, seed, space hash,
  hardware, the model's source precision, and the compute dtype (as asked, as resolved on this
  machine, and why) beside the storage dtype.

`read_study` reads a finished folder back (for `export` and `project`), torch-free.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from kvpareto.errors import UserError
from kvpareto.search.frontier import Point, hypervolume, indistinguishable, knee, pareto_front
from kvpareto.search.paired import outcomes, versus

# A FAIL trial with no recorded error: its worker died mid-trial (`study.Search.prepare`).
INTERRUPTED = "interrupted: its worker stopped mid-trial"
# What a weight config that rebuilds its source grid (`weights.source_grid`) is flagged with.
GRID_NOTE = "reproduces the source grid; its accuracy cost is not a 16→4-bit cost"


def is_baseline(row: dict) -> bool:
    """The unquantized run (16-bit weights and cache, no pruning, unchunked) every study starts
    with; matched by config key, since a label prefix would also match pruned 16-bit runs."""
    from kvpareto.config import Config

    return row.get("config_key") == Config().key()


def trial_rows(study) -> list[dict]:
    """One row per trial, from what the study keeps on it: failed trials have no figures."""
    from kvpareto.evaluation.result import PARTS, TrialFigures

    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        figures = TrialFigures.from_user_attrs(a)
        config = a.get("config") or a.get("fixed_config") or {}
        ppl = figures.perplexity
        row = {
            "trial": t.number,
            "state": t.state.name,
            "label": a.get("label"),
            "config_key": None,
            **{
                f"cfg_{k}": (json.dumps(v) if isinstance(v, dict) else v) for k, v in config.items()
            },
            "accuracy": figures.accuracy,
            "accuracy_lo": figures.accuracy_ci[0],
            "accuracy_hi": figures.accuracy_ci[1],
            # Paired with the baseline's outcomes on the same samples (`_against_baseline`).
            "delta_accuracy": None,
            "delta_accuracy_lo": None,
            "delta_accuracy_hi": None,
            "mcnemar_p": None,
            "feasible": all(v <= 0 for v in t.constraints.values())
            if t.state.name == "COMPLETE"
            else None,
            "cached": a.get("cached"),
            # Racing (`search.racing`): samples run per task and length; a trial raced out at
            # its first rung names the cheaper trial that beat it, and their paired difference.
            "samples_run": a.get("samples_run"),
            "raced_out_by": a.get("raced_out_by"),
            "race_delta": a.get("race_delta"),
            "race_delta_lo": (a.get("race_delta_ci") or (None, None))[0],
            "race_delta_hi": (a.get("race_delta_ci") or (None, None))[1],
            # The knee's top-up: the trial it gives more samples to, and how many outcomes it
            # read from that trial's record instead of answering them again.
            "top_up_of": a.get("top_up_of"),
            "samples_reused": a.get("samples_reused"),
            # A config the study already ran, proposed again: its first trial (`--trials` does
            # not count it; the cache answered it).
            "repeat_of": a.get("repeat_of"),
            # The weight config rebuilds the grid the model was stored on upstream.
            "reproduces_source_grid": a.get("reproduces_source_grid"),
            # every failure the objective catches records its error; one without was cut short
            "error": a.get("error") or (INTERRUPTED if t.state.name == "FAIL" else None),
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "prefill_tokens_per_s": figures.prefill_tokens_per_s,
            "decode_ms_per_token": figures.decode_ms_per_token,
            # Realized mean KV code bits (token-weighted; the point of kv_scheme adaptive/rule).
            "mean_bits": figures.mean_bits,
            # What a cached value costs: KV bytes x 8 / values stored, scales and tail included.
            "effective_kv_bits": figures.effective_kv_bits,
            # Held-out perplexity, when the study measures it: a metric beside accuracy.
            "perplexity": ppl.value if ppl else None,
            "delta_perplexity": ppl.delta_vs_baseline if ppl else None,
            # Fidelity to the baseline's answers (`kvpareto.fidelity`), means over the samples.
            **_fidelity_columns(figures.fidelity),
            # Per-sample outcomes (task, length, depth, correct), for the report's heatmaps.
            "samples_json": json.dumps(list(figures.samples)),
        }
        memory = figures.memory
        for part in PARTS:
            row[part] = getattr(memory.measured, part) if memory else None
            row[f"modeled_{part}"] = getattr(memory.modeled, part) if memory else None
        if config:
            from kvpareto.config import Config

            row["config_key"] = Config.from_dict(config).key()
        rows.append(row)
    _against_baseline(rows)
    return rows


def _fidelity_columns(fidelity) -> dict:
    columns = {}
    for name in ("kld", "answer_logprob"):
        low, high = getattr(fidelity, f"{name}_ci") if fidelity else (None, None)
        value = getattr(fidelity, name) if fidelity else None
        columns |= {name: value, f"{name}_lo": low, f"{name}_hi": high}
    return columns


def _candidates(rows: list[dict]) -> list[dict]:
    """Complete trials with figures that ran to full fidelity: not raced out at a first rung."""
    return [
        r
        for r in rows
        if r["state"] == "COMPLETE" and r["total_bytes"] is not None and not r.get("raced_out_by")
    ]


def _fullest(rows) -> dict | None:
    """Of one config's rows, the one with the most samples (its knee top-up, if it got one);
    the first among equals."""
    return max(rows, key=lambda r: r.get("samples_run") or 0, default=None)


def _against_baseline(rows: list[dict]) -> None:
    """Fill each complete trial's accuracy difference from the baseline (its run with the most
    samples), paired on the samples both scored (`search.paired`); left empty where there is no
    complete baseline, or no sample in common."""
    baseline = _fullest(r for r in _candidates(rows) if is_baseline(r))
    if baseline is None:
        return
    base = outcomes(json.loads(baseline["samples_json"]))
    for row in rows:
        if row["state"] != "COMPLETE":
            continue
        delta = versus(outcomes(json.loads(row["samples_json"])), base)
        if delta is not None:
            row["delta_accuracy"] = delta.delta
            row["delta_accuracy_lo"], row["delta_accuracy_hi"] = delta.ci
            row["mcnemar_p"] = delta.p


def frontier_summary(rows: list[dict]) -> dict:
    """The frontier of complete, feasible trials, with baseline, knee, marks and hypervolume."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["total_bytes"] is not None]
    full = _candidates(rows)  # trials raced out at their first rung are never points
    feasible = [r for r in full if r["feasible"]]
    by_key = {}
    for r in sorted(feasible, key=lambda r: r["trial"]):
        kept = by_key.setdefault(r["config_key"], r)  # one point per config, its fullest run
        by_key[r["config_key"]] = _fullest([kept, r])
    points = [
        Point(
            k,
            r["total_bytes"],
            r["accuracy"],
            (r["accuracy_lo"], r["accuracy_hi"]),
            outcomes(json.loads(r["samples_json"])),
        )
        for k, r in by_key.items()
    ]
    baseline = _fullest(r for r in full if is_baseline(r))
    base_mem = baseline["total_bytes"] if baseline else max((p.memory for p in points), default=1)
    front = pareto_front(points)
    knee_point = knee(front)
    same = indistinguishable(front)
    entries = []
    for p in front:
        r = by_key[p.key]
        entries.append(
            {
                "trial": r["trial"],
                "label": r["label"],
                "config": row_config(r),
                "config_key": p.key,
                "total_bytes": r["total_bytes"],
                "memory": {
                    part: r[part]
                    for part in (
                        "weights_bytes",
                        "kv_bytes",
                        "activation_peak_bytes",
                        "total_bytes",
                    )
                },
                "modeled_memory": {
                    part: r[f"modeled_{part}"]
                    for part in (
                        "weights_bytes",
                        "kv_bytes",
                        "activation_peak_bytes",
                        "total_bytes",
                    )
                },
                "memory_reduction": 1 - p.memory / base_mem,
                "accuracy": p.accuracy,
                "accuracy_ci": list(p.ci),
                "samples_run": r.get("samples_run"),  # per task and length
                # vs the baseline, paired on the same samples (None where they cannot be)
                "delta_accuracy": r["delta_accuracy"],
                "delta_accuracy_ci": _interval(r, "delta_accuracy"),
                "mcnemar_p": r["mcnemar_p"],
                "kld": r["kld"],
                "kld_ci": _interval(r, "kld"),
                "answer_logprob": r["answer_logprob"],
                "answer_logprob_ci": _interval(r, "answer_logprob"),
                "perplexity": r.get("perplexity"),
                "delta_perplexity": r.get("delta_perplexity"),
                "knee": knee_point is not None and p.key == knee_point.key,
                "indistinguishable": p.key in same,
                "reproduces_source_grid": bool(r.get("reproduces_source_grid")),
            }
        )
    return {
        "baseline": None
        if baseline is None
        else {
            "trial": baseline["trial"],
            "label": baseline["label"],
            "total_bytes": baseline["total_bytes"],
            "accuracy": baseline["accuracy"],
            "accuracy_ci": [baseline["accuracy_lo"], baseline["accuracy_hi"]],
        },
        "hypervolume": hypervolume(front, base_mem),
        "hypervolume_reference": {"memory_fraction_of_baseline": 1.1, "accuracy": 0.0},
        "trials": len(rows),
        "complete": len(done),
        "failed": sum(r["state"] == "FAIL" for r in rows),
        "infeasible": len(full) - len(feasible),
        "raced_out": len(done) - len(full),
        "frontier": entries,
    }


def row_config(row: dict) -> dict:
    """A trial row's config values (its `cfg_` columns) as plain data, for `Config.from_dict`."""
    return {k[4:]: _plain(v) for k, v in row.items() if k.startswith("cfg_")}


def _interval(row: dict, name: str) -> list[float] | None:
    low, high = row[f"{name}_lo"], row[f"{name}_hi"]
    return None if low is None else [low, high]


def _plain(value):
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(study, folder: Path, facts: dict) -> dict:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    frame = pd.DataFrame(rows)
    tmp = folder / "trials.parquet.tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, folder / "trials.parquet")
    _atomic_write(folder / "trials.csv", frame.to_csv(index=False))
    summary = frontier_summary(rows)
    summary["source_precision"] = (facts.get("source_precision") or {}).get("description")
    _atomic_write(folder / "frontier.json", json.dumps(summary, indent=2))
    _atomic_write(folder / "study.json", json.dumps(facts, indent=2))
    return summary


# What `read_study` needs of a study folder; `search` writes them all.
STUDY_FILES = ("frontier.json", "trials.csv", "study.json")


@dataclass(frozen=True)
class StudyFolder:
    """A finished study read back: its frontier summary, its facts and one row per trial (the
    rows `trial_rows` wrote, missing values as None)."""

    path: Path
    frontier: dict
    facts: dict
    rows: list[dict]

    @property
    def model(self) -> str:
        return self.facts.get("model", self.path.parent.name)

    @property
    def context_length(self) -> int:
        """The length the study measured memory at (`--context-length` of its search)."""
        return self.facts["context_length"]


def read_study(folder: Path) -> StudyFolder:
    """The study in `folder` (results/<model>/<study>), or a one-line error naming what is
    missing."""
    import pandas as pd

    missing = [name for name in STUDY_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} holds no finished study (no {', '.join(missing)}); run kvpareto search first"
        )
    try:
        frontier = json.loads((folder / "frontier.json").read_text())
        facts = json.loads((folder / "study.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder}: a results file is not valid JSON ({e})") from None
    records = pd.read_csv(folder / "trials.csv").to_dict("records")
    rows = [{k: None if _missing(v) else v for k, v in r.items()} for r in records]
    return StudyFolder(folder, frontier, facts, rows)


def _missing(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
