// Page selection of QuestAttention decode (kernels_attention.cc): the pages a mask leaves, the page min/max fold,
// the keep flags from page scores, and the page scores of a GQA group. Target-free bodies (PageMinMaxBody,
// PageScoresBody) are compiled into each ISA variant of the decode family.
#pragma once

#include "kernels_util.h"

namespace solm {
namespace {

// The pages [P] of S tokens holding a key that some of the n mask rows allows (page_ok |= ...; the caller zeroes
// it); returns the number of such keys (L with no mask). Page by page: no division per key (an idiv per key was
// ~5 % of a sparse decode step at ctx 2048).
int64_t UnmaskedPages(const MaskRow* m, int64_t n, int64_t L, int64_t S, uint8_t* page_ok) {
  bool one = true;  // every row the same (a mask broadcast over the group's heads): one row decides
  for (int64_t g = 1; g < n && one; ++g) one = SameRow(m[0], m[g]);
  if (one && m[0].f == nullptr && m[0].jmax >= L - 1 && (m[0].b == nullptr || m[0].sl == 1)) {
    // no mask, or a contiguous bool row with no causal bound inside [0, L): count the allowed bytes a page at a time
    const uint8_t* b = m[0].b;
    int64_t lv = 0;
    int64_t p = 0, j0 = 0;
    if (b != nullptr && S == 8)  // a page is one 8-byte word: its allowed count from the word's nonzero bytes
      for (; j0 + 8 <= L; ++p, j0 += 8) {
        uint64_t w;
        std::memcpy(&w, b + j0, 8);
        w = (w | w >> 4) & 0x0f0f0f0f0f0f0f0full;  // per byte: nonzero iff its low nibble is now nonzero
        w = (w | w >> 2) & 0x0303030303030303ull;
        w = (w | w >> 1) & 0x0101010101010101ull;  // per byte: 1 iff the mask byte was nonzero
        const int64_t c = static_cast<int64_t>((w * 0x0101010101010101ull) >> 56);
        if (c > 0) page_ok[p] = 1;
        lv += c;
      }
    for (; j0 < L; ++p, j0 += S) {
      const int64_t j1 = std::min(L, j0 + S);
      int64_t c = j1 - j0;
      if (b != nullptr) {
        c = 0;
        for (int64_t j = j0; j < j1; ++j) c += b[j] != 0;
      }
      if (c > 0) page_ok[p] = 1;
      lv += c;
    }
    return lv;
  }
  int64_t lv = 0;
  for (int64_t p = 0, j0 = 0; j0 < L; ++p, j0 += S) {
    const int64_t j1 = std::min(L, j0 + S);
    int64_t c = 0;
    for (int64_t j = j0; j < j1; ++j) {
      bool ok = false;
      for (int64_t g = 0; g < n && !ok; ++g) {
        float add;
        ok = Allowed(m[g], j, &add);
      }
      c += ok;
    }
    if (c > 0) page_ok[p] = 1;
    lv += c;
  }
  return lv;
}

// Element-wise max/min of the keys of pages, hi/lo [P, d], folding keys [j0, L) in order: a page that starts at or
// after j0 starts from its first key; the page holding j0, when j0 is inside it, continues from its current hi/lo
// (its keys before j0 already folded in), so the result equals the fold over the whole page (j0 = 0: every page).
// R: how K's rows are read, St: how hi/lo are read and written (kernels_util.h: F32Rows, F16Rows, F16cRows). With
// fp16 keys an fp16 hi/lo holds exactly the fp32 one's values: a min or max of halves is one of them.
template <class R, class St>
SOLM_INLINE void PageMinMaxBody(const typename R::E* K, int64_t j0, int64_t L, int64_t d, int64_t S,
                                typename St::E* hi, typename St::E* lo) {
  for (int64_t p = j0 / S; p * S < L; ++p) {
    typename St::E* h = hi + p * d;
    typename St::E* l = lo + p * d;
    int64_t j = std::max(j0, p * S);
    const int64_t j1 = std::min(L, (p + 1) * S);
    if (j == p * S) {
      for (int64_t i = 0; i < d; ++i) {
        const float x = R::At(K + j * d + i);
        St::Put(h + i, x);
        St::Put(l + i, x);
      }
      ++j;
    }
    for (; j < j1; ++j) {
      const typename R::E* kr = K + j * d;
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        v8 x = R::Load8(kr + i);
        v8 a = St::Load8(h + i);
        v8 b = St::Load8(l + i);
        St::Store8(h + i, x > a ? x : a);
        St::Store8(l + i, x < b ? x : b);
      }
      for (; i < d; ++i) {
        const float x = R::At(kr + i), a = St::At(h + i), b = St::At(l + i);
        St::Put(h + i, x > a ? x : a);
        St::Put(l + i, x < b ? x : b);
      }
    }
  }
}

// The pb-th best score (pb >= 1) among the pages page_ok allows (null: every page); tmp [P] overwritten.
inline float PageThreshold(const float* score, int64_t P, int64_t pb, float* tmp, const uint8_t* page_ok) {
  int64_t n = 0;
  for (int64_t p = 0; p < P; ++p)
    if (page_ok == nullptr || page_ok[p]) tmp[n++] = score[p];
  return KthLargest(tmp, n, pb);
}

// Token keep flags [L] from page scores: the pb best pages (ties at the threshold kept) among the pages page_ok
// allows (null: every page; the caller clamps pb to their number), the first `sinks` and last `window` tokens, and
// the last token if nothing else is kept (reference.quest_keep_ref).
void KeepFromScores(const float* score, int64_t P, int64_t pb, int64_t L, int64_t S, int64_t sinks, int64_t window,
                    uint8_t* keep, float* tmp, const uint8_t* page_ok) {
  std::memset(keep, 0, L);
  if (pb > 0) {
    const float thr = PageThreshold(score, P, pb, tmp, page_ok);
    constexpr uint64_t kOnes = 0x0101010101010101ull;
    for (int64_t p = 0; p < P; ++p) {
      if (!((page_ok == nullptr || page_ok[p]) && score[p] >= thr)) continue;
      const int64_t m = std::min(S, L - p * S);
      if (m == 8) std::memcpy(keep + p * S, &kOnes, 8);  // a full page of 8: one store, not a call to memset
      else std::memset(keep + p * S, 1, m);
    }
  }
  if (sinks > 0) std::memset(keep, 1, std::min(sinks, L));
  if (window > 0) {
    const int64_t s0 = std::max<int64_t>(L - window, 0);
    std::memset(keep + s0, 1, L - s0);
  }
  bool any = false;
  for (int64_t j = 0; j < L && !any; ++j) any = keep[j] != 0;
  if (!any) keep[L - 1] = 1;
}

// The kept token indices [n] (ascending; returns n) of one token set straight from its page scores: the tokens
// KeepFromScores flags with the same arguments (the pb best pages among those page_ok allows, ties at the threshold
// kept; the first `sinks` and last `window` tokens; the last token if nothing else), without a flag per token.
int64_t KeptFromScores(const float* score, int64_t P, int64_t pb, int64_t L, int64_t S, int64_t sinks,
                       int64_t window, int32_t* idx, float* tmp, const uint8_t* page_ok) {
  const float thr = pb > 0 ? PageThreshold(score, P, pb, tmp, page_ok) : 0.f;
  const int64_t s1 = std::min(std::max<int64_t>(sinks, 0), L);        // sinks: [0, s1)
  const int64_t w0 = std::max(window > 0 ? L - window : L, s1);       // the window past the sinks: [w0, L)
  int64_t n = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t j0 = p * S, j1 = std::min(L, j0 + S);
    if (pb > 0 && (page_ok == nullptr || page_ok[p]) && score[p] >= thr) {
      for (int64_t j = j0; j < j1; ++j) idx[n++] = static_cast<int32_t>(j);
      continue;
    }
    for (int64_t j = j0; j < std::min(j1, s1); ++j) idx[n++] = static_cast<int32_t>(j);
    for (int64_t j = std::max(j0, w0); j < j1; ++j) idx[n++] = static_cast<int32_t>(j);
  }
  if (n == 0) idx[n++] = static_cast<int32_t>(L - 1);
  return n;
}

