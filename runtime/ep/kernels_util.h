// Helpers shared by the fp32 kernel files (kernels_attention.cc, kernels_mlp.cc): SIMD dot/axpy, the per-thread
// scratch, and the load-time ISA dispatch macro. Internal to the kernels; not part of kernels.h's contract.
#pragma once

#include "kernels.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>

// The hot per-item functions are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked once per
// process from IsaLevel() (the CPU, capped by SOLM_EP_ISA), so the library stays portable across CI machines and
// every variant can be tested on one machine. Each family keeps a table of its variants' function pointers
// (Panel(), DecodeKernels(), PrefillKernel()); the variant bodies are always_inline templates/functions wrapped in
// SOLM_TARGET_V3 / SOLM_TARGET_V4 functions. (GCC's target_clones would ignore SOLM_EP_ISA: not used.)
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
#define SOLM_ISA_VARIANTS 1
#define SOLM_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define SOLM_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
// x86-64-v4 with AVX512_VNNI (vpdpbusd): the int8-activation kernels only, picked where IsaVnni().
#define SOLM_TARGET_V4_VNNI __attribute__((target("arch=x86-64-v4,avx512vnni")))
#endif
// A variant body: inlined into each ISA's wrapper, so it is compiled with that wrapper's target.
#define SOLM_INLINE inline __attribute__((always_inline))

namespace solm {
namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
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
// x in every lane, as one broadcast. (`V{} + x` is not one: 0 + x differs from x for x = -0, so GCC adds a scalar
// add before every broadcast of the hot loops. x - 0 is x for every x, but splatting into the aligned(4) typedefs
// themselves GCC builds lane by lane under masks (GCC 12); through a plain vector type it is one vbroadcastss.)
template <class V>
inline __attribute__((always_inline)) V Splat(float x) {
  typedef float W __attribute__((vector_size(sizeof(V))));
  const W w = x - W{};
  V v;
  __builtin_memcpy(&v, &w, sizeof(V));
  return v;
}


// The register tile's inner loop, shared by the dense micro-kernels (attention q·k and p·v, MLP rows):
// acc[r][c] += a(r, i) * B[i][c] for i < n, B row i being NV vectors at brow(i). The callers differ only in
// where A and B live and how acc starts and ends.
template <class V, int MR, int NV, class AAt, class BRow>
inline __attribute__((always_inline)) void RankUpdates(V (&acc)[MR][NV], int64_t n, AAt a, BRow brow) {
  constexpr int Ln = Lanes<V>();
  for (int64_t i = 0; i < n; ++i) {
    const float* b = brow(i);
    V w[NV];
#pragma GCC unroll 32
    for (int c = 0; c < NV; ++c) w[c] = Load<V>(b + c * Ln);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const V x = Splat<V>(a(r, i));
#pragma GCC unroll 32
      for (int c = 0; c < NV; ++c) acc[r][c] += x * w[c];
    }
  }
}

// The int32 vector of a float vector's width (keyed by size: the float typedefs' attributes do not survive as
// template arguments).
template <size_t Bytes>
struct IntVec {
  typedef int32_t type __attribute__((vector_size(Bytes)));
};

// 2^x for x <= 0 (a logit minus its running max), -inf -> 0, NaN -> NaN. Round-to-nearest split x = n + r,
// |r| <= 1/2, 2^r by the Cephes exp2f polynomial (relative error ~2e-7), 2^n built in the exponent bits.
// Below -126 the result is flushed to 0 (it would be denormal; its weight in a softmax sum of >= 1 is nil).
template <class V>
inline __attribute__((always_inline)) V Exp2(V x) {
  typedef typename IntVec<sizeof(V)>::type VI;
  const V lo = V{} - 126.f;
  const V xc = x < lo ? lo : x;                 // NaN compares false and stays NaN
  const V magic = V{} + 12582912.f;             // 1.5 * 2^23: x + magic rounds x to an integer in the low bits
  const V t = xc + magic;
  const V r = xc - (t - magic);
  V p = V{} + 1.535336188319500e-4f;
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.f;
  VI ti;
  __builtin_memcpy(&ti, &t, sizeof(V));
  const VI e = (ti - 0x4B400000 + 127) << 23;  // bits of t = bits of magic + n
  V s;
  __builtin_memcpy(&s, &e, sizeof(V));
  return x < lo ? V{} : p * s;
}

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

