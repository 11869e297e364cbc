// fp32 kernels of the ai.solm ops; see kernels.h for the contract.
#include "kernels.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>

// The hot per-item functions are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked at load
// time by GCC's ifunc resolver (__builtin_cpu_supports), so the library stays portable across CI machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
#define SOLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOLM_CLONES
#endif

namespace solm {

Stats& GlobalStats() {
  static Stats stats;
  return stats;
}

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline __attribute__((always_inline)) float HSum(v8 s) {
  float r = 0.f;
  for (int i = 0; i < 8; ++i) r += s[i];
  return r;
}

inline __attribute__((always_inline)) float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  v8 acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += *reinterpret_cast<const v8*>(a + i) * *reinterpret_cast<const v8*>(b + i);
    acc1 += *reinterpret_cast<const v8*>(a + i + 8) * *reinterpret_cast<const v8*>(b + i + 8);
  }
  float r = HSum(acc0 + acc1);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

inline __attribute__((always_inline)) void Axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct MaskRow {  // the mask restricted to one (b, h, t)
  const uint8_t* b = nullptr;
  const float* f = nullptr;
  int64_t sl = 0;
  int64_t jmax = INT64_MAX;  // is_causal: tokens j > jmax are masked out
};

// Thread-local temporaries for one work item (grown on demand, reused across calls).
struct Tls {
  std::vector<float> f0, f1;
  std::vector<int32_t> i0;
  std::vector<uint8_t> u0;
  std::vector<MaskRow> masks;
};
Tls& ThreadScratch() {
  thread_local Tls tls;
  return tls;
}
template <class V>
typename V::value_type* Grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ------------------------------------------------------------------------------------------------ attention

inline MaskRow RowOf(const MaskView& m, int64_t b, int64_t h, int64_t t, bool causal) {
  MaskRow r;
  if (causal) r.jmax = t;
  if (m.data == nullptr) return r;
  const int64_t off = b * m.sb + h * m.sh + t * m.st;
  if (m.is_bool)
    r.b = static_cast<const uint8_t*>(m.data) + off;
  else
    r.f = static_cast<const float*>(m.data) + off;
  r.sl = m.sl;
  return r;
}
// Returns false if token j is masked out; else sets *add to the additive mask value.
inline bool Allowed(const MaskRow& m, int64_t j, float* add) {
  *add = 0.f;
  if (j > m.jmax) return false;
  if (m.b) return m.b[j * m.sl] != 0;
  if (m.f) {
    *add = m.f[j * m.sl];
    return *add != kNegInf;
  }
  return true;
}

// Element-wise max/min of the keys of pages, hi/lo [P, d], folding keys [j0, L) in order: a page that starts at or
// after j0 starts from its first key; the page holding j0, when j0 is inside it, continues from its current hi/lo
// (its keys before j0 already folded in), so the result equals the fold over the whole page (j0 = 0: every page).
SOLM_CLONES void PageMinMax(const float* K, int64_t j0, int64_t L, int64_t d, int64_t S, float* hi, float* lo) {
  for (int64_t p = j0 / S; p * S < L; ++p) {
    float* h = hi + p * d;
    float* l = lo + p * d;
    int64_t j = std::max(j0, p * S);
    const int64_t j1 = std::min(L, (p + 1) * S);
    if (j == p * S) {
      std::memcpy(h, K + j * d, d * sizeof(float));
      std::memcpy(l, K + j * d, d * sizeof(float));
      ++j;
    }
    for (; j < j1; ++j) {
      const float* kr = K + j * d;
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        v8 x = *reinterpret_cast<const v8*>(kr + i);
        v8 a = *reinterpret_cast<v8*>(h + i);
        v8 b = *reinterpret_cast<v8*>(l + i);
        *reinterpret_cast<v8*>(h + i) = x > a ? x : a;
        *reinterpret_cast<v8*>(l + i) = x < b ? x : b;
      }
      for (; i < d; ++i) {
        h[i] = kr[i] > h[i] ? kr[i] : h[i];
        l[i] = kr[i] < l[i] ? kr[i] : l[i];
      }
    }
  }
}

// Quest page scores of one query head: score[p] (+)= Σ_d max(q_d·max_d, q_d·min_d).
// hi/lo [P, d]: the page max/min.
SOLM_CLONES void PageScores(const float* qrow, const float* hi_pages, const float* lo_pages, int64_t P, int64_t d,
                            float* score, bool accumulate) {
  for (int64_t p = 0; p < P; ++p) {
    const float* hi = hi_pages + p * d;
    const float* lo = lo_pages + p * d;
    v8 acc = {};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
      v8 qv = *reinterpret_cast<const v8*>(qrow + i);
      v8 a = qv * *reinterpret_cast<const v8*>(hi + i);
      v8 b = qv * *reinterpret_cast<const v8*>(lo + i);
      acc += a > b ? a : b;
    }
    float s = HSum(acc);
    for (; i < d; ++i) s += std::max(qrow[i] * hi[i], qrow[i] * lo[i]);
    score[p] = accumulate ? score[p] + s : s;
  }
}

