// Decode attention (one query token) read straight from the packed KV stores of kv_cache.py.
//
// Scores come from the codes: with a tile's scale s and zero z, q.(s*code + z) = s*(q.code) +
// z*sum(q), so a K row costs one dot product over its unpacked codes. V rows are accumulated
// the same way: p*s*code per channel, plus p*z per tile, folded in once at the end.
//
// Codes are packed along channels, `per` = 8/bits to a byte: channel per*i + f sits in byte i at
// bits f*bits. Rather than interleave unpacked fields back into channel order, the query and the
// V accumulator are kept "planar" (field f of every byte, then field f+1), so every inner loop
// runs over contiguous bytes and vectorizes.
//
// Work is split over (batch, KV head, chunk of tokens) as in flash-decoding: each part keeps its
// own running max, sum and accumulators, merged per query head at the end. The query heads of a
// GQA group share one KV head, so every unpacked row serves all of them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // tokens per part: enough parts to keep every thread busy

// One stream (K or V) of one (batch, KV head): its packed tiles and its full-precision tail.
template <typename T>
struct Stream {
  const uint8_t* codes;  // [cap * tile_tokens, D / per]
  const at::Half* scale;  // [cap, D / tile_channels]
  const at::Half* zero;   // same, or null when symmetric
  const T* tail;          // [tail_cap, D]
  int64_t bits, tile_tokens, tile_channels, cap, start, q_start, n_q, tail_cap, tail_start;

  int64_t row_bytes(int64_t d) const { return d * bits / 8; }
  // The packed row and tile of kept token t < n_q.
  const uint8_t* code_row(int64_t t, int64_t d) const {
    int64_t u = (t - q_start) / tile_tokens, r = (t - q_start) % tile_tokens;
    return codes + (((start + u) % cap) * tile_tokens + r) * row_bytes(d);
  }
  int64_t tile_row(int64_t t) const { return (start + (t - q_start) / tile_tokens) % cap; }
  const T* tail_row(int64_t t, int64_t d) const {
    return tail + ((tail_start + t - n_q) % tail_cap) * d;
  }
  // The scale and zero of `n` tiles from `at` on, as floats: converted once per row, not per head.
  void tiles(int64_t at, int64_t n, float* s, float* z) const {
    for (int64_t g = 0; g < n; ++g) {
      s[g] = static_cast<float>(scale[at + g]);
      z[g] = zero ? static_cast<float>(zero[at + g]) : -s[g] * static_cast<float>(1 << (bits - 1));
    }
  }
};

// Codes of one row into floats, planar: out[f * nb + i] = field f of byte i.
inline void unpack(const uint8_t* row, int64_t nb, int64_t bits, float* out) {
  const int per = 8 / bits;
  const uint8_t mask = static_cast<uint8_t>((1 << bits) - 1);
  for (int f = 0; f < per; ++f) {
    const int shift = f * bits;
    float* o = out + f * nb;
    for (int64_t i = 0; i < nb; ++i) o[i] = static_cast<float>((row[i] >> shift) & mask);
  }
}

// Channel c = per*i + f to its planar index f*nb + i.
inline int64_t planar(int64_t c, int64_t per, int64_t nb) { return (c % per) * nb + c / per; }

template <typename T>
inline float dot_raw(const float* q, const T* x, int64_t d) {
  float s = 0.f;
  for (int64_t c = 0; c < d; ++c) s += q[c] * static_cast<float>(x[c]);
  return s;
}

// Everything one part needs about one query head of the group.
struct Head {
  std::vector<float> q;       // raw, for the tail and the new token
  std::vector<float> qp;      // rotated if K is, planar: for packed K
  std::vector<float> qs;      // planar q * scale of the current per-channel tile
  std::vector<float> qsum;    // per-token K: sum of rotated q over each group
  float smooth = 0.f;         // q . mean, added to every packed K score
  float bias = 0.f;           // per-channel K: q . zero of the current tile
};

