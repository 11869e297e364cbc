// Register-tiled micro-kernels of SparseMLP (kernels_mlp.cc) and their load-time ISA dispatch (Panel()): a sum of
// weight rows times per-token coefficients, one token (GEMV) or many (GEMM), over the down-projection panels and the
// gate/up input-major rows. See kernels_util.h (PanelKernels) for the signatures.
#include "kernels_util.h"

namespace solm {
namespace {

constexpr int64_t kColChunk = MlpWeights::kPanel;  // floats per panel row

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
  RankUpdates<V, NT, NV>(acc, n, [coef, cs](int u, int64_t r) { return coef[u * cs + r]; },
                         [base, idx, rs, c0](int64_t r) { return base + static_cast<int64_t>(idx[r]) * rs + c0; });
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

// Baseline x86-64 (SSE2) / any other architecture: 4-lane vectors.
void GemvBase(float* y, const float* p, const int32_t* i, const float* c, int64_t n) {
  GemvPanel<vf4, 8>(y, p, i, c, n);
}
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

}  // namespace

// Picked once per process from the CPU; SOLM_EP_ISA=baseline|x86-64-v3 caps it (to test the other variants).
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

}  // namespace solm