// Token keep flags [L] from page scores: the pb best pages (ties at the threshold kept), the first `sinks` and last
// `window` tokens, and the last token if nothing else is kept (reference.quest_keep_ref).
void KeepFromScores(const float* score, int64_t P, int64_t pb, int64_t L, int64_t S, int64_t sinks, int64_t window,
                    uint8_t* keep, float* tmp) {
  std::memset(keep, 0, L);
  if (pb > 0) {
    std::copy(score, score + P, tmp);
    std::nth_element(tmp, tmp + (pb - 1), tmp + P, std::greater<float>());
    const float thr = tmp[pb - 1];
    for (int64_t p = 0; p < P; ++p)
      if (score[p] >= thr) std::memset(keep + p * S, 1, std::min(S, L - p * S));
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

// Attention of G query heads (rows qrows[g*qstride]) that share one K/V head. Head g attends over the tokens j its
// mask allows and, when keep is given, with keep[g*ks + j] (ks = 0: one token set for the group; ks = L: a set per
// head). ukeep (null: every token) is the union of the heads' sets: the loop streams the union once, so each K and
// V row is read once for the whole group, and computes q·k (and softmax·v) only for the heads that kept the
// token. q·k over d, V rows and outputs of dv values. Scratch: logit [G*L + G], idx [L]. Returns the number of q·k
// dot products computed; *rows = the K rows read (tokens of the union some head may attend).
SOLM_CLONES uint64_t AttendGroup(const float* qrows, int64_t qstride, int64_t G, const float* K, const float* V,
                                 int64_t L, int64_t d, int64_t dv, float scale, const uint8_t* ukeep,
                                 const uint8_t* keep, int64_t ks, const MaskRow* masks, float* logit, int32_t* idx,
                                 float* out, int64_t ostride, uint64_t* rows) {
  uint64_t scored = 0;
  // candidates: the union's tokens in order (idx[0, nc)); compacted in place to the tokens some head attends
  int64_t nc = 0;
  if (ukeep) {
    for (int64_t j = 0; j < L; ++j)
      if (ukeep[j]) idx[nc++] = static_cast<int32_t>(j);
  } else {
    for (int64_t j = 0; j < L; ++j) idx[j] = static_cast<int32_t>(j);
    nc = L;
  }
  // Kept pages are short runs (S rows) at scattered places: the hardware prefetchers lose the stream, so the K and
  // V rows kPrefetch candidates ahead are prefetched by hand (V is then in cache for the softmax·v pass). Measured
  // at SmolLM2 shapes (L = 2048, kappa = 0.5 per KV head): 0.5x of the dense time without, ~1.1-1.6x with.
  // Dense streams need no help.
  constexpr int64_t kPrefetch = 12;
  const int64_t npf = ukeep ? nc - kPrefetch : 0;
  int64_t n = 0;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t j = idx[c];
    if (c < npf) {
      const int64_t jp = idx[c + kPrefetch];
      const char* kp = reinterpret_cast<const char*>(K + jp * d);
      const char* vp = reinterpret_cast<const char*>(V + jp * dv);
      for (int64_t b = 0; b < d * 4; b += 64) __builtin_prefetch(kp + b);
      for (int64_t b = 0; b < dv * 4; b += 64) __builtin_prefetch(vp + b);
    }
    const float* kr = K + j * d;
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float add;
      if ((keep == nullptr || keep[g * ks + j]) && Allowed(masks[g], j, &add)) {
        logit[g * L + n] = Dot(qrows + g * qstride, kr, d) * scale + add;
        any = true;
        ++scored;
      } else {
        logit[g * L + n] = kNegInf;
      }
    }
    if (any) idx[n++] = static_cast<int32_t>(j);
  }
  *rows = static_cast<uint64_t>(n);
  float* sums = logit + G * L;
  for (int64_t g = 0; g < G; ++g) {
    float* lg = logit + g * L;
    float mx = kNegInf;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lg[i]);
    float sum = 0.f;
    if (mx != kNegInf) {
      for (int64_t i = 0; i < n; ++i) {
        lg[i] = std::exp(lg[i] - mx);
        sum += lg[i];
      }
    }
    // sum > 0 unless every token is masked out (softmax of all -inf) or a logit is NaN: NaN, as in the reference.
    sums[g] = sum;
    std::memset(out + g * ostride, 0, dv * sizeof(float));
  }
  // PV: every kept V row read once, accumulated into every head of the group.
  for (int64_t i = 0; i < n; ++i) {
    const float* vr = V + static_cast<int64_t>(idx[i]) * dv;
    for (int64_t g = 0; g < G; ++g) {
      const float e = logit[g * L + i];
      if (e != 0.f && sums[g] > 0.f) Axpy(out + g * ostride, vr, e, dv);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * ostride;
    if (!(sums[g] > 0.f)) {
      for (int64_t i = 0; i < dv; ++i) o[i] = kNaN;
      continue;
    }
    const float inv = 1.f / sums[g];
    for (int64_t i = 0; i < dv; ++i) o[i] *= inv;
  }
  return scored;
}

