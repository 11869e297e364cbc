// Row micro-kernels of QuestAttention decode (kernels_attention.cc): the softmax numerators, q·k of 8 cache rows per
// reduction tree (one head, or a 3-head group at AVX-512), single rows, softmax·v (per row, or for dv = 64 with
// the sums in registers), and AttendRowsBody, which runs them over a list of cache rows. Target-free bodies,
// compiled into each ISA variant of AttendRowsBody; R is the row reader (kernels_util.h: F32Rows, F16Rows,
// F16cRows), VF the variant's vector; and the flash-decoding epilogue of a row list split in chunks (Normalise,
// MergeChunks).
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
// Rows with gaps (a sparse row's kept pages) also get an L2 prefetch kFarRows ahead: a page jump ends the hardware
// prefetchers' stream, and the L1 prefetches kPrefetch rows ahead alone left the softmax·v and q·k passes waiting on
// memory (one thread, SmolLM2 at ctx 2048, κ 0.5 pages per KV head: the attend kernel's time at 50 % of the rows
// fell from ~0.74 to ~0.62 of the dense kernel's; dense rows are contiguous and do not take it).
constexpr int64_t kFarRows = 48;

template <class R, class VF, int NG, bool PER_HEAD>
SOLM_INLINE void SoftmaxV64Rows(const float* logit, int64_t L, const typename R::E* V, const int32_t* idx, int64_t n,
                                const uint8_t* per_head, int64_t ks, bool pf, float* out) {
  constexpr int Ln = Lanes<VF>(), NV = 64 / Ln;
  constexpr int64_t kPrefetch = 16;
  const int64_t far = pf && n > 0 && idx[n - 1] - idx[0] != n - 1 ? kFarRows : 0;  // rows with gaps: L2 too
  VF acc[NG][NV];  // every loop over acc fully unrolled: constant indices keep the sums in registers
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) acc[g][c] = VF{};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = idx[i];
    if (pf && i + kPrefetch < n) {
      const char* vp = reinterpret_cast<const char*>(V + static_cast<int64_t>(idx[i + kPrefetch]) * 64);
      for (size_t b = 0; b < 64 * sizeof(typename R::E); b += 64) __builtin_prefetch(vp + b);
    }
    if (far > 0 && i + far < n) {
      const char* vp = reinterpret_cast<const char*>(V + static_cast<int64_t>(idx[i + far]) * 64);
      for (size_t b = 0; b < 64 * sizeof(typename R::E); b += 64) __builtin_prefetch(vp + b, 0, 2);
    }
    const typename R::E* vr = V + j * 64;
    VF x[NV];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) x[c] = LoadRow<R, VF>(vr + c * Ln);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) {
      if constexpr (PER_HEAD)
        if (!per_head[g * ks + j]) continue;
      const VF w = Splat<VF>(logit[g * L + i]);
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) acc[g][c] += w * x[c];
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) Store<VF>(out + g * 64 + c * Ln, acc[g][c]);
}
template <class R, class VF, int NG>
SOLM_INLINE void SoftmaxV64(const float* logit, int64_t L, const typename R::E* V, const int32_t* idx, int64_t n,
                            const uint8_t* per_head, int64_t ks, bool pf, float* out) {
  if (per_head == nullptr) SoftmaxV64Rows<R, VF, NG, false>(logit, L, V, idx, n, per_head, ks, pf, out);
  else SoftmaxV64Rows<R, VF, NG, true>(logit, L, V, idx, n, per_head, ks, pf, out);
}

// Returns false if token j is masked out (bool false, or an additive value at or below the lowest finite float:
// -inf or Hugging Face's finfo.min, as reference.valid_keys); else sets *add to the additive mask value.
inline bool Allowed(const MaskRow& m, int64_t j, float* add) {
  *add = 0.f;
  if (j > m.jmax) return false;
  if (m.b) return m.b[j * m.sl] != 0;
  if (m.f) {
    *add = m.f[j * m.sl];
    return !(*add <= std::numeric_limits<float>::lowest());
  }
  return true;
}


