"""Packed weight kernels: layouts, agreement with the dequantize reference, bytes, path choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kvpareto.config import Config
from kvpareto.memory.measure import weights_bytes_measured, weights_bytes_modeled
from kvpareto.weights import int4pack
from kvpareto.weights import packed_linear as pl
from kvpareto.weights import quantize as weights_module
from kvpareto.weights.packed_linear import (
    PATHS,
    Int4PackLinear,
    Int8PackLinear,
    PackedLinear,
    TilesLinear,
    kernel_choice,
    kernel_summary,
)
from kvpareto.weights.quantize import quantized_model

needs_int4pack = pytest.mark.skipif(int4pack.layout() is None, reason="no int4pack in this build")

# [out, in, group]: a tiny-model shape, SmolLM2's k/v_proj (576 wide, 192 out), its down_proj
# (1536 wide), and an output width that leaves a partial int4pack block.
SHAPES = [(64, 128, 32), (192, 576, 64), (576, 1536, 128), (112, 576, 64)]


def _int4(shape) -> PackedLinear:
    out_features, in_features, group = shape
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    return PackedLinear.quantize(w * 0.05, None, 4, group, symmetric=False)


def _int8(shape) -> PackedLinear:
    out_features, in_features, _ = shape
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    return PackedLinear.quantize(w * 0.05, None, 8, in_features, symmetric=True)


@needs_int4pack
def test_int4pack_known_answer_maps_the_zero_to_the_kernels_centre_of_eight():
    # Every group holds codes 0..15 exactly: w = (c - 8) * 0.25 + 1, so min -1, scale 0.25 and the
    # kernel's zero is min + 8 * scale = 1. All values are on the grid, so outputs are exact.
    codes = torch.arange(32).remainder(16).repeat(16, 1)
    w = (codes - 8) * 0.25 + 1.0
    layer = PackedLinear.quantize(w, None, bits=4, group=32, symmetric=False)
    assert isinstance(layer, Int4PackLinear)
    assert layer.codes.shape == (16, 16) and layer.codes.dtype == torch.uint8
    assert layer.scales_and_zeros.shape == (1, 16, 2)
    assert (layer.scale == 0.25).all() and (layer.zero == 1.0).all()
    assert torch.equal(int4pack.unpack(layer.codes, int4pack.layout()), codes.to(torch.uint8))
    assert torch.equal(layer.dequantized_weight(torch.float32), w)
    x = torch.arange(32, dtype=torch.float32)[None] - 16
    assert torch.equal(layer.forward_via("packed", x), x @ w.T)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_int4pack_layout_is_detected_and_inverted_for_other_isas(capability):
    """torch packs nibbles in an ISA-specific order; a process dispatched for another ISA must
    find its own order (and get a different weight cache key)."""
    code = (
        "import torch; from kvpareto.weights import int4pack as p;"
        "q = torch.randint(0, 16, (112, 64), dtype=torch.uint8);"
        "print(p.layout(), torch.equal(p.unpack(p.pack(q), p.layout()), q))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    expected = {"avx2": "lanes32", "default": "pairs32"}[capability]
    assert out.stdout.split() == [expected, "True"], out.stderr


def _reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ layer.dequantized_weight(torch.float32).double().T


def _tolerance(layer: PackedLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    """Per output: c * sum_k |x_k| |w_nk|, the scale of every rounding in the dot product.

    bf16 paths round the activations, possibly the weights and the output to bf16 (2^-9
    relative each): c = 2^-7 covers all three. fp32 paths accumulate K products in fp32, whose
    error grows at worst as K * 2^-24 (K = 1536: 9e-5); c = 1e-4.
    """
    w = layer.dequantized_weight(torch.float32).double().abs()
    c = 1e-4 if path == "packed" and x.dtype == torch.float32 else 2**-7
    return c * (x.double().abs() @ w.T)


@needs_int4pack
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_kernels_equal_the_dequantize_reference(shape, bits, dtype):
    layer = _int4(shape) if bits == 4 else _int8(shape)
    assert layer.kernel_ok
    for rows in (1, 5):
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
        ref = _reference(layer, x)
        for path in PATHS:
            y = layer.forward_via(path, x)
            assert y.dtype == dtype and y.shape == (rows, shape[0])
            err = (y.double() - ref).abs()
            assert (err <= _tolerance(layer, x, path)).all(), (path, err.max().item())


_MISALIGNED = """
import torch
from kvpareto.weights.packed_linear import Int8PackLinear, PackedLinear

def shifted(t):  # a copy of t that starts 2 bytes past a 64-byte boundary, as a view can
    flat = torch.empty(t.numel() * t.element_size() + 2, dtype=torch.uint8)
    view = flat[2:].view(t.dtype).view(t.shape)
    return view.copy_(t)