// Page min/max of this call: into the state outputs for every row (carried pages copied, the new tokens' pages
// folded in), else into scratch for the rows that select (sparse(b, &pb)). Reads only the new keys when a past
// state is given.
template <class F>
void PageMinMaxStep(const float* k, int64_t B, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t S,
                    const PageState* state, bool any_sparse, F& sparse, AttnScratch& scratch, const Parallel& par) {
  const int64_t P = (L + S - 1) / S;
  const bool to_state = state != nullptr && state->min != nullptr && state->max != nullptr;
  if (!to_state && !any_sparse) return;
  float* hi = to_state ? state->max : Grow(scratch.page_max, static_cast<size_t>(B * Hkv * P * d));
  float* lo = to_state ? state->min : Grow(scratch.page_min, static_cast<size_t>(B * Hkv * P * d));
  const int64_t P_past = state != nullptr ? state->P_past : 0;
  const int64_t j0 = P_past > 0 ? L - T : 0;  // first key not yet folded into the carried pages
  Stats& st = GlobalStats();
  auto item = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / Hkv;
    int64_t pb;
    if (!to_state && !sparse(b, &pb)) return;
    const int64_t o = static_cast<int64_t>(it);  // b * Hkv + hk
    if (P_past > 0) {
      std::memcpy(hi + o * P * d, state->past_max + o * P_past * d, P_past * d * sizeof(float));
      std::memcpy(lo + o * P * d, state->past_min + o * P_past * d, P_past * d * sizeof(float));
    }
    PageMinMax(k + o * L * d, j0, L, d, S, hi + o * P * d, lo + o * P * d);
    st.attn_minmax_rows.fetch_add(static_cast<uint64_t>(L - j0), std::memory_order_relaxed);
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
  Stats& st = GlobalStats();
  st.attn_calls.fetch_add(1, std::memory_order_relaxed);
  st.attn_keys_dense.fetch_add(static_cast<uint64_t>(B * H * T * L), std::memory_order_relaxed);
  const int64_t G = H / Hkv;
  const float scale = p.scale;
  const int64_t S = std::max<int64_t>(p.page_size, 1);
  const int64_t P = (L + S - 1) / S;

  // Single-token step: per row, dense if kappa >= 1 or the page budget covers every page.
  auto row_budget = [&](int64_t b, int64_t* pb) {
    const double kb = static_cast<double>(kappa[b]);
    *pb = PageBudget(kb, L, S);
    return T == 1 && !(kb >= 1.0 || *pb >= P);  // true: sparse row
  };
  bool any_sparse = false;
  for (int64_t b = 0; b < B; ++b) {
    int64_t pb;
    any_sparse = any_sparse || row_budget(b, &pb);
  }
  PageMinMaxStep(k, B, Hkv, T, L, d, S, state, any_sparse, row_budget, scratch, par);
  const bool to_state = state != nullptr && state->min != nullptr && state->max != nullptr;
  const float* pmax = to_state ? state->max : scratch.page_max.data();
  const float* pmin = to_state ? state->min : scratch.page_min.data();

  if (T != 1) {
    // Multi-token call (prefill): dense attention under the mask; one item per (row, KV head, query position).
    auto item = [&](size_t it) {
      const int64_t t = static_cast<int64_t>(it) % T;
      const int64_t bk = static_cast<int64_t>(it) / T;
      const int64_t b = bk / Hkv, hk = bk % Hkv;
      Tls& tls = ThreadScratch();
      float* logit = Grow(tls.f0, static_cast<size_t>(G * L + G));
      int32_t* idx = Grow(tls.i0, static_cast<size_t>(L));
      MaskRow* mr = Grow(tls.masks, static_cast<size_t>(G));
      for (int64_t g = 0; g < G; ++g) mr[g] = RowOf(mask, b, hk * G + g, t, p.is_causal);
      const float* qb = q + ((b * H + hk * G) * T + t) * d;
      const float* K = k + (b * Hkv + hk) * L * d;
      const float* V = v + (b * Hkv + hk) * L * dv;
      float* ob = out + ((b * H + hk * G) * T + t) * dv;
      uint64_t rows = 0;
      const uint64_t scored =
          AttendGroup(qb, T * d, G, K, V, L, d, dv, scale, nullptr, nullptr, 0, mr, logit, idx, ob, T * dv, &rows);
      st.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
      st.attn_kv_rows_read.fetch_add(rows, std::memory_order_relaxed);
    };
    par.For(static_cast<size_t>(B * Hkv * T), item);
    return;
  }

  // One item per (row, KV head): the pages are chosen per query head (or once for the group with per_kv_head), and
  // the group streams the union of its heads' kept tokens once, each head scoring only the tokens it kept.
  auto item = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / Hkv, hk = static_cast<int64_t>(it) % Hkv;
    const int64_t h = hk * G;  // first query head of the group
    int64_t pb;
    const bool sparse = row_budget(b, &pb);
    const bool shared = p.per_kv_head || G == 1;  // one token set for the whole group
    const int64_t nsets = sparse ? (shared ? 1 : G) : 0;
    Tls& tls = ThreadScratch();
    float* logit = Grow(tls.f0, static_cast<size_t>(G * L + G + 2 * P));
    float* score = logit + G * L + G;
    float* tmp = score + P;
    int32_t* idx = Grow(tls.i0, static_cast<size_t>(L));
    uint8_t* keep = sparse ? Grow(tls.u0, static_cast<size_t>((nsets + 1) * L)) : nullptr;
    uint8_t* ukeep = keep == nullptr ? nullptr : nsets == 1 ? keep : keep + nsets * L;
    MaskRow* mr = Grow(tls.masks, static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g) mr[g] = RowOf(mask, b, h + g, 0, false);
    const float* qh = q + (b * H + h) * d;  // T == 1
    const float* K = k + (b * Hkv + hk) * L * d;
    const float* V = v + (b * Hkv + hk) * L * dv;
    if (sparse) {
      const int64_t o = (b * Hkv + hk) * P * d;
      if (shared) {
        for (int64_t g = 0; g < G; ++g) PageScores(qh + g * d, pmax + o, pmin + o, P, d, score, g > 0);
        KeepFromScores(score, P, pb, L, S, p.sinks, p.window, keep, tmp);
      } else {
        for (int64_t g = 0; g < G; ++g) {
          PageScores(qh + g * d, pmax + o, pmin + o, P, d, score, false);
          KeepFromScores(score, P, pb, L, S, p.sinks, p.window, keep + g * L, tmp);
        }
        std::memcpy(ukeep, keep, L);
        for (int64_t g = 1; g < G; ++g)
          for (int64_t j = 0; j < L; ++j) ukeep[j] |= keep[g * L + j];
      }
    }
    uint64_t rows = 0;
    const uint64_t scored = AttendGroup(qh, d, G, K, V, L, d, dv, scale, ukeep, keep, nsets == 1 ? 0 : L, mr, logit,
                                        idx, out + (b * H + h) * dv, dv, &rows);
    st.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
    st.attn_kv_rows_read.fetch_add(rows, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(B * Hkv), item);
}

// ------------------------------------------------------------------------------------------------ MLP

bool ParseAct(const std::string& name, Act* act) {
  if (name == "silu") *act = Act::kSilu;
  else if (name == "gelu") *act = Act::kGelu;
  else if (name == "gelu_tanh") *act = Act::kGeluTanh;
  else if (name == "relu") *act = Act::kRelu;
  else return false;
  return true;
}