// Quest page scores of the G query heads of a GQA group (rows qrows + g*d) over P pages: score[g*ps + p] =
// Σ_d max(q_d·max_d, q_d·min_d), or with sum, score[p] = the heads' scores added in head order. Pages in blocks of 8, the heads in
// turn per block: a page's max/min (2·d values, 1/4 of the page's fp16 K and V bytes at S = 8 in fp32, 1/8 in fp16)
// comes from memory once for the whole group, not once per head, and the 8 pages' sums are independent chains (one
// page's serial lane sum no longer waits for the previous page's). Each score is the same sum in the same order as
// scoring one head and one page at a time (8-float lanes, then lanes 0..7 in turn, then the tail): the selections,
// hence the outputs, are bit-identical to the per-head kernel's. (An HSum8 tree over vf16 lanes was tried: as fast
// here, but it rounds differently and flipped a near-tied page choice at κ = 0.3 in a 32-step SmolLM2 decode.)
// St: how the pages are read (F32Rows, or fp16 pages: the same floats, so the same scores).
//
// With sum (pages chosen once per KV head) the heads fold first: max(q·M, q·m) = q⁺·M + q⁻·m element-wise (M >= m;
// q⁺ = max(q, 0), q⁻ = min(q, 0)), so Σ_g score_g = Q⁺·M + Q⁻·m with Q± = Σ_g q±_g: two FMAs per page element for
// the whole group instead of G·(two products, a max, an add). The same sum up to rounding (the heads are added
// before the page elements multiply them); per_kv_head is SolmEP's own coarser selection, not the reference's.
template <class St>
SOLM_INLINE void PageScoresFolded(const float* qrows, int64_t G, const typename St::E* hi_pages,
                                  const typename St::E* lo_pages, int64_t P, int64_t d, float* score) {
  constexpr int64_t kMaxD = 256;
  alignas(32) float qp[kMaxD], qn[kMaxD];
  for (int64_t i = 0; i < d; ++i) {
    float a = 0.f, b = 0.f;
    for (int64_t g = 0; g < G; ++g) a += std::max(qrows[g * d + i], 0.f), b += std::min(qrows[g * d + i], 0.f);
    qp[i] = a, qn[i] = b;
  }
  for (int64_t p = 0; p < P; ++p) {
    const typename St::E* hi = hi_pages + p * d;
    const typename St::E* lo = lo_pages + p * d;
    v8 acc0 = {}, acc1 = {};
    for (int64_t i = 0; i < d; i += 8) {
      acc0 += Load<v8>(qp + i) * St::Load8(hi + i);
      acc1 += Load<v8>(qn + i) * St::Load8(lo + i);
    }
    score[p] = HSum(acc0 + acc1);
  }
}