// Decode attention (T == 1) of the G query heads (rows qrows + g*d) that share one K/V head, over the cache rows
// idx[0, n) (token indices, ascending; all of a call's rows, or one chunk of them: QuestAttentionView splits long
// row lists so that the chunks of the few (row, KV head) items spread over the threads). Head g attends over the
// rows its mask allows and, when keep is given, with keep[g*ks + j] (ks = 0: one token set for the group; ks = L: a
// set per head). Two passes, each with one access pattern and, when pf, its own software prefetch kPrefetch rows
// ahead: q·k of every head over the rows' K (8 rows per
// reduction tree), then, after a vectorised softmax, softmax·v over the V rows. Branch-free per head: a row the head
// did not keep (or its mask removes) gets -inf, so weight 0. Not normalised: per head g, mx[g] = its largest logit
// over these rows, sums[g] = Σ exp(logit - mx[g]) (0 when every row is -inf for it; NaN from a NaN logit) and
// out[g, dv] = Σ exp(logit - mx[g])·v (unspecified when sums[g] == 0). Scratch: logit [G*n]. Returns the q·k
// products that count (kept and allowed); *rows = the rows some head attends.
template <class R, class VF>
SOLM_INLINE uint64_t AttendRowsBody(const float* qrows, int64_t G, const typename R::E* K, const typename R::E* V,
                                    int64_t d, int64_t dv, float scale, const int32_t* idx, int64_t n, bool pf,
                                    const uint8_t* keep, int64_t ks, const MaskRow* masks, float* logit, float* mx,
                                    float* sums, float* out, uint64_t* rows) {
  constexpr int64_t kPrefetch = 16;
  // A set per head (ks = L): a head computes nothing for the union's rows it did not keep (q·k skipped per block
  // of 8 rows it kept none of, the logit then -inf below; softmax·v skipped per row), so its arithmetic follows
  // its own set, not the union's (at κ = 0.5 the union of 3 heads' sets is ~65 % of the rows).
  const uint8_t* per_head = keep != nullptr && ks != 0 ? keep : nullptr;
  auto kept8 = [per_head, ks](int64_t g, const int32_t* ix) {
    if (per_head == nullptr) return true;
    const uint8_t* kg = per_head + g * ks;
    int any = 0;
    for (int r = 0; r < 8; ++r) any |= kg[ix[r]];
    return any != 0;
  };
  const int64_t kb = d * sizeof(typename R::E), vb = dv * sizeof(typename R::E);
  const int64_t far = pf && n > 0 && idx[n - 1] - idx[0] != n - 1 ? kFarRows : 0;  // rows with gaps: L2 prefetch too
  // q·k: rows in blocks of 8 (one reduction tree per head and block), the tail one row at a time
  const int64_t n8 = d % 8 == 0 ? n / 8 * 8 : 0;
  for (int64_t c = 0; c < n8; c += 8) {
    if (pf)
      for (int64_t r = c + kPrefetch; r < std::min(c + kPrefetch + 8, n); ++r) {
        const char* kp = reinterpret_cast<const char*>(K + static_cast<int64_t>(idx[r]) * d);
        for (int64_t b = 0; b < kb; b += 64) __builtin_prefetch(kp + b);
      }
    for (int64_t r = c + far; far > 0 && r < std::min(c + far + 8, n); ++r) {
      const char* kp = reinterpret_cast<const char*>(K + static_cast<int64_t>(idx[r]) * d);
      for (int64_t b = 0; b < kb; b += 64) __builtin_prefetch(kp + b, 0, 2);
    }
    if constexpr (Lanes<VF>() == 16) {  // AVX-512 (32 registers): 3 heads' 8-row trees, each K chunk widened once
      if (G == 3 && kept8(0, idx + c) && kept8(1, idx + c) && kept8(2, idx + c)) {
        Dot8Rows3<R>(qrows, K, idx + c, d, logit + c, n);
        continue;
      }
    }
    for (int64_t g = 0; g < G; ++g)
      if (kept8(g, idx + c)) Dot8Rows<R>(qrows + g * d, K, idx + c, d, logit + g * n + c);
  }
  for (int64_t c = n8; c < n; ++c)
    for (int64_t g = 0; g < G; ++g)
      if (per_head == nullptr || per_head[g * ks + idx[c]])
        logit[g * n + c] = DotRow<R>(qrows + g * d, K + static_cast<int64_t>(idx[c]) * d, d);
  // scale, mask and keep: a row some head attends counts as read
  uint64_t scored = 0, nrows = 0;
  // one mask row for the group (a mask broadcast over heads): per block of 64 rows each row's mask verdict once,
  // then per head its keep flags (one set for the group: ks = 0, or its own: ks = L) and its logits 8 at a time
  bool same = true;
  for (int64_t g = 1; g < G && same; ++g) same = SameRow(masks[0], masks[g]);
  if (same) {
    typedef int32_t v8i __attribute__((vector_size(32)));
    const v8 sc = Splat<v8>(scale), ninf = Splat<v8>(kNegInf);
    for (int64_t c0 = 0; c0 < n; c0 += 64) {
      const int64_t m = std::min<int64_t>(64, n - c0), m8 = m / 8 * 8;
      alignas(32) int32_t okm[64], okb[64], anyb[64];
      alignas(32) float addb[64];
      for (int64_t c = 0; c < m; ++c) {
        const int64_t j = idx[c0 + c];
        okm[c] = (keep == nullptr || ks != 0 || keep[j]) && Allowed(masks[0], j, &addb[c]) ? -1 : 0;
        anyb[c] = 0;
      }
      for (int64_t g = 0; g < G; ++g) {
        const int32_t* ok = okm;
        if (keep != nullptr && ks != 0) {  // this head's own set
          const uint8_t* kg = keep + g * ks;
          for (int64_t c = 0; c < m; ++c) okb[c] = kg[idx[c0 + c]] ? okm[c] : 0;
          ok = okb;
        }
        float* lg = logit + g * n + c0;
        for (int64_t c = 0; c < m8; c += 8) {
          v8 x, a;
          v8i k;
          __builtin_memcpy(&x, lg + c, sizeof(x));
          __builtin_memcpy(&a, addb + c, sizeof(a));
          __builtin_memcpy(&k, ok + c, sizeof(k));
          x = k != 0 ? x * sc + a : ninf;
          __builtin_memcpy(lg + c, &x, sizeof(x));
        }
        for (int64_t c = m8; c < m; ++c) lg[c] = ok[c] ? lg[c] * scale + addb[c] : kNegInf;
        for (int64_t c = 0; c < m; ++c) {
          anyb[c] |= ok[c];
          scored += ok[c] != 0;
        }
      }
      for (int64_t c = 0; c < m; ++c) nrows += anyb[c] != 0;
    }
  } else for (int64_t c = 0; c < n; ++c) {
    const int64_t j = idx[c];
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float add;
      const bool ok = (keep == nullptr || keep[g * ks + j]) && Allowed(masks[g], j, &add);
      float& lg = logit[g * n + c];
      lg = ok ? lg * scale + add : kNegInf;
      any |= ok;
      scored += ok;
    }
    nrows += any;
  }
  *rows = nrows;
  for (int64_t g = 0; g < G; ++g) {
    float* lg = logit + g * n;
    float m = kNegInf;  // std::max(m, x) per lane (a NaN logit never wins), 8 lanes then the tail
    if (n >= 8) {
      v8 mv = Splat<v8>(kNegInf);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        v8 x;
        __builtin_memcpy(&x, lg + i, sizeof(x));
        mv = mv < x ? x : mv;
      }
      for (int r = 0; r < 8; ++r) m = std::max(m, mv[r]);
      for (; i < n; ++i) m = std::max(m, lg[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) m = std::max(m, lg[i]);
    }
    mx[g] = m;
    // sum > 0 unless every token is masked out (0) or a logit is NaN (NaN)
    sums[g] = m != kNegInf ? ExpShiftSum(lg, n, m) : 0.f;
    if (m == kNegInf)  // no finite logit: 0 when every row is masked out, NaN when a logit is NaN
      for (int64_t i = 0; i < n; ++i)
        if (lg[i] != lg[i]) sums[g] = kNaN;
    std::memset(out + g * dv, 0, dv * sizeof(float));
  }
  // softmax·v: every row once, into every head (skipped where the head did not keep it)
  if (dv == 64 && G <= 3) {  // the accumulators in registers (SmolLM2-like heads; each element's sum is the same)
    if (G == 1) SoftmaxV64<R, VF, 1>(logit, n, V, idx, n, per_head, ks, pf, out);
    else if (G == 2) SoftmaxV64<R, VF, 2>(logit, n, V, idx, n, per_head, ks, pf, out);
    else SoftmaxV64<R, VF, 3>(logit, n, V, idx, n, per_head, ks, pf, out);
  } else for (int64_t i = 0; i < n; ++i) {
    if (pf && i + kPrefetch < n) {
      const char* vp = reinterpret_cast<const char*>(V + static_cast<int64_t>(idx[i + kPrefetch]) * dv);
      for (int64_t b = 0; b < vb; b += 64) __builtin_prefetch(vp + b);
    }
    const typename R::E* vr = V + static_cast<int64_t>(idx[i]) * dv;
    for (int64_t g = 0; g < G; ++g)
      if (per_head == nullptr || per_head[g * ks + idx[i]]) AxpyRow<R>(out + g * dv, vr, logit[g * n + i], dv);
  }
  return scored;
}

