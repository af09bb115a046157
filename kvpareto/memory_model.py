"""The modeled (analytic) activation peak of a chunked prefill, for the decoder-only families here.

The peak is the larger of two moments in one decoder layer, taken over every prefill chunk of
c tokens with p tokens already cached (t = p + c visible), with e bytes per element:

- at the attention call: the residual stream (embeddings, residual, normed input: 3h), q and the
  attention output (2 H d), the chunk's k and v (2 kv d) and rotary cos/sin (2 d), all times c;
  plus, once a cache exists (p > 0), the k/v the cache returns (2 t kv d); plus, once a mask is
  needed (p > 0), a bool c x t mask and the k/v repeated to all query heads (2 t H d), since
  transformers' SDPA path only uses grouped-query attention natively when no mask is given;
- in the MLP: three c x I intermediates (gate activation, up, their product), four copies of the
  residual stream and cos/sin, plus the mask when there is one.

Unchunked prefill has no mask and no repeat, which is why chunking wins twice at long context.
Packed weights (`weights` int8/int4/awq4) add a third moment: the widest linear running on its
chunk, with its dequantized weight and, for int4, the unpacked codes alive when the chunk takes
the dequantize path, or only its activations cast to bf16 when it takes a packed kernel (the path
measured on this machine, `packed_linear.call_path`; see `_weight_moment`).
It only sets the peak when chunks are small; otherwise it hides under the other two.

e is the compute dtype's size. When weights and full-precision K/V are held in another (storage)
dtype, `models.storage_dtype` casts them as they are used, which adds:
- at the attention call, the k/v the cache returns even when p = 0: a cast copy of the stored
  ones, where an uncast 16-bit cache hands back the tensor it holds (so t = c there);
- a fourth moment, the largest weight cast (`_cast_moment`). A float decoder linear's cast copy
  lives while it runs. The widest is an MLP projection (I x h), and while up_proj runs in
  down(act(gate(x)) * up(x)), act(gate(x)) and up's output (2 c I) are live beside it, with the
  residual stream (residual, normed input, layer input: 3 h per token). The LM head casts in row
  blocks of at most `CAST_BLOCK` elements, with the last hidden states (c h) and the logits
  (vocab, plus the block being written) beside it.
Checked against the measured peak in tests/test_memory.py (SmolLM2, 1k and 4k, within 10%) and,
for fp32 compute over bf16 storage, in tests/test_storage_dtype.py.
"""

from __future__ import annotations

import torch

from kvpareto.config import Config
from kvpareto.models.storage_dtype import cast_elements
from kvpareto.quant.kv_cache import layer_windows


def modeled_activation_peak(
    model_config,
    config: Config,
    prompt_len: int,
    dtype: torch.dtype,
    storage: torch.dtype | None = None,
) -> int:
    """The modeled peak in bytes, computing in `dtype` with weights and full-precision K/V held
    in `storage` (default: `dtype`)."""
    cfg = model_config.get_text_config()
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    e = torch.finfo(dtype).bits // 8
    casts = storage is not None and storage != dtype
    windows = set(layer_windows(model_config))
    masks_per_chunk = len(windows)  # one mask per distinct attention pattern (global, sliding)

    step = config.chunk_size or prompt_len
    peak = 0
    for p in range(0, prompt_len, step):
        c = min(step, prompt_len - p)
        # The widest layer sees all t tokens; a sliding layer sees at most its window.
        t = max(p + c if w is None else min(p, w - 1) + c for w in windows)
        masked = p > 0
        mask = masks_per_chunk * c * t if masked else 0
        attention = c * (3 * h + 2 * heads * d + 2 * kv * d + 2 * d) * e + mask
        if masked or casts:
            attention += 2 * t * kv * d * e
        if masked and heads > kv:
            attention += 2 * t * heads * d * e
        mlp = c * (3 * inter + 4 * h + 2 * d) * e + mask
        peak = max(peak, attention, mlp, _weight_moment(cfg, config, c, dtype))
        if casts:
            peak = max(peak, _cast_moment(cfg, config, c, e))
    return peak


def _cast_moment(cfg, config: Config, c: int, e: int) -> int:
    """Bytes live while the largest weight cast copy exists (see the module docstring)."""
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    head_block = cast_elements(vocab, h)
    head = (head_block + c * h + vocab + head_block // h) * e
    if config.weights != "none":  # packed decoder linears never cast their weights
        return head
    heads = cfg.num_attention_heads
    q = heads * (getattr(cfg, "head_dim", None) or h // heads)
    widest = max(cast_elements(o, i) for o, i in ((inter, h), (h, inter), (q, h), (h, q)))
    return max(head, widest * e + c * (2 * inter + 3 * h) * e)


def _weight_moment(cfg, config: Config, c: int, dtype: torch.dtype) -> int:
    """Bytes live while the widest packed linear (down_proj) runs on a chunk of c tokens."""
    from kvpareto.quant import int4pack
    from kvpareto.quant.packed_linear import call_path, weight_group

    if config.weights == "none":
        return 0
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or h // heads
    width = max(inter, heads * d)  # the input width of the widest linear; its output is h
    e = torch.finfo(dtype).bits // 8
    chunk = c * (inter + 3 * h) * e
    bits = 8 if config.weights == "int8" else 4
    group = weight_group(config.weight_group_size, width) if bits == 4 else width
    path = call_path(bits, (h, width), group, dtype, c)
    if path == "packed-bf16":
        return chunk + c * (width + h) * 2
    if path == "packed":
        return chunk
    # The dequantized weight, plus the codes unpacked beside it: none for int8; for int4, one
    # byte a weight from torch's int4pack layout, 1.5 from the tile codec's (the tail of its
    # shifted fields; measured on SmolLM2's down_proj: 3.15 MB in bf16).
    codes = 0 if bits == 8 else 1.0 if int4pack.supports(h, width, group) else 1.5
    return int(h * width * (e + codes)) + chunk
