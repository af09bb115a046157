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
Checked against the measured peak in tests/test_memory.py (SmolLM2, 1k and 4k, within 10%).
"""

from __future__ import annotations

import torch

from kvpareto.config import Config
from kvpareto.quant.kv_cache import layer_windows


def modeled_activation_peak(
    model_config, config: Config, prompt_len: int, dtype: torch.dtype
) -> int:
    cfg = model_config.get_text_config()
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    e = torch.finfo(dtype).bits // 8
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
        if masked:
            attention += 2 * t * kv * d * e
            if heads > kv:
                attention += 2 * t * heads * d * e
        mlp = c * (3 * inter + 4 * h + 2 * d) * e + mask
        peak = max(peak, attention, mlp)
    return peak
