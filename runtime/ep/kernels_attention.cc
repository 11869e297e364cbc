// fp32 Quest attention (QuestAttention, PageBudget); see kernels.h for the contract.
#include "kernels_attention_rows.h"
#include "kernels_util.h"

namespace solm {

Stats& GlobalStats() {
  static Stats stats;
  return stats;
}

namespace {
std::atomic<const char*> g_last_isa[kIsaFamilies];
}  // namespace

void NoteIsa(IsaFamily family, const char* isa) { g_last_isa[family].store(isa, std::memory_order_relaxed); }
const char* LastIsa(IsaFamily family) { return g_last_isa[family].load(std::memory_order_relaxed); }
const char* SelectedIsa() { return IsaName(IsaLevel()); }

namespace {

// ------------------------------------------------------------------------------------------------ attention

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

// The pages [P] of S tokens holding a key that some of the n mask rows allows (page_ok |= ...; the caller zeroes
// it); returns the number of such keys (L with no mask). Page by page: no division per key (an idiv per key was
// ~5 % of a sparse decode step at ctx 2048).
int64_t UnmaskedPages(const MaskRow* m, int64_t n, int64_t L, int64_t S, uint8_t* page_ok) {
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

inline bool SameRow(const MaskRow& a, const MaskRow& b) {
  return a.b == b.b && a.f == b.f && a.sl == b.sl && a.jmax == b.jmax;
}

// Element-wise max/min of the keys of pages, hi/lo [P, d], folding keys [j0, L) in order: a page that starts at or
// after j0 starts from its first key; the page holding j0, when j0 is inside it, continues from its current hi/lo
// (its keys before j0 already folded in), so the result equals the fold over the whole page (j0 = 0: every page).
// R: how K's rows are read (kernels_util.h: F32Rows, F16Rows, F16cRows).
template <class R>
SOLM_INLINE void PageMinMaxBody(const typename R::E* K, int64_t j0, int64_t L, int64_t d, int64_t S, float* hi,
                                float* lo) {
  for (int64_t p = j0 / S; p * S < L; ++p) {
    float* h = hi + p * d;
    float* l = lo + p * d;
    int64_t j = std::max(j0, p * S);
    const int64_t j1 = std::min(L, (p + 1) * S);
    if (j == p * S) {
      for (int64_t i = 0; i < d; ++i) h[i] = l[i] = R::At(K + j * d + i);
      ++j;
    }
    for (; j < j1; ++j) {
      const typename R::E* kr = K + j * d;
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        v8 x = R::Load8(kr + i);
        v8 a = *reinterpret_cast<v8*>(h + i);
        v8 b = *reinterpret_cast<v8*>(l + i);
        *reinterpret_cast<v8*>(h + i) = x > a ? x : a;
        *reinterpret_cast<v8*>(l + i) = x < b ? x : b;
      }
      for (; i < d; ++i) {
        const float x = R::At(kr + i);
        h[i] = x > h[i] ? x : h[i];
        l[i] = x < l[i] ? x : l[i];
      }
    }
  }
}

// Token keep flags [L] from page scores: the pb best pages (ties at the threshold kept) among the pages page_ok
// allows (null: every page; the caller clamps pb to their number), the first `sinks` and last `window` tokens, and
// the last token if nothing else is kept (reference.quest_keep_ref).
void KeepFromScores(const float* score, int64_t P, int64_t pb, int64_t L, int64_t S, int64_t sinks, int64_t window,
                    uint8_t* keep, float* tmp, const uint8_t* page_ok) {
  std::memset(keep, 0, L);
  if (pb > 0) {
    int64_t n = 0;
    for (int64_t p = 0; p < P; ++p)
      if (page_ok == nullptr || page_ok[p]) tmp[n++] = score[p];
    const float thr = KthLargest(tmp, n, pb);
    for (int64_t p = 0; p < P; ++p)
      if ((page_ok == nullptr || page_ok[p]) && score[p] >= thr) std::memset(keep + p * S, 1, std::min(S, L - p * S));
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

// Decode attention (T == 1) of the G query heads (rows qrows + g*d) that share one K/V head. Head g attends over the
// tokens j its mask allows and, when keep is given, with keep[g*ks + j] (ks = 0: one token set for the group;
// ks = L: a set per head); ukeep (null: every token) is the union of the heads' sets, streamed once so each K and V
// row is read once for the whole group. Two passes, each with one access pattern and its own prefetch kPrefetch
// rows ahead (kept pages are 2 KiB runs at scattered places, which the hardware prefetchers do not follow): q·k of
// every head over the union's K rows (8 rows per reduction tree), then, after a vectorised softmax, softmax·v over
// the V rows. Branch-free per head: a row the head did not keep (or its mask removes) gets -inf, so weight 0.
// Scratch: logit [G*L + G], idx [L]. Returns the q·k products that count (kept and allowed); *rows = the rows
// some head attends. out [G, dv].
template <class R, class VF>
SOLM_INLINE uint64_t AttendKeptBody(const float* qrows, int64_t G, const typename R::E* K, const typename R::E* V,
                                    int64_t L, int64_t d, int64_t dv, float scale, const uint8_t* ukeep,
                                    const uint8_t* keep, int64_t ks, const MaskRow* masks, float* logit, int32_t* idx,
                                    float* out, uint64_t* rows) {
  int64_t n = 0;
  if (ukeep) {
    for (int64_t j = 0; j < L; ++j)
      if (ukeep[j]) idx[n++] = static_cast<int32_t>(j);
  } else {
    for (int64_t j = 0; j < L; ++j) idx[j] = static_cast<int32_t>(j);
    n = L;
  }
  constexpr int64_t kPrefetch = 16;
  const bool pf = ukeep != nullptr;
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
  // q·k: rows in blocks of 8 (one reduction tree per head and block), the tail one row at a time
  const int64_t n8 = d % 8 == 0 ? n / 8 * 8 : 0;
  for (int64_t c = 0; c < n8; c += 8) {
    if (pf)
      for (int64_t r = c + kPrefetch; r < std::min(c + kPrefetch + 8, n); ++r) {
        const char* kp = reinterpret_cast<const char*>(K + static_cast<int64_t>(idx[r]) * d);
        for (int64_t b = 0; b < kb; b += 64) __builtin_prefetch(kp + b);
      }
    if constexpr (Lanes<VF>() == 16) {  // AVX-512 (32 registers): 3 heads' 8-row trees, each K chunk widened once
      if (G == 3 && kept8(0, idx + c) && kept8(1, idx + c) && kept8(2, idx + c)) {
        Dot8Rows3<R>(qrows, K, idx + c, d, logit + c, L);
        continue;
      }
    }
    for (int64_t g = 0; g < G; ++g)
      if (kept8(g, idx + c)) Dot8Rows<R>(qrows + g * d, K, idx + c, d, logit + g * L + c);
  }
  for (int64_t c = n8; c < n; ++c)
    for (int64_t g = 0; g < G; ++g)
      if (per_head == nullptr || per_head[g * ks + idx[c]])
        logit[g * L + c] = DotRow<R>(qrows + g * d, K + static_cast<int64_t>(idx[c]) * d, d);
  // scale, mask and keep: a row some head attends counts as read
  uint64_t scored = 0, nrows = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = idx[c];
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float add;
      const bool ok = (keep == nullptr || keep[g * ks + j]) && Allowed(masks[g], j, &add);
      float& lg = logit[g * L + c];
      lg = ok ? lg * scale + add : kNegInf;
      any |= ok;
      scored += ok;
    }
    nrows += any;
  }
  *rows = nrows;
  float* sums = logit + G * L;
  for (int64_t g = 0; g < G; ++g) {
    float* lg = logit + g * L;
    float mx = kNegInf;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lg[i]);
    // sum > 0 unless every token is masked out (0: zeros, as in the reference) or a logit is NaN (NaN).
    sums[g] = mx != kNegInf ? ExpShiftSum(lg, n, mx) : 0.f;
    std::memset(out + g * dv, 0, dv * sizeof(float));
  }
  // softmax·v: every V row of the union once, into every head (skipped where the head did not keep it)
  if (dv == 64 && G <= 3) {  // the accumulators in registers (SmolLM2-like heads; each element's sum is the same)
    if (G == 1) SoftmaxV64<R, VF, 1>(logit, L, V, idx, n, per_head, ks, pf, out);
    else if (G == 2) SoftmaxV64<R, VF, 2>(logit, L, V, idx, n, per_head, ks, pf, out);
    else SoftmaxV64<R, VF, 3>(logit, L, V, idx, n, per_head, ks, pf, out);
  } else for (int64_t i = 0; i < n; ++i) {
    if (pf && i + kPrefetch < n) {
      const char* vp = reinterpret_cast<const char*>(V + static_cast<int64_t>(idx[i + kPrefetch]) * dv);
      for (int64_t b = 0; b < vb; b += 64) __builtin_prefetch(vp + b);
    }
    const typename R::E* vr = V + static_cast<int64_t>(idx[i]) * dv;
    for (int64_t g = 0; g < G; ++g)
      if (per_head == nullptr || per_head[g * ks + idx[i]]) AxpyRow<R>(out + g * dv, vr, logit[g * L + i], dv);
  }
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * dv;
    if (!(sums[g] > 0.f)) {  // no allowed key: zeros; a NaN logit: NaN
      const float f = sums[g] == 0.f ? 0.f : kNaN;
      for (int64_t i = 0; i < dv; ++i) o[i] = f;
      continue;
    }
    const float inv = 1.f / sums[g];
    for (int64_t i = 0; i < dv; ++i) o[i] *= inv;
  }
  return scored;
}