template <typename T>
void run_part(const Stream<T>& K, const Stream<T>& V, std::vector<Head>& heads, const float* k_new,
              const float* v_new, int64_t d, int64_t lo, int64_t hi, int64_t kept, float scaling,
              float* out) {
  const int64_t rep = heads.size();
  const int64_t k_nb = K.row_bytes(d), k_per = 8 / K.bits;
  const int64_t v_nb = V.row_bytes(d), v_per = 8 / V.bits;
  const int64_t v_groups = d / V.tile_channels;
  const int64_t n = hi - lo;
  std::vector<float> scores(n * rep), row(d), zacc(rep * v_groups, 0.f), sc(d), zr(d);
  int64_t tile = -1;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = lo + j;
    if (t == kept) {
      for (int64_t h = 0; h < rep; ++h) scores[j * rep + h] = dot_raw(heads[h].q.data(), k_new, d);
    } else if (t >= K.n_q) {
      const T* x = K.tail_row(t, d);
      for (int64_t h = 0; h < rep; ++h) scores[j * rep + h] = dot_raw(heads[h].q.data(), x, d);
    } else if (K.tile_tokens == 1) {  // per-token: one scale and zero per group of channels
      unpack(K.code_row(t, d), k_nb, K.bits, row.data());
      const int64_t groups = d / K.tile_channels, span = K.tile_channels / k_per;
      K.tiles(K.tile_row(t) * groups, groups, sc.data(), zr.data());
      for (int64_t h = 0; h < rep; ++h) {
        const Head& hd = heads[h];
        float s = hd.smooth;
        for (int64_t g = 0; g < groups; ++g) {
          float acc = 0.f;
          for (int64_t f = 0; f < k_per; ++f) {
            const float* a = hd.qp.data() + f * k_nb + g * span;
            const float* b = row.data() + f * k_nb + g * span;
            for (int64_t i = 0; i < span; ++i) acc += a[i] * b[i];
          }
          s += sc[g] * acc + zr[g] * hd.qsum[g];
        }
        scores[j * rep + h] = s;
      }
    } else {  // per-channel: one scale and zero per channel over a tile of tokens
      if (K.tile_row(t) != tile) {
        tile = K.tile_row(t);
        K.tiles(tile * d, d, sc.data(), zr.data());
        for (Head& hd : heads) {
          hd.bias = 0.f;
          for (int64_t c = 0; c < d; ++c) {
            const int64_t p = planar(c, k_per, k_nb);
            hd.qs[p] = hd.qp[p] * sc[c];
            hd.bias += hd.qp[p] * zr[c];
          }
        }
      }
      unpack(K.code_row(t, d), k_nb, K.bits, row.data());
      for (int64_t h = 0; h < rep; ++h) {
        const float* a = heads[h].qs.data();
        float acc = 0.f;
        for (int64_t i = 0; i < d; ++i) acc += a[i] * row[i];
        scores[j * rep + h] = acc + heads[h].bias + heads[h].smooth;
      }
    }
  }
  // out per head: [max, sum, packed-V accumulator (planar, then in channel order), raw accumulator]
  const int64_t stride = 2 + 2 * d;
  for (int64_t h = 0; h < rep; ++h) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, scores[j * rep + h] * scaling);
    float l = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      float p = std::exp(scores[j * rep + h] * scaling - m);
      scores[j * rep + h] = p;
      l += p;
    }
    float* o = out + h * stride;
    o[0] = m;
    o[1] = l;
    std::fill(o + 2, o + stride, 0.f);
  }
  const int64_t span = V.tile_channels / v_per;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = lo + j;
    if (t >= V.n_q) {
      const float* xf = t == kept ? v_new : nullptr;
      const T* x = t == kept ? nullptr : V.tail_row(t, d);
      for (int64_t h = 0; h < rep; ++h) {
        const float p = scores[j * rep + h];
        float* acc = out + h * stride + 2 + d;
        if (xf)
          for (int64_t c = 0; c < d; ++c) acc[c] += p * xf[c];
        else
          for (int64_t c = 0; c < d; ++c) acc[c] += p * static_cast<float>(x[c]);
      }
      continue;
    }
    unpack(V.code_row(t, d), v_nb, V.bits, row.data());
    V.tiles(V.tile_row(t) * v_groups, v_groups, sc.data(), zr.data());
    for (int64_t h = 0; h < rep; ++h) {
      const float p = scores[j * rep + h];
      float* acc = out + h * stride + 2;
      for (int64_t g = 0; g < v_groups; ++g) {
        const float w = p * sc[g];
        zacc[h * v_groups + g] += p * zr[g];
        for (int64_t f = 0; f < v_per; ++f) {
          float* a = acc + f * v_nb + g * span;
          const float* b = row.data() + f * v_nb + g * span;
          for (int64_t i = 0; i < span; ++i) a[i] += w * b[i];
        }
      }
    }
  }
  for (int64_t h = 0; h < rep; ++h) {  // planar to channel order, zeros folded in
    float* acc = out + h * stride + 2;
    for (int64_t c = 0; c < d; ++c) row[c] = acc[planar(c, v_per, v_nb)];
    for (int64_t c = 0; c < d; ++c) acc[c] = row[c] + zacc[h * v_groups + c / V.tile_channels];
  }
}

