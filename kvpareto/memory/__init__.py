"""Memory: bytes measured (held tensors, allocator peaks) and modeled (closed form).

`MemoryParts` is the one shape both take; it lives here, apart from the torch code that measures,
so that trial records can be read without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MemoryParts:
    weights_bytes: int
    kv_bytes: int  # the most the KV cache held during prefill (see measure.measure_prefill)
    activation_peak_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_peak_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}