// Quest page scores of the G query heads of a GQA group (rows qrows + g*d): score[g*P + p] = Σ_d max(q_d·max_d,
// q_d·min_d), or with sum, score[p] = the heads' scores added in head order. Pages in blocks of 8, the heads in
// turn per block: a page's max/min (2·d floats, 1/4 of the page's fp16 K and V bytes at S = 8) comes from memory
// once for the whole group, not once per head, and the 8 pages' sums are independent chains (one page's serial
// lane sum no longer waits for the previous page's). Each score is the same sum in the same order as scoring one
// head and one page at a time (8-float lanes, then lanes 0..7 in turn, then the tail): the selections, hence the
// outputs, are bit-identical to the per-head kernel's. (An HSum8 tree over vf16 lanes was tried: as fast here, but
// it rounds differently and flipped a near-tied page choice at κ = 0.3 in a 32-step SmolLM2 decode.)
SOLM_INLINE void PageScoresBody(const float* qrows, int64_t G, const float* hi_pages, const float* lo_pages,
                                int64_t P, int64_t d, float* score, bool sum) {
  const int64_t dvec = d / 8 * 8;
  for (int64_t p0 = 0; p0 < P; p0 += 8) {
    const int64_t np = std::min<int64_t>(8, P - p0);
    float total[8] = {};
    for (int64_t g = 0; g < G; ++g) {
      const float* q = qrows + g * d;
      v8 part[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        v8 acc = {};
        if (r < np) {
          const float* hi = hi_pages + (p0 + r) * d;
          const float* lo = lo_pages + (p0 + r) * d;
          for (int64_t i = 0; i < dvec; i += 8) {
            const v8 qv = Load<v8>(q + i);
            const v8 x = qv * Load<v8>(hi + i);
            const v8 y = qv * Load<v8>(lo + i);
            acc += x > y ? x : y;
          }
        }
        part[r] = acc;
      }
      for (int64_t r = 0; r < np; ++r) {
        const float* hi = hi_pages + (p0 + r) * d;
        const float* lo = lo_pages + (p0 + r) * d;
        float sc = HSum(part[r]);
        for (int64_t i = dvec; i < d; ++i) sc += std::max(q[i] * hi[i], q[i] * lo[i]);
        if (!sum) score[g * P + p0 + r] = sc;
        else total[r] = g == 0 ? sc : total[r] + sc;
      }
    }
    if (sum)
      for (int64_t r = 0; r < np; ++r) score[p0 + r] = total[r];
  }
}