// IEEE half -> float, exact: the half's exponent and mantissa moved into a float's and scaled by 2^112 (the bias
// 15 -> 127; a subnormal half becomes a float subnormal times 2^112, exactly), inf and NaN kept.
inline float HalfToFloat(uint16_t h) {
  uint32_t x = static_cast<uint32_t>(h & 0x7fff) << 13;
  if ((h & 0x7c00) == 0x7c00) x |= 0x7f800000u;
  float f;
  __builtin_memcpy(&f, &x, 4);
  if ((h & 0x7c00) != 0x7c00) f *= 0x1p112f;
  return (h & 0x8000) ? -f : f;
}
// float -> IEEE half, rounded to nearest even (GCC's _Float16 conversion; overflow to inf, NaN kept).
inline uint16_t FloatToHalf(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  __builtin_memcpy(&u, &h, 2);
  return u;
}

// How a kernel body reads rows of the KV cache: 8 lanes at once (Load8) or one element (At). F32Rows: float;
// F16Rows: IEEE half in software (any x86-64); F16cRows: half through F16C's vcvtph2ps (inline asm, so the
// always_inline bodies stay target-free: use it only in the x86-64-v3/v4 variants, whose CPUs have F16C).
struct F32Rows {
  typedef float E;
  static inline __attribute__((always_inline)) v8 Load8(const float* p) {
    v8 v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
  }
  static inline __attribute__((always_inline)) float At(const float* p) { return *p; }
  static inline __attribute__((always_inline)) void Store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof(v)); }
  static inline __attribute__((always_inline)) void Put(float* p, float x) { *p = x; }
};
struct F16Rows {
  typedef uint16_t E;
  static inline __attribute__((always_inline)) v8 Load8(const uint16_t* p) {
    v8 v;
    for (int i = 0; i < 8; ++i) v[i] = HalfToFloat(p[i]);
    return v;
  }
  static inline __attribute__((always_inline)) float At(const uint16_t* p) { return HalfToFloat(*p); }
  static inline __attribute__((always_inline)) void Store8(uint16_t* p, v8 v) {
    for (int i = 0; i < 8; ++i) p[i] = FloatToHalf(v[i]);
  }
  static inline __attribute__((always_inline)) void Put(uint16_t* p, float x) { *p = FloatToHalf(x); }
};
#ifdef SOLM_ISA_VARIANTS
struct F16cRows {
  typedef uint16_t E;
  static inline __attribute__((always_inline)) v8 Load8(const uint16_t* p) {
    v8 v;
    asm("vcvtph2ps %1, %0" : "=x"(v) : "m"(*reinterpret_cast<const char(*)[16]>(p)));
    return v;
  }
  static inline __attribute__((always_inline)) float At(const uint16_t* p) { return HalfToFloat(*p); }
  static inline __attribute__((always_inline)) void Store8(uint16_t* p, v8 v) {  // imm 0: nearest even
    asm("vcvtps2ph $0, %1, %0" : "=m"(*reinterpret_cast<char(*)[16]>(p)) : "x"(v));
  }
  static inline __attribute__((always_inline)) void Put(uint16_t* p, float x) { *p = FloatToHalf(x); }
};
#endif

struct MaskRow {  // the mask restricted to one (b, h, t)
  const uint8_t* b = nullptr;
  const float* f = nullptr;
  int64_t sl = 0;
  int64_t jmax = INT64_MAX;  // is_causal: tokens j > jmax are masked out
};

// Whether two mask rows say the same for every token (the same bytes or floats, stride and causal bound).
inline bool SameRow(const MaskRow& a, const MaskRow& b) {
  return a.b == b.b && a.f == b.f && a.sl == b.sl && a.jmax == b.jmax;
}

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

// The widest kernel variant this CPU runs: 4 (x86-64-v4, AVX-512), 3 (x86-64-v3, AVX2+FMA) or 0 (baseline).
// SOLM_EP_ISA=baseline|x86-64-v3|x86-64-v4 caps it (to test the other variants). Read once per process.
inline int IsaLevel() {
  static const int level = [] {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
    const char* cap = std::getenv("SOLM_EP_ISA");
    const std::string want = cap ? cap : "";
    __builtin_cpu_init();
    if (want != "baseline" && want != "x86-64-v3" && __builtin_cpu_supports("x86-64-v4")) return 4;
    if (want != "baseline" && __builtin_cpu_supports("x86-64-v3")) return 3;
#endif
    return 0;
  }();
  return level;
}

