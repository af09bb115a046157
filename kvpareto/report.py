"""`kvpareto report`: one self-contained HTML page of frontiers, from study folders.

The page embeds plotly.js, so it opens offline (from a USB stick, on a plane). It reads only what a
search wrote (`trials.parquet`, `frontier.json`, `study.json`); it never imports torch.

Per model: the source precision of its weights (a dequantized 4-bit model is no float
baseline), the frontier scatter (every trial, CI error bars, the frontier as a step line, baseline
and knee marked, failed and over-budget trials faded), the memory breakdown of frontier configs
(measured next to modeled), NIAH heatmaps (context length x needle depth) for the baseline, the
knee and the cheapest frontier config within 3 points of the baseline, a parallel-categories view
of the knobs coloured by accuracy, and a sortable table of frontier configs (accuracy, its
difference from the baseline with the paired CI and McNemar p, KLD and answer log-probability)
with a copyable `--config` snippet each (configs that rebuild the source grid say so). With
several models, an overlay of their fronts on normalized axes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import yaml
from plotly.offline import get_plotlyjs

from kvpareto import knobs
from kvpareto.errors import UserError
from kvpareto.search.outputs import GRID_NOTE

KNOBS = [knob.name for knob in knobs.KNOBS]  # the knob chart shows each one that varies
PARTS = [
    ("weights_bytes", "weights"),
    ("kv_bytes", "KV cache"),
    ("activation_peak_bytes", "activations"),
]
FAINT = "rgba(150,150,150,0.35)"


class Study:
    """One study folder, read once."""

    def __init__(self, folder: Path):
        self.folder = folder
        for name in ("frontier.json", "trials.parquet", "study.json"):
            if not (folder / name).is_file():
                raise UserError(f"{folder} has no {name}; run kvpareto search first")
        try:
            self.frontier = json.loads((folder / "frontier.json").read_text())
            self.facts = json.loads((folder / "study.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{folder}: a results file is not valid JSON ({e})") from None
        self.trials = pd.read_parquet(folder / "trials.parquet").sort_values("trial")
        self.model = self.facts.get("model", folder.parent.name)
        self.slug = "".join(c if c.isalnum() else "-" for c in f"{self.model}-{folder.name}")

    @property
    def baseline(self) -> dict | None:
        return self.frontier.get("baseline")


# --- figures ---------------------------------------------------------------------------------


def frontier_figure(st: Study) -> go.Figure:
    t = st.trials
    done = t[(t.state == "COMPLETE") & t.total_bytes.notna()]
    base_mem = st.baseline["total_bytes"] if st.baseline else done.total_bytes.max()
    fig = go.Figure()

    def hover(r) -> str:
        parts = "<br>".join(f"{name}: {getattr(r, key) / 1e6:.2f} MB" for key, name in PARTS)
        return (
            f"<b>{html.escape(str(r.label))}</b><br>accuracy {r.accuracy:.3f} "
            f"[{r.accuracy_lo:.2f}, {r.accuracy_hi:.2f}]<br>total {r.total_bytes / 1e6:.2f} MB "
            f"({1 - r.total_bytes / base_mem:+.1%} reduction)<br>{parts}"
        )

    # Trials raced out at their first rung (`search.racing`) ran part of the samples: shown apart,
    # never as candidates.
    raced = done.get("raced_out_by", pd.Series(None, index=done.index)).notna()
    groups = (
        (done[~raced & (done.feasible == True)], "trials", "#1f77b4"),  # noqa: E712
        (done[~raced & (done.feasible == False)], "over budget", FAINT),  # noqa: E712
        (done[raced], "raced out (first samples only)", FAINT),
    )
    for sub, name, color in groups:
        if sub.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=sub.total_bytes / 1e6,
                y=sub.accuracy,
                mode="markers",
                name=name,
                marker={"color": color, "size": 8},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": sub.accuracy_hi - sub.accuracy,
                    "arrayminus": sub.accuracy - sub.accuracy_lo,
                    "color": color,
                    "width": 2,
                },
                text=[hover(r) for r in sub.itertuples()],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    front = st.frontier["frontier"]
    if front:
        fig.add_trace(
            go.Scatter(
                x=[e["total_bytes"] / 1e6 for e in front],
                y=[e["accuracy"] for e in front],
                mode="lines+markers",
                line={"shape": "hv", "color": "#d62728"},
                name="frontier",
                marker={"size": 10, "symbol": "diamond"},
                text=[html.escape(e["label"]) for e in front],
                hovertemplate="%{text}<extra>frontier</extra>",
            )
        )
    knee = next((e for e in front if e["knee"]), None)
    if knee:
        _mark(fig, knee, "knee", {"size": 18, "symbol": "star", "color": "#ff7f0e"})
    if st.baseline:
        marker = {"size": 16, "symbol": "square-open", "color": "black", "line": {"width": 2}}
        _mark(fig, st.baseline, "baseline (16-bit)", marker)
    failed = int((t.state == "FAIL").sum())
    fig.update_layout(
        title=f"{st.model}: memory vs accuracy ({len(done)} trials"
        + (f", {failed} failed" if failed else "")
        + ")",
        xaxis_title=f"total memory at {st.facts.get('context_length')} tokens (MB, measured)",
        yaxis_title="accuracy (95% CI)",
        yaxis_range=[-0.05, 1.05],
        template="plotly_white",
        height=480,
    )
    return fig


def _mark(fig: go.Figure, point: dict, name: str, marker: dict) -> None:
    """Add one highlighted point (a frontier.json entry or the baseline) to a scatter."""
    fig.add_trace(
        go.Scatter(
            x=[point["total_bytes"] / 1e6],
            y=[point["accuracy"]],
            mode="markers",
            name=name,
            marker=marker,
            text=[point["label"]],
            hovertemplate=f"%{{text}}<extra>{name}</extra>",
        )
    )


def memory_figure(st: Study) -> go.Figure:
    front = st.frontier["frontier"]
    labels = [e["label"] for e in front]
    fig = go.Figure()
    colors = ["#4c78a8", "#f58518", "#54a24b"]
    for (key, name), color in zip(PARTS, colors, strict=True):
        for source, group, opacity in (
            ("memory", "measured", 1.0),
            ("modeled_memory", "modeled", 0.5),
        ):
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=[(e[source][key] or 0) / 1e6 for e in front],
                    name=f"{name} ({group})",
                    offsetgroup=group,
                    legendgroup=name,
                    marker={"color": color, "opacity": opacity},
                    hovertemplate=f"{name}, {group}: %{{y:.2f}} MB<extra>%{{x}}</extra>",
                )
            )
    fig.update_layout(
        barmode="relative",
        title="memory of frontier configs: measured (solid) next to modeled (light)",
        yaxis_title="MB",
        template="plotly_white",
        height=420,
    )
    return fig


def _niah_grid(row) -> pd.DataFrame | None:
    raw = row.get("samples_json") if hasattr(row, "get") else None
    # Every NIAH variant (niah, niah-mk, niah-mv:uuid, ...) records depth and context length;
    # they are pooled into one grid per trial.
    samples = [
        s
        for s in json.loads(raw or "[]")
        if str(s.get("task", "")).startswith("niah") and "depth" in s
    ]
    if not samples:
        return None
    frame = pd.DataFrame(samples)
    frame["depth"] = (frame["depth"] * 100).round().astype(int)
    return frame.pivot_table(
        index="context_length", columns="depth", values="correct", aggfunc="mean"
    )


def niah_figures(st: Study) -> list[tuple[str, go.Figure]]:
    t = st.trials.set_index("trial", drop=False)
    picks = []
    if st.baseline:
        picks.append(("baseline", st.baseline["trial"]))
    front = st.frontier["frontier"]
    knee = next((e for e in front if e["knee"]), None)
    if knee:
        picks.append(("knee", knee["trial"]))
    if st.baseline:
        within = [e for e in front if e["accuracy"] >= st.baseline["accuracy"] - 0.03]
        if within:
            picks.append(("cheapest within 3 points", within[0]["trial"]))
    figures = []
    for n, (title, trial) in enumerate(picks):
        if trial not in t.index:
            continue
        grid = _niah_grid(t.loc[trial])
        if grid is None:
            continue
        fig = go.Figure(
            go.Heatmap(
                z=grid.values,
                x=[f"{d}%" for d in grid.columns],
                y=[str(i) for i in grid.index],
                zmin=0,
                zmax=1,
                colorscale="RdYlGn",
                showscale=n == len(picks) - 1,
                colorbar={"title": "acc"},
                hovertemplate="depth %{x}, %{y} tokens: %{z:.2f}<extra></extra>",
            )
        )
        # A fixed width: the heatmaps sit side by side in a grid and must not overflow it.
        fig.update_layout(
            title=f"NIAH, {title}<br><sup>{html.escape(str(t.loc[trial].label))}</sup>",
            xaxis_title="needle depth",
            xaxis_type="category",
            yaxis_type="category",
            yaxis_title="context length",
            template="plotly_white",
            height=320,
            width=380,
            margin={"l": 60, "r": 20, "t": 60, "b": 50},
        )
        figures.append((title, fig))
    return figures


def knobs_figure(st: Study) -> go.Figure | None:
    done = st.trials[(st.trials.state == "COMPLETE") & st.trials.accuracy.notna()]
    cols = [k for k in KNOBS if f"cfg_{k}" in done and done[f"cfg_{k}"].nunique() > 1]
    if done.empty or not cols:
        return None
    fig = go.Figure(
        go.Parcats(
            dimensions=[{"label": k, "values": done[f"cfg_{k}"].astype(str)} for k in cols],
            line={
                "color": done.accuracy,
                "colorscale": "Viridis",
                "cmin": 0,
                "cmax": 1,
                "showscale": True,
                "colorbar": {"title": "accuracy"},
            },
            hoveron="color",
        )
    )
    fig.update_layout(title="which knobs matter: every trial, coloured by accuracy", height=420)
    return fig


def overlay_figure(studies: list[Study]) -> go.Figure:
    fig = go.Figure()
    for st in studies:
        if not st.baseline:
            continue
        front = st.frontier["frontier"]
        fig.add_trace(
            go.Scatter(
                x=[100 * e["memory_reduction"] for e in front],
                y=[e["delta_accuracy"] for e in front],
                mode="lines+markers",
                name=st.model,
                line={"shape": "hv"},
                text=[e["label"] for e in front],
                hovertemplate="%{text}<br>%{x:.1f}% less memory, Δacc %{y:+.3f}<extra></extra>",
            )
        )
    fig.update_layout(
        title="frontiers of all models, normalized to each model's 16-bit baseline",
        xaxis_title="memory reduction vs baseline (%)",
        yaxis_title="Δ accuracy vs baseline",
        template="plotly_white",
        height=460,
    )
    return fig


# --- page ------------------------------------------------------------------------------------


def _div(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def _facts_html(st: Study) -> str:
    f = st.facts
    versions = ", ".join(f"{k} {v}" for k, v in (f.get("versions") or {}).items())
    rows = [
        ("model", st.model),
        ("tasks", ", ".join(f.get("tasks", []))),
        ("context length", f.get("context_length")),
        ("trials", st.frontier.get("trials")),
        ("sampler", f.get("sampler")),
        ("seed", f.get("seed")),
        ("budget", f"{f['budget_mb']} MB" if f.get("budget_mb") else "none"),
        ("compute dtype", _compute_dtype(f)),
        ("storage dtype", f.get("storage_dtype", f.get("dtype"))),
        ("device", f.get("device", "cpu")),  # studies from before --device ran on the CPU
        (
            "hypervolume",
            f"{st.frontier.get('hypervolume', 0):.4f} "
            "(reference: 1.1 x baseline memory, accuracy 0)",
        ),
        ("space", f"{(f.get('space') or {}).get('name')} ({(f.get('space') or {}).get('hash')})"),
        ("versions", versions),
    ]
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f'<table class="facts">{cells}</table>'


def _source_html(st: Study) -> str:
    """The model's upstream precision, under the study's title: studies written before it was
    recorded show their baseline note instead."""
    source = (st.facts.get("source_precision") or {}).get("description")
    text = source or st.facts.get("baseline_note")
    if not text:
        return ""
    return f'<p class="source-precision"><b>source precision:</b> {html.escape(text)}</p>'


def _compute_dtype(facts: dict) -> str:
    """The compute dtype and why; studies from before the storage split name one dtype only."""
    name = facts.get("compute_dtype", facts.get("dtype"))
    reason = facts.get("compute_dtype_reason")
    return f"{name} ({reason})" if reason else str(name)


def _frontier_table(st: Study) -> str:
    head = "".join(
        f'<th onclick="sortTable(this)">{h}</th>'
        for h in (
            "config",
            "memory MB",
            "reduction",
            "accuracy",
            "95% CI",
            "Δ acc vs baseline",
            "paired 95% CI",
            "McNemar p",
            "KLD",
            "answer log-prob",
            "notes",
            "--config snippet",
        )
    )
    body = []
    for e in st.frontier["frontier"]:
        snippet = yaml.safe_dump(e["config"], sort_keys=False).strip()
        lo, hi = e["accuracy_ci"]
        notes = "; ".join(
            n
            for n, on in (
                ("knee", e["knee"]),
                ("indistinguishable", e["indistinguishable"]),
                (GRID_NOTE, e.get("reproduces_source_grid")),
            )
            if on
        )
        delta = "" if e["delta_accuracy"] is None else f"{e['delta_accuracy']:+.3f}"
        body.append(
            '<tr class="frontier-row">'
            f"<td>{html.escape(e['label'])}</td><td>{e['total_bytes'] / 1e6:.2f}</td>"
            f"<td>{e['memory_reduction']:.1%}</td><td>{e['accuracy']:.3f}</td>"
            f"<td>[{lo:.2f}, {hi:.2f}]</td><td>{delta}</td><td>{_paired_cells(e)}</td>"
            f"<td>{notes}</td>"
            f"<td><pre>{html.escape(snippet)}</pre>"
            '<button onclick="copySnippet(this)">copy</button></td></tr>'
        )
    return (
        f'<table class="frontier" id="table-{st.slug}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _paired_cells(e: dict) -> str:
    """The paired CI of Δ acc, McNemar's p, and the fidelity scores with their CIs; blank where
    a study recorded none (studies from before they existed)."""

    def interval(ci, fmt):
        return "" if not ci else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"

    p, kld, logprob = e.get("mcnemar_p"), e.get("kld"), e.get("answer_logprob")
    cells = (
        interval(e.get("delta_accuracy_ci"), "+.2f"),
        "" if p is None else f"{p:.3g}",
        "" if kld is None else f"{kld:.2e} {interval(e.get('kld_ci'), '.1e')}",
        "" if logprob is None else f"{logprob:.2f} {interval(e.get('answer_logprob_ci'), '.2f')}",
    )
    return "</td><td>".join(cells)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;cursor:pointer}pre{margin:0;font-size:12px}.facts th{cursor:default}
.heatmaps{display:grid;grid-template-columns:repeat(auto-fit,minmax(390px,1fr))}
"""