// The decode family's variants (kernels_util.h): the bodies above compiled for each ISA, one table per process.
// Each variant also reads fp16 caches (H: HALF, the half-row reader of that ISA); VEC: softmax·v's vector.
#define SOLM_DECODE_VARIANT(SUFFIX, ATTR, HALF, VEC)                                                                    \
  ATTR void PageMinMax##SUFFIX(const float* K, int64_t j0, int64_t L, int64_t d, int64_t S, float* hi,           \
                               float* lo) {                                                                      \
    PageMinMaxBody<F32Rows>(K, j0, L, d, S, hi, lo);                                                             \
  }                                                                                                              \
  ATTR void PageMinMaxH##SUFFIX(const uint16_t* K, int64_t j0, int64_t L, int64_t d, int64_t S, float* hi,       \
                                float* lo) {                                                                     \
    PageMinMaxBody<HALF>(K, j0, L, d, S, hi, lo);                                                                \
  }                                                                                                              \
  ATTR void PageScores##SUFFIX(const float* qrows, int64_t G, const float* hi, const float* lo, int64_t P,       \
                               int64_t d, float* score, bool sum) {                                              \
    PageScoresBody(qrows, G, hi, lo, P, d, score, sum);                                                           \
  }                                                                                                              \
  ATTR uint64_t AttendKept##SUFFIX(const float* qrows, int64_t G, const float* K, const float* V, int64_t L,      \
                                   int64_t d, int64_t dv, float scale, const uint8_t* ukeep, const uint8_t* keep, \
                                   int64_t ks, const MaskRow* masks, float* logit, int32_t* idx, float* out,      \
                                   uint64_t* rows) {                                                             \
    return AttendKeptBody<F32Rows, VEC>(qrows, G, K, V, L, d, dv, scale, ukeep, keep, ks, masks, logit, idx, out,     \
                                   rows);                                                                        \
  }                                                                                                              \
  ATTR uint64_t AttendKeptH##SUFFIX(const float* qrows, int64_t G, const uint16_t* K, const uint16_t* V,         \
                                    int64_t L, int64_t d, int64_t dv, float scale, const uint8_t* ukeep,         \
                                    const uint8_t* keep, int64_t ks, const MaskRow* masks, float* logit,         \
                                    int32_t* idx, float* out, uint64_t* rows) {                                  \
    return AttendKeptBody<HALF, VEC>(qrows, G, K, V, L, d, dv, scale, ukeep, keep, ks, masks, logit, idx, out, rows); \
  }