inline const char* IsaName(int level) { return level == 4 ? "x86-64-v4" : level == 3 ? "x86-64-v3" : "baseline"; }

// AVX512_VNNI on top of x86-64-v4, used only by SparseMLPBlocks' int8-activation kernels (vpdpbusd): the CPU has it
// and SOLM_EP_ISA does not say plain x86-64-v4 (that level has no VNNI; "x86-64-v4-vnni" or no cap allows it).
inline bool IsaVnni() {
  static const bool vnni = [] {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
    const char* cap = std::getenv("SOLM_EP_ISA");
    return IsaLevel() == 4 && !(cap && std::string(cap) == "x86-64-v4") && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
  }();
  return vnni;
}

// Thread-local temporaries for one work item (grown on demand, reused across calls).
struct Tls {
  std::vector<float> f0, f1;
  std::vector<int32_t> i0;
  std::vector<uint8_t> u0, u1;
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

}  // namespace

// Shared by SparseMLP and SparseMLPBlocks (kernels_topk.cc): the per-token top-k of the input channels (returns
// the non-zero channels written to xs) and the output's fake quantisation.
int64_t TopK(const float* x, int64_t D, double rho, float* xs, float* tmp);
// TopK's threshold for rho < 1 (kernels_topk.cc): |x| >= it is kept.
float TopKThreshold(const float* x, int64_t D, double rho, float* tmp);
// The k-th largest (1 <= k <= n) of x[0, n) in float order, by a radix select; x is overwritten.
float KthLargest(float* x, int64_t n, int64_t k);
void FakeQuant(float* y, int64_t n, double bits);
// y [B*T, Dout]: each token's row fake-quantised to its row's bits (nothing when every row keeps 16).
void FakeQuantTokens(float* y, int64_t B, int64_t T, int64_t Dout, const float* bits, const Parallel& par);

// SparseMLP's register-tiled micro-kernels (kernels_mlp_tiles.cc). gemv/gemm: y (+)= Σ_r coef[r] · row idx[r] of a
// down-projection panel (kPanel floats per row), one token or nt (buffers y + t*kPanel, coefficients coef + t*cs);
// gemv_rows/gemm_rows: the same over input-major rows of stride rs and `width` floats (gate/up), nt tokens at
// y + t*ys. Every variant adds the rows one FMA at a time in the order given, so a token gets bit-identical results
// whichever variant (single- or multi-token) processes it.
using GemvRowsFn = void (*)(float*, int64_t, const float*, int64_t, const int32_t*, const float*, int64_t);
using GemmRowsFn = void (*)(float*, int64_t, int64_t, int64_t, const float*, int64_t, const int32_t*, const float*,
                            int64_t, int64_t);
using GemvFn = void (*)(float*, const float*, const int32_t*, const float*, int64_t);
using GemmFn = void (*)(float*, int64_t, const float*, const int32_t*, const float*, int64_t, int64_t);
struct PanelKernels {
  GemvFn gemv;
  GemmFn gemm;
  GemvRowsFn gemv_rows;
  GemmRowsFn gemm_rows;
  const char* isa;
};
// Picked once per process from the CPU (IsaLevel).
const PanelKernels& Panel();

// SparseMLPBlocks' fp32-activation kernels (kernels_mlp_blocks.cc; picked once per process): y rows [g0*16, g1*16)
// = W·x for one token (gemv) or nt at y + t*ys (gemm); a block column whose 32 inputs are all zero is not read.
struct BlockIn {
  const float* x;     // [K]
  const float* xsum;  // [nb]
  const uint8_t* nz;  // [nb]
};
using BlockGemvFn = void (*)(const BlockMatrix&, const BlockIn&, int64_t, int64_t, float*);
using BlockGemmFn = void (*)(const BlockMatrix&, const BlockIn*, int64_t, int64_t, int64_t, float*, int64_t);
struct BlockKernels {
  BlockGemvFn gemv;
  BlockGemmFn gemm;
  const char* isa;
};
const BlockKernels& Blocks();