void MlpWeights::Set(const float* w_gate, const float* b_gate_, const float* w_up, const float* b_up_,
                     const float* w_down, const float* b_down_, int64_t D_, int64_t I_, int64_t Dout_) {
  D = D_, I = I_, Dout = Dout_;
  gated = w_gate != nullptr;
  auto transpose = [](const float* src, int64_t rows, int64_t cols, std::vector<float>& dst) {
    // src [rows, cols] (nn.Linear [out, in]) -> dst [ceil(rows/kPanel), cols, kPanel], zero padded.
    const int64_t np = (rows + kPanel - 1) / kPanel;
    dst.assign(static_cast<size_t>(np * cols * kPanel), 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      float* panel = dst.data() + (r / kPanel) * cols * kPanel + (r % kPanel);
      const float* s = src + r * cols;
      for (int64_t c = 0; c < cols; ++c) panel[c * kPanel] = s[c];
    }
  };
  // gate/up: row c of gu_t = per slice [w_gate[cols, c] | pad | w_up[cols, c] | pad]
  parts = gated ? 2 : 1;
  slice = std::max<int64_t>(64, slice / 64 * 64);
  const int64_t ns = Slices();
  gu_stride = ns == 0 ? 0 : (ns - 1) * slice * parts + Padded(SliceWidth(ns - 1)) * parts;
  // An odd number of cache lines per row: with a power-of-two-ish stride (12 KiB) the rows' pieces of one column
  // tile would all fall into a few cache sets, and the multi-token kernel's tile (n rows x 256 B) would thrash L2.
  if (gu_stride > 0 && (gu_stride / 16) % 2 == 0) gu_stride += 16;
  gu_t.assign(static_cast<size_t>(D * gu_stride), 0.f);
  for (int64_t sl = 0; sl < ns; ++sl) {
    const int64_t c0 = sl * slice, w = SliceWidth(sl), wp = Padded(w);
    for (int64_t part = 0; part < parts; ++part) {
      const float* src = part == 0 && gated ? w_gate : w_up;  // [I, D]
      for (int64_t i = 0; i < w; ++i) {
        const float* s = src + (c0 + i) * D;
        float* dst = gu_t.data() + sl * slice * parts + part * wp + i;
        for (int64_t c = 0; c < D; ++c) dst[c * gu_stride] = s[c];
      }
    }
  }
  transpose(w_down, Dout, I, down_t);
  auto copy = [](const float* src, int64_t n, std::vector<float>& dst) {
    if (src) dst.assign(src, src + n);
    else dst.clear();
  };
  copy(gated ? b_gate_ : nullptr, I, b_gate);
  copy(b_up_, I, b_up);
  copy(b_down_, Dout, b_down);
}

namespace {

constexpr int64_t kTokBlock = 8;   // tokens sharing one pass over a weight-row slice
constexpr int64_t kColChunk = MlpWeights::kPanel;  // output columns per work item = one weight panel

inline float Activate(Act act, float x) {
  switch (act) {
    case Act::kSilu: return x / (1.f + std::exp(-x));
    case Act::kGelu: return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752440f));
    case Act::kGeluTanh: {
      const float c = 0.79788456080286535588f;  // sqrt(2/pi)
      return 0.5f * x * (1.f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    case Act::kRelu: return x > 0.f ? x : 0.f;
  }
  return x;
}

// Keep the ceil(rho*D) channels of largest |x| (ties at the threshold kept), zero the rest
// (reference.topk_channels_ref). Returns the number of non-zero channels written.
int64_t TopK(const float* x, int64_t D, double rho, float* xs, float* tmp) {
  if (rho >= 1.0) {
    int64_t nz = 0;
    for (int64_t c = 0; c < D; ++c) {
      xs[c] = x[c];
      nz += x[c] != 0.f;
    }
    return nz;
  }
  const double kd = std::ceil(rho * static_cast<double>(D) - 1e-9);
  int64_t kk = kd >= static_cast<double>(D) ? D : (kd > 1 ? static_cast<int64_t>(kd) : 1);
  for (int64_t c = 0; c < D; ++c) tmp[c] = std::fabs(x[c]);
  std::nth_element(tmp, tmp + (kk - 1), tmp + D, std::greater<float>());
  const float thr = tmp[kk - 1];
  int64_t nz = 0;
  for (int64_t c = 0; c < D; ++c) {
    const bool keep = std::fabs(x[c]) >= thr;
    xs[c] = keep ? x[c] : 0.f;
    nz += xs[c] != 0.f;
  }
  return nz;
}

// ---- register-tiled panel kernels --------------------------------------------------------------------------
// y (a kColChunk-float buffer, or NT of them) += Σ_r coef[r] · panel row idx[r]. The accumulators of a column tile
// live in vector registers for the whole pass over the rows, so every weight element is loaded once per pass and
// the only memory traffic is the weight stream. Every variant adds the rows one FMA at a time in the order given,
// so a token gets bit-identical results whichever variant (single- or multi-token) processes it.

typedef float vf16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef float vf4 __attribute__((vector_size(16), aligned(4), may_alias));

template <class V>
constexpr int Lanes() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}
// Unaligned vector load/store. (A template parameter loses the typedef's aligned(4) attribute, so dereferencing a
// V* would assume natural alignment.)
template <class V>
inline __attribute__((always_inline)) V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
inline __attribute__((always_inline)) void Store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

template <class V, int NV>
inline __attribute__((always_inline)) void GemvTile(float* y, const float* base, const int32_t* idx,
                                                    const float* coef, int64_t n) {
  constexpr int L = Lanes<V>();
  V acc[NV];
#pragma GCC unroll 32
  for (int k = 0; k < NV; ++k) acc[k] = Load<V>(y + k * L);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = base + static_cast<int64_t>(idx[r]) * kColChunk;
    const V a = V{} + coef[r];
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) acc[k] += a * Load<V>(x + k * L);
  }