SOLM_DECODE_VARIANT(Base, , F16Rows, v8)
#ifdef SOLM_ISA_VARIANTS
SOLM_DECODE_VARIANT(V3, SOLM_TARGET_V3, F16cRows, v8)
SOLM_DECODE_VARIANT(V4, SOLM_TARGET_V4, F16cRows, vf16)
#endif
#undef SOLM_DECODE_VARIANT

struct DecodeKernelTable {
  decltype(&PageMinMaxBase) page_minmax;
  decltype(&PageScoresBase) page_scores;
  decltype(&AttendKeptBase) attend_kept;
  decltype(&PageMinMaxHBase) page_minmax_h;  // fp16 caches
  decltype(&AttendKeptHBase) attend_kept_h;
  const char* isa;
};

// Picked once per process (IsaLevel: the CPU, capped by SOLM_EP_ISA).
const DecodeKernelTable& DecodeKernels() {
  static const DecodeKernelTable t = [] {
#ifdef SOLM_ISA_VARIANTS
    if (IsaLevel() == 4)
      return DecodeKernelTable{PageMinMaxV4, PageScoresV4, AttendKeptV4, PageMinMaxHV4, AttendKeptHV4, IsaName(4)};
    if (IsaLevel() == 3)
      return DecodeKernelTable{PageMinMaxV3, PageScoresV3, AttendKeptV3, PageMinMaxHV3, AttendKeptHV3, IsaName(3)};
#endif
    return DecodeKernelTable{PageMinMaxBase, PageScoresBase, AttendKeptBase, PageMinMaxHBase, AttendKeptHBase,
                             IsaName(0)};
  }();
  return t;
}

