"""One-row linears (decode steps) by the compiled bf16 matrix-vector kernel, where it is faster.

At one row a linear reads each weight once, so a decode step's linears are bound by the bytes of
the float weights. torch's bf16 linear at one row was measured here at about half the machine's
memory read rate, and a model computing in fp32 with bf16 storage (`CastLinear`) first copies
each weight to fp32. The kernel (csrc/decode_linear.cpp) reads the bf16 weight in place and
accumulates in fp32, for bf16, fp16 and fp32 activations alike.

Whether it beats torch is measured once per machine and activation dtype (`kernel_faster`, kept
in the per-machine record beside the packed weight kernels' choices): a probe times both on a
stack of layers (42 MB) that most CPUs' caches cannot hold, as a model's weights are streamed.
Calls of more than one row (prefill), weights not held in bf16, tensors off the CPU and calls
that need gradients keep torch's path, which is also the reference the tests compare with.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from kvpareto.kernels import build
from kvpareto.kernels.record import measured

# The probe: SmolLM2-sized up_proj layers (1536 x 576), enough of them (42 MB) that on most CPUs
# they stream from memory as a decode step's weights do.
_PROBE_SHAPE, _PROBE_LAYERS, _PROBE_ROUNDS = (1536, 576), 24, 5


class DecodeLinear(torch.nn.Linear):
    """An nn.Linear whose one-row calls run the compiled kernel where this machine measured it
    faster than torch's linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_kernel(x, self.weight):
            return build.kernel().decode_linear(
                x, self.weight, _NO_BIAS if self.bias is None else self.bias
            )
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The call through torch (a subclass may cast the weight first)."""
        return F.linear(x, self.weight, self.bias)


_NO_BIAS = torch.empty(0)


def runs_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a call with input `x` on a `weight` takes the kernel."""
    return (
        not build.torch_only_now()
        and x.numel() == weight.shape[1]
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and kernel_faster(x.dtype)
    )


def install(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make `model`'s plain nn.Linear layers `DecodeLinear`s, and settle now whether the kernel
    wins for `dtype`, the dtype it computes in, so that no probe runs inside a measured forward
    pass. (Subclasses such as the storage dtype's cast linear already are.)"""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = DecodeLinear
    kernel_faster(dtype)


@functools.cache
def kernel_faster(dtype: torch.dtype) -> bool:
    """Whether the kernel beat torch's linear for one-row `dtype` activations on bf16 weights on
    this machine (False where the kernel could not be built or `dtype` is not a float)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or build.kernel() is None:
        return False
    key = f"decode-linear|{str(dtype).removeprefix('torch.')}"
    return measured(key, lambda: _probe(dtype))["path"] == "kernel"


def _probe(dtype: torch.dtype) -> dict:
    """Microseconds per layer of each path over the probe's stack, best of rounds that take
    turns (so that other load on the machine hits both alike)."""
    gen = torch.Generator().manual_seed(0)
    weights = [
        (torch.randn(_PROBE_SHAPE, generator=gen) * 0.05).to(torch.bfloat16)
        for _ in range(_PROBE_LAYERS)
    ]
    x = torch.randn(1, 1, _PROBE_SHAPE[1], generator=gen).to(dtype)
    paths = {
        "kernel": lambda w: build.kernel().decode_linear(x, w, _NO_BIAS),
        "torch": lambda w: F.linear(x, w.to(dtype)),  # the cast is CastLinear's, when dtypes differ
    }
    us = {name: float("inf") for name in paths}
    with torch.inference_mode():
        for _ in range(_PROBE_ROUNDS):
            for name, run in paths.items():
                start = time.perf_counter()
                for w in weights:
                    run(w)
                us[name] = min(us[name], (time.perf_counter() - start) / len(weights) * 1e6)
    us = {name: round(t, 1) for name, t in us.items()}
    return {"path": min(us, key=us.get), "us": us}
