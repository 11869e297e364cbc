// fp32 kernels of the ai.solm ops; see kernels.h for the contract.
#include "kernels.h"

#include <algorithm>
#include <cmath>
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

inline MaskRow RowOf(const MaskView& m, int64_t b, int64_t h, int64_t t) {
  MaskRow r;
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
  if (m.b) return m.b[j * m.sl] != 0;
  if (m.f) {
    *add = m.f[j * m.sl];
    return *add != kNegInf;
  }
  return true;
}

// Element-wise max/min of the keys of every page: out [P, 2, d] (max row, then min row).
SOLM_CLONES void PageMinMax(const float* K, int64_t L, int64_t d, int64_t S, float* out) {
  const int64_t P = (L + S - 1) / S;
  for (int64_t p = 0; p < P; ++p) {
    float* hi = out + p * 2 * d;
    float* lo = hi + d;
    const int64_t j0 = p * S, j1 = std::min(L, j0 + S);
    std::memcpy(hi, K + j0 * d, d * sizeof(float));
    std::memcpy(lo, K + j0 * d, d * sizeof(float));
    for (int64_t j = j0 + 1; j < j1; ++j) {
      const float* kr = K + j * d;
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        v8 x = *reinterpret_cast<const v8*>(kr + i);
        v8 a = *reinterpret_cast<v8*>(hi + i);
        v8 b = *reinterpret_cast<v8*>(lo + i);
        *reinterpret_cast<v8*>(hi + i) = x > a ? x : a;
        *reinterpret_cast<v8*>(lo + i) = x < b ? x : b;
      }
      for (; i < d; ++i) {
        hi[i] = kr[i] > hi[i] ? kr[i] : hi[i];
        lo[i] = kr[i] < lo[i] ? kr[i] : lo[i];
      }
    }
  }
}

