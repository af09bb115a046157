// Decode attention (one query token) read straight from the KV stores of kv/static.py: packed
// quantized tiles, then a full-precision tail (a 16-bit stream is all tail).
//
// Each row is read once for every query head of its GQA group, and the dequantized history is
// never materialized. Rows of per-token tiles, and full-precision rows, are dequantized a vector
// at a time in registers (code * scale + zero of its tile), with the heads' running sums held in
// registers too (the head count is a template argument, so they are not spilled): for K, one
// vector of partial sums per token and head, a block of kLanes tokens then summed at once
// (`vhsums`); for V, one vector of channels at a time over all the part's tokens. Before that,
// a row went through a scratch row in memory and every head's V accumulator was updated in
// memory token after token: bound by stores, 2.5x slower (docs/findings.md). Rows of
// per-channel K tiles, and other shapes, still take the scratch row.
//
// Codes are packed along channels, `per` = 8/bits to a byte: channel per*i + f sits in byte i at
// bits f*bits. Rather than interleave unpacked fields back into channel order, the rotated
// query, the scratch row and the packed-V accumulator are kept "planar" (field f of every byte,
// then field f+1), so every inner loop runs over contiguous floats and vectorizes.
//
// The inner loops (unpacking codes, dot products, axpy, bf16 rows) use the vector helpers of
// vec.h. The softmax's exp is a polynomial over the same helpers (libm's expf is called one lane
// at a time).
//
// Work is split over (batch, KV head, chunk of tokens) as in flash-decoding: each part keeps its
// own running max, sum and accumulators, merged per query head at the end.
// ATen alone, not torch/extension.h: the Python bindings live in module.cpp, and this file then
// compiles in a quarter of the time.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

using namespace kvpareto;

constexpr int64_t kChunk = 256;  // tokens per part: enough parts to keep every thread busy