#pragma GCC unroll 32
  for (int k = 0; k < NV; ++k) Store<V>(y + k * L, acc[k]);
}

template <class V, int NV, int NT>
inline __attribute__((always_inline)) void GemmTile(float* y, int64_t ys, const float* base, const int32_t* idx,
                                                    const float* coef, int64_t cs, int64_t n) {
  constexpr int L = Lanes<V>();
  V acc[NT][NV];
#pragma GCC unroll 32
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) acc[t][k] = Load<V>(y + t * ys + k * L);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = base + static_cast<int64_t>(idx[r]) * kColChunk;
    V w[NV];
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) w[k] = Load<V>(x + k * L);
#pragma GCC unroll 32
    for (int t = 0; t < NT; ++t) {
      const V a = V{} + coef[t * cs + r];
#pragma GCC unroll 32
      for (int k = 0; k < NV; ++k) acc[t][k] += a * w[k];
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) Store<V>(y + t * ys + k * L, acc[t][k]);
}

// One token over a whole panel.
template <class V, int NV>
inline __attribute__((always_inline)) void GemvPanel(float* y, const float* panel, const int32_t* idx,
                                                     const float* coef, int64_t n) {
  constexpr int TW = NV * Lanes<V>();
  static_assert(kColChunk % TW == 0, "tile must divide the panel");
  for (int64_t c0 = 0; c0 < kColChunk; c0 += TW) GemvTile<V, NV>(y + c0, panel + c0, idx, coef, n);
}

// nt tokens (buffers y + t*kColChunk, coefficients coef + t*cs) over a whole panel, NT tokens per pass.
template <class V, int NV1, int NV, int NT>
inline __attribute__((always_inline)) void GemmPanel(float* y, int64_t nt, const float* panel, const int32_t* idx,
                                                     const float* coef, int64_t cs, int64_t n) {
  constexpr int TW = NV * Lanes<V>();
  static_assert(kColChunk % TW == 0, "tile must divide the panel");
  int64_t t = 0;
  for (; t + NT <= nt; t += NT)
    for (int64_t c0 = 0; c0 < kColChunk; c0 += TW)
      GemmTile<V, NV, NT>(y + t * kColChunk + c0, kColChunk, panel + c0, idx, coef + t * cs, cs, n);
  for (; t < nt; ++t) GemvPanel<V, NV1>(y + t * kColChunk, panel, idx, coef + t * cs, n);
}

// ---- row kernels (gate/up, input-major rows of stride rs) ------------------------------------------------------
// y [width] += Σ_r coef[r] · row idx[r] (base + idx[r]*rs, `width` floats, a multiple of the vector width). One
// token: the accumulators live in y (L1) and each pass folds 4 rows into them (one load and store of y per 4 rows);
// each row is one contiguous segment, so skipped rows are skipped bytes. Adds the rows one at a time in the given
// order, like the panel kernels: bit-identical to GemmRows for the same token.
template <class V>
inline __attribute__((always_inline)) void GemvRowsT(float* y, int64_t width, const float* base, int64_t rs,
                                                     const int32_t* idx, const float* coef, int64_t n) {
  constexpr int L = Lanes<V>();
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const float* w0 = base + static_cast<int64_t>(idx[r]) * rs;
    const float* w1 = base + static_cast<int64_t>(idx[r + 1]) * rs;
    const float* w2 = base + static_cast<int64_t>(idx[r + 2]) * rs;
    const float* w3 = base + static_cast<int64_t>(idx[r + 3]) * rs;
    const V a0 = V{} + coef[r], a1 = V{} + coef[r + 1], a2 = V{} + coef[r + 2], a3 = V{} + coef[r + 3];
    for (int64_t k = 0; k < width; k += L) {
      V acc = Load<V>(y + k);
      acc += a0 * Load<V>(w0 + k);
      acc += a1 * Load<V>(w1 + k);
      acc += a2 * Load<V>(w2 + k);
      acc += a3 * Load<V>(w3 + k);
      Store<V>(y + k, acc);
    }
  }
  for (; r < n; ++r) {
    const float* w0 = base + static_cast<int64_t>(idx[r]) * rs;
    const V a0 = V{} + coef[r];
    for (int64_t k = 0; k < width; k += L) Store<V>(y + k, Load<V>(y + k) + a0 * Load<V>(w0 + k));
  }
}

// NT tokens (buffers y + u*ys, coefficients coef + u*cs) over the column tile [c0, c0 + NV*L) of the rows.
template <class V, int NV, int NT>
inline __attribute__((always_inline)) void RowsTile(float* y, int64_t ys, int64_t c0, const float* base, int64_t rs,
                                                    const int32_t* idx, const float* coef, int64_t cs, int64_t n) {
  constexpr int L = Lanes<V>();
  V acc[NT][NV];
#pragma GCC unroll 32
  for (int u = 0; u < NT; ++u)
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) acc[u][k] = Load<V>(y + u * ys + c0 + k * L);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = base + static_cast<int64_t>(idx[r]) * rs + c0;
    V w[NV];
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) w[k] = Load<V>(x + k * L);
#pragma GCC unroll 32
    for (int u = 0; u < NT; ++u) {
      const V a = V{} + coef[u * cs + r];
#pragma GCC unroll 32
      for (int k = 0; k < NV; ++k) acc[u][k] += a * w[k];
    }
  }
#pragma GCC unroll 32
  for (int u = 0; u < NT; ++u)
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) Store<V>(y + u * ys + c0 + k * L, acc[u][k]);
}