// Page min/max of this call: into the state outputs for every row (carried pages copied, the new tokens' pages
// folded in), else into scratch for the rows that select (sparse(b, &pb)). Reads only the new keys when a past
// state is given. In the buffer form (state->stride > 0) row b folds its own new keys [L_b - T, L_b) into its pages.
template <class F>
void PageMinMaxStep(const KvView& kv, int64_t B, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t S,
                    const PageState* state, bool any_sparse, F& sparse, AttnScratch& scratch, const Parallel& par) {
  const int64_t P = (L + S - 1) / S;
  const bool to_state = state != nullptr && state->min != nullptr && state->max != nullptr;
  if (!to_state && !any_sparse) return;
  const bool paged = to_state && state->stride > 0;
  const int64_t Ps = paged ? state->stride : P;  // pages per (row, KV head) in hi/lo
  float* hi = to_state ? state->max : Grow(scratch.page_max, static_cast<size_t>(B * Hkv * P * d));
  float* lo = to_state ? state->min : Grow(scratch.page_min, static_cast<size_t>(B * Hkv * P * d));
  const int64_t P_past = state != nullptr ? state->P_past : 0;
  Stats& st = GlobalStats();
  auto item = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / Hkv;
    int64_t pb;
    if (!to_state && !sparse(b, &pb)) return;
    const int64_t o = static_cast<int64_t>(it);  // b * Hkv + hk
    const int64_t Lb = kv.lengths != nullptr ? kv.lengths[b] : L;
    int64_t j0 = P_past > 0 ? Lb - T : 0;  // first key not yet folded into the carried pages
    if (paged) {
      j0 = Lb - T;
      const int64_t keep = (j0 + S - 1) / S;  // this row's pages before the call
      if (state->past_max != nullptr && state->past_max != hi) {
        std::memmove(hi + o * Ps * d, state->past_max + o * Ps * d, keep * d * sizeof(float));
        std::memmove(lo + o * Ps * d, state->past_min + o * Ps * d, keep * d * sizeof(float));
      }
    } else if (P_past > 0 && state->past_max != hi) {  // in place (kernels.h: aliasing needs P_past == P): no copy
      std::memmove(hi + o * P * d, state->past_max + o * P_past * d, P_past * d * sizeof(float));
      std::memmove(lo + o * P * d, state->past_min + o * P_past * d, P_past * d * sizeof(float));
    }
    if (kv.f16)
      DecodeKernels().page_minmax_h(static_cast<const uint16_t*>(kv.k) + o * kv.stride * d, j0, Lb, d, S,
                                    hi + o * Ps * d, lo + o * Ps * d);
    else
      DecodeKernels().page_minmax(static_cast<const float*>(kv.k) + o * kv.stride * d, j0, Lb, d, S,
                                  hi + o * Ps * d, lo + o * Ps * d);
    st.attn_minmax_rows.fetch_add(static_cast<uint64_t>(Lb - j0), std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(B * Hkv), item);
}

}  // namespace

int64_t PageBudget(double kappa, int64_t L, int64_t S) {
  const double nd = std::ceil(kappa * static_cast<double>(L) - 1e-9);
  int64_t n = 0;
  if (nd > 0) n = nd >= static_cast<double>(L) ? L : static_cast<int64_t>(nd);
  const int64_t P = (L + S - 1) / S;
  return std::min((n + S - 1) / S, P);
}

