"""Whether torch's CPU flash attention packs K and V on this machine, found by running it once.

Where oneDNN's brgemm micro-kernels serve a reduced-precision dtype (bf16 on CPUs with AMX),
torch's flash attention reorders K and V into packed copies before its main loop whenever the
call is large enough (`packs_call` states torch 2.13's rule), and those copies are activation
memory. Whether the kernels are there depends on the CPU and on oneDNN's settings (for example
ONEDNN_MAX_CPU_ISA), so rather than read CPU flags this runs one call far above the size rule
and looks for the packed copies among its allocations.
"""

from __future__ import annotations

import functools

import torch
from torch.profiler import ProfilerActivity, profile

# The probe's call: one head, 128 queries over 192 keys of 64 channels. Its packed K and V
# (192 x 64 each) are the only allocations of their size.
_Q, _KV, _D = 128, 192, 64


@functools.cache
def sdpa_packs(dtype: torch.dtype) -> bool:
    """Whether flash attention in `dtype` packs K and V here when a call is large enough."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False  # only reduced-precision types have a packed path
    q = torch.zeros(1, 1, _Q, _D, dtype=dtype)
    kv = torch.zeros(1, 1, _KV, _D, dtype=dtype)
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p,
    ):
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kv, kv)
    packed = _KV * _D * q.element_size()
    sizes = [e.nbytes() for e in p.profiler.kineto_results.events() if e.name() == "[memory]"]
    return sizes.count(packed) >= 2


def packs_call(
    packs: bool,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    d: int,
    c: int,
    t: int,
    q_block: int,
    threads: int,
    causal: bool,
) -> bool:
    """Whether a flash-attention call of c queries (`heads` heads, blocks of `q_block`) over t
    keys (`kv_heads` heads) of d channels packs, on a machine where calls in `dtype` can
    (`packs`, what `sdpa_packs(dtype)` found there): both lengths reach a threshold (64 for
    bf16, 16 for fp16), and the per-thread GEMM work is at least 4x (bf16) or 1x (fp16) the
    packing work."""
    if not packs:
        return False
    bf16 = dtype == torch.bfloat16
    if min(c, t) < (64 if bf16 else 16):
        return False
    q_blocks_per_thread = (heads * -(-c // q_block) + threads - 1) // threads
    gemm = q_blocks_per_thread * q_block * (min(c, t) if causal else t) * d
    return gemm / (kv_heads * t * d) >= (4 if bf16 else 1)
