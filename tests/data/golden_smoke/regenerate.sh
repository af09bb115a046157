#!/usr/bin/env bash
# Rewrite the stored smoke study after a change that is MEANT to alter what it pins (new output
# columns, a sampler that proposes differently). Review `git diff` afterwards: config keys, labels
# and trial-cache keys must change only when that was the point. config-keys.json is not touched
# (tests/test_golden_smoke.py says how it is kept).
set -euo pipefail
cd "$(dirname "$0")/../../.."
golden=tests/data/golden_smoke
out=/tmp/golden  # the path is recorded in study.json's command
rm -rf "$out"
.venv/bin/kvpareto search --model tiny-llama --space search_spaces/smoke.yaml --tasks agreement \
  --context-length 512 --samples 6 --trials 12 --study smoke --out "$out" --dtype bfloat16
cp "$out"/tiny-llama/smoke/{study.db,trials.csv,frontier.json,study.json} "$golden"/
rm -rf "$golden/trial-cache"
cp -r "$out/tiny-llama/trial-cache" "$golden/trial-cache"
.venv/bin/python - "$golden" <<'PY'
import hashlib, shutil, sys, tempfile
from pathlib import Path
from kvpareto.report import write_report
golden = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "smoke"  # the report names the study by its folder
    shutil.copytree(golden, folder, ignore=shutil.ignore_patterns("trial-cache"))
    page = write_report([folder], folder / "report.html")
    (golden / "report.sha256").write_text(hashlib.sha256(page.read_bytes()).hexdigest() + "\n")
PY
echo "rewrote $golden; review git diff"