// out[g, dv] /= sums[g] (AttendRowsBody's numerators of one chunk): zeros when no row is allowed (sums 0), NaN
// from a NaN logit.
void Normalise(float* out, int64_t G, int64_t dv, const float* sums) {
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * dv;
    if (!(sums[g] > 0.f)) {
      const float f = sums[g] == 0.f ? 0.f : kNaN;
      for (int64_t i = 0; i < dv; ++i) o[i] = f;
      continue;
    }
    const float inv = 1.f / sums[g];
    for (int64_t i = 0; i < dv; ++i) o[i] *= inv;
  }
}

// One item's nc chunk results part [nc, G·(dv + 2)] (per chunk: mx [G], sums [G], acc [G, dv]) merged into out
// [G, dv]: per head M = the largest chunk max, out = Σ_c e^(mx_c - M)·acc_c / Σ_c e^(mx_c - M)·sums_c, in chunk
// order; a chunk with sums 0 (no row allowed for the head) adds nothing.
void MergeChunks(const float* part, int64_t nc, int64_t G, int64_t dv, float* out) {
  const int64_t ps = G * (dv + 2);
  for (int64_t g = 0; g < G; ++g) {
    float M = kNegInf;
    for (int64_t c = 0; c < nc; ++c)
      if (part[c * ps + G + g] != 0.f) M = std::max(M, part[c * ps + g]);
    float* o = out + g * dv;
    std::memset(o, 0, dv * sizeof(float));
    float total = 0.f;
    for (int64_t c = 0; c < nc; ++c) {
      const float* pc = part + c * ps;
      if (pc[G + g] == 0.f) continue;
      const float w = std::exp(pc[g] - M);
      total += w * pc[G + g];
      const float* acc = pc + 2 * G + g * dv;
      for (int64_t i = 0; i < dv; ++i) o[i] += w * acc[i];
    }
    Normalise(o, 1, dv, &total);
  }
}

}  // namespace
}  // namespace solm