// nt tokens (buffers y + t*ys, coefficients coef + t*cs) over rows of `width` floats, in chunks of 64 rows: a
// chunk's segments (64 x width floats) stay in L2 while every column tile and token group uses them, and each
// row is read front to back. NT tokens x NV vectors per register tile, leftover tokens one at a time; each
// element still adds the rows one at a time in the given order.
template <class V, int NV, int NT>
inline __attribute__((always_inline)) void GemmRowsT(float* y, int64_t ys, int64_t nt, int64_t width,
                                                     const float* base, int64_t rs, const int32_t* idx,
                                                     const float* coef, int64_t cs, int64_t n) {
  constexpr int TW = NV * Lanes<V>();
  constexpr int64_t kRowChunk = 64;
  for (int64_t r0 = 0; r0 < n; r0 += kRowChunk) {
    const int64_t nr = std::min(kRowChunk, n - r0);
    for (int64_t c0 = 0; c0 < width; c0 += TW) {
      int64_t t = 0;
      for (; t + NT <= nt; t += NT)
        RowsTile<V, NV, NT>(y + t * ys, ys, c0, base, rs, idx + r0, coef + t * cs + r0, cs, nr);
      for (; t < nt; ++t) RowsTile<V, NV, 1>(y + t * ys, ys, c0, base, rs, idx + r0, coef + t * cs + r0, cs, nr);
    }
  }
}

using GemvRowsFn = void (*)(float*, int64_t, const float*, int64_t, const int32_t*, const float*, int64_t);
using GemmRowsFn = void (*)(float*, int64_t, int64_t, int64_t, const float*, int64_t, const int32_t*, const float*,
                            int64_t, int64_t);

void GemvRowsBase(float* y, int64_t w, const float* b, int64_t rs, const int32_t* i, const float* c, int64_t n) {
  GemvRowsT<vf4>(y, w, b, rs, i, c, n);
}
void GemmRowsBase(float* y, int64_t ys, int64_t nt, int64_t w, const float* b, int64_t rs, const int32_t* i,
                  const float* c, int64_t cs, int64_t n) {
  GemmRowsT<vf4, 2, 4>(y, ys, nt, w, b, rs, i, c, cs, n);
}
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
__attribute__((target("arch=x86-64-v3"))) void GemvRowsV3(float* y, int64_t w, const float* b, int64_t rs,
                                                          const int32_t* i, const float* c, int64_t n) {
  GemvRowsT<v8>(y, w, b, rs, i, c, n);
}
__attribute__((target("arch=x86-64-v3"))) void GemmRowsV3(float* y, int64_t ys, int64_t nt, int64_t w, const float* b,
                                                          int64_t rs, const int32_t* i, const float* c, int64_t cs,
                                                          int64_t n) {
  GemmRowsT<v8, 2, 4>(y, ys, nt, w, b, rs, i, c, cs, n);
}
__attribute__((target("arch=x86-64-v4"))) void GemvRowsV4(float* y, int64_t w, const float* b, int64_t rs,
                                                          const int32_t* i, const float* c, int64_t n) {
  GemvRowsT<vf16>(y, w, b, rs, i, c, n);
}
__attribute__((target("arch=x86-64-v4"))) void GemmRowsV4(float* y, int64_t ys, int64_t nt, int64_t w, const float* b,
                                                          int64_t rs, const int32_t* i, const float* c, int64_t cs,
                                                          int64_t n) {
  GemmRowsT<vf16, 4, 4>(y, ys, nt, w, b, rs, i, c, cs, n);
}
#endif

using GemvFn = void (*)(float*, const float*, const int32_t*, const float*, int64_t);
using GemmFn = void (*)(float*, int64_t, const float*, const int32_t*, const float*, int64_t, int64_t);
struct PanelKernels {
  GemvFn gemv;
  GemmFn gemm;
  GemvRowsFn gemv_rows;
  GemmRowsFn gemm_rows;
  const char* isa;
};

// Baseline x86-64 (SSE2) / any other architecture: 4-lane vectors.
void GemvBase(float* y, const float* p, const int32_t* i, const float* c, int64_t n) { GemvPanel<vf4, 8>(y, p, i, c, n); }
void GemmBase(float* y, int64_t nt, const float* p, const int32_t* i, const float* c, int64_t cs, int64_t n) {
  GemmPanel<vf4, 8, 2, 4>(y, nt, p, i, c, cs, n);
}
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
// AVX2 + FMA: 16 ymm registers (8 accumulators for one token; 4 tokens x 2 for the multi-token tile).
__attribute__((target("arch=x86-64-v3"))) void GemvV3(float* y, const float* p, const int32_t* i, const float* c,
                                                      int64_t n) {
  GemvPanel<v8, 8>(y, p, i, c, n);
}
__attribute__((target("arch=x86-64-v3"))) void GemmV3(float* y, int64_t nt, const float* p, const int32_t* i,
                                                      const float* c, int64_t cs, int64_t n) {
  GemmPanel<v8, 8, 2, 4>(y, nt, p, i, c, cs, n);
}
// AVX-512: 32 zmm registers (a whole 256-float panel row for one token; 4 tokens x 64 floats).
__attribute__((target("arch=x86-64-v4"))) void GemvV4(float* y, const float* p, const int32_t* i, const float* c,
                                                      int64_t n) {
  GemvPanel<vf16, 16>(y, p, i, c, n);
}
__attribute__((target("arch=x86-64-v4"))) void GemmV4(float* y, int64_t nt, const float* p, const int32_t* i,
                                                      const float* c, int64_t cs, int64_t n) {
  GemmPanel<vf16, 16, 4, 4>(y, nt, p, i, c, cs, n);
}
#endif

