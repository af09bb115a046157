"""lm-eval documents are fixed by --seed: the bridge seeds what lm-eval's own entry point seeds.

RULER's generators draw needles from Python's global `random`; building `niah_single_1` takes
about 40 s a process, so the test task here draws its documents the same way (from Python's,
numpy's and torch's global generators) and builds in a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASK_YAML = """\
task: global_draws
dataset_path: ""
dataset_name: ""
custom_dataset: !function global_draws.documents
output_type: multiple_choice
test_split: test
doc_to_text: "{{input}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

TASK_CODE = """\
import random

import datasets
import numpy as np
import torch


def documents(**_):
    docs = [
        {
            "input": f"The number is {random.randint(0, 10**9)}, {np.random.randint(0, 10**9)}, "
            f"{int(torch.randint(0, 10**9, ()))}.",
            "choices": ["a", "b"],
            "label": 0,
        }
        for _ in range(5)
    ]
    return {"test": datasets.Dataset.from_list(docs)}
"""

BUILD = """
import json, sys
from pathlib import Path
import kvpareto.evaluation.lmeval.bridge as bridge
bridge.LOCAL_TASKS = Path(sys.argv[1])
task = bridge.load_task("global_draws", "unused", 256, int(sys.argv[2]))["tasks"]["global_draws"]
print(json.dumps([doc["input"] for doc in task.test_docs()]))
"""


def _documents(folder, seed: int) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BUILD), str(folder), str(seed)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],  # this checkout's kvpareto
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_build_the_same_documents_and_another_seed_others(tmp_path):
    (tmp_path / "global_draws.yaml").write_text(TASK_YAML)
    (tmp_path / "global_draws.py").write_text(TASK_CODE)
    first, second = _documents(tmp_path, seed=3), _documents(tmp_path, seed=3)
    assert first == second
    assert _documents(tmp_path, seed=4) != first