// One block of np <= 8 pages (hi/lo: its first page's max and min, read through R) scored for the G heads: each
// head's 8 page sums are independent chains; lanes summed in turn, then the tail elements (d % 8).
template <class R>
SOLM_INLINE void ScorePageBlock(const float* qrows, int64_t G, const typename R::E* hi_pages,
                                const typename R::E* lo_pages, int64_t np, int64_t d, float* score, int64_t ps,
                                bool sum) {
  const int64_t dvec = d / 8 * 8;
  float total[8] = {};
  for (int64_t g = 0; g < G; ++g) {
    const float* q = qrows + g * d;
    v8 part[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      v8 acc = {};
      if (r < np) {
        const typename R::E* hi = hi_pages + r * d;
        const typename R::E* lo = lo_pages + r * d;
        for (int64_t i = 0; i < dvec; i += 8) {
          const v8 qv = Load<v8>(q + i);
          const v8 x = qv * R::Load8(hi + i);
          const v8 y = qv * R::Load8(lo + i);
          acc += x > y ? x : y;
        }
      }
      part[r] = acc;
    }
    for (int64_t r = 0; r < np; ++r) {
      const typename R::E* hi = hi_pages + r * d;
      const typename R::E* lo = lo_pages + r * d;
      float sc = HSum(part[r]);
      for (int64_t i = dvec; i < d; ++i) sc += std::max(q[i] * R::At(hi + i), q[i] * R::At(lo + i));
      if (!sum) score[g * ps + r] = sc;
      else total[r] = g == 0 ? sc : total[r] + sc;
    }
  }
  if (sum)
    for (int64_t r = 0; r < np; ++r) score[r] = total[r];
}

template <class St>
SOLM_INLINE void PageScoresBody(const float* qrows, int64_t G, const typename St::E* hi_pages,
                                const typename St::E* lo_pages, int64_t P, int64_t ps, int64_t d, float* score,
                                bool sum) {
  if (sum && G > 1 && d % 8 == 0 && d <= 256) return PageScoresFolded<St>(qrows, G, hi_pages, lo_pages, P, d, score);
  // fp16 pages read by several heads: each block converted to fp32 once, every head reading the floats (the same
  // values in the same order, so the same scores; per query head at κ 0.5, ctx 2048, the step 1.012-1.014× faster)
  constexpr int64_t kMaxD = 256;
  constexpr bool kHalf = !std::is_same_v<St, F32Rows>;
  const bool staged = kHalf && G > 1 && d <= kMaxD;
  alignas(32) float hf[kHalf ? 8 * kMaxD : 1], lf[kHalf ? 8 * kMaxD : 1];
  for (int64_t p0 = 0; p0 < P; p0 += 8) {
    const int64_t np = std::min<int64_t>(8, P - p0);
    const typename St::E* hi = hi_pages + p0 * d;
    const typename St::E* lo = lo_pages + p0 * d;
    if (!staged) {
      ScorePageBlock<St>(qrows, G, hi, lo, np, d, score + p0, ps, sum);
      continue;
    }
    const int64_t n = np * d, n8 = n / 8 * 8;  // the block's pages are contiguous
    for (int64_t i = 0; i < n8; i += 8) {
      const v8 a = St::Load8(hi + i), b = St::Load8(lo + i);
      __builtin_memcpy(hf + i, &a, sizeof(a));
      __builtin_memcpy(lf + i, &b, sizeof(b));
    }
    for (int64_t i = n8; i < n; ++i) hf[i] = St::At(hi + i), lf[i] = St::At(lo + i);
    ScorePageBlock<F32Rows>(qrows, G, hf, lf, np, d, score + p0, ps, sum);
  }
}

}  // namespace
}  // namespace solm
