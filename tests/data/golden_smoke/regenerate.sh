#!/usr/bin/env bash
# Rewrite the stored smoke study after a change that is MEANT to alter what it pins (new output
# columns, a sampler that proposes differently). Review `git diff` afterwards: config keys, labels
# and trial-cache keys must change only when that was the point. config-keys.json is not touched
# (tests/test_golden_smoke.py says how it is kept).
set -euo pipefail
cd "$(dirname "$0")/../../.."
golden=tests/data/golden_smoke
# `--outputs-only`: keep the stored study and trial cache, rebuild the files derived from them (a
# change to how outputs are computed, e.g. the knee rule); otherwise re-run the search too.
if [ "${1:-}" != "--outputs-only" ]; then
  out=/tmp/golden  # the path is recorded in study.json's command
  rm -rf "$out"
  .venv/bin/python -m kvpareto search --model tiny-llama --space search_spaces/smoke.yaml \
    --tasks agreement --context-length 512 --samples 6 --trials 12 --sampler nsga2 --study smoke \
    --out "$out" \
    --dtype bfloat16
  cp "$out"/tiny-llama/smoke/{study.db,trials.csv,frontier.json,study.json} "$golden"/
  rm -rf "$golden/trial-cache"
  cp -r "$out/tiny-llama/trial-cache" "$golden/trial-cache"
fi
.venv/bin/python - "$golden" <<'PY'
# the report's sha256, from outputs rebuilt as tests/test_golden_smoke.py rebuilds them
import hashlib, json, shutil, sys, tempfile
from pathlib import Path
import optuna
from kvpareto.report import write_report
from kvpareto.search.outputs import write_outputs
golden = Path(sys.argv[1])
stored = json.loads((golden / "study.json").read_text())
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp) / "smoke"  # the report names the study by its folder
    folder.mkdir()
    shutil.copy(golden / "study.db", folder / "study.db")
    name = f"{stored['study']}:{stored['model']}"
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")
    write_outputs(study, folder, stored)
    for name in ("trials.csv", "frontier.json", "study.json"):
        shutil.copy(folder / name, golden / name)
    page = write_report([folder], folder / "report.html")
    (golden / "report.sha256").write_text(hashlib.sha256(page.read_bytes()).hexdigest() + "\n")
PY
echo "rewrote $golden; review git diff"
