"""embed_weights: the token embedding and LM head as packed tables, held once where tied."""

from __future__ import annotations

import pytest
import torch

from kvpareto.config import Config
from kvpareto.memory.measure import weights_bytes_measured, weights_bytes_modeled
from kvpareto.models import LoadedModel, load_model
from kvpareto.models.tiny import build_tiny
from kvpareto.weights import embedding
from kvpareto.weights import packed_linear as pl
from kvpareto.weights.embedding import PackedEmbedding, PackedHead
from kvpareto.weights.packed_linear import Int4PackLinear, Int8PackLinear, PackedLinear
from kvpareto.weights.quantize import quantized_model

VOCAB, HIDDEN = 320, 128  # the tiny models' table
# Packed bytes of one 320 x 128 table: int8 a byte a value and a bf16 scale per row; int4 half a
# byte a value and a 2-byte scale and zero per group of 32.
TABLE_BYTES = {"int8": VOCAB * (HIDDEN + 2), "int4": VOCAB * HIDDEN // 2 + VOCAB * HIDDEN // 8}


def _ids(n=40, seed=1):
    return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def untied_llama():
    model, tok, identity = build_tiny("llama", torch.bfloat16, tied=False)
    loaded = load_model("tiny-llama", dtype=torch.bfloat16)
    return LoadedModel(model, tok, loaded.spec, identity)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_tied_table_is_one_packed_matrix_counted_once(tiny_models, method):
    loaded = tiny_models["tiny-llama"]
    q = quantized_model(loaded, Config(embed_weights=method)).model
    embed, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert isinstance(embed, PackedEmbedding) and isinstance(head, PackedHead)
    assert embed.table is head.table
    assert isinstance(head.table, Int8PackLinear if method == "int8" else Int4PackLinear)
    saved = VOCAB * HIDDEN * 2 - TABLE_BYTES[method]
    assert weights_bytes_measured(q) == weights_bytes_modeled(q)
    assert weights_bytes_measured(q) == weights_bytes_measured(loaded.model) - saved


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_an_untied_head_is_a_packed_linear_of_its_own_weight(untied_llama, method):
    q = quantized_model(untied_llama, Config(embed_weights=method)).model
    embed, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert embed.table is not head.table
    float_head = untied_llama.model.get_output_embeddings().weight.float()
    assert torch.allclose(head.table.dequantized_weight(torch.float32), float_head, atol=0.01)
    saved = 2 * (VOCAB * HIDDEN * 2 - TABLE_BYTES[method])
    assert weights_bytes_measured(q) == weights_bytes_modeled(q)
    assert weights_bytes_measured(q) == weights_bytes_measured(untied_llama.model) - saved


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_the_lookup_decodes_only_the_rows_it_reads(tiny_models, monkeypatch, method, name):
    q = quantized_model(tiny_models[name], Config(embed_weights=method)).model
    embed = q.get_input_embeddings()
    whole = embed.table.dequantized_weight(torch.bfloat16)  # the model computes in bf16
    monkeypatch.setattr(type(embed.table), "dequantized_weight", None)  # the lookup must not
    ids = torch.tensor([[5, 300, 5, 17], [0, 319, 64, 128]])
    scale = getattr(tiny_models[name].model.get_input_embeddings(), "embed_scale", None)
    expected = whole[ids] if scale is None else whole[ids] * scale.to(torch.bfloat16)
    assert torch.equal(embed(ids), expected)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_head_agrees_across_its_kernel_and_blockwise_dequantize_paths(
    tiny_models, monkeypatch, method
):
    q = quantized_model(tiny_models["tiny-llama"], Config(embed_weights=method)).model
    head = q.get_output_embeddings()
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    reference = x.float() @ head.table.dequantized_weight(torch.float32).T
    monkeypatch.setattr(pl, "kernel_path", lambda *_: "packed")
    packed = head(x).float()
    monkeypatch.setattr(pl, "kernel_path", lambda *_: "dequantize")
    monkeypatch.setattr(embedding, "CAST_BLOCK", 100 * HIDDEN)  # 100 rows: 4 blocks, one partial
    blockwise = head(x).float()
    scale = reference.abs().max()
    assert (packed - reference).abs().max() <= 0.02 * scale
    assert (blockwise - reference).abs().max() <= 0.02 * scale


def test_int8_embeddings_keep_logits_close_and_int4_stays_finite(tiny_models):
    """Measured on the four tiny models (bf16, 40 tokens): the largest logit difference over the
    largest logit is 0.013-0.022 with int8 tables and 0.10-0.15 with int4 ones."""
    for name, loaded in tiny_models.items():
        x = _ids()
        base = loaded.model(x).logits.float()
        errors = {}
        for method in ("int8", "int4"):
            logits = quantized_model(loaded, Config(embed_weights=method)).model(x).logits.float()
            assert torch.isfinite(logits).all()
            errors[method] = ((logits - base).abs().max() / base.abs().max()).item()
        assert errors["int8"] <= 0.05, (name, errors)
        assert errors["int8"] < errors["int4"] <= 0.5, (name, errors)


def test_storage_and_compute_dtypes_keep_their_roles(tiny_models):
    """Bytes are the storage's whatever the compute dtype; rows come out in the compute dtype."""
    fp32 = load_model("tiny-llama", dtype=torch.float32, storage_dtype=torch.bfloat16)
    figures = []
    for loaded, dtype in ((tiny_models["tiny-llama"], torch.bfloat16), (fp32, torch.float32)):
        q = quantized_model(loaded, Config(embed_weights="int4")).model
        assert q.get_input_embeddings()(_ids()).dtype == dtype
        assert q(_ids()).logits.dtype == dtype
        figures.append(weights_bytes_measured(q))
    assert figures[0] == figures[1]


def test_tie_weights_leaves_the_packed_tables_in_place(tiny_models):
    """lm-eval's HFLM calls tie_weights() on the model it is given."""
    q = quantized_model(tiny_models["tiny-qwen2"], Config(embed_weights="int8")).model
    before = q.get_input_embeddings().table
    q.tie_weights()
    assert q.get_input_embeddings().table is before is q.get_output_embeddings().table


def test_the_decoder_summaries_leave_the_token_table_out(tiny_models):
    q = quantized_model(
        tiny_models["tiny-llama"],
        Config(weights="int4", weight_group_size=64, embed_weights="int4"),
    ).model
    summary = pl.kernel_summary(q)
    assert {"decode", "prefill", "embedding"} <= summary.keys()
    decoder = [m for m in q.modules() if isinstance(m, PackedLinear) and not m.embedding_table]
    assert {m.group for m in decoder} == {64} and q.get_output_embeddings().table.group == 32
