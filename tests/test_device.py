"""--device: how it resolves, what it refuses, and what a study and a record keep of it. The
CUDA run itself is tested only where torch sees a GPU (CI has none)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
import torch

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.hardware import cpu_only, resolve_device
from tests.conftest import CLI

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def gpu_seen(monkeypatch):
    """Make torch report a GPU, for the resolution rules alone (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu", {"weights": ["int4"]}) == "cpu"
    with pytest.raises(UserError, match="sees no CUDA GPU"):
        resolve_device("cuda")


def test_auto_takes_a_seen_gpu_unless_a_knob_value_runs_on_the_cpu_only(gpu_seen):
    assert resolve_device("auto") == "cuda"
    assert resolve_device("auto", {"weights": ["none"], "k_bits": [4, 16]}) == "cuda"
    assert resolve_device("auto", {"weights": ["none", "awq4"]}) == "cpu"
    assert resolve_device("auto", {"kv_scheme": ["static", "adaptive"]}) == "cpu"
    with pytest.raises(UserError, match="embed_weights=int8 runs on the CPU only"):
        resolve_device("cuda", {"embed_weights": ["int8"]})
    with pytest.raises(UserError, match="--device must be one of"):
        resolve_device("tpu")


def test_cpu_only_names_each_value_once():
    choices = {"weights": ["none", "int4", "int4"], "kv_scheme": ["rule"], "k_bits": [2]}
    assert cpu_only(choices) == ["kv_scheme=rule", "weights=int4"]


def _settings(tmp_path, space: str, **kw):
    from kvpareto.search.study import SearchSettings

    path = tmp_path / "space.yaml"
    path.write_text(space)
    return SearchSettings("tiny-llama", str(path), ["niah"], 512, 1, **kw)


def test_a_search_resolves_auto_by_its_space_and_keys_gpu_trials_apart(tmp_path, gpu_seen):
    from kvpareto.search.study import eval_key

    kv_only = _settings(tmp_path, "params:\n  k_bits: [4, 8]\n")
    assert kv_only.device_type == "cuda" and kv_only.defining()["device"] == "cuda"
    weights = _settings(tmp_path, "params:\n  weights: [none, int4]\n")
    assert weights.device_type == "cpu"
    on_cpu = _settings(tmp_path, "params:\n  k_bits: [4, 8]\n", device="cpu")
    assert eval_key(Config(), "h", kv_only) != eval_key(Config(), "h", on_cpu)
    with pytest.raises(UserError, match="weights=int4 runs on the CPU only"):
        _settings(tmp_path, "params:\n  weights: [none, int4]\n", device="cuda").validate()
    baseline = [{"kv_scheme": "rule", "target_mean_bits": 4}]
    assert _settings(tmp_path, "params:\n  k_bits: 4\n", baselines=baseline).device_type == "cpu"


def test_a_cpu_trial_key_and_record_keep_the_shape_they_had_before_the_option(tmp_path):
    from kvpareto.evaluation.result import TrialResult
    from kvpareto.search.study import eval_key
    from tests.test_result import STORED

    # A stored record (from before --device) reads as a CPU trial and writes back without it.
    result = TrialResult.from_dict(json.loads(STORED[0].read_text()))
    assert result.device == "cpu" and "device" not in result.to_dict()
    on_gpu = replace(result, device="cuda")
    assert TrialResult.from_dict(on_gpu.to_dict()).device == "cuda"
    # A CPU trial's key has no device in it: trial caches from before the option stay valid.
    space = "params:\n  k_bits: [4, 8]\n"
    cpu, auto = (_settings(tmp_path, space, device=d) for d in ("cpu", "auto"))
    if not HAS_CUDA:
        assert eval_key(Config(), "h", cpu) == eval_key(Config(), "h", auto)
    assert cpu.defining()["device"] == "cpu"


def _cuda_run(tmp_path, command: str) -> subprocess.CompletedProcess:
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  k_bits: [4, 8]\n")
    out = ["--out", str(tmp_path / "out")]
    args = {
        "eval": ["eval", "--context-lengths", "256", "--samples", "1"],
        "search": ["search", "--space", str(space), "--trials", "1", *out],
        "bench": ["bench", "--parts", "kv", "--context-lengths", "256"],
    }[command]
    return subprocess.run(
        [*CLI, *args, "--model", "tiny-llama", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["eval", "search", "bench"])
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, command):
    done = _cuda_run(tmp_path, command)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA GPU" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bench_on_a_gpu_runs_the_kv_part_only(gpu_seen):
    from kvpareto.cli.bench import bench_command

    with pytest.raises(UserError, match="runs --parts kv,samplers only"):
        bench_command(device="cuda", parts="kv,weights", context_lengths="256")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_trial_on_cuda_measures_what_it_models_and_answers_as_the_cpu_does():
    from kvpareto.evaluation.trial import run_trial
    from kvpareto.models import load_model

    config = Config(k_bits=4, v_bits=4)
    results = {
        device: run_trial(
            load_model("tiny-llama", dtype=torch.float32, device=device),
            config,
            ["niah"],
            [256],
            2,
            0,
        )
        for device in ("cpu", "cuda")
    }
    cpu, gpu = results["cpu"], results["cuda"]
    assert (cpu.device, gpu.device) == ("cpu", "cuda")
    assert (
        gpu.memory.measured.kv_bytes == gpu.memory.modeled.kv_bytes == cpu.memory.modeled.kv_bytes
    )
    assert gpu.memory.measured.weights_bytes == cpu.memory.measured.weights_bytes
    assert gpu.memory.measured.activation_peak_bytes > 0
    # float32 on both: the answers' distributions agree to rounding
    assert gpu.fidelity.kld == pytest.approx(cpu.fidelity.kld, abs=1e-4)
