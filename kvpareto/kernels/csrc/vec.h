// Vector helpers shared by the kernels: kLanes floats at a time, written with AVX-512 or
// AVX2/FMA intrinsics, whichever the build targets (kernels/build.py passes the flags), with a
// scalar fallback. The compiler's own vectorizer was measured to fall short in these loops: rows
// of 16-64 bytes ran in its scalar remainder loops, and each `omp simd` reduction ended in a
// chain of scalar adds, one per lane.
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cmath>
#include <cstring>

namespace kvpareto {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
// kLanes packed bytes widened to 32-bit lanes, once for all the fields they hold (`vfield`).
using VecI = __m512i;
inline VecI vexpand(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec vfield(VecI x, __m128i shift, uint32_t mask) {
  return _mm512_cvtepi32_ps(
      _mm512_and_si512(_mm512_srl_epi32(x, shift), _mm512_set1_epi32(static_cast<int>(mask))));
}
inline Vec vbf16(const uint16_t* p) {  // bf16 is fp32's upper half
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
// lo in the lower half of the lanes, hi in the upper half
inline Vec vset2(float lo, float hi) {
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi));
}
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }  // b where either is NaN
inline Vec vround(Vec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Vec vpow2(Vec n) {  // 2^n for integral n in [-126, 127]
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
// out[t] = the sum of rows[t * kLanes : (t + 1) * kLanes], for t < kLanes: kLanes horizontal
// sums at once (45 shuffles and adds, where one at a time costs about 8 dependent ones each).
inline void vhsums(const float* rows, float* out) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k) {  // per 128-bit block: rows 2k and 2k+1, interleaved
    const __m512 x = _mm512_loadu_ps(rows + 32 * k), y = _mm512_loadu_ps(rows + 32 * k + 16);
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  for (int m = 0; m < 4; ++m) {  // per 128-bit block: rows 4m .. 4m+3 in order
    const __m512d x = _mm512_castps_pd(a[2 * m]), y = _mm512_castps_pd(a[2 * m + 1]);
    b[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const auto fold = [](__m512 x, __m512 y) {  // blocks (x0+x1, x2+x3, y0+y1, y2+y3)
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
  };
  const __m512 c0 = fold(b[0], b[1]), c1 = fold(b[2], b[3]);
  _mm512_storeu_ps(out, fold(c0, c1));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
using VecI = __m256i;
inline VecI vexpand(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline Vec vfield(VecI x, __m128i shift, uint32_t mask) {
  return _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_srl_epi32(x, shift), _mm256_set1_epi32(static_cast<int>(mask))));
}
inline Vec vbf16(const uint16_t* p) {
  __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline Vec vset2(float lo, float hi) {
  return _mm256_blend_ps(_mm256_set1_ps(lo), _mm256_set1_ps(hi), 0xF0);
}
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }  // b where either is NaN
inline Vec vround(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vpow2(Vec n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
// out[t] = the sum of rows[t * kLanes : (t + 1) * kLanes], for t < kLanes, at once.
inline void vhsums(const float* rows, float* out) {
  __m256 a[4], b[2];
  for (int k = 0; k < 4; ++k) {
    const __m256 x = _mm256_loadu_ps(rows + 16 * k), y = _mm256_loadu_ps(rows + 16 * k + 8);
    a[k] = _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y));
  }
  for (int m = 0; m < 2; ++m) {
    const __m256d x = _mm256_castps_pd(a[2 * m]), y = _mm256_castps_pd(a[2 * m + 1]);
    b[m] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                         _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20),
                                      _mm256_permute2f128_ps(b[0], b[1], 0x31)));
}
#else  // scalar: one lane
constexpr int64_t kLanes = 1;
using Vec = float;
inline Vec vzero() { return 0.f; }
inline Vec vset(float x) { return x; }
inline Vec vload(const float* p) { return *p; }
inline void vstore(float* p, Vec v) { *p = v; }
inline Vec vfma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float vsum(Vec v) { return v; }
using VecI = uint32_t;
inline VecI vexpand(const uint8_t* p) { return *p; }
inline Vec vfield(VecI x, int shift, uint32_t mask) {
  return static_cast<float>((x >> shift) & mask);
}
inline Vec vbf16(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline Vec vset2(float lo, float) { return lo; }  // one lane: its lower half
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline Vec vmul(Vec a, Vec b) { return a * b; }
inline Vec vsub(Vec a, Vec b) { return a - b; }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }  // b where either is NaN
inline Vec vround(Vec x) { return std::nearbyint(x); }
inline Vec vpow2(Vec n) {
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &e, sizeof f);
  return f;
}
inline void vhsums(const float* rows, float* out) { *out = *rows; }
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
inline __m128i vshift(int bits) { return _mm_cvtsi32_si128(bits); }
#else
inline int vshift(int bits) { return bits; }
#endif

// Field `shift` (from vshift) of kLanes packed bytes, as floats: one field of a row read alone.
inline Vec vcodes(const uint8_t* p, decltype(vshift(0)) shift, uint32_t mask) {
  return vfield(vexpand(p), shift, mask);
}

}  // namespace kvpareto