// exp(x) for x <= 0 (scores minus their max): 2^n * e^r with |r| <= ln2/2 and e^r by its Taylor
// series to r^6 (relative error ~1e-7, under fp32's rounding of the scores themselves). Below
// -87 it returns e^-87 (~1.6e-38) instead of a denormal: a weight nothing can add to. A NaN
// stays NaN (vmax keeps its second operand), so a broken trial still reads as one.
inline Vec vexp_nonpositive(Vec x) {
  x = vmax(vset(-87.f), x);
  const Vec n = vround(vmul(x, vset(1.44269504f)));
  // ln2 split in two so that n * hi is exact
  const Vec r = vfma(n, vset(2.12194440e-4f), vfma(n, vset(-0.693359375f), x));
  Vec p = vset(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = vfma(p, r, vset(c));
  return vmul(p, vpow2(n));
}

// Softmax numerators of `s[0:n] * scaling` in place; returns their max (of the scaled scores)
// and adds their sum to `sum`.
float softmax_numerators(float* s, int64_t n, float scaling, float& sum) {
  const Vec scv = vset(scaling);
  float lanes[kLanes];
  Vec mv = vset(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) mv = vmax(mv, vmul(vload(s + j), scv));
  vstore(lanes, mv);
  float m = *std::max_element(lanes, lanes + kLanes);
  for (; j < n; ++j) m = std::max(m, s[j] * scaling);
  mv = vset(m);
  Vec acc = vzero();
  j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec p = vexp_nonpositive(vsub(vmul(vload(s + j), scv), mv));
    vstore(s + j, p);
    acc = vfma(p, vset(1.f), acc);
  }
  float l = vsum(acc);
  for (; j < n; ++j) {
    vstore(lanes, vexp_nonpositive(vset(s[j] * scaling - m)));
    s[j] = lanes[0];
    l += lanes[0];
  }
  sum += l;
  return m;
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc = vzero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// a . b as a vector of kLanes partial sums, for n a multiple of kLanes (`vhsums` adds them up).
inline Vec dot_lanes(const float* a, const float* b, int64_t n) {
  Vec acc = vzero();
  for (int64_t i = 0; i < n; i += kLanes) acc = vfma(vload(a + i), vload(b + i), acc);
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  const Vec wv = vset(w);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(y + i, vfma(wv, vload(x + i), vload(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

enum class Float { f32, f16, bf16 };

Float float_type(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16) return Float::bf16;
  if (t.scalar_type() == at::kHalf) return Float::f16;
  return Float::f32;
}

// A full-precision row as floats: `out` is filled unless the row already is fp32 in memory.
const float* load_row(const void* src, Float type, int64_t d, float* out) {
  if (type == Float::f32) return static_cast<const float*>(src);
  if (type == Float::bf16) {
    const uint16_t* h = static_cast<const uint16_t*>(src);
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes) vstore(out + i, vbf16(h + i));
    for (; i < d; ++i) {
      const uint32_t u = static_cast<uint32_t>(h[i]) << 16;
      std::memcpy(out + i, &u, sizeof u);
    }
    return out;
  }
  const at::Half* h = static_cast<const at::Half*>(src);
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(h[i]);
  return out;
}

// Channel c = per*i + f to its planar index f*nb + i.
inline int64_t planar(int64_t c, int64_t per, int64_t nb) { return (c % per) * nb + c / per; }

// One stream (K or V) of one (batch, KV head): its packed tiles, then its full-precision tail.
// Token indices count kept tokens; the tail holds [tail_first, kept), the packed store
// [q_start, n_q), each in a ring of `cap` (tiles) or `tail_cap` (rows) slots.
struct Stream {
  const uint8_t* codes = nullptr;    // [cap * tile_tokens, D / per]
  const at::Half* scale = nullptr;   // [cap, D / tile_channels]
  const at::Half* zero = nullptr;    // same, or null when symmetric
  const char* tail = nullptr;        // [tail_cap, D] of tail_type
  Float tail_type = Float::f32;
  int64_t tail_row_bytes = 0;
  int64_t bits = 16, per = 1, nb = 0, tile_tokens = 1, tile_channels = 1;
  int64_t cap = 1, start = 0, q_start = 0, n_q = 0, tail_cap = 1, tail_start = 0, tail_first = 0;

  int64_t groups(int64_t d) const { return d / tile_channels; }
  // Where token t is held: a packed token's tile slot and row in its tile, or a tail token's
  // slot. A part walks its tokens in order with `next_*`, as integer division costs more than
  // a dequantized row's arithmetic.
  void packed_at(int64_t t, int64_t& slot, int64_t& row) const {
    slot = (start + (t - q_start) / tile_tokens) % cap;
    row = (t - q_start) % tile_tokens;
  }
  void next_packed(int64_t& slot, int64_t& row) const {
    if (++row == tile_tokens) {
      row = 0;
      if (++slot == cap) slot = 0;
    }
  }
  int64_t tail_at(int64_t t) const { return (tail_start + t - tail_first) % tail_cap; }
  void next_tail(int64_t& slot) const {
    if (++slot == tail_cap) slot = 0;
  }
  const float* tail_row(int64_t slot, int64_t d, float* scratch) const {
    return load_row(tail + slot * tail_row_bytes, tail_type, d, scratch);
  }
  // The scale and zero of `n` tiles from `at` on, as floats.
  void tiles(int64_t at, int64_t n, float* s, float* z) const {
    for (int64_t g = 0; g < n; ++g) {
      s[g] = static_cast<float>(scale[at + g]);
      z[g] = zero ? static_cast<float>(zero[at + g]) : -s[g] * static_cast<float>(1 << (bits - 1));
    }
  }
};

// Scratch one part reuses token after token; allocated once per thread and chunk of parts.
struct Scratch {
  std::vector<float> scores, row, s, z, ps, pz;
  std::vector<float> ts, tz;         // per-token tiles' scales and zeros, [token, group]
  std::vector<const uint8_t*> rows;  // per-token tiles' code rows
  std::vector<float> lanes;          // [head, kLanes tokens, kLanes partial sums] (`vhsums`)
  std::vector<const char*> tail_rows;  // full-precision rows, in token order
  Scratch(int64_t rep, int64_t d)
      : scores(rep * kChunk), row(d), s(d), z(d), ps(d), pz(d), rows(kChunk),
        lanes(rep * kLanes * kLanes), tail_rows(kChunk) {}
};

constexpr int64_t kMaxRep = 8;  // query heads per KV head whose accumulators stay in registers

// Whether `weigh_packed_rows` serves a packed stream: per-token tiles whose groups cover whole
// vectors of a row's bytes, or two groups to a vector (2-bit g32 with 16 lanes).
bool weighs_by_vectors(const Stream& st, int64_t d, int64_t rep) {
  if (st.tile_tokens != 1 || st.nb % kLanes != 0 || st.nb / kLanes > 64 || rep > kMaxRep)
    return false;
  const int64_t span = st.nb / st.groups(d);
  return span % kLanes == 0 || 2 * span == kLanes;
}

// The scales and zeros (as floats) and the code rows of per-token tiles [lo, lo + n) of `st`,
// into sc.ts / sc.tz ([token, group]) and sc.rows.
void per_token_tiles(const Stream& st, int64_t lo, int64_t n, int64_t d, Scratch& sc) {
  const int64_t groups = st.groups(d);
  if (static_cast<int64_t>(sc.ts.size()) < n * groups) {
    sc.ts.resize(n * groups);
    sc.tz.resize(n * groups);
  }
  int64_t slot, r;
  st.packed_at(lo, slot, r);
  for (int64_t j = 0; j < n; ++j, st.next_packed(slot, r)) {
    st.tiles(slot * groups, groups, sc.ts.data() + j * groups, sc.tz.data() + j * groups);
    sc.rows[j] = st.codes + slot * st.nb;
  }
}

// Where a per-token row's vectors of bytes find their scale and zero: vector k covers bytes
// [k * kLanes, (k + 1) * kLanes), in group g[k] (and g[k] + 1 when two groups share a vector).
struct RowGroups {
  int64_t vectors = 0, groups = 0, nb = 0;
  bool two = false;
  int64_t g[64] = {};  // nb / kLanes <= 64: d <= 4096 at 8 bits with 16 lanes
  RowGroups() = default;
  // For a stream that `weighs_by_vectors`.
  RowGroups(const Stream& st, int64_t d) : groups(st.groups(d)), nb(st.nb) {
    const int64_t span = nb / groups;
    vectors = nb / kLanes;
    two = span < kLanes;
    for (int64_t k = 0; k < vectors; ++k) g[k] = k * kLanes / span;
  }
  Vec pick(const float* v, int64_t k) const {
    return two ? vset2(v[g[k]], v[g[k] + 1]) : vset(v[g[k]]);
  }
};

// Packed V rows j < n of `per_token_tiles` weighted by p[h * stride_p + j] and added into the
// planar accumulators acc + h * stride_acc, for R query heads, PER fields to a byte. The loop
// runs one vector of bytes at a time over all the part's tokens, so that the accumulators of
// its PER fields and R heads stay in registers (R and PER are template arguments so that the
// compiler keeps them there), and each byte is widened once for all its fields: row after row
// of axpy into memory was bound by its stores.
template <int R, int PER>
void weigh_packed_rows(const RowGroups& rg, int64_t n, const float* p, int64_t stride_p,
                       const Scratch& sc, float* acc, int64_t stride_acc) {
  constexpr int kBits = 8 / PER;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  for (int64_t k = 0; k < rg.vectors; ++k) {
    const int64_t i = k * kLanes;
    Vec a[PER][R];
    for (int f = 0; f < PER; ++f)
      for (int h = 0; h < R; ++h) a[f][h] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      const Vec s = rg.pick(sc.ts.data() + j * rg.groups, k);
      const Vec z = rg.pick(sc.tz.data() + j * rg.groups, k);
      const VecI bytes = vexpand(sc.rows[j] + i);
      Vec w[R];
      for (int h = 0; h < R; ++h) w[h] = vset(p[h * stride_p + j]);
      for (int f = 0; f < PER; ++f) {
        const Vec x = vfma(vfield(bytes, vshift(f * kBits), kMask), s, z);
        for (int h = 0; h < R; ++h) a[f][h] = vfma(w[h], x, a[f][h]);
      }
    }
    for (int f = 0; f < PER; ++f)
      for (int h = 0; h < R; ++h) {
        float* o = acc + h * stride_acc + f * rg.nb + i;
        vstore(o, vadd(vload(o), a[f][h]));
      }
  }
}

// The products qp[h] * row (kLanes partial sums per head h < R) of the per-token packed K row j
// of `per_token_tiles`, dequantized a vector at a time in registers, each byte widened once for
// its PER fields; stored at lanes + h * kLanes * kLanes (see `score_in_blocks`).
template <int R, int PER>
void packed_products(const RowGroups& rg, int64_t j, const float* const* qp, const Scratch& sc,
                     float* lanes) {
  constexpr int kBits = 8 / PER;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  const uint8_t* row = sc.rows[j];
  const float* ts = sc.ts.data() + j * rg.groups;
  const float* tz = sc.tz.data() + j * rg.groups;
  Vec a[R];
  for (int h = 0; h < R; ++h) a[h] = vzero();
  for (int64_t k = 0; k < rg.vectors; ++k) {
    const int64_t i = k * kLanes;
    const Vec s = rg.pick(ts, k), z = rg.pick(tz, k);
    const VecI bytes = vexpand(row + i);
    for (int f = 0; f < PER; ++f) {
      const Vec x = vfma(vfield(bytes, vshift(f * kBits), kMask), s, z);
      for (int h = 0; h < R; ++h) a[h] = vfma(vload(qp[h] + f * rg.nb + i), x, a[h]);
    }
  }
  for (int h = 0; h < R; ++h) vstore(lanes + h * kLanes * kLanes, a[h]);
}

// kLanes floats of a full-precision row (bf16 or fp32) from element i on.
inline Vec row_vec(const char* row, Float type, int64_t i) {
  return type == Float::bf16 ? vbf16(reinterpret_cast<const uint16_t*>(row) + i)
                             : vload(reinterpret_cast<const float*>(row) + i);
}

// Whether full-precision rows of this type are read in registers (`tail_products`,
// `weigh_tail_rows`); fp16 rows take the scalar conversion of `load_row`.
bool tail_in_registers(Float type, int64_t d, int64_t rep) {
  return type != Float::f16 && d % kLanes == 0 && rep <= kMaxRep;
}

// The products q[h] * row (kLanes partial sums per head h < R) of a full-precision row, stored
// at lanes + h * kLanes * kLanes, as `packed_products` does for packed rows.
template <int R>
void tail_products(const char* row, Float type, const float* const* q, int64_t d,
                   float* lanes) {
  Vec a[R];
  for (int h = 0; h < R; ++h) a[h] = vzero();
  for (int64_t i = 0; i < d; i += kLanes) {
    const Vec x = row_vec(row, type, i);
    for (int h = 0; h < R; ++h) a[h] = vfma(vload(q[h] + i), x, a[h]);
  }
  for (int h = 0; h < R; ++h) vstore(lanes + h * kLanes * kLanes, a[h]);
}

// Full-precision rows[0:n] weighted by p[h * stride_p + j] and added into acc + h * stride_acc,
// a vector of channels at a time, as `weigh_packed_rows` does for packed rows.
template <int R>
void weigh_tail_rows(const char* const* rows, Float type, int64_t n, const float* p,
                     int64_t stride_p, int64_t d, float* acc, int64_t stride_acc) {
  for (int64_t c = 0; c < d; c += kLanes) {
    Vec a[R];
    for (int h = 0; h < R; ++h) a[h] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      const Vec x = row_vec(rows[j], type, c);
      for (int h = 0; h < R; ++h) a[h] = vfma(vset(p[h * stride_p + j]), x, a[h]);
    }
    for (int h = 0; h < R; ++h) {
      float* o = acc + h * stride_acc + c;
      vstore(o, vadd(vload(o), a[h]));
    }
  }
}

using TailProducts = void (*)(const char*, Float, const float* const*, int64_t, float*);
constexpr TailProducts kTailProducts[kMaxRep] = {
    tail_products<1>, tail_products<2>, tail_products<3>, tail_products<4>,
    tail_products<5>, tail_products<6>, tail_products<7>, tail_products<8>};

using WeighTail = void (*)(const char* const*, Float, int64_t, const float*, int64_t, int64_t,
                           float*, int64_t);
constexpr WeighTail kWeighTail[kMaxRep] = {
    weigh_tail_rows<1>, weigh_tail_rows<2>, weigh_tail_rows<3>, weigh_tail_rows<4>,
    weigh_tail_rows<5>, weigh_tail_rows<6>, weigh_tail_rows<7>, weigh_tail_rows<8>};

// The instances of a template over (R, PER) for R = 1..kMaxRep and PER = 1, 2, 4 (8-, 4- and
// 2-bit codes), indexed [per_index(PER)][R - 1].
using PackedProducts = void (*)(const RowGroups&, int64_t, const float* const*, const Scratch&,
                                float*);
using WeighRows = void (*)(const RowGroups&, int64_t, const float*, int64_t, const Scratch&,
                           float*, int64_t);

template <int PER, std::size_t... I>
constexpr std::array<PackedProducts, kMaxRep> products_for(std::index_sequence<I...>) {
  return {packed_products<static_cast<int>(I) + 1, PER>...};
}
template <int PER, std::size_t... I>
constexpr std::array<WeighRows, kMaxRep> weighs_for(std::index_sequence<I...>) {
  return {weigh_packed_rows<static_cast<int>(I) + 1, PER>...};
}
constexpr auto kReps = std::make_index_sequence<kMaxRep>{};
constexpr std::array<std::array<PackedProducts, kMaxRep>, 3> kPackedProducts = {
    products_for<1>(kReps), products_for<2>(kReps), products_for<4>(kReps)};
constexpr std::array<std::array<WeighRows, kMaxRep>, 3> kWeighRows = {
    weighs_for<1>(kReps), weighs_for<2>(kReps), weighs_for<4>(kReps)};

int per_index(int64_t per) { return per == 1 ? 0 : per == 2 ? 1 : 2; }

// The packed row at (slot, row) of `st` dequantized into `out`, planar. Each field f of the
// row's bytes is one loop over the bytes, with the scale and zero of byte i's channel: for
// per-token tiles these depend on i alone (its group), for per-channel tiles on the channel,
// so the caller keeps them planar (`ps`, `pz`) for the current tile (`tile`: its slot, or -1).
void dequantize_row(const Stream& st, int64_t slot, int64_t row_in_tile, int64_t d, Scratch& sc,
                    int64_t& tile, float* out) {
  const uint8_t* row = st.codes + (slot * st.tile_tokens + row_in_tile) * st.nb;
  const uint32_t mask = (1u << st.bits) - 1;
  const int64_t nb = st.nb;
  const bool per_token = st.tile_tokens == 1;
  if (per_token) {
    const int64_t groups = st.groups(d), span = nb / groups;
    st.tiles(slot * groups, groups, sc.s.data(), sc.z.data());
    if (span % kLanes == 0) {  // whole vectors per group: broadcast its scale and zero
      for (int64_t f = 0; f < st.per; ++f) {
        const auto sh = vshift(static_cast<int>(f * st.bits));
        for (int64_t g = 0; g < groups; ++g) {
          const Vec s = vset(sc.s[g]), z = vset(sc.z[g]);
          for (int64_t i = g * span; i < (g + 1) * span; i += kLanes)
            vstore(out + f * nb + i, vfma(vcodes(row + i, sh, mask), s, z));
        }
      }
      return;
    }
    for (int64_t g = 0; g < groups; ++g) {
      std::fill_n(sc.ps.data() + g * span, span, sc.s[g]);
      std::fill_n(sc.pz.data() + g * span, span, sc.z[g]);
    }
  } else if (slot != tile) {
    tile = slot;
    st.tiles(tile * d, d, sc.s.data(), sc.z.data());
    for (int64_t c = 0; c < d; ++c) {
      sc.ps[planar(c, st.per, nb)] = sc.s[c];
      sc.pz[planar(c, st.per, nb)] = sc.z[c];
    }
  }
  for (int64_t f = 0; f < st.per; ++f) {
    const int shift = static_cast<int>(f * st.bits);
    const float* s = sc.ps.data() + (per_token ? 0 : f * nb);
    const float* z = sc.pz.data() + (per_token ? 0 : f * nb);
    float* o = out + f * nb;
    int64_t i = 0;
    for (const auto sh = vshift(shift); i + kLanes <= nb; i += kLanes)
      vstore(o + i, vfma(vcodes(row + i, sh, mask), vload(s + i), vload(z + i)));
    for (; i < nb; ++i)
      o[i] = static_cast<float>((static_cast<uint32_t>(row[i]) >> shift) & mask) * s[i] + z[i];
  }
}

// What one query head of a group brings to every part.
struct Head {
  std::vector<float> q;   // raw: for the tail and the new token
  std::vector<float> qp;  // rotated if K is, planar: for packed K
  float smooth = 0.f;     // q . mean, added to every packed K score
};

// The scores of tokens [lo, lo + n) for every head into scores[h * n + j], for d a multiple of
// kLanes: each token's products stay a vector per head until a block of kLanes tokens is summed
// at once (`vhsums`), as one horizontal sum per token and head cost more than its products.
void score_in_blocks(const Stream& K, const std::vector<Head>& heads, const float* k_new,
                     int64_t d, int64_t lo, int64_t n, int64_t kept, Scratch& sc, float* scores) {
  const int64_t rep = heads.size(), n_packed = std::clamp<int64_t>(K.n_q - lo, 0, n);
  float* row = sc.row.data();
  float* lanes = sc.lanes.data();
  int64_t slot = 0, r = 0, tile = -1;
  if (n_packed) K.packed_at(lo, slot, r);
  int64_t tail_slot = K.tail_at(lo + n_packed);
  // Per-token packed rows are dequantized in registers (`packed_products`), others into `row`.
  const PackedProducts in_registers =
      n_packed && weighs_by_vectors(K, d, rep) ? kPackedProducts[per_index(K.per)][rep - 1]
                                               : nullptr;
  const RowGroups rg = in_registers ? RowGroups(K, d) : RowGroups();
  const float* qp[kMaxRep] = {};
  if (in_registers) {
    per_token_tiles(K, lo, n_packed, d, sc);
    for (int64_t h = 0; h < rep; ++h) qp[h] = heads[h].qp.data();
  }
  const bool tail_fast = tail_in_registers(K.tail_type, d, rep);
  const float* q_raw[kMaxRep] = {};
  if (tail_fast)
    for (int64_t h = 0; h < rep; ++h) q_raw[h] = heads[h].q.data();
  for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
    const int64_t m = std::min(kLanes, n - j0);
    for (int64_t t = 0; t < m; ++t) {
      const int64_t j = j0 + t;
      const bool packed = j < n_packed;
      if (packed && in_registers) {
        in_registers(rg, j, qp, sc, lanes + t * kLanes);
        continue;
      }
      if (!packed && tail_fast) {
        const bool is_new = lo + j == kept;
        const char* x = is_new ? reinterpret_cast<const char*>(k_new)
                               : K.tail + tail_slot * K.tail_row_bytes;
        kTailProducts[rep - 1](x, is_new ? Float::f32 : K.tail_type, q_raw, d, lanes + t * kLanes);
        K.next_tail(tail_slot);
        continue;
      }
      const float* x;
      if (packed) {
        dequantize_row(K, slot, r, d, sc, tile, row);
        K.next_packed(slot, r);
        x = row;
      } else {
        x = lo + j == kept ? k_new : K.tail_row(tail_slot, d, row);
        K.next_tail(tail_slot);
      }
      for (int64_t h = 0; h < rep; ++h) {
        const float* q = packed ? heads[h].qp.data() : heads[h].q.data();
        vstore(lanes + (h * kLanes + t) * kLanes, dot_lanes(q, x, d));
      }
    }
    for (int64_t h = 0; h < rep; ++h) {
      float* block = lanes + h * kLanes * kLanes;
      if (m == kLanes) {
        vhsums(block, scores + h * n + j0);
        continue;
      }
      float sums[kLanes];
      std::fill(block + m * kLanes, block + kLanes * kLanes, 0.f);
      vhsums(block, sums);
      std::copy(sums, sums + m, scores + h * n + j0);
    }
  }
  for (int64_t h = 0; h < rep; ++h)
    for (int64_t j = 0; j < n_packed; ++j) scores[h * n + j] += heads[h].smooth;
}