_SCRIPT = """
function sortTable(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
b=t.tBodies[0],rows=[...b.rows],asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const v=r=>{const s=r.cells[i].innerText;const n=parseFloat(s.replace(/[^0-9.+-]/g,''));
return isNaN(n)?s:n};rows.sort((a,c)=>(v(a)>v(c)?1:v(a)<v(c)?-1:0)*(asc?1:-1));
rows.forEach(r=>b.appendChild(r))}
function copySnippet(btn){const text=btn.previousElementSibling.innerText;
if(navigator.clipboard){navigator.clipboard.writeText(text).then(()=>{btn.innerText='copied'},
()=>{btn.innerText='select and copy'})}}
"""


def build_report(folders: list[Path]) -> str:
    studies = [Study(Path(f)) for f in folders]
    sections = []
    for st in studies:
        parts = [
            f'<section id="{st.slug}">'
            f"<h2>{html.escape(st.model)}: {html.escape(st.folder.name)}</h2>",
            _source_html(st),
            _facts_html(st),
            _div(frontier_figure(st), f"frontier-{st.slug}"),
        ]
        if st.frontier["frontier"]:
            parts.append(_div(memory_figure(st), f"memory-{st.slug}"))
        heatmaps = niah_figures(st)
        if heatmaps:
            parts.append(
                '<div class="heatmaps">'
                + "".join(_div(fig, f"niah-{st.slug}-{i}") for i, (_, fig) in enumerate(heatmaps))
                + "</div>"
            )
        knobs = knobs_figure(st)
        if knobs is not None:
            parts.append(_div(knobs, f"knobs-{st.slug}"))
        parts.append("<h3>frontier configs</h3>" + _frontier_table(st) + "</section>")
        sections.append("".join(parts))
    if len(studies) > 1:
        sections.insert(0, _div(overlay_figure(studies), "overlay"))
    title = "kvpareto report: " + ", ".join(st.model for st in studies)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f"<script>{get_plotlyjs()}</script><script>{_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Memory is measured (bytes held, allocator peak) at the declared context length; "
        "modeled figures are shown beside it. Accuracy carries a 95% interval (Wilson; "
        "bootstrap for partial scores).</p>" + "".join(sections) + "</body></html>"
    )


def write_report(folders: list[Path], out: Path) -> Path:
    page = build_report(folders)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