w = torch.randn(256, 576, generator=torch.Generator().manual_seed(0)) * 0.05
layer = PackedLinear.quantize(w, None, 8, 576, symmetric=True)
x = torch.randn(64, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
want = layer.forward_via("packed-bf16", x)
odd = Int8PackLinear(8, 576, (256, 576), None, torch.bfloat16,
                     {"codes": shifted(layer.codes), "scale": shifted(layer.scale)})
assert odd.codes.data_ptr() % 64 == 0 and odd.scale.data_ptr() % 64 == 0
assert torch.equal(odd.forward_via("packed-bf16", shifted(x)), want)
print("ok")
"""


def test_int8_kernel_survives_tensors_that_start_off_a_64_byte_boundary():
    """torch's int8pack kernel faults (kills the process) on codes or activations that start
    off a 64-byte boundary, as codes read back from the weights cache did: a layer copies such
    buffers on construction and such activations per call. Run in a child, so a fault is a
    failure here rather than the end of the test session."""
    done = subprocess.run([sys.executable, "-c", _MISALIGNED], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr)


def test_layers_no_kernel_accepts_fall_back_to_dequantize():
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(0))
    assert isinstance(PackedLinear.quantize(w, None, 4, 16, False), TilesLinear)  # group 16
    assert isinstance(PackedLinear.quantize(w, None, 4, 48, False), TilesLinear)  # 8 rows
    ragged = PackedLinear.quantize(w, None, 8, 48, symmetric=True)  # K = 48: not 32 k
    assert isinstance(ragged, Int8PackLinear) and not ragged.kernel_ok
    for layer in (PackedLinear.quantize(w, None, 4, 16, False), ragged):
        assert layer.path(torch.bfloat16, 1) == "dequantize"
        x = torch.randn(3, 48)
        assert torch.allclose(layer(x), x @ layer.dequantized_weight(torch.float32).T)


@needs_int4pack
@pytest.mark.parametrize("shape", SHAPES)
def test_modeled_bytes_are_the_kernel_layouts_own_tensors(shape):
    for layer in (_int4(shape), _int8(shape)):
        held = sum(t.nbytes for t in layer.buffers())
        assert held == layer.modeled_nbytes()
    int4 = _int4(shape)
    assert int4.codes.shape == (shape[0], shape[1] // 2)
    assert int4.scales_and_zeros.dtype == torch.bfloat16


@needs_int4pack
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_tiny_model_uses_kernel_layouts_and_measures_as_modeled(tiny_models, method):
    q = quantized_model(tiny_models["tiny-llama"], Config(weights=method, weight_group_size=32))
    layers = [m for m in q.model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.kernel_ok for m in layers)
    assert all(
        isinstance(m, Int4PackLinear if method == "int4" else Int8PackLinear) for m in layers
    )
    assert weights_bytes_measured(q.model) == weights_bytes_modeled(q.model)


@needs_int4pack
def test_model_logits_agree_across_paths(tiny_models, monkeypatch):
    q = quantized_model(tiny_models["tiny-llama"], Config(weights="int4", weight_group_size=32))
    x = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(3))
    logits = {}
    for path in ("packed", "dequantize"):
        monkeypatch.setattr(pl, "kernel_path", lambda *_, p=path: p)
        logits[path] = q.model(x).logits.float()
    scale = logits["dequantize"].abs().max()
    assert (logits["packed"] - logits["dequantize"]).abs().max() <= 0.05 * scale


def test_the_chosen_path_is_measured_recorded_per_machine_and_inspectable(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPARETO_HOME", str(tmp_path))
    kernel_choice.cache_clear()
    try:
        choice = kernel_choice(8, torch.float32, "decode")
        assert choice["path"] in PATHS and choice["path"] == min(choice["us"], key=choice["us"].get)
        assert set(choice["us"]) == set(PATHS)  # every candidate was timed
        record = json.loads((tmp_path / "kernels.json").read_text())
        (entries,) = record.values()
        assert entries["8|float32|decode"] == choice
        kernel_choice.cache_clear()
        monkeypatch.setattr(pl, "_probe", lambda *a: pytest.fail("probed again"))
        assert kernel_choice(8, torch.float32, "decode") == choice  # read back from disk
    finally:
        kernel_choice.cache_clear()


def test_eval_summary_names_the_path_per_phase(tiny_models):
    q = quantized_model(tiny_models["tiny-qwen2"], Config(weights="int8"))
    summary = kernel_summary(q.model)
    assert set(summary) == {"decode", "prefill", "dequantize_only_layers"}
    assert summary["decode"] in PATHS and summary["dequantize_only_layers"] == 0
    assert kernel_summary(tiny_models["tiny-qwen2"].model) == {}


def test_the_weight_cache_key_follows_the_int4pack_layout(monkeypatch):
    key = weights_module._cache_key("hash", "int4", 64, "", None)
    monkeypatch.setattr(int4pack, "layout", lambda: "lanes32")
    assert weights_module._cache_key("hash", "int4", 64, "", None) != key


@needs_int4pack
@pytest.mark.parametrize("seed", range(4))
def test_int4pack_round_trip_error_is_at_most_half_a_scale_plus_half_an_ulp_of_the_zero(seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=gen) * torch.rand(32, 1, generator=gen) + seed
    layer = PackedLinear.quantize(w, None, 4, 32, symmetric=False)
    err = (layer.dequantized_weight(torch.float32) - w).abs().view(32, 4, 32)
    scale, zero = layer.scale.t().float(), layer.zero.t().float()  # [N, K/g]
    bound = scale / 2 + zero.abs() * 2**-9 + 1e-6
    assert (err <= bound[..., None]).all()


@pytest.mark.parametrize("name", ["lanes64", "lanes32", "pairs32"])
def test_int4pack_rows_reads_any_row_of_every_layout_in_place(name):
    """A lookup reads token rows from the layout the head's kernel multiplies with: every
    layout's rows, in full blocks and in the partial one, match its whole unpacking."""
    gen = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (112, 32), generator=gen).to(torch.uint8)  # 1-3 full blocks
    ids = torch.cat([torch.arange(112), torch.randint(0, 112, (40,), generator=gen)])
    assert torch.equal(int4pack.rows(packed, name, ids), int4pack.unpack(packed, name)[ids])


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantized_rows_are_rows_of_the_dequantized_weight_in_every_layout(shape):
    tiles = PackedLinear.quantize(torch.randn(shape[:2]), None, 4, 16, symmetric=False)
    ids = torch.tensor([0, shape[0] - 1, 3, 3, shape[0] // 2])
    for layer in (_int4(shape), _int8(shape), tiles):
        whole = layer.dequantized_weight(torch.float32)
        assert torch.equal(layer.dequantized_rows(ids, torch.float32), whole[ids])
