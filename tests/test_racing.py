"""Multi-fidelity racing (`search.racing`): a trial answered in slices equals a plain run, a
clearly dominated config stops at its first rung, racing off keeps the plain search, and the
knee's top-up gives the knee more samples.

The study below runs four fixed configs on tiny-llama's agreement task at 128 and 256 tokens
(8 samples each, first rung 6; racing off runs the first three): the baseline; W, int4 weights
and an 8/4-bit KV cache (1.82 MB measured, every sample right); P, a 90% streaming-pruned
16-bit config that costs more (1.98 MB) and gets most samples wrong; and C, W pruned the same
way, the cheapest and least accurate. P is raced out by W; C and W are the frontier, W its knee.
(W once kept a 16-bit cache: 1.95 MB on an AVX-512 EPYC, but 1.984 MB on a Xeon with AMX,
where bf16 SDPA's packed K/V made it 864 bytes costlier than P, and nothing raced P out.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kvpareto.config import Config
from kvpareto.errors import UserError
from kvpareto.evaluation.trial import TrialRun, run_trial
from kvpareto.search.paired import outcomes
from kvpareto.search.racing import (
    TOP_UP_ROUNDS,
    Rival,
    default_min_samples,
    raced_out,
    top_up_keys,
)
from kvpareto.search.study import Search, SearchSettings, eval_key, run_search

SMOKE_SPACE = str(Path(__file__).parent.parent / "search_spaces" / "smoke.yaml")
W = Config(weights="int4", weight_group_size=128, k_bits=8, v_bits=4)
P = Config(prune_rate=0.9, chunk_size=32, prune_scorer="streaming")
C = Config(
    weights="int4",
    weight_group_size=128,
    k_bits=8,
    v_bits=4,
    prune_rate=0.9,
    chunk_size=32,
    prune_scorer="streaming",
)


def _outcomes(pattern: str):
    return outcomes([{"task": "t", "context_length": 8, "correct": c == "1"} for c in pattern])


def test_the_first_rung_is_about_half_the_samples_and_off_when_that_saves_nothing():
    assert [default_min_samples(n) for n in (1, 2, 3, 5, 6, 10)] == [1, 2, 2, 2, 3, 5]
    assert SearchSettings("tiny-llama", SMOKE_SPACE, ["agreement"], 256, 1, samples=2).rung is None
    off = SearchSettings("tiny-llama", SMOKE_SPACE, ["agreement"], 256, 1, samples=8, min_samples=0)
    assert off.rung is None
    assert SearchSettings("tiny-llama", SMOKE_SPACE, ["agreement"], 256, 1, samples=8).rung == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [({"min_samples": 9}, "--min-samples must be 0 to"), ({"knee_samples": 3}, "must exceed")],
)
def test_bad_racing_flags_are_one_line_errors(flags, message):
    settings = SearchSettings("tiny-llama", SMOKE_SPACE, ["agreement"], 256, 1, samples=5, **flags)
    with pytest.raises(UserError, match=message):
        settings.validate()


def test_a_trial_is_raced_out_only_by_a_no_costlier_trial_shown_more_accurate():
    mine = _outcomes("0000")  # the first rung: 4 samples, all wrong
    right = _outcomes("11111111")  # a full trial, all 8 right
    cheap, costly = Rival(1, "cheap", 1.0, right), Rival(2, "costly", 3.0, right)
    verdict = raced_out(mine, 2.0, [costly, cheap])
    assert verdict.by is cheap and verdict.delta.n == 4 and verdict.delta.ci[1] < 0
    assert verdict.attrs()["raced_out_by"] == "#1 cheap"
    assert raced_out(mine, 2.0, [costly]) is None  # costs more: not a dominator
    # three discordant pairs of three cannot show it (Bonett-Price's upper bound is above 0)
    assert raced_out(_outcomes("000"), 2.0, [cheap]) is None
    assert raced_out(_outcomes("1111"), 2.0, [cheap]) is None


def test_the_top_up_takes_the_knee_its_neighbours_the_best_point_and_the_baseline():
    front = [{"config_key": k, "knee": k == "b"} for k in "abcd"]
    summary = {"frontier": front, "baseline": {"trial": 0}}
    assert top_up_keys(summary) == ["a", "b", "c", "d", Config().key()]
    assert top_up_keys({"frontier": front[:1], "baseline": None}) == []


def _scripted_search(monkeypatch, groups: list[list[str]]):
    """A Search whose frontier reads give the knee groups `groups` in turn and whose `top_up`
    records the keys it would top up: the rounds' logic without a model."""
    from kvpareto.search import outputs, racing

    reads = iter(groups)
    monkeypatch.setattr(racing, "top_up_keys", lambda summary: next(reads))
    monkeypatch.setattr(outputs, "trial_rows", lambda study: [])
    monkeypatch.setattr(outputs, "frontier_summary", lambda rows: {})
    search = Search.__new__(Search)
    search.study, search.topped = None, []

    def top_up(keys, on_trial=None, stop=None):
        new = [k for k in keys if k not in search.topped]
        search.topped += new
        return len(new)

    search.top_up = top_up
    return search