template <typename T>
Stream<T> stream_at(const std::vector<torch::Tensor>& store, const std::vector<int64_t>& layout,
                    int64_t bh) {
  // store: codes, scale, zero (empty if symmetric), tail; layout: bits, tile_tokens,
  // tile_channels, start, q_start, n_q, tail_start
  const auto& codes = store[0];
  const auto& scale = store[1];
  const auto& zero = store[2];
  const auto& tail = store[3];
  Stream<T> s{};
  s.bits = layout[0];
  s.tile_tokens = layout[1];
  s.tile_channels = layout[2];
  s.start = layout[3];
  s.q_start = layout[4];
  s.n_q = layout[5];
  s.tail_start = layout[6];
  s.cap = scale.numel() ? scale.size(2) : 1;
  s.tail_cap = tail.numel() ? tail.size(2) : 1;
  if (codes.numel()) {
    s.codes = codes.data_ptr<uint8_t>() + bh * codes.size(2) * codes.size(3);
    s.scale = scale.data_ptr<at::Half>() + bh * scale.size(2) * scale.size(3);
    s.zero = zero.numel() ? zero.data_ptr<at::Half>() + bh * zero.size(2) * zero.size(3) : nullptr;
  }
  if (tail.numel()) s.tail = tail.data_ptr<T>() + bh * tail.size(2) * tail.size(3);
  return s;
}