// One part: tokens [lo, hi) of one (batch, KV head), for its `rep` query heads. `kept` is the
// new token's index (read from k_new / v_new, not the stores). Writes per head
// [max, sum, packed-V accumulator (planar), full-precision-V accumulator].
void run_part(const Stream& K, const Stream& V, const std::vector<Head>& heads,
              const float* k_new, const float* v_new, int64_t d, int64_t lo, int64_t hi,
              int64_t kept, float scaling, Scratch& sc, float* out) {
  const int64_t rep = heads.size(), n = hi - lo, stride = 2 + 2 * d;
  float* scores = sc.scores.data();  // [rep, n]
  float* row = sc.row.data();
  // Scores: packed tokens [lo, K.n_q), then the tail, whose last token may be the new one.
  int64_t j = 0, tile = -1;
  if (d % kLanes == 0) {
    score_in_blocks(K, heads, k_new, d, lo, n, kept, sc, scores);
    j = n;
  } else if (lo < K.n_q) {
    int64_t slot, r;
    K.packed_at(lo, slot, r);
    for (; j < n && lo + j < K.n_q; ++j, K.next_packed(slot, r)) {
      dequantize_row(K, slot, r, d, sc, tile, row);
      for (int64_t h = 0; h < rep; ++h)
        scores[h * n + j] = dot(heads[h].qp.data(), row, d) + heads[h].smooth;
    }
  }
  if (j < n)
    for (int64_t slot = K.tail_at(lo + j); j < n; ++j, K.next_tail(slot)) {
      const float* x = lo + j == kept ? k_new : K.tail_row(slot, d, row);
      for (int64_t h = 0; h < rep; ++h) scores[h * n + j] = dot(heads[h].q.data(), x, d);
    }
  for (int64_t h = 0; h < rep; ++h) {
    float* o = out + h * stride;
    o[1] = 0.f;
    o[0] = softmax_numerators(scores + h * n, n, scaling, o[1]);
    std::fill(o + 2, o + stride, 0.f);
  }
  // Weighted values: packed rows into the planar accumulator, tail rows into the raw one.
  j = 0, tile = -1;
  if (lo < V.n_q && weighs_by_vectors(V, d, rep)) {
    j = std::min(n, V.n_q - lo);
    per_token_tiles(V, lo, j, d, sc);
    kWeighRows[per_index(V.per)][rep - 1](RowGroups(V, d), j, scores, n, sc, out + 2, stride);
  } else if (lo < V.n_q) {
    int64_t slot, r;
    V.packed_at(lo, slot, r);
    for (; j < n && lo + j < V.n_q; ++j, V.next_packed(slot, r)) {
      dequantize_row(V, slot, r, d, sc, tile, row);
      for (int64_t h = 0; h < rep; ++h) axpy(scores[h * n + j], row, out + h * stride + 2, d);
    }
  }
  int64_t slot = V.tail_at(lo + j);
  const int64_t stored = std::min(n, kept - lo);  // tokens [j, stored) are in the tail's ring
  if (stored > j && tail_in_registers(V.tail_type, d, rep)) {
    for (int64_t k = 0; j + k < stored; ++k, V.next_tail(slot))
      sc.tail_rows[k] = V.tail + slot * V.tail_row_bytes;
    kWeighTail[rep - 1](sc.tail_rows.data(), V.tail_type, stored - j, scores + j, n, d,
                        out + 2 + d, stride);
    j = stored;
  }
  for (; j < n; ++j, V.next_tail(slot)) {
    const float* x = lo + j == kept ? v_new : V.tail_row(slot, d, row);
    for (int64_t h = 0; h < rep; ++h) axpy(scores[h * n + j], x, out + h * stride + 2 + d, d);
  }
}