void QuestAttention(const float* q, const float* k, const float* v, const MaskView& mask, const float* kappa,
                    int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv,
                    const QuestParams& p, float* out, AttnScratch& scratch, const Parallel& par,
                    const PageState* state) {
  KvView kv;
  kv.k = k, kv.v = v, kv.stride = L;
  QuestAttentionView(q, kv, mask, kappa, B, H, Hkv, T, L, d, dv, p, out, scratch, par, state);
}

void QuestAttentionView(const float* q, const KvView& kv, const MaskView& mask, const float* kappa, int64_t B,
                        int64_t H, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv, const QuestParams& p,
                        float* out, AttnScratch& scratch, const Parallel& par, const PageState* state) {
  Stats& st = GlobalStats();
  st.attn_calls.fetch_add(1, std::memory_order_relaxed);
  st.attn_keys_dense.fetch_add(static_cast<uint64_t>(B * H * T * L), std::memory_order_relaxed);
  const int64_t G = H / Hkv;
  const float scale = p.scale;
  const int64_t S = std::max<int64_t>(p.page_size, 1);
  const int64_t P = (L + S - 1) / S;

  // Single-token step: per row, dense if kappa >= 1 or the page budget covers every page. Under a mask the budget
  // is per query head, over its unmasked keys and pages (reference.quest_keep_ref), so every row with kappa < 1 may
  // select (and a head whose budget covers its unmasked pages keeps them all).
  const bool masked = mask.data != nullptr;
  // step protocol 2: row b has its own valid keys L_b <= L (single-token steps; kv.lengths)
  auto len_of = [&](int64_t b) { return kv.lengths != nullptr ? kv.lengths[b] : L; };
  auto row_budget = [&](int64_t b, int64_t* pb) {
    const double kb = static_cast<double>(kappa[b]);
    const int64_t Lb = len_of(b);
    *pb = PageBudget(kb, Lb, S);
    return T == 1 && !(kb >= 1.0 || (!masked && *pb >= (Lb + S - 1) / S));  // true: sparse row (may select)
  };
  bool any_sparse = false;
  for (int64_t b = 0; b < B; ++b) {
    int64_t pb;
    any_sparse = any_sparse || row_budget(b, &pb);
  }
  PageMinMaxStep(kv, B, Hkv, T, L, d, S, state, any_sparse, row_budget, scratch, par);
  const bool to_state = state != nullptr && state->min != nullptr && state->max != nullptr;
  const float* pmax = to_state ? state->max : scratch.page_max.data();
  const float* pmin = to_state ? state->min : scratch.page_min.data();
  const int64_t Ps = to_state && state->stride > 0 ? state->stride : P;  // pages per (row, KV head) there

  if (T != 1) {  // multi-token call (prefill): dense attention under the mask, blocked (kernels_attention_prefill.cc)
    if (kv.f16 || kv.stride != L || kv.lengths != nullptr) std::abort();  // QuestAttentionCache gathers a tight copy
    const float* k = static_cast<const float*>(kv.k);
    const float* v = static_cast<const float*>(kv.v);
    AttendPrefill(q, k, v, mask, B, H, Hkv, T, L, d, dv, scale, p.is_causal, out, scratch, par);
    return;
  }

  const DecodeKernelTable& dk = DecodeKernels();
  NoteIsa(kIsaDecode, dk.isa);
  // One item per (row, KV head): the pages are chosen per query head (or once for the group with per_kv_head), and
  // the group streams the union of its heads' kept tokens once, each head scoring only the tokens it kept.
  auto item = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / Hkv, hk = static_cast<int64_t>(it) % Hkv;
    const int64_t h = hk * G;  // first query head of the group
    const int64_t L = len_of(b), P = (L + S - 1) / S;  // this row's keys and pages (shadow the call's maxima)
    int64_t pb;
    const bool sparse = row_budget(b, &pb);
    const bool shared = p.per_kv_head || G == 1;  // one token set for the whole group
    const int64_t nsets = sparse ? (shared ? 1 : G) : 0;
    Tls& tls = ThreadScratch();
    float* logit = Grow(tls.f0, static_cast<size_t>(G * L + G + (G + 1) * P));
    float* score = logit + G * L + G;  // [P] (one set) or [G, P] (a set per head)
    float* tmp = score + G * P;
    uint8_t* page_ok = masked && sparse ? Grow(tls.u1, static_cast<size_t>(P)) : nullptr;
    // one token set: its keep flags from its page scores sc (the set of query heads mh[0, nh) decides what is
    // unmasked: one head, or the group's union when it shares a set). The unmasked pages are counted once for
    // consecutive sets whose mask rows are the same (a mask broadcast over heads: every head of the group).
    const MaskRow* counted = nullptr;
    int64_t lv = 0, pv = 0;
    auto select = [&](const float* sc, const MaskRow* mh, int64_t nh, uint8_t* kp) {
      int64_t pbs = pb;
      if (masked) {
        if (counted == nullptr || nh != 1 || !SameRow(*counted, mh[0])) {
          std::memset(page_ok, 0, P);
          lv = UnmaskedPages(mh, nh, L, S, page_ok);
          pv = 0;
          for (int64_t i = 0; i < P; ++i) pv += page_ok[i];
          counted = nh == 1 ? mh : nullptr;
        }
        pbs = std::min(PageBudget(static_cast<double>(kappa[b]), lv, S), pv);
        if (pbs >= pv) {  // the budget covers every unmasked page: dense under the mask
          std::memset(kp, 1, L);
          return;
        }
      }
      KeepFromScores(sc, P, pbs, L, S, p.sinks, p.window, kp, tmp, page_ok);
    };
    int32_t* idx = Grow(tls.i0, static_cast<size_t>(L));
    uint8_t* keep = sparse ? Grow(tls.u0, static_cast<size_t>((nsets + 1) * L)) : nullptr;
    uint8_t* ukeep = keep == nullptr ? nullptr : nsets == 1 ? keep : keep + nsets * L;
    MaskRow* mr = Grow(tls.masks, static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) mr[g] = RowOf(mask, b, h + g, 0, false);
    const float* qh = q + (b * H + h) * d;  // T == 1
    const int64_t head = (b * Hkv + hk) * kv.stride;  // rows before this head's first
    if (sparse) {
      const int64_t o = (b * Hkv + hk) * Ps * d;
      dk.page_scores(qh, G, pmax + o, pmin + o, P, d, score, shared);
      if (shared) {
        select(score, mr, G, keep);
      } else {
        for (int64_t g = 0; g < G; ++g) select(score + g * P, mr + g, 1, keep + g * L);
        std::memcpy(ukeep, keep, L);
        for (int64_t g = 1; g < G; ++g)
          for (int64_t j = 0; j < L; ++j) ukeep[j] |= keep[g * L + j];
      }
    }
    uint64_t rows = 0;
    const int64_t ks = nsets == 1 ? 0 : L;
    const uint64_t scored =
        kv.f16 ? dk.attend_kept_h(qh, G, static_cast<const uint16_t*>(kv.k) + head * d,
                                  static_cast<const uint16_t*>(kv.v) + head * dv, L, d, dv, scale, ukeep, keep, ks, mr,
                                  logit, idx, out + (b * H + h) * dv, &rows)
               : dk.attend_kept(qh, G, static_cast<const float*>(kv.k) + head * d,
                                static_cast<const float*>(kv.v) + head * dv, L, d, dv, scale, ukeep, keep, ks, mr,
                                logit, idx, out + (b * H + h) * dv, &rows);
    st.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
    st.attn_kv_rows_read.fetch_add(rows, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(B * Hkv), item);
}

}  // namespace solm
