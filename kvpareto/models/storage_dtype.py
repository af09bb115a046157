"""Float weights held in a storage dtype while the model computes in another.

Memory figures are of what a deployment holds, so a model's float weights (linears, embeddings,
norms) stay in the storage dtype whatever dtype this machine computes in. When the two differ,
`compute_in` makes every op cast at its own boundary and let the copy go:
- a linear casts its weight to its input's dtype, in row blocks of at most `CAST_BLOCK` elements,
  so that a tied LM head (49152 x 576 in SmolLM2) never exists whole in fp32 (a one-row call
  that the compiled decode linear takes reads the bf16 weight in place and casts nothing);
- an embedding casts the rows it looked up, not its table;
- a norm multiplies its storage-dtype weight into compute-dtype activations, and type promotion
  casts inside that op (the RMSNorms of every supported family compute this way).
The copies are temporaries: the activation measurement sees them and `memory_model` counts the
largest. When the dtypes agree nothing is installed, so that path costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpareto.errors import UserError
from kvpareto.kernels.decode_linear import DecodeLinear

CAST_BLOCK = 2**20  # the most weight elements one cast copy holds


def cast_elements(out_features: int, in_features: int) -> int:
    """Elements of the largest block a `CastLinear` of this shape casts at once."""
    rows = min(out_features, max(CAST_BLOCK // in_features, 1))
    return rows * in_features


class CastLinear(DecodeLinear):
    """An nn.Linear whose weight stays in the storage dtype and is cast for each call."""

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = cast_elements(self.out_features, self.in_features) // self.in_features
        if rows == self.out_features:
            return F.linear(x, self.weight.to(x.dtype), _to(self.bias, x.dtype))
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows):
            block = slice(start, start + rows)
            bias = None if self.bias is None else self.bias[block]
            y[..., block] = F.linear(x, self.weight[block].to(x.dtype), _to(bias, x.dtype))
        return y


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def storage_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's float weights are held in."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in (its storage dtype unless `compute_in` said otherwise)."""
    return getattr(model, "kvpareto_compute_dtype", None) or storage_dtype(model)


def compute_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make `model`, held in its storage dtype, compute in `dtype` (see the module docstring)."""
    model.kvpareto_compute_dtype = dtype
    storage = storage_dtype(model)
    if dtype == storage:
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = CastLinear
        elif isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(lambda m, args, out: out.to(dtype))
        elif _holds_floats(module) and not type(module).__name__.endswith("RMSNorm"):
            raise UserError(
                f"{type(module).__name__} layers cannot compute in {dtype_name(dtype)} while "
                f"stored in {dtype_name(storage)}; pass --storage-dtype {dtype_name(dtype)}"
            )


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name as the CLI, the JSON and the cache keys write it, e.g. bfloat16."""
    return str(dtype).removeprefix("torch.")


def _holds_floats(module: torch.nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))
