"""The token embedding and the LM head held as packed integer tables (the `embed_weights` knob).

In small models the vocabulary table is a large share of the bytes (SmolLM2: 49152 x 576, 21% of
its parameters), so it is quantized by rows, the way a lookup reads it:

    int8   one symmetric bf16 scale per token row: `Int8PackLinear`'s layout, the one
           `_weight_int8pack_mm` reads (it takes no zero point, hence symmetric);
    int4   a bf16 scale and zero per group of `EMBED_GROUP` values of a row: `Int4PackLinear`'s
           int4pack layout, asymmetric because that layout holds a zero whether used or not
           (the tile codec's fp16 scale and zero where int4pack refuses the shape).

A tied model holds its table once, as one `PackedLinear`: the LM head (`PackedHead`) runs it
through the same packed kernels as the decoder's linears, and the lookup (`PackedEmbedding`)
decodes only the rows of the tokens it reads (`PackedLinear.dequantized_rows`; in the int4pack
layout a row is one byte column of its block, read in place by `int4pack.rows`). Both modules
hold the same table, so `model.modules()` yields it once and its bytes count once. An untied
model gets two tables: the head's is a packed linear of the head's own weight.

The group of 32 is llama.cpp's q4_0 block; `packed_linear.weight_group` halves it for a hidden
size it does not divide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpareto.models.storage_dtype import CAST_BLOCK, compute_dtype
from kvpareto.weights.packed_linear import PackedLinear, weight_group

BITS = {"int8": 8, "int4": 4}
EMBED_GROUP = 32


def table_group(method: str, hidden: int) -> int:
    """The group a table of `hidden`-wide rows is quantized in: the whole row for int8."""
    return hidden if BITS[method] == 8 else weight_group(EMBED_GROUP, hidden)


def pack_table(weight: torch.Tensor, bias, method: str) -> PackedLinear:
    """A [vocab, hidden] matrix as a packed token table."""
    bits = BITS[method]
    group = table_group(method, weight.shape[1])
    return PackedLinear.quantize(weight.detach(), bias, bits, group, symmetric=bits == 8)


class PackedEmbedding(torch.nn.Module):
    """An nn.Embedding whose table is a packed `PackedLinear`; returns rows in the model's
    compute dtype (times `embed_scale`, for the families that scale their embeddings)."""

    def __init__(self, table: PackedLinear, like: torch.nn.Embedding, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.padding_idx = like.padding_idx
        self.compute_dtype, self.storage_dtype = dtype, like.weight.dtype
        scale = getattr(like, "embed_scale", None)
        self.register_buffer("embed_scale", scale, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantized_rows(input_ids.reshape(-1), self.compute_dtype)
        rows = rows.view(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:  # Gemma3 rounds its scale to the weights' dtype
            rows = rows * self.embed_scale.to(self.storage_dtype)
        return rows


class PackedHead(torch.nn.Module):
    """The LM head y = x T^T over a packed table T [vocab, hidden]: the packed kernel where this
    machine's probe chose it, else dequantized in blocks of rows (`CAST_BLOCK` weights), so the
    vocabulary-sized matrix never exists whole in a float dtype."""

    def __init__(self, table: PackedLinear):
        super().__init__()
        self.table = table
        self.in_features, self.out_features = table.in_features, table.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.table.path(x.dtype, x.numel() // self.in_features)
        if path != "dequantize":
            return self.table.forward_via(path, x)
        rows = head_block_rows(self.out_features, self.in_features)
        y = x.new_empty(*x.shape[:-1], self.out_features)
        bias = None if self.table.bias is None else self.table.bias.to(x.dtype)
        for start in range(0, self.out_features, rows):
            block = slice(start, min(start + rows, self.out_features))
            ids = torch.arange(block.start, block.stop)
            weight = self.table.dequantized_rows(ids, x.dtype)
            y[..., block] = F.linear(x, weight, None if bias is None else bias[block])
        return y


def head_block_rows(vocab: int, hidden: int) -> int:
    """Rows of the table the head dequantizes at once on its dequantize path."""
    return min(vocab, max(CAST_BLOCK // hidden, 1))


def quantize_embeddings(model: torch.nn.Module, method: str) -> None:
    """Replace `model`'s input embedding and LM head, in place, by packed ones: one table if
    they are tied, two if not."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embedding.weight
    table = pack_table(embedding.weight, None, method)
    head_table = table if tied else pack_table(head.weight, head.bias, method)
    install(model, table, head_table)


def install(model, table: PackedLinear, head_table: PackedLinear) -> None:
    """Put packed tables in place of `model`'s embedding and LM head."""
    embedding = model.get_input_embeddings()
    table.embedding_table = head_table.embedding_table = True
    model.set_input_embeddings(PackedEmbedding(table, embedding, compute_dtype(model)))
    model.set_output_embeddings(PackedHead(head_table))
    # The tables are shared by module, not by parameter, so transformers has nothing left to
    # tie; without this, `tie_weights()` (lm-eval calls it) looks for `embed_tokens.weight`.
    model._tied_weights_keys = None
    model.all_tied_weights_keys = {}


def tables(model: torch.nn.Module) -> tuple[PackedLinear, PackedLinear] | None:
    """(embedding table, head table) of a model with packed embeddings (the same object twice
    when tied), or None."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, PackedEmbedding):
        return None
    return embedding.table, head.table
