// fp32 sparse-input MLP (SparseMlp, MlpWeights); see kernels.h for the contract.
#include "kernels_util.h"

namespace solm {

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

template <class V, int NV>
inline __attribute__((always_inline)) void GemvTile(float* y, const float* base, const int32_t* idx,
                                                    const float* coef, int64_t n) {
  constexpr int L = Lanes<V>();
  V acc[NV];
#pragma GCC unroll 32
  for (int k = 0; k < NV; ++k) acc[k] = Load<V>(y + k * L);
  for (int64_t r = 0; r < n; ++r) {
    const float* x = base + static_cast<int64_t>(idx[r]) * kColChunk;
    const V a = Splat<V>(coef[r]);
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) acc[k] += a * Load<V>(x + k * L);
  }
#pragma GCC unroll 32
  for (int k = 0; k < NV; ++k) Store<V>(y + k * L, acc[k]);
}

// NT tokens (buffers y + u*ys, coefficients coef + u*cs) over the column tile [c0, c0 + NV*L) of the rows idx of
// stride rs: the register tile of both layouts (panels: rs = kColChunk, c0 = 0; gate/up rows: the slice's stride).
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
      const V a = Splat<V>(coef[u * cs + r]);
#pragma GCC unroll 32
      for (int k = 0; k < NV; ++k) acc[u][k] += a * w[k];
    }
  }
#pragma GCC unroll 32
  for (int u = 0; u < NT; ++u)
#pragma GCC unroll 32
    for (int k = 0; k < NV; ++k) Store<V>(y + u * ys + c0 + k * L, acc[u][k]);
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
      RowsTile<V, NV, NT>(y + t * kColChunk + c0, kColChunk, 0, panel + c0, kColChunk, idx, coef + t * cs, cs, n);
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
    const V a0 = Splat<V>(coef[r]), a1 = Splat<V>(coef[r + 1]);
    const V a2 = Splat<V>(coef[r + 2]), a3 = Splat<V>(coef[r + 3]);
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
    const V a0 = Splat<V>(coef[r]);
    for (int64_t k = 0; k < width; k += L) Store<V>(y + k, Load<V>(y + k) + a0 * Load<V>(w0 + k));
  }
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

// Picked once per process from the CPU (IsaLevel: SOLM_EP_ISA=baseline|x86-64-v3 caps it).
const PanelKernels& Panel() {
  static const PanelKernels k = [] {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
    if (IsaLevel() == 4) return PanelKernels{GemvV4, GemmV4, GemvRowsV4, GemmRowsV4, "x86-64-v4"};
    if (IsaLevel() == 3) return PanelKernels{GemvV3, GemmV3, GemvRowsV3, GemmRowsV3, "x86-64-v3"};
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