// Quest page scores of one query head: score[p] (+)= Σ_d max(q_d·max_d, q_d·min_d).
SOLM_CLONES void PageScores(const float* qrow, const float* minmax, int64_t P, int64_t d, float* score,
                            bool accumulate) {
  for (int64_t p = 0; p < P; ++p) {
    const float* hi = minmax + p * 2 * d;
    const float* lo = hi + d;
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

// Attention of G query heads (rows qrows[g*qstride]) that share one K/V head, over the tokens with keep[j] (all
// if keep is null) that each head's mask allows. Each kept K and V row is read once for the whole group.
// Scratch: logit [G*L + G], idx [L]. Returns the number of q·k dot products computed.
SOLM_CLONES uint64_t AttendGroup(const float* qrows, int64_t qstride, int64_t G, const float* K, const float* V,
                                 int64_t L, int64_t d, float scale, const uint8_t* keep, const MaskRow* masks,
                                 float* logit, int32_t* idx, float* out, int64_t ostride) {
  uint64_t scored = 0;
  int64_t n = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (keep && !keep[j]) continue;
    const float* kr = K + j * d;
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float add;
      if (Allowed(masks[g], j, &add)) {
        logit[g * L + n] = Dot(qrows + g * qstride, kr, d) * scale + add;
        any = true;
        ++scored;
      } else {
        logit[g * L + n] = kNegInf;
      }
    }
    if (any) idx[n++] = static_cast<int32_t>(j);
  }
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
    std::memset(out + g * ostride, 0, d * sizeof(float));
  }
  // PV: every kept V row read once, accumulated into every head of the group.
  for (int64_t i = 0; i < n; ++i) {
    const float* vr = V + static_cast<int64_t>(idx[i]) * d;
    for (int64_t g = 0; g < G; ++g) {
      const float e = logit[g * L + i];
      if (e != 0.f && sums[g] > 0.f) Axpy(out + g * ostride, vr, e, d);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * ostride;
    if (!(sums[g] > 0.f)) {
      for (int64_t i = 0; i < d; ++i) o[i] = kNaN;
      continue;
    }
    const float inv = 1.f / sums[g];
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
  return scored;
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
                    int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t L, int64_t d, const QuestParams& p,
                    float* out, AttnScratch& scratch, const Parallel& par) {
  Stats& st = GlobalStats();
  st.attn_calls.fetch_add(1, std::memory_order_relaxed);
  st.attn_keys_dense.fetch_add(static_cast<uint64_t>(B * H * T * L), std::memory_order_relaxed);
  const int64_t G = H / Hkv;
  const float scale = p.scale;
  const int64_t S = std::max<int64_t>(p.page_size, 1);
  const int64_t P = (L + S - 1) / S;

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
      for (int64_t g = 0; g < G; ++g) mr[g] = RowOf(mask, b, hk * G + g, t);
      const float* qb = q + ((b * H + hk * G) * T + t) * d;
      const float* K = k + (b * Hkv + hk) * L * d;
      const float* V = v + (b * Hkv + hk) * L * d;
      float* ob = out + ((b * H + hk * G) * T + t) * d;
      const uint64_t scored = AttendGroup(qb, T * d, G, K, V, L, d, scale, nullptr, mr, logit, idx, ob, T * d);
      st.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
      st.attn_kv_rows_read.fetch_add(static_cast<uint64_t>(L), std::memory_order_relaxed);
    };
    par.For(static_cast<size_t>(B * Hkv * T), item);
    return;
  }

  // Single-token step: per row, dense if kappa >= 1 or the page budget covers every page.
  auto row_budget = [&](int64_t b, int64_t* pb) {
    const double kb = static_cast<double>(kappa[b]);
    *pb = PageBudget(kb, L, S);
    return !(kb >= 1.0 || *pb >= P);  // true: sparse row
  };
  bool any_sparse = false;
  for (int64_t b = 0; b < B; ++b) {
    int64_t pb;
    any_sparse = any_sparse || row_budget(b, &pb);
  }
  float* pm = nullptr;
  if (any_sparse) {
    pm = Grow(scratch.page_minmax, static_cast<size_t>(B * Hkv * P * 2 * d));
    auto mm = [&](size_t it) {
      const int64_t b = static_cast<int64_t>(it) / Hkv, hk = static_cast<int64_t>(it) % Hkv;
      int64_t pb;
      if (!row_budget(b, &pb)) return;
      PageMinMax(k + (b * Hkv + hk) * L * d, L, d, S, pm + (b * Hkv + hk) * P * 2 * d);
    };
    par.For(static_cast<size_t>(B * Hkv), mm);
  }

  // One item per (row, query head); dense rows and per-KV-head selection do the whole group in the item of its
  // first head (K/V rows read once per group), the other items of the group return at once.
  auto item = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / H, h = static_cast<int64_t>(it) % H;
    const int64_t hk = h / G, g = h % G;
    int64_t pb;
    const bool sparse = row_budget(b, &pb);
    const bool group = !sparse || p.per_kv_head || G == 1;
    if (group && g != 0) return;
    Tls& tls = ThreadScratch();
    const int64_t heads = group ? G : 1;
    float* logit = Grow(tls.f0, static_cast<size_t>(heads * L + heads + 2 * P));
    float* score = logit + heads * L + heads;
    float* tmp = score + P;
    int32_t* idx = Grow(tls.i0, static_cast<size_t>(L));
    uint8_t* keep = sparse ? Grow(tls.u0, static_cast<size_t>(L)) : nullptr;
    MaskRow* mr = Grow(tls.masks, static_cast<size_t>(heads));
    for (int64_t gg = 0; gg < heads; ++gg) mr[gg] = RowOf(mask, b, h + gg, 0);
    const float* qh = q + (b * H + h) * d;  // T == 1
    const float* K = k + (b * Hkv + hk) * L * d;
    const float* V = v + (b * Hkv + hk) * L * d;
    if (sparse) {
      const float* minmax = pm + (b * Hkv + hk) * P * 2 * d;
      for (int64_t gg = 0; gg < heads; ++gg) PageScores(qh + gg * d, minmax, P, d, score, gg > 0);
      KeepFromScores(score, P, pb, L, S, p.sinks, p.window, keep, tmp);
    }
    const uint64_t scored = AttendGroup(qh, d, heads, K, V, L, d, scale, keep, mr, logit, idx, out + (b * H + h) * d, d);
    uint64_t rows = 0;
    if (keep) {
      for (int64_t j = 0; j < L; ++j) rows += keep[j];
    } else {
      rows = static_cast<uint64_t>(L);
    }
    st.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
    st.attn_kv_rows_read.fetch_add(rows, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(B * H), item);
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
    // src [rows, cols] -> dst [cols, rows], in 32x32 tiles.
    dst.assign(static_cast<size_t>(rows * cols), 0.f);
    constexpr int64_t TS = 32;
    for (int64_t r0 = 0; r0 < rows; r0 += TS)
      for (int64_t c0 = 0; c0 < cols; c0 += TS)
        for (int64_t r = r0; r < std::min(rows, r0 + TS); ++r)
          for (int64_t c = c0; c < std::min(cols, c0 + TS); ++c) dst[c * rows + r] = src[r * cols + c];
  };
  if (gated) transpose(w_gate, I, D, gate_t);
  else gate_t.clear();
  transpose(w_up, I, D, up_t);
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
constexpr int64_t kColChunk = 256;  // output columns per work item (1 KiB of each weight row)

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

