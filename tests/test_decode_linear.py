"""The compiled decode linear: one-row calls equal torch's linear, and it is chosen by measurement.

Tolerances: the kernel widens the bf16 weight to fp32 exactly and accumulates in fp32, so against
an fp32 reference it differs only in summation order (1e-5 relative to the output's scale). With
bf16 or fp16 activations both it and torch round the fp32 sum once to the output dtype, so each
output is within one rounding (half an ulp: at most 2^-8 relative in bf16, 2^-11 in fp16) of
the fp32 reference, plus the summation-order term. Through a whole bf16 model the roundings
compound, and decode logits agree within 2e-2 (as the fused attention's tests find).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from kvpareto.config import Config
from kvpareto.engine import prefill
from kvpareto.hf_compat import with_cache
from kvpareto.kernels import build, decode_linear
from kvpareto.kernels.decode_linear import DecodeLinear
from kvpareto.kv import make_cache
from kvpareto.models import load_model
from kvpareto.models.storage_dtype import CastLinear
from tests.conftest import TINY

HALF_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(scope="module")
def kernel():
    if build.kernel() is None:
        pytest.skip("no C++ compiler: the kernels could not be built")
    return build.kernel()


@pytest.fixture
def always_kernel(monkeypatch):
    """Whatever this machine measured, one-row calls take the kernel."""
    monkeypatch.setattr(decode_linear, "kernel_faster", lambda dtype: True)


# Shapes with ragged widths (not a multiple of a vector) and row counts (not of the 4-row block).
@pytest.mark.parametrize("shape", [(5, 17), (7, 100), (192, 576), (576, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_equals_the_fp32_reference_within_one_rounding(kernel, shape, dtype, bias):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    weight = torch.randn(shape, generator=gen).bfloat16()
    b = torch.randn(shape[0], generator=gen).bfloat16() if bias else torch.empty(0)
    x = torch.randn(1, 1, shape[1], generator=gen).to(dtype)
    y = kernel.decode_linear(x, weight, b)
    ref = F.linear(x.float(), weight.float(), b.float() if bias else None)
    assert y.shape == (1, 1, shape[0]) and y.dtype == dtype
    bound = HALF_ULP[dtype] * ref.abs() + 1e-5 * ref.abs().max()
    assert ((y.float() - ref).abs() <= bound).all()


def test_a_nan_input_gives_nan_outputs(kernel):
    x = torch.randn(1, 64)
    x[0, 3] = float("nan")
    assert kernel.decode_linear(x, torch.randn(8, 64).bfloat16(), torch.empty(0)).isnan().all()


@pytest.mark.parametrize("name", TINY)
def test_decode_logits_equal_torch_linears_and_only_one_row_calls_take_the_kernel(
    name, tiny_models, always_kernel, monkeypatch
):
    model = tiny_models[name].model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, DecodeLinear) for m in linears)
    calls = []  # (rows, took the kernel) of every linear call
    real = decode_linear.runs_kernel

    def spy(x, w):
        calls.append((x.numel() // w.shape[1], real(x, w)))
        return calls[-1][1]

    monkeypatch.setattr(decode_linear, "runs_kernel", spy)
    ids = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for path in ("kernel", "torch"):
        cache = make_cache(model, Config(), torch.bfloat16)
        prefill(model, ids, cache, 0)  # its decoder layers see 24 rows; its LM head one
        with build.torch_only() if path == "torch" else contextlib.nullcontext():
            step = model(ids[:, -1:], **with_cache(cache), use_cache=True, logits_to_keep=1)
        logits[path] = step.logits.float()
        assert any(rows > 1 for rows, _ in calls) and any(rows == 1 for rows, _ in calls)
        if path == "kernel":
            assert all(took == (rows == 1) for rows, took in calls)
        else:  # the prefill's calls ran before torch_only: only the step's must all be torch's
            assert not any(took for _, took in calls[-len(linears) :])
        calls[:] = []
    scale = logits["torch"].abs().max()
    assert (logits["kernel"] - logits["torch"]).abs().max() <= 2e-2 * max(scale, 1.0)


def test_a_cast_linear_reads_the_bf16_weight_in_place_for_one_row(kernel, always_kernel):
    model = load_model("tiny-llama", dtype=torch.float32, storage_dtype=torch.bfloat16).model
    layer = next(m for m in model.modules() if isinstance(m, CastLinear))
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(1))
    y, ref = layer(x), layer.torch_forward(x)
    assert y.dtype == torch.float32
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_choice_is_measured_recorded_per_machine_and_read_back(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("KVPARETO_HOME", str(tmp_path))
    decode_linear.kernel_faster.cache_clear()
    try:
        faster = decode_linear.kernel_faster(torch.float32)
        (entries,) = json.loads((tmp_path / "kernels.json").read_text()).values()
        choice = entries["decode-linear|float32"]
        assert set(choice["us"]) == {"kernel", "torch"}  # both paths were timed
        assert choice["path"] == min(choice["us"], key=choice["us"].get)
        assert faster == (choice["path"] == "kernel")
        decode_linear.kernel_faster.cache_clear()
        monkeypatch.setattr(decode_linear, "_probe", lambda dtype: pytest.fail("probed again"))
        assert decode_linear.kernel_faster(torch.float32) == faster
    finally:
        decode_linear.kernel_faster.cache_clear()


def test_without_the_kernel_every_call_takes_torch(monkeypatch):
    monkeypatch.setattr(build, "kernel", lambda: None)
    decode_linear.kernel_faster.cache_clear()
    try:
        assert not decode_linear.kernel_faster(torch.bfloat16)
        w = torch.randn(8, 16).bfloat16()
        assert not decode_linear.runs_kernel(torch.randn(1, 16).bfloat16(), w)
    finally:
        decode_linear.kernel_faster.cache_clear()