def test_the_top_up_follows_a_knee_that_its_samples_moved(monkeypatch):
    search = _scripted_search(monkeypatch, [["a", "b"], ["b", "c"], ["b", "c"]])
    assert search.top_up_knee() == 3 and search.topped == ["a", "b", "c"]


def test_a_knee_that_keeps_moving_is_topped_up_for_at_most_the_bounded_rounds(monkeypatch):
    groups = [[f"k{i}"] for i in range(TOP_UP_ROUNDS + 2)]
    search = _scripted_search(monkeypatch, groups)
    assert search.top_up_knee() == TOP_UP_ROUNDS
    assert search.topped == [f"k{i}" for i in range(TOP_UP_ROUNDS)]


def _comparable(result) -> dict:
    """A record without what differs between two runs of the same prompts: timings, the clock,
    and whether quantized weights came from the on-disk store."""
    record = result if isinstance(result, dict) else result.to_dict()
    return {
        k: ({**v, "from_cache": None} if k == "weights" else v)
        for k, v in record.items()
        if k not in ("timing", "when")
    }


def test_a_trial_answered_in_slices_equals_a_plain_run(tiny_models):
    loaded = tiny_models["tiny-llama"]
    plain = run_trial(loaded, P, ["agreement"], [128], 8, seed=0, memory_length=256)
    run = TrialRun(loaded, P, ["agreement"], [128], 8, seed=0, memory_length=256)
    first = run.result(3)
    assert first.samples == plain.samples[:3] and first.n == 3
    assert _comparable(run.result(8)) == _comparable(plain)
    assert run.answered == set(range(8))  # the first three were not answered again


def _settings(out: Path, trials: int = 4, **racing) -> SearchSettings:
    return SearchSettings(
        model="tiny-llama",
        space_path=SMOKE_SPACE,
        tasks=["agreement"],
        context_length=256,
        lengths=[128, 256],
        trials=trials,
        sampler="random",
        out=str(out),
        samples=8,
        dtype="bfloat16",
        baselines=[W.to_dict(), P.to_dict(), C.to_dict()],
        **racing,
    )


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """The same four configs with racing on (first rung 6, knee top-up 10) and off."""
    on = _settings(tmp_path_factory.mktemp("on"), min_samples=6, knee_samples=10)
    off = _settings(tmp_path_factory.mktemp("off"), min_samples=0, knee_samples=0, trials=3)
    for settings in (on, off):
        run_search(settings, ["test"])
    return on, off


def _rows(settings: SearchSettings) -> pd.DataFrame:
    rows = pd.read_csv(settings.study_dir() / "trials.csv")
    return rows.set_index("config_key", drop=False)


def _frontier(settings: SearchSettings) -> dict:
    return json.loads((settings.study_dir() / "frontier.json").read_text())


def test_a_clearly_dominated_config_stops_at_its_first_rung(studies):
    on, _ = studies
    rows = _rows(on)
    first = rows[rows.top_up_of.isna()]
    p, w = first.loc[P.key()], first.loc[W.key()]
    assert p.samples_run == 6 and p.raced_out_by == f"#{w.trial} {W.label()}"
    assert p.race_delta_hi < 0 and p.race_delta_lo <= p.race_delta <= p.race_delta_hi
    assert len(json.loads(p.samples_json)) == 12  # 6 per length
    frontier = _frontier(on)
    assert P.key() not in {e["config_key"] for e in frontier["frontier"]}
    assert frontier["raced_out"] == 1


