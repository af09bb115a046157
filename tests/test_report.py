"""`kvpareto report`: a self-contained page built from a real tiny-model search, checked in a
real headless Chromium (Debian's; `.ci/run` installs it) with the network kept off."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLI

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results")
    done = subprocess.run(
        [
            *CLI,
            "search",
            "--model",
            "tiny-llama",
            "--space",
            "search_spaces/smoke.yaml",
            "--tasks",
            "niah,agreement",
            "--context-length",
            "640",
            "--task-lengths",
            "512,640",
            "--samples",
            "3",
            "--knee-samples",  # no top-up trials: the golden smoke report draws those
            "0",
            "--trials",
            "8",
            "--sampler",
            "tpe",
            "--study",
            "fixture",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / "tiny-llama" / "fixture"


@pytest.fixture(scope="module")
def report(study, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    done = subprocess.run(
        [*CLI, "report", str(study), "-o", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return path


def test_report_is_self_contained(report, study):
    page = report.read_text()
    assert "Plotly" in page and len(page) > 1_000_000  # plotly.js is embedded
    assert not re.search(r"<script[^>]+src=", page)
    assert not re.search(r"<link[^>]+href=\"https?:", page)
    frontier = json.loads((study / "frontier.json").read_text())
    assert page.count('class="frontier-row"') == len(frontier["frontier"])
    for div in ("frontier-", "memory-", "niah-", "knobs-"):
        assert f'id="{div}' in page


def browser_check(page_path: Path, screenshot: Path | None = None) -> dict:
    """Open the page headless; return console errors, plots without an SVG, table rows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS[1:])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route(
            "**/*",
            lambda route: (
                route.abort() if not route.request.url.startswith("file:") else route.continue_()
            ),
        )
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        page.wait_for_timeout(1000)
        plots = page.locator(".plotly-graph-div")
        n_plots = plots.count()
        missing = [
            plots.nth(i).get_attribute("id")
            for i in range(n_plots)
            if plots.nth(i).locator("svg.main-svg").count() == 0
        ]
        rows = page.locator("tr.frontier-row").count()
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"errors": errors, "plots": n_plots, "missing_svg": missing, "rows": rows}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(report, study):
    result = browser_check(report, ARTIFACTS / "report.png")
    frontier = json.loads((study / "frontier.json").read_text())
    assert result["errors"] == []
    assert result["plots"] >= 4 and result["missing_svg"] == []
    assert result["rows"] == len(frontier["frontier"])
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_a_broken_plot_fails_the_browser_check(report, tmp_path):
    page = report.read_text()
    # Break the first figure's data so plotly throws while drawing it.
    broken = page.replace("Plotly.newPlot(", "Plotly.newPlot(undefinedVariable, ", 1)
    bad = tmp_path / "broken.html"
    bad.write_text(broken)
    result = browser_check(bad)
    assert result["errors"] and result["missing_svg"]


def test_several_studies_get_a_normalized_overlay(study, tmp_path):
    from kvpareto.report import build_report

    page = build_report([study, study])
    assert 'id="overlay"' in page and page.count('class="frontier-row"') >= 2