// SparseMLPBlocks' int8-activation kernels (kernels_mlp_blocks_int8.cc), on BlockMatrix with int8_layout.
// quant: one token's nb blocks of 32 values x -> q (int8), d (scale) and s (the block sum the offset term reads):
// d = max|x|/127, q = round-half-even(x·(1/d)) (0 where d = 0), s = d·Σq (of the quantised values, as llama.cpp's
// Q8_1; kernels_mlp_blocks_int8.cc says why). gemv/gemm: y rows [g0*16, g1*16) = W·x (one token; nt tokens at
// y + t*ys), per block and row scale·(d·Σ code·q) + offset·xsum, a block whose nz is 0 skipped. Both give a token
// bit-identical results.
struct BlockQIn {
  const int8_t* q;     // [K]
  const float* d;      // [nb]
  const float* xsum;   // [nb], d·Σq (quant's s)
  const uint8_t* nz;   // [nb]
};
using QuantFn = void (*)(const float* x, int64_t nb, int8_t* q, float* d, float* s);
using QGemvFn = void (*)(const BlockMatrix&, const BlockQIn&, int64_t, int64_t, float*);
using QGemmFn = void (*)(const BlockMatrix&, const BlockQIn*, int64_t, int64_t, int64_t, float*, int64_t);
struct BlockInt8Kernels {
  QuantFn quant;
  QGemvFn gemv;
  QGemmFn gemm;
  const char* isa;
};
// Picked once per process (IsaLevel, IsaVnni).
const BlockInt8Kernels& BlocksInt8();

// SparseMLPBlocks' skip="h" down projection (kernels_mlp_blocks_h.cc): y[32·c0 .. 32·c1) = Σ_i h[idx[i]] ·
// downT[idx[i], blocks c0..c1) for one token (fp32 h; y overwritten), reading only the listed units' rows.
using DownHFn = void (*)(const BlockRows&, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                         float* y);
// The same for up to `tile` tokens at once over the union of their kept units: units [nu] ascending, coef [nu, tile]
// (token t's h at a unit it kept, 0 at one it dropped), y + t·ys for t < nt (kernels_mlp_blocks_h.cc DownTileMany).
using DownHManyFn = void (*)(const BlockRows&, const int32_t* units, const float* coef, int64_t nu, int64_t nt,
                             int64_t c0, int64_t c1, float* y, int64_t ys);
struct BlockHKernels {
  DownHFn down;
  DownHManyFn many;  // nullptr: per token only (baseline)
  int tile;          // tokens per `many` call
  const char* isa;
};
const BlockHKernels& BlocksH();
// The rows at rho < 1 on DownGroups (kernels_mlp_blocks_hg.cc): a token's n kept units idx (ascending, h != 0)
// prepared once (PrepareDownG), then y[128·k0 .. 128·k1) (rows < D) of it, the source's int8 dot product on the
// masked h.
void PrepareDownG(const float* h, const int32_t* idx, int64_t n, DownGToken& t);
using DownGFn = void (*)(const DownGroups&, const DownGToken&, int64_t k0, int64_t k1, float* y);
struct BlockHGKernels {
  DownGFn down;
  const char* isa;
};
const BlockHGKernels& BlocksHG();
// SparseMLPBlocks' skip="h" tail (kernels_mlp_blocks_h.cc): per token the top-k units of h [N, Ip] (ρ of row n/T),
// then y [N, Dout] = Σ_kept h_j·downT[j] (+ b_down), unfake-quantised.
void SparseMlpBlocksDownH(const float* h, int64_t Ip, int64_t N, int64_t T, int64_t I, int64_t Dout,
                          const MlpBlockWeights& W, const float* rho, float* y, MlpBlockScratch& sc,
                          const Parallel& par);

// The multi-token (T > 1) path of QuestAttention (kernels_attention_prefill.cc): dense attention under the mask
// (and is_causal), blocked like flash attention. Shapes as QuestAttention's; kappa plays no part.
void AttendPrefill(const float* q, const float* k, const float* v, const MaskView& mask, int64_t B, int64_t H,
                   int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv, float scale, bool is_causal,
                   float* out, AttnScratch& scratch, const Parallel& par);

}  // namespace solm
