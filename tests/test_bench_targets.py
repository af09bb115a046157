"""`kvpareto bench`'s targets table: each issue target read from the rows it measures."""

from kvpareto.bench import targets


def _decode(context, bits, rate, dynamic, reference=None):
    return {
        "context": context,
        "scheme": "static",
        "kv_bits": bits,
        "tokens_per_s": rate,
        "vs_dynamic": rate / dynamic,
        "vs_reference": rate / reference if reference else None,
    }


def test_decode_targets_are_read_against_their_goals():
    rows = {
        "decode": [
            _decode(1024, 16, 30.0, 20.0, reference=20.0),  # kernels ÷ before them 1.5 < 2
            _decode(1024, 4, 18.0, 20.0),
            _decode(4096, 4, 12.0, 10.0),  # 1.2 >= 1.0
            _decode(8192, 4, 6.0, 5.0),  # 1.2 < 1.3
            _decode(8192, 2, 6.6, 5.0),  # 1.1x the 4-bit rate >= 1.0
            {**_decode(4096, 4, 9.0, 10.0), "scheme": "adaptive"},  # not a static row
        ]
    }
    found = {t["measure"]: t for t in targets(rows)}
    kernels_16 = found["16-bit KV decode, kernels ÷ before them (SDPA, torch ops) at 1024"]
    assert kernels_16["met"] is False and kernels_16["value"] == 1.5
    assert found["4-bit KV decode ÷ DynamicCache at 1024"]["met"] is None
    assert found["4-bit KV decode ÷ DynamicCache at 4096"]["met"] is True
    assert found["4-bit KV decode ÷ DynamicCache at 4096"]["target"] == ">= 1.0"
    assert found["4-bit KV decode ÷ DynamicCache at 8192"]["met"] is False
    int2 = found["2-bit KV decode ÷ 4-bit KV decode at 8192"]
    assert abs(int2["value"] - 1.1) < 1e-9 and int2["met"] is True
    assert len(found) == 6


def test_trial_cost_targets_keep_their_direction():
    rows = {
        "weights": [{"weights": "int4", "vs_none": 1.4}, {"weights": "int8", "vs_none": 0.9}],
        "reuse": {"reused_vs_cold": 0.3},
    }
    found = {t["measure"]: t for t in targets(rows)}
    assert found["int4-weight decode ÷ float-weight decode"]["met"] is True
    assert found["int8-weight decode ÷ float-weight decode"]["met"] is False
    reuse = found["KV-only trial with prefill reuse ÷ cold trial"]
    assert reuse["target"] == "<= 0.25" and reuse["met"] is False


def test_a_decode_step_must_need_less_activation_memory_than_the_prefill():
    rows = {
        "decode_memory": [
            {"context": 1024, "kv_bits": 4, "step_vs_prefill": 0.2},
            {"context": 4096, "kv_bits": 16, "step_vs_prefill": 1.1},
        ]
    }
    found = {t["measure"]: t for t in targets(rows)}
    assert found["one decode step's activation peak ÷ the prefill's, 4-bit KV at 1024"]["met"]
    over = found["one decode step's activation peak ÷ the prefill's, 16-bit KV at 4096"]
    assert over["target"] == "<= 1.0" and over["met"] is False