// Picked once per process from the CPU; SOLM_EP_ISA=baseline|x86-64-v3 caps it (to test the other variants).
const PanelKernels& Panel() {
  static const PanelKernels k = [] {
    const char* cap = std::getenv("SOLM_EP_ISA");
    const std::string want = cap ? cap : "";
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
    __builtin_cpu_init();
    if (want != "baseline" && want != "x86-64-v3" && __builtin_cpu_supports("x86-64-v4"))
      return PanelKernels{GemvV4, GemmV4, GemvRowsV4, GemmRowsV4, "x86-64-v4"};
    if (want != "baseline" && __builtin_cpu_supports("x86-64-v3")) return PanelKernels{GemvV3, GemmV3, GemvRowsV3, GemmRowsV3, "x86-64-v3"};
#endif
    return PanelKernels{GemvBase, GemmBase, GemvRowsBase, GemmRowsBase, "baseline"};
  }();
  return k;
}

// Fill nt buffers of kColChunk floats with the bias slice [j0, j0+w) (or zeros) and zero padding.
void InitAcc(float* acc, int64_t nt, const std::vector<float>& bias, int64_t j0, int64_t w) {
  for (int64_t t = 0; t < nt; ++t) {
    float* a = acc + t * kColChunk;
    if (!bias.empty()) std::memcpy(a, bias.data() + j0, w * sizeof(float));
    else std::memset(a, 0, w * sizeof(float));
    std::memset(a + w, 0, (kColChunk - w) * sizeof(float));
  }
}

// Rows of one token block: per token its non-zero coefficients (the work that must be done), and whether the block
// is dense enough for the multi-token kernel over the union of rows (zero coefficients for rows a token dropped:
// exact, at most 1/3 extra multiply-adds, each weight vector loaded once per 4 tokens instead of once per token).
constexpr double kMultiTokenFill = 0.75;

// gate/up (+ activation) of a token block over one column slice sl of gu_t. xs [N, D] top-k-zeroed inputs;
// uidx/ucount the union of the block's kept channels. Scratch: acc kTokBlock*parts*slice floats, coef kTokBlock*D
// floats, rows D ints.
void MlpUpItem(const MlpWeights& W, const float* xs, const int32_t* uidx, int64_t ucount, int64_t n0, int64_t nt,
               int64_t sl, Act act, float* h, float* acc, float* coef, int32_t* rows) {
  const int64_t D = W.D, I = W.I;
  const PanelKernels& K = Panel();
  const int64_t i0 = sl * W.slice, w = W.SliceWidth(sl), wp = MlpWeights::Padded(w);
  const int64_t width = W.parts * wp;  // accumulator floats per token: [gate | pad | up | pad]
  const float* base = W.gu_t.data() + sl * W.slice * W.parts;
  for (int64_t t = 0; t < nt; ++t) {
    float* a = acc + t * width;
    std::memset(a, 0, width * sizeof(float));
    if (W.gated && !W.b_gate.empty()) std::memcpy(a, W.b_gate.data() + i0, w * sizeof(float));
    if (!W.b_up.empty()) std::memcpy(a + (W.parts - 1) * wp, W.b_up.data() + i0, w * sizeof(float));
  }
  int64_t work = 0;
  for (int64_t t = 0; t < nt; ++t) {
    const float* x = xs + (n0 + t) * D;
    for (int64_t u = 0; u < ucount; ++u) work += x[uidx[u]] != 0.f;
  }
  if (nt > 1 && static_cast<double>(work) >= kMultiTokenFill * static_cast<double>(nt * ucount)) {
    for (int64_t t = 0; t < nt; ++t) {
      const float* x = xs + (n0 + t) * D;
      for (int64_t u = 0; u < ucount; ++u) coef[t * ucount + u] = x[uidx[u]];
    }
    K.gemm_rows(acc, width, nt, width, base, W.gu_stride, uidx, coef, ucount, ucount);
  } else {
    for (int64_t t = 0; t < nt; ++t) {
      const float* x = xs + (n0 + t) * D;
      int64_t n = 0;
      for (int64_t u = 0; u < ucount; ++u) {
        const int32_t c = uidx[u];
        if (x[c] != 0.f) rows[n] = c, coef[n++] = x[c];
      }
      K.gemv_rows(acc + t * width, width, base, W.gu_stride, rows, coef, n);
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    float* hr = h + (n0 + t) * I + i0;
    const float* g = acc + t * width;
    const float* u = g + (W.parts - 1) * wp;
    if (W.gated)
      for (int64_t i = 0; i < w; ++i) hr[i] = Activate(act, g[i]) * u[i];
    else
      for (int64_t i = 0; i < w; ++i) hr[i] = Activate(act, u[i]);
  }
}

// down projection of a token block over one output column panel: one row per non-zero activation. Scratch: acc
// kTokBlock*kColChunk floats, coef kTokBlock*I floats, rows I ints. Returns the non-zero activations (summed over
// the block's tokens) in *nonzero.
void MlpDownItem(const MlpWeights& W, const float* h, int64_t n0, int64_t nt, int64_t j0, int64_t w, float* y,
                 float* acc, float* coef, int32_t* rows, uint64_t* nonzero) {
  const int64_t I = W.I, Dout = W.Dout;
  const PanelKernels& K = Panel();
  const float* panel = W.down_t.data() + j0 * I;  // panel j0/kColChunk
  InitAcc(acc, nt, W.b_down, j0, w);
  // union of the non-zero activations of the block, and the work per token
  int64_t u = 0, work = 0;
  for (int64_t i = 0; i < I; ++i) {
    int64_t cnt = 0;
    for (int64_t t = 0; t < nt; ++t) cnt += h[(n0 + t) * I + i] != 0.f;
    if (cnt) rows[u++] = static_cast<int32_t>(i);
    work += cnt;
  }
  *nonzero = static_cast<uint64_t>(work);
  if (nt > 1 && static_cast<double>(work) >= kMultiTokenFill * static_cast<double>(nt * u)) {
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t k = 0; k < u; ++k) coef[t * u + k] = h[(n0 + t) * I + rows[k]];
    K.gemm(acc, nt, panel, rows, coef, u, u);
  } else {
    for (int64_t t = 0; t < nt; ++t) {
      const float* hr = h + (n0 + t) * I;
      int32_t* trows = rows + u;  // after the union list (rows has room for 2*I)
      int64_t n = 0;
      for (int64_t k = 0; k < u; ++k)
        if (hr[rows[k]] != 0.f) trows[n] = rows[k], coef[n++] = hr[rows[k]];
      K.gemv(acc + t * kColChunk, panel, trows, coef, n);
    }
  }
  for (int64_t t = 0; t < nt; ++t) std::memcpy(y + (n0 + t) * Dout + j0, acc + t * kColChunk, w * sizeof(float));
}

