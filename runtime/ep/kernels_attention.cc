// fp32 Quest attention (QuestAttention, PageBudget); see kernels.h for the contract.
#include "kernels_attention_rows.h"
#include "kernels_attention_select.h"
#include "kernels_util.h"

#include <numeric>

namespace solm {

namespace {

// Page min/max and page score variants: keys read as KR, pages held as SR (kernels_util.h row readers: F32Rows, or a
// half reader; their element type E is the pointers').
#define SOLM_PAGE_MINMAX(NAME, ATTR, KR, SR)                                                                   \
  ATTR void NAME(const KR::E* K, int64_t j0, int64_t L, int64_t d, int64_t S, SR::E* hi, SR::E* lo) {         \
    PageMinMaxBody<KR, SR>(K, j0, L, d, S, hi, lo);                                                           \
  }
#define SOLM_PAGE_SCORES(NAME, ATTR, SR)                                                                       \
  ATTR void NAME(const float* qrows, int64_t G, const SR::E* hi, const SR::E* lo, int64_t P, int64_t ps,      \
                 int64_t d, float* score, bool sum) {                                                         \
    PageScoresBody<SR>(qrows, G, hi, lo, P, ps, d, score, sum);                                               \
  }

// The decode family's variants (kernels_util.h): the bodies above compiled for each ISA, one table per process.
// Each variant also reads fp16 caches (H: HALF, the half-row reader of that ISA); VEC: softmax·v's vector. Page
// state: fp32 (PageMinMax, PageMinMaxH over an fp16 cache, PageScores) or fp16 (HH, FH from a prefill's fp32
// gather, PageScoresH: step protocol 3).
#define SOLM_DECODE_VARIANT(SUFFIX, ATTR, HALF, VEC)                                                                    \
  SOLM_PAGE_MINMAX(PageMinMax##SUFFIX, ATTR, F32Rows, F32Rows)                                                   \
  SOLM_PAGE_MINMAX(PageMinMaxH##SUFFIX, ATTR, HALF, F32Rows)                                                     \
  SOLM_PAGE_MINMAX(PageMinMaxHH##SUFFIX, ATTR, HALF, HALF)                                                       \
  SOLM_PAGE_MINMAX(PageMinMaxFH##SUFFIX, ATTR, F32Rows, HALF)                                                    \
  SOLM_PAGE_SCORES(PageScores##SUFFIX, ATTR, F32Rows)                                                            \
  SOLM_PAGE_SCORES(PageScoresH##SUFFIX, ATTR, HALF)                                                              \
  ATTR uint64_t AttendRows##SUFFIX(const float* qrows, int64_t G, const float* K, const float* V, int64_t d,      \
                                   int64_t dv, float scale, const int32_t* idx, int64_t n, bool pf,              \
                                   const uint8_t* keep, int64_t ks, const MaskRow* masks, float* logit, float* mx, \
                                   float* sums, float* out, uint64_t* rows) {                                    \
    return AttendRowsBody<F32Rows, VEC>(qrows, G, K, V, d, dv, scale, idx, n, pf, keep, ks, masks, logit, mx,    \
                                        sums, out, rows);                                                        \
  }                                                                                                              \
  ATTR uint64_t AttendRowsH##SUFFIX(const float* qrows, int64_t G, const uint16_t* K, const uint16_t* V,         \
                                    int64_t d, int64_t dv, float scale, const int32_t* idx, int64_t n, bool pf,  \
                                    const uint8_t* keep, int64_t ks, const MaskRow* masks, float* logit,         \
                                    float* mx, float* sums, float* out, uint64_t* rows) {                        \
    return AttendRowsBody<HALF, VEC>(qrows, G, K, V, d, dv, scale, idx, n, pf, keep, ks, masks, logit, mx, sums, \
                                     out, rows);                                                                 \
  }
SOLM_DECODE_VARIANT(Base, , F16Rows, v8)
#ifdef SOLM_ISA_VARIANTS
SOLM_DECODE_VARIANT(V3, SOLM_TARGET_V3, F16cRows, v8)
SOLM_DECODE_VARIANT(V4, SOLM_TARGET_V4, F16cRows, vf16)
#endif
#undef SOLM_DECODE_VARIANT
#undef SOLM_PAGE_SCORES
#undef SOLM_PAGE_MINMAX

struct DecodeKernelTable {
  decltype(&PageMinMaxBase) page_minmax;
  decltype(&PageScoresBase) page_scores;
  decltype(&AttendRowsBase) attend_rows;
  decltype(&PageMinMaxHBase) page_minmax_h;  // fp16 caches
  decltype(&AttendRowsHBase) attend_rows_h;
  decltype(&PageMinMaxHHBase) page_minmax_hh;  // fp16 page state (step protocol 3): from the fp16 cache,
  decltype(&PageMinMaxFHBase) page_minmax_fh;  // from a prefill's fp32 gather of it (the same values)
  decltype(&PageScoresHBase) page_scores_h;
  const char* isa;
};

// Picked once per process (IsaLevel: the CPU, capped by SOLM_EP_ISA).
const DecodeKernelTable& DecodeKernels() {
  static const DecodeKernelTable t = [] {
#ifdef SOLM_ISA_VARIANTS
    if (IsaLevel() == 4)
      return DecodeKernelTable{PageMinMaxV4,   PageScoresV4,  AttendRowsV4, PageMinMaxHV4,
                               AttendRowsHV4, PageMinMaxHHV4, PageMinMaxFHV4, PageScoresHV4, IsaName(4)};
    if (IsaLevel() == 3)
      return DecodeKernelTable{PageMinMaxV3,   PageScoresV3,  AttendRowsV3, PageMinMaxHV3,
                               AttendRowsHV3, PageMinMaxHHV3, PageMinMaxFHV3, PageScoresHV3, IsaName(3)};
#endif
    return DecodeKernelTable{PageMinMaxBase,   PageScoresBase,  AttendRowsBase, PageMinMaxHBase,
                             AttendRowsHBase, PageMinMaxHHBase, PageMinMaxFHBase, PageScoresHBase, IsaName(0)};
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
  const bool half = paged && state->f16;         // fp16 page buffers (kernels.h PageState; an fp16 cache only)
  const int64_t Ps = paged ? state->stride : P;  // pages per (row, KV head) in hi/lo
  const size_t es = half ? sizeof(uint16_t) : sizeof(float);
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
      if (state->past_max != nullptr && state->past_max != hi) {  // element offsets in bytes: fp32 or fp16
        const size_t at = static_cast<size_t>(o * Ps * d) * es, n = static_cast<size_t>(keep * d) * es;
        std::memmove(reinterpret_cast<char*>(hi) + at, reinterpret_cast<const char*>(state->past_max) + at, n);
        std::memmove(reinterpret_cast<char*>(lo) + at, reinterpret_cast<const char*>(state->past_min) + at, n);
      }
    } else if (P_past > 0 && state->past_max != hi) {  // in place (kernels.h: aliasing needs P_past == P): no copy
      std::memmove(hi + o * P * d, state->past_max + o * P_past * d, P_past * d * sizeof(float));
      std::memmove(lo + o * P * d, state->past_min + o * P_past * d, P_past * d * sizeof(float));
    }
    if (half && kv.f16)
      DecodeKernels().page_minmax_hh(static_cast<const uint16_t*>(kv.k) + o * kv.stride * d, j0, Lb, d, S,
                                     reinterpret_cast<uint16_t*>(hi) + o * Ps * d,
                                     reinterpret_cast<uint16_t*>(lo) + o * Ps * d);
    else if (half)
      DecodeKernels().page_minmax_fh(static_cast<const float*>(kv.k) + o * kv.stride * d, j0, Lb, d, S,
                                     reinterpret_cast<uint16_t*>(hi) + o * Ps * d,
                                     reinterpret_cast<uint16_t*>(lo) + o * Ps * d);
    else if (kv.f16)
      DecodeKernels().page_minmax_h(static_cast<const uint16_t*>(kv.k) + o * kv.stride * d, j0, Lb, d, S,
                                    hi + o * Ps * d, lo + o * Ps * d);
    else
      DecodeKernels().page_minmax(static_cast<const float*>(kv.k) + o * kv.stride * d, j0, Lb, d, S,
                                  hi + o * Ps * d, lo + o * Ps * d);
    st.attn_minmax_rows.fetch_add(static_cast<uint64_t>(Lb - j0), std::memory_order_relaxed);
  };
  if (T == 1 && (paged || P_past > 0))  // one key per item folded in: less work than waking a thread for it
    for (int64_t it = 0; it < B * Hkv; ++it) item(static_cast<size_t>(it));
  else
    par.For(static_cast<size_t>(B * Hkv), item);
}

// Decode chunks: an item's n rows are cut into ceil(n / kChunkRows) chunks (one when n <= kChunkRows), at
// multiples of 8 rows (AttendRowsBody's q·k blocks, so each logit is computed as without chunks). The size is a
// build-time constant (-DSOLM_DECODE_CHUNK_ROWS=N for experiments; a huge N restores the unchunked decode).
#ifndef SOLM_DECODE_CHUNK_ROWS
#define SOLM_DECODE_CHUNK_ROWS 256
#endif
constexpr int64_t kChunkRows = SOLM_DECODE_CHUNK_ROWS;
inline int64_t DecodeChunks(int64_t n) { return n <= kChunkRows ? 1 : (n + kChunkRows - 1) / kChunkRows; }

// 0, 1, ..., n-1 (the rows of a dense item), kept in v across calls.
const int32_t* Iota(std::vector<int32_t>& v, int64_t n) {
  const size_t had = v.size();
  if (had < static_cast<size_t>(n)) {
    v.resize(static_cast<size_t>(n));
    for (size_t i = had; i < v.size(); ++i) v[i] = static_cast<int32_t>(i);
  }
  return v.data();
}

// The indices of the kept tokens (keep [L] of 0/1) in ascending order into idx; returns their number. Eight flags at
// a time: a page of 8 is usually all kept or all dropped, so most words are one compare and no per-token branch.
int64_t KeptRows(const uint8_t* keep, int64_t L, int32_t* idx) {
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  int64_t n = 0, j = 0;
  for (; j + 8 <= L; j += 8) {
    uint64_t w;
    std::memcpy(&w, keep + j, 8);
    if (w == 0) continue;
    if (w == kOnes) {
      for (int r = 0; r < 8; ++r) idx[n + r] = static_cast<int32_t>(j + r);
      n += 8;
      continue;
    }
    for (int r = 0; r < 8; ++r)
      if (keep[j + r]) idx[n++] = static_cast<int32_t>(j + r);
  }
  for (; j < L; ++j)
    if (keep[j]) idx[n++] = static_cast<int32_t>(j);
  return n;
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
  const bool half_pages = to_state && state->stride > 0 && state->f16;    // pmax/pmin hold IEEE halves

  if (T != 1) {  // multi-token call (prefill): dense attention under the mask, blocked (kernels_attention_prefill.cc)
    if (kv.f16 || kv.stride != L || kv.lengths != nullptr) std::abort();  // QuestAttentionCache gathers a tight copy
    const float* k = static_cast<const float*>(kv.k);
    const float* v = static_cast<const float*>(kv.v);
    AttendPrefill(q, k, v, mask, B, H, Hkv, T, L, d, dv, scale, p.is_causal, out, scratch, par);
    return;
  }

  const DecodeKernelTable& dk = DecodeKernels();
  NoteIsa(kIsaDecode, dk.isa);
  // Phase 1, one item per (row, KV head): the rows the GQA group attends (idx: token indices, ascending) and, for
  // a sparse row, its keep flags: pages chosen per query head (or once for the group with per_kv_head), the group
  // streaming the union of its heads' kept tokens once, each head scoring only the tokens it kept. A dense row
  // attends every row (the shared 0..L-1). Phase 2: each item's rows in chunks of ~kChunkRows (AttendRowsBody), so
  // that the B·Hkv items (3 for SmolLM2 at B = 1) spread evenly over the threads; phase 3 merges an item's chunks
  // (flash-decoding). The chunking depends only on the number of rows, never on the threads, so outputs do not
  // change with the thread count; an item of one chunk (at most kChunkRows rows) is computed exactly as before.
  const int64_t items = B * Hkv, L0 = L;
  const bool shared = p.per_kv_head || G == 1;  // one token set for the whole group
  const int64_t nsets = shared ? 1 : G;
  int32_t* idx_all = any_sparse ? Grow(scratch.idx, static_cast<size_t>(items * L)) : nullptr;
  uint8_t* keep_all = any_sparse ? Grow(scratch.keep, static_cast<size_t>(items * (nsets + 1) * L)) : nullptr;
  int64_t* nrow = Grow(scratch.nrow, static_cast<size_t>(items));  // rows an item attends; < 0: dense (all)
  // Page scores first, in work items of (item, kScorePages pages), so that two threads share the 3 KV heads of a
  // SmolLM2 row evenly (one item each left a thread idle for a third of the scoring); each score is computed as
  // whole-item scoring computes it. Per item: [P] (one set) or [G, P] (a set per head, rows P apart).
  constexpr int64_t kScorePages = 64;
  const int64_t pch = (P + kScorePages - 1) / kScorePages, P0 = P;
  float* score_all = any_sparse ? Grow(scratch.score, static_cast<size_t>(items * G * P)) : nullptr;
  auto score_item = [&](size_t w) {
    const int64_t it = static_cast<int64_t>(w) / pch, p0 = static_cast<int64_t>(w) % pch * kScorePages;
    const int64_t b = it / Hkv, hk = it % Hkv, P = (len_of(b) + S - 1) / S;
    int64_t pb;
    if (p0 >= P || !row_budget(b, &pb)) return;
    const int64_t p1 = std::min(P, p0 + kScorePages), o = (it * Ps + p0) * d;
    if (half_pages)
      dk.page_scores_h(q + (b * H + hk * G) * d, G, reinterpret_cast<const uint16_t*>(pmax) + o,
                       reinterpret_cast<const uint16_t*>(pmin) + o, p1 - p0, P, d, score_all + it * G * P0 + p0, shared);
    else
      dk.page_scores(q + (b * H + hk * G) * d, G, pmax + o, pmin + o, p1 - p0, P, d, score_all + it * G * P0 + p0,
                     shared);
  };
  if (any_sparse) par.For(static_cast<size_t>(items * pch), score_item);
  auto select_item = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / Hkv;
    const int64_t L = len_of(b), P = (L + S - 1) / S;  // this row's keys and pages (shadow the call's maxima)
    int64_t pb;
    if (!row_budget(b, &pb)) {
      nrow[it] = -L;
      return;
    }
    const int64_t h = static_cast<int64_t>(it) % Hkv * G;  // first query head of the group
    Tls& tls = ThreadScratch();
    const float* score = score_all + static_cast<int64_t>(it) * G * P0;
    float* tmp = Grow(tls.f0, static_cast<size_t>(P));
    uint8_t* page_ok = masked ? Grow(tls.u1, static_cast<size_t>(P)) : nullptr;
    MaskRow* mr = Grow(tls.masks, static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) mr[g] = RowOf(mask, b, h + g, 0, false);
    // one token set's page budget (the set of query heads mh[0, nh) decides what is unmasked: one head, or the
    // group's union when it shares a set); false: the budget covers every unmasked page (dense under the mask). The
    // unmasked pages are counted once for consecutive sets whose mask rows are the same (a mask broadcast over
    // heads: every head of the group).
    const MaskRow* counted = nullptr;
    int64_t lv = 0, pv = 0;
    auto budget = [&](const MaskRow* mh, int64_t nh, int64_t* pbs) {
      *pbs = pb;
      if (!masked) return true;
      if (counted == nullptr || nh != 1 || !SameRow(*counted, mh[0])) {
        std::memset(page_ok, 0, P);
        lv = UnmaskedPages(mh, nh, L, S, page_ok);
        pv = 0;
        for (int64_t i = 0; i < P; ++i) pv += page_ok[i];
        counted = nh == 1 ? mh : nullptr;
      }
      *pbs = std::min(PageBudget(static_cast<double>(kappa[b]), lv, S), pv);
      return *pbs < pv;
    };
    int32_t* idx = idx_all + static_cast<int64_t>(it) * L0;
    int64_t pbs;
    if (shared) {  // one set: its rows straight from the page scores, no keep flags (the attend reads every row)
      if (budget(mr, G, &pbs)) {
        const uint8_t* ok = masked && pv < P ? page_ok : nullptr;
        nrow[it] = KeptFromScores(score, P, pbs, L, S, p.sinks, p.window, idx, tmp, ok);
      } else {  // dense under the mask: every row
        nrow[it] = L;
        std::iota(idx, idx + L, 0);
      }
      return;
    }
    uint8_t* keep = keep_all + static_cast<int64_t>(it) * (nsets + 1) * L0;
    uint8_t* ukeep = keep + nsets * L;
    for (int64_t g = 0; g < G; ++g) {  // a set per head: its keep flags, then their union
      uint8_t* kp = keep + g * L;
      if (budget(mr + g, 1, &pbs)) KeepFromScores(score + g * P, P, pbs, L, S, p.sinks, p.window, kp, tmp,
                                                  masked && pv < P ? page_ok : nullptr);
      else std::memset(kp, 1, L);
    }
    std::memcpy(ukeep, keep, L);
    for (int64_t g = 1; g < G; ++g)
      for (int64_t j = 0; j < L; ++j) ukeep[j] |= keep[g * L + j];
    nrow[it] = KeptRows(ukeep, L, idx);
  };
  if (any_sparse) par.For(static_cast<size_t>(items), select_item);
  else for (int64_t it = 0; it < items; ++it) select_item(static_cast<size_t>(it));

  const int32_t* iota = Iota(scratch.iota, L);
  int64_t* first = Grow(scratch.first, static_cast<size_t>(items + 1));  // item it's chunks: [first[it], first[it+1])
  first[0] = 0;
  for (int64_t it = 0; it < items; ++it) first[it + 1] = first[it] + DecodeChunks(std::abs(nrow[it]));
  const int64_t nch = first[items], pstride = G * (dv + 2);
  float* part = Grow(scratch.part, static_cast<size_t>(nch * pstride));  // per chunk: mx [G], sums [G], acc [G, dv]
  auto chunk = [&](size_t ci) {
    const int64_t it = std::upper_bound(first, first + items + 1, static_cast<int64_t>(ci)) - first - 1;
    const int64_t c = static_cast<int64_t>(ci) - first[it], nc = first[it + 1] - first[it];
    const int64_t b = it / Hkv, hk = it % Hkv, h = hk * G, Lb = len_of(b);
    const bool sparse = nrow[it] >= 0;
    const int64_t n = std::abs(nrow[it]);
    const int64_t r0 = c * n / nc / 8 * 8, r1 = c + 1 == nc ? n : (c + 1) * n / nc / 8 * 8;  // blocks of 8 rows
    Tls& tls = ThreadScratch();
    MaskRow* mr = Grow(tls.masks, static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) mr[g] = RowOf(mask, b, h + g, 0, false);
    float* logit = Grow(tls.f0, static_cast<size_t>(G * (r1 - r0 + 2)));
    float* mx = nc == 1 ? logit + G * (r1 - r0) : part + ci * pstride;
    float* sums = mx + G;
    float* o = nc == 1 ? out + (b * H + h) * dv : part + ci * pstride + 2 * G;
    const uint8_t* keep = sparse && !shared ? keep_all + it * (nsets + 1) * L0 : nullptr;  // a set per head
    const int32_t* idx = (sparse ? idx_all + it * L0 : iota) + r0;
    const int64_t ks = nsets == 1 ? 0 : Lb;
    const float* qh = q + (b * H + h) * d;  // T == 1
    const int64_t head = it * kv.stride;    // rows before this head's first
    uint64_t rows = 0;
    // software prefetch on dense rows too: contiguous rows, but the hardware prefetchers fall behind the two passes
    // (session 16: -7 % step time at ctx 2048, one thread)
    constexpr bool kPf = true;
    const uint64_t scored =
        kv.f16 ? dk.attend_rows_h(qh, G, static_cast<const uint16_t*>(kv.k) + head * d,
                                  static_cast<const uint16_t*>(kv.v) + head * dv, d, dv, scale, idx, r1 - r0, kPf,
                                  keep, ks, mr, logit, mx, sums, o, &rows)
               : dk.attend_rows(qh, G, static_cast<const float*>(kv.k) + head * d,
                                static_cast<const float*>(kv.v) + head * dv, d, dv, scale, idx, r1 - r0, kPf, keep,
                                ks, mr, logit, mx, sums, o, &rows);
    if (nc == 1) Normalise(o, G, dv, sums);
    st.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
    st.attn_kv_rows_read.fetch_add(rows, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(nch), chunk);
  for (int64_t it = 0; it < items; ++it)
    if (first[it + 1] - first[it] > 1)
      MergeChunks(part + first[it] * pstride, first[it + 1] - first[it], G, dv,
                  out + ((it / Hkv) * H + (it % Hkv) * G) * dv);
}

}  // namespace solm