// store: codes, scale, zero (empty if symmetric), tail; layout: bits, tile_tokens,
// tile_channels, start, q_start, n_q, tail_start, tail_first.
Stream stream_at(const std::vector<at::Tensor>& store, const std::vector<int64_t>& layout,
                 int64_t bh, int64_t d) {
  const auto& codes = store[0];
  const auto& scale = store[1];
  const auto& zero = store[2];
  const auto& tail = store[3];
  Stream s;
  s.bits = layout[0];
  s.per = s.bits < 8 ? 8 / s.bits : 1;
  s.nb = d / s.per;
  s.tile_tokens = layout[1];
  s.tile_channels = layout[2];
  s.start = layout[3];
  s.q_start = layout[4];
  s.n_q = layout[5];
  s.tail_start = layout[6];
  s.tail_first = layout[7];
  s.cap = scale.numel() ? scale.size(2) : 1;
  s.tail_cap = tail.numel() ? tail.size(2) : 1;
  if (codes.numel()) {
    s.codes = codes.data_ptr<uint8_t>() + bh * codes.size(2) * codes.size(3);
    s.scale = scale.data_ptr<at::Half>() + bh * scale.size(2) * scale.size(3);
    s.zero = zero.numel() ? zero.data_ptr<at::Half>() + bh * zero.size(2) * zero.size(3) : nullptr;
  }
  if (tail.numel()) {
    s.tail_type = float_type(tail);
    s.tail_row_bytes = d * tail.element_size();
    s.tail = static_cast<const char*>(tail.data_ptr()) + bh * tail.size(2) * s.tail_row_bytes;
  }
  return s;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const std::vector<at::Tensor>& k_store,
                            const std::vector<int64_t>& k_layout,
                            const std::vector<at::Tensor>& v_store,
                            const std::vector<int64_t>& v_layout, const at::Tensor& k_mean,
                            const at::Tensor& k_rot, const at::Tensor& v_rot, int64_t lo,
                            int64_t kept, double scaling) {
  const int64_t B = q.size(0), Hq = q.size(1), d = q.size(2), Hkv = k_new.size(1);
  const int64_t rep = Hq / Hkv, n = kept + 1 - lo, parts = (n + kChunk - 1) / kChunk;
  const int64_t stride = 2 + 2 * d;
  const int64_t k_per = k_layout[0] < 8 ? 8 / k_layout[0] : 1, k_nb = d / k_per;
  auto partial = at::empty({B * Hkv, parts, rep, stride}, q.options());
  const float* kr = k_rot.numel() ? k_rot.data_ptr<float>() : nullptr;
  std::vector<std::vector<Head>> groups(B * Hkv, std::vector<Head>(rep));
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {  // a few d x d products: not worth threads
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
      for (int64_t c = 0; c < d; ++c) hd.qp[planar(c, k_per, k_nb)] = qr[c];
      if (k_mean.numel()) {
        const at::Half* mean = k_mean.data_ptr<at::Half>() + bh * d;
        for (int64_t c = 0; c < d; ++c) hd.smooth += qh[c] * static_cast<float>(mean[c]);
      }
    }
  }
  at::parallel_for(0, B * Hkv * parts, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(rep, d);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / parts, part = unit % parts;
      const int64_t a = lo + part * kChunk, b = std::min(a + kChunk, kept + 1);
      run_part(stream_at(k_store, k_layout, bh, d), stream_at(v_store, v_layout, bh, d),
               groups[bh], k_new.data_ptr<float>() + bh * d, v_new.data_ptr<float>() + bh * d, d,
               a, b, kept, static_cast<float>(scaling), sc,
               partial.data_ptr<float>() + (bh * parts + part) * rep * stride);
    }
  });
  auto out = at::empty({B, Hq, d}, q.options());
  const int64_t v_per = v_layout[0] < 8 ? 8 / v_layout[0] : 1, v_nb = d / v_per;
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
        axpy(w, o + 2, enc.data(), d);
        axpy(w, o + 2 + d, raw.data(), d);
      }
      float* dst = od + bq * d;
      for (int64_t c = 0; c < d; ++c) {
        float s = raw[c];
        if (vr)  // V was stored as v R: rotate the weighted sum back once
          for (int64_t e = 0; e < d; ++e) s += enc[planar(e, v_per, v_nb)] * vr[c * d + e];
        else
          s += enc[planar(c, v_per, v_nb)];
        dst[c] = s / l;
      }
    }
  });
  return out;
}