// gate/up for a block of tokens and one column chunk [i0, i0+w): one input-major weight row per kept channel.
SOLM_CLONES void MlpUpItem(const MlpWeights& W, const float* xs, const int32_t* uidx, int64_t ucount, int64_t n0,
                           int64_t nt, int64_t i0, int64_t w, Act act, float* h, float* acc) {
  const int64_t D = W.D, I = W.I;
  float* ga = acc;                    // [nt, w]
  float* ua = acc + kTokBlock * kColChunk;  // [nt, w]
  for (int64_t t = 0; t < nt; ++t) {
    if (W.gated) {
      if (!W.b_gate.empty()) std::memcpy(ga + t * w, W.b_gate.data() + i0, w * sizeof(float));
      else std::memset(ga + t * w, 0, w * sizeof(float));
    }
    if (!W.b_up.empty()) std::memcpy(ua + t * w, W.b_up.data() + i0, w * sizeof(float));
    else std::memset(ua + t * w, 0, w * sizeof(float));
  }
  for (int64_t u = 0; u < ucount; ++u) {
    const int64_t c = uidx[u];
    const float* wu = W.up_t.data() + c * I + i0;
    const float* wg = W.gated ? W.gate_t.data() + c * I + i0 : nullptr;
    for (int64_t t = 0; t < nt; ++t) {
      const float xv = xs[(n0 + t) * D + c];
      if (xv == 0.f) continue;
      if (wg) Axpy(ga + t * w, wg, xv, w);
      Axpy(ua + t * w, wu, xv, w);
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    float* hr = h + (n0 + t) * I + i0;
    const float* g = ga + t * w;
    const float* u = ua + t * w;
    if (W.gated)
      for (int64_t i = 0; i < w; ++i) hr[i] = Activate(act, g[i]) * u[i];
    else
      for (int64_t i = 0; i < w; ++i) hr[i] = Activate(act, u[i]);
  }
}

// down projection for a block of tokens and one output column chunk: one row per non-zero activation.
SOLM_CLONES void MlpDownItem(const MlpWeights& W, const float* h, int64_t n0, int64_t nt, int64_t j0, int64_t w,
                             float* y) {
  const int64_t I = W.I, Dout = W.Dout;
  for (int64_t t = 0; t < nt; ++t) {
    float* yr = y + (n0 + t) * Dout + j0;
    if (!W.b_down.empty()) std::memcpy(yr, W.b_down.data() + j0, w * sizeof(float));
    else std::memset(yr, 0, w * sizeof(float));
  }
  for (int64_t i = 0; i < I; ++i) {
    const float* wd = W.down_t.data() + i * Dout + j0;
    for (int64_t t = 0; t < nt; ++t) {
      const float hv = h[(n0 + t) * I + i];
      if (hv == 0.f) continue;
      Axpy(y + (n0 + t) * Dout + j0, wd, hv, w);
    }
  }
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

  // B: gate/up + activation, items (column chunk, token block); chunk-major so a thread keeps a weight slice hot.
  const int64_t nci = (I + kColChunk - 1) / kColChunk;
  auto up = [&](size_t it) {
    const int64_t j = static_cast<int64_t>(it) / nblk, blk = static_cast<int64_t>(it) % nblk;
    const int64_t n0 = blk * kTokBlock, nt = std::min(kTokBlock, N - n0);
    const int64_t i0 = j * kColChunk, w = std::min(kColChunk, I - i0);
    float* acc = Grow(ThreadScratch().f1, static_cast<size_t>(2 * kTokBlock * kColChunk));
    MlpUpItem(W, xs, uidx + blk * D, ucnt[blk], n0, nt, i0, w, act, h, acc);
  };
  par.For(static_cast<size_t>(nci * nblk), up);

  // C: down projection, items (output column chunk, token block).
  const int64_t nco = (Dout + kColChunk - 1) / kColChunk;
  auto down = [&](size_t it) {
    const int64_t j = static_cast<int64_t>(it) / nblk, blk = static_cast<int64_t>(it) % nblk;
    const int64_t n0 = blk * kTokBlock, nt = std::min(kTokBlock, N - n0);
    const int64_t j0 = j * kColChunk, w = std::min(kColChunk, Dout - j0);
    MlpDownItem(W, h, n0, nt, j0, w, y);
    if (j == 0) {
      uint64_t rows = 0;
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t i = 0; i < I; ++i) rows += h[(n0 + t) * I + i] != 0.f;
      st.mlp_down_rows.fetch_add(rows, std::memory_order_relaxed);
    }
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