template <typename T>
torch::Tensor decode(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                     const std::vector<torch::Tensor>& k_store, const std::vector<int64_t>& k_layout,
                     const std::vector<torch::Tensor>& v_store, const std::vector<int64_t>& v_layout,
                     const torch::Tensor& k_mean, const torch::Tensor& k_rot,
                     const torch::Tensor& v_rot, int64_t lo, int64_t kept, double scaling) {
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), Hkv = k_new.size(1);
  const int64_t rep = Hq / Hkv, n = kept + 1 - lo, parts = (n + kChunk - 1) / kChunk;
  const int64_t stride = 2 + 2 * d;
  auto partial = torch::empty({B * Hkv, parts, rep, stride}, q.options());
  const float* kr = k_rot.numel() ? k_rot.data_ptr<float>() : nullptr;
  std::vector<std::vector<Head>> groups(B * Hkv, std::vector<Head>(rep));
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t k_per = 8 / k_layout[0], k_nb = d * k_layout[0] / 8, tc = k_layout[2];
      for (int64_t h = 0; h < rep; ++h) {
        Head& hd = groups[bh][h];
        const float* qh = q.data_ptr<float>() + ((bh / Hkv) * Hq + (bh % Hkv) * rep + h) * d;
        hd.q.assign(qh, qh + d);
        std::vector<float> qr(qh, qh + d);
        if (kr)  // q . (x R^T) = (q R) . x: rotate the query once instead of every key
          for (int64_t e = 0; e < d; ++e) {
            float s = 0.f;
            for (int64_t c = 0; c < d; ++c) s += qh[c] * kr[c * d + e];
            qr[e] = s;
          }
        hd.qp.resize(d);
        hd.qs.resize(d);
        for (int64_t c = 0; c < d; ++c) hd.qp[planar(c, k_per, k_nb)] = qr[c];
        hd.qsum.assign(d / tc, 0.f);
        for (int64_t c = 0; c < d; ++c) hd.qsum[c / tc] += qr[c];
        if (k_mean.numel()) {
          const at::Half* mean = k_mean.data_ptr<at::Half>() + bh * d;
          for (int64_t c = 0; c < d; ++c) hd.smooth += qh[c] * static_cast<float>(mean[c]);
        }
      }
    }
  });
  at::parallel_for(0, B * Hkv * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / parts, part = unit % parts;
      std::vector<Head> heads = groups[bh];  // a copy: a part moves its own per-channel tile
      const int64_t a = lo + part * kChunk, b = std::min(a + kChunk, kept + 1);
      run_part<T>(stream_at<T>(k_store, k_layout, bh), stream_at<T>(v_store, v_layout, bh), heads,
                  k_new.data_ptr<float>() + bh * d, v_new.data_ptr<float>() + bh * d, d, a, b,
                  kept, static_cast<float>(scaling),
                  partial.data_ptr<float>() + (bh * parts + part) * rep * stride);
    }
  });
  auto out = torch::empty({B, Hq, d}, q.options());
  const float* vr = v_rot.numel() ? v_rot.data_ptr<float>() : nullptr;
  const float* pd = partial.data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> enc(d), raw(d);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Hq, hq = bq % Hq, bh = b * Hkv + hq / rep, h = hq % rep;
      float m = -std::numeric_limits<float>::infinity(), l = 0.f;
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, pd[((bh * parts + p) * rep + h) * stride]);
      std::fill(enc.begin(), enc.end(), 0.f);
      std::fill(raw.begin(), raw.end(), 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const float* o = pd + ((bh * parts + p) * rep + h) * stride;
        const float w = std::exp(o[0] - m);
        l += w * o[1];
        for (int64_t c = 0; c < d; ++c) enc[c] += w * o[2 + c];
        for (int64_t c = 0; c < d; ++c) raw[c] += w * o[2 + d + c];
      }
      float* dst = od + bq * d;
      for (int64_t c = 0; c < d; ++c) {
        float s = raw[c];
        if (vr)  // V was stored as v R: rotate the weighted sum back once
          for (int64_t e = 0; e < d; ++e) s += enc[e] * vr[c * d + e];
        else
          s += enc[c];
        dst[c] = s / l;
      }
    }
  });
  return out;
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_new,
                               const torch::Tensor& v_new, const std::vector<torch::Tensor>& k_store,
                               const std::vector<int64_t>& k_layout,
                               const std::vector<torch::Tensor>& v_store,
                               const std::vector<int64_t>& v_layout, const torch::Tensor& k_mean,
                               const torch::Tensor& k_rot, const torch::Tensor& v_rot, int64_t lo,
                               int64_t kept, double scaling) {
  const auto tail = k_store[3].scalar_type();
  if (tail == at::kBFloat16)
    return decode<at::BFloat16>(q, k_new, v_new, k_store, k_layout, v_store, v_layout, k_mean,
                                k_rot, v_rot, lo, kept, scaling);
  if (tail == at::kHalf)
    return decode<at::Half>(q, k_new, v_new, k_store, k_layout, v_store, v_layout, k_mean, k_rot,
                            v_rot, lo, kept, scaling);
  return decode<float>(q, k_new, v_new, k_store, k_layout, v_store, v_layout, k_mean, k_rot, v_rot,
                       lo, kept, scaling);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "Attention of one query token over a packed KV store (see the file's opening comment)");
}