// Symmetric per-token fake quantisation, q_max = 2^(b-1)-1; b >= 16 is the identity (reference.fake_quant_ref).
void FakeQuant(float* y, int64_t n, double bits) {
  if (bits >= 16) return;
  const double rb = std::nearbyint(bits);  // Python round(): half to even
  const float qmax = static_cast<float>(std::pow(2.0, rb - 1.0) - 1.0);
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(y[i]));
  const float s = amax / qmax;
  if (s == 0.f) return;
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(y[i] / s);  // torch.round: half to even
    r = std::min(std::max(r, -qmax), qmax);
    y[i] = r * s;
  }
}

}  // namespace

const char* MlpKernelIsa() { return Panel().isa; }

void SparseMlp(const float* x, int64_t B, int64_t T, const MlpWeights& W, const float* rho, const float* bits,
               Act act, float* y, MlpScratch& sc, const Parallel& par) {
  Stats& st = GlobalStats();
  st.mlp_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t N = B * T, D = W.D, I = W.I, Dout = W.Dout;
  if (N == 0) return;
  const int64_t nblk = (N + kTokBlock - 1) / kTokBlock;
  float* xs = Grow(sc.xs, static_cast<size_t>(N * D));
  float* h = Grow(sc.h, static_cast<size_t>(N * I));
  int32_t* uidx = Grow(sc.uidx, static_cast<size_t>(nblk * D));
  int32_t* ucnt = Grow(sc.ucount, static_cast<size_t>(nblk));
  st.mlp_in_rows_dense.fetch_add(static_cast<uint64_t>(N * D), std::memory_order_relaxed);
  st.mlp_down_rows_dense.fetch_add(static_cast<uint64_t>(N * I), std::memory_order_relaxed);

  // A: per token top-k channels; per token block the union of the kept channels.
  auto select = [&](size_t blk) {
    const int64_t n0 = static_cast<int64_t>(blk) * kTokBlock, nt = std::min(kTokBlock, N - n0);
    float* tmp = Grow(ThreadScratch().f0, static_cast<size_t>(D));
    uint64_t rows = 0;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t n = n0 + t;
      rows += static_cast<uint64_t>(TopK(x + n * D, D, static_cast<double>(rho[n / T]), xs + n * D, tmp));
    }
    int32_t* u = uidx + blk * D;
    int32_t cnt = 0;
    for (int64_t c = 0; c < D; ++c) {
      bool any = false;
      for (int64_t t = 0; t < nt && !any; ++t) any = xs[(n0 + t) * D + c] != 0.f;
      if (any) u[cnt++] = static_cast<int32_t>(c);
    }
    ucnt[blk] = cnt;
    st.mlp_in_rows.fetch_add(rows, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(nblk), select);

  // B: gate/up + activation, items (column slice, token block); slice-major so a thread keeps a weight slice hot.
  const int64_t ns = W.Slices();
  auto up = [&](size_t it) {
    const int64_t sl = static_cast<int64_t>(it) / nblk, blk = static_cast<int64_t>(it) % nblk;
    const int64_t n0 = blk * kTokBlock, nt = std::min(kTokBlock, N - n0);
    Tls& tls = ThreadScratch();
    const int64_t accn = kTokBlock * W.parts * W.slice;
    float* acc = Grow(tls.f1, static_cast<size_t>(accn + kTokBlock * D));
    int32_t* rows = Grow(tls.i0, static_cast<size_t>(D));
    MlpUpItem(W, xs, uidx + blk * D, ucnt[blk], n0, nt, sl, act, h, acc, acc + accn, rows);
  };
  par.For(static_cast<size_t>(ns * nblk), up);

  // C: down projection, items (output column panel, token block).
  const int64_t nco = (Dout + kColChunk - 1) / kColChunk;
  auto down = [&](size_t it) {
    const int64_t j = static_cast<int64_t>(it) / nblk, blk = static_cast<int64_t>(it) % nblk;
    const int64_t n0 = blk * kTokBlock, nt = std::min(kTokBlock, N - n0);
    const int64_t j0 = j * kColChunk, w = std::min(kColChunk, Dout - j0);
    Tls& tls = ThreadScratch();
    float* acc = Grow(tls.f1, static_cast<size_t>(kTokBlock * kColChunk + kTokBlock * I));
    int32_t* rows = Grow(tls.i0, static_cast<size_t>(2 * I));
    uint64_t nz = 0;
    MlpDownItem(W, h, n0, nt, j0, w, y, acc, acc + kTokBlock * kColChunk, rows, &nz);
    if (j == 0) st.mlp_down_rows.fetch_add(nz, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(nco * nblk), down);

  // D: per token fake quantisation.
  bool any_quant = false;
  for (int64_t b = 0; b < B; ++b) any_quant = any_quant || static_cast<double>(bits[b]) < 16;
  if (any_quant) {
    auto quant = [&](size_t n) {
      FakeQuant(y + static_cast<int64_t>(n) * Dout, Dout, static_cast<double>(bits[static_cast<int64_t>(n) / T]));
    };
    par.For(static_cast<size_t>(N), quant);
  }
}

}  // namespace solm