def test_a_config_that_is_not_raced_out_runs_to_n_and_equals_a_plain_run(studies):
    on, off = studies
    rows = _rows(on)
    first = rows[rows.top_up_of.isna()]
    assert first.loc[W.key()].samples_run == 8 and pd.isna(first.loc[W.key()].raced_out_by)
    records = []  # W's full record, answered in two slices with racing on and plainly off
    for settings in (on, off):
        key = eval_key(W, _model_hash(settings), settings)
        folder = Path(settings.out) / "tiny-llama" / "trial-cache"
        records.append(json.loads((folder / f"{key}.json").read_text()))
    assert _comparable(records[0]) == _comparable(records[1])


def _model_hash(settings: SearchSettings) -> str:
    folder = Path(settings.out) / "tiny-llama" / "trial-cache"
    return json.loads(next(folder.glob("*.json")).read_text())["model_hash"]


def test_racing_off_runs_every_trial_in_full_and_caches_only_full_results(studies):
    _, off = studies
    rows = _rows(off)
    rows = rows[rows.state == "COMPLETE"]  # C stays enqueued: the study holds its 3 trials
    assert len(rows) == 3 and (rows.samples_run == 8).all()  # racing off: P runs in full
    assert rows.raced_out_by.isna().all() and rows.top_up_of.isna().all()
    folder = Path(off.out) / "tiny-llama" / "trial-cache"
    keys = {eval_key(c, _model_hash(off), off) for c in (Config(), W, P)}
    assert {p.stem for p in folder.glob("*.json")} == keys


def test_the_knee_and_its_neighbours_get_the_knee_samples(studies):
    on, _ = studies
    frontier = _frontier(on)
    knee = next(e for e in frontier["frontier"] if e["knee"])
    assert knee["config_key"] == W.key() and knee["samples_run"] == 10
    rows = _rows(on)
    topped = rows[rows.top_up_of.notna()]
    assert set(topped.config_key) == {W.key(), C.key(), Config().key()}
    assert (topped.samples_run == 10).all()
    assert (topped.samples_reused == 16).all()  # 8 per length came from each first trial
    assert all(len(json.loads(s)) == 20 for s in topped.samples_json)  # 10 per length
    # the knee's paired difference from the baseline is now over the 20 samples both scored
    assert knee["delta_accuracy"] == 0.0 and knee["mcnemar_p"] == 1.0


def test_a_resumed_racing_study_redoes_nothing(studies):
    on, _ = studies
    before = _rows(on)
    run_search(on, ["test"])
    after = _rows(on)
    assert len(after) == len(before) == 7
    assert list(after.samples_run) == list(before.samples_run)


def test_a_top_up_reads_its_first_samples_from_the_full_record(tiny_models, monkeypatch):
    """The knee top-up's first samples come from its full trial's record: the merged result
    equals a plain run over all the samples (the mean KV bits aside: a record keeps them per
    trial, not per prompt), and only the extra prompts are answered."""
    import kvpareto.evaluation.trial as trial

    loaded = tiny_models["tiny-llama"]
    args = (loaded, P, ["agreement"], [128, 256], 4)
    full = run_trial(*args, seed=0, memory_length=256)
    plain = TrialRun(*args, seed=0, memory_length=256, extra=3).result(7)
    run = TrialRun(*args, seed=0, memory_length=256, extra=3)
    answered = []
    generate = trial.generate
    monkeypatch.setattr(trial, "generate", lambda *a, **k: answered.append(1) or generate(*a, **k))
    assert run.reuse(full) == 8
    topped = run.result(7)
    assert len(answered) == 6  # 3 extra per length; the 8 recorded prompts were not answered
    assert len(topped.samples) == 14 and topped.samples[:4] == full.samples[:4]

    def same(record):
        return {k: v for k, v in _comparable(record).items() if k != "nominal_kv_bits"}

    assert same(topped) == same(plain)
    # a record of other prompts (another seed, another sample count) is not taken
    other = run_trial(*args, seed=1, memory_length=256)
    assert TrialRun(*args, seed=0, memory_length=256, extra=3).reuse(other) == 0
    fewer = run_trial(loaded, P, ["agreement"], [128, 256], 3, seed=0, memory_length=256)
    assert TrialRun(*args, seed=0, memory_length=256, extra=3).reuse(fewer) == 0
