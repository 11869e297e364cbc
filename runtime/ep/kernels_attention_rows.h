// Row micro-kernels of QuestAttention decode (kernels_attention.cc): the softmax numerators, q·k of 8 cache rows per
// reduction tree (one head, or a 3-head group at AVX-512), single rows, and softmax·v (per row, or for dv = 64 with
// the sums in registers). Target-free bodies, compiled into each ISA variant of AttendKeptBody; R is the row reader
// (kernels_util.h: F32Rows, F16Rows, F16cRows), VF the variant's vector.
#pragma once

#include "kernels_util.h"

namespace solm {
namespace {

// The softmax numerators of n logits in place (exp(lg - max)); returns their sum, in lane order then the tail.
inline __attribute__((always_inline)) float ExpShiftSum(float* lg, int64_t n, float mx) {
  const v8 m = Splat<v8>(mx), l2e = Splat<v8>(1.44269504088896341f);  // exp(y) = 2^(y log2 e)
  v8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8 x;
    __builtin_memcpy(&x, lg + i, sizeof(x));
    x = Exp2<v8>((x - m) * l2e);
    __builtin_memcpy(lg + i, &x, sizeof(x));
    acc += x;
  }
  float sum = HSum(acc);
  for (; i < n; ++i) {
    lg[i] = std::exp(lg[i] - mx);
    sum += lg[i];
  }
  return sum;
}

// Σ_i a_r[i] for the 8 vectors a_0..a_7: lane r of the result (a transposing tree of pairwise adds).
inline __attribute__((always_inline)) v8 HSum8(const v8* a) {
  auto pair = [](v8 x, v8 y) {  // [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7]
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const v8 u0 = pair(pair(a[0], a[1]), pair(a[2], a[3]));  // [s0 s1 s2 s3 | s0' s1' s2' s3'] (halves of a_r)
  const v8 u1 = pair(pair(a[4], a[5]), pair(a[6], a[7]));
  return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// lg[r] = q·K row idx[r] for the 8 rows idx[0..8) (d a multiple of 8): one accumulator per row, reduced together.
template <class R>
inline __attribute__((always_inline)) void Dot8Rows(const float* q, const typename R::E* K, const int32_t* idx,
                                                    int64_t d, float* lg) {
  v8 acc[8] = {};
  const typename R::E* kr[8];
  for (int r = 0; r < 8; ++r) kr[r] = K + static_cast<int64_t>(idx[r]) * d;
  for (int64_t i = 0; i < d; i += 8) {
    v8 qv;
    __builtin_memcpy(&qv, q + i, sizeof(qv));
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) acc[r] += qv * R::Load8(kr[r] + i);
  }
  const v8 s = HSum8(acc);
  __builtin_memcpy(lg, &s, sizeof(s));
}

// Dot8Rows for the 3 query heads of a group at once (rows q + g*d, logits lg + g*ls): each 8-float chunk of a K row
// is widened once for the three heads instead of once per head. 24 accumulators: only for the AVX-512 variant's 32
// registers. Per head the same products summed in the same order as Dot8Rows (bit-identical logits).
template <class R>
inline __attribute__((always_inline)) void Dot8Rows3(const float* q, const typename R::E* K, const int32_t* idx,
                                                     int64_t d, float* lg, int64_t ls) {
  v8 acc[3][8] = {};
  const typename R::E* kr[8];
  for (int r = 0; r < 8; ++r) kr[r] = K + static_cast<int64_t>(idx[r]) * d;
  for (int64_t i = 0; i < d; i += 8) {
    v8 q0, q1, q2;
    __builtin_memcpy(&q0, q + i, sizeof(q0));
    __builtin_memcpy(&q1, q + d + i, sizeof(q1));
    __builtin_memcpy(&q2, q + 2 * d + i, sizeof(q2));
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const v8 x = R::Load8(kr[r] + i);
      acc[0][r] += q0 * x;
      acc[1][r] += q1 * x;
      acc[2][r] += q2 * x;
    }
  }
  for (int g = 0; g < 3; ++g) {
    const v8 s = HSum8(acc[g]);
    __builtin_memcpy(lg + g * ls, &s, sizeof(s));
  }
}

// q·row and y += a·row for a cache row read through R (float rows: kernels_util.h's Dot and Axpy, unchanged).
template <class R>
inline __attribute__((always_inline)) float DotRow(const float* q, const typename R::E* k, int64_t d) {
  if constexpr (std::is_same<typename R::E, float>::value) {
    return Dot(q, k, d);
  } else {
    v8 acc = {};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) acc += *reinterpret_cast<const v8*>(q + i) * R::Load8(k + i);
    float r = HSum(acc);
    for (; i < d; ++i) r += q[i] * R::At(k + i);
    return r;
  }
}
template <class R>
inline __attribute__((always_inline)) void AxpyRow(float* y, const typename R::E* x, float a, int64_t n) {
  if constexpr (std::is_same<typename R::E, float>::value) {
    Axpy(y, x, a, n);
  } else {
    const v8 av = Splat<v8>(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) *reinterpret_cast<v8*>(y + i) += av * R::Load8(x + i);
    for (; i < n; ++i) y[i] += a * R::At(x + i);
  }
}

// Ln floats of a row read through R (kernels_util.h) at p: one or two 8-float reads.
template <class R, class VF>
SOLM_INLINE VF LoadRow(const typename R::E* p) {
  if constexpr (Lanes<VF>() == 16) {
    const v8 a = R::Load8(p), b = R::Load8(p + 8);
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  } else {
    return R::Load8(p);
  }
}

// softmax·v for dv = 64 and NG <= 3 heads: out[g] = Σ_i logit[g*L + i] · V row idx[i], the NG·64 sums held in
// registers while the union's rows stream by (each row widened once for all heads), instead of a load and a store
// of out per FMA. Rows a head did not keep (per_head, ks: AttendKeptBody) are skipped for it. Each output element
// is the same sum in the same order as AxpyRow's (0, then += w·v row by row), so the result is unchanged.
template <class R, class VF, int NG>
SOLM_INLINE void SoftmaxV64(const float* logit, int64_t L, const typename R::E* V, const int32_t* idx, int64_t n,
                            const uint8_t* per_head, int64_t ks, bool pf, float* out) {
  constexpr int Ln = Lanes<VF>(), NV = 64 / Ln;
  constexpr int64_t kPrefetch = 16;
  VF acc[NG][NV];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NV; ++c) acc[g][c] = VF{};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = idx[i];
    if (pf && i + kPrefetch < n) {
      const char* vp = reinterpret_cast<const char*>(V + static_cast<int64_t>(idx[i + kPrefetch]) * 64);
      for (size_t b = 0; b < 64 * sizeof(typename R::E); b += 64) __builtin_prefetch(vp + b);
    }
    const typename R::E* vr = V + j * 64;
    VF x[NV];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) x[c] = LoadRow<R, VF>(vr + c * Ln);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      if (per_head != nullptr && !per_head[g * ks + j]) continue;
      const VF w = Splat<VF>(logit[g * L + i]);
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) acc[g][c] += w * x[c];
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < NV; ++c) Store<VF>(out + g * 64 + c * Ln, acc[g][c]);
}

}  // namespace
}  // namespace solm
