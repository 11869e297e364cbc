// SparseMLPBlocks with int8 activations (activations="int8"; kernels_util.h BlocksInt8, kernels_mlp_blocks.cc calls
// it). The idea of llama.cpp's Q4_1 x Q8_1 dot product, written for SolmEP's block-column-major layout:
//
// - each token's (top-k masked) x, and later h, is quantised per block of 32: d = max|x|/127, q = round(x·(1/d)),
//   round half to even (the magic-number add, exact for |v| < 2^22; the reference uses torch.round, also half to
//   even), and the block's sum for the offset term taken from the quantised values, d·Σq (llama.cpp's Q8_1 s). The
//   fp32 Σx would pair the offset with x but the codes with x's rounding: the rounding error then meets d·code (all
//   of one sign, up to 15·d) instead of the weight d·code + offset, which cost SmolLM2 +0.5 % PPL (session 21);
// - per row n and block b, y_n += scale·(d·Σ_i code_i·q_i) + offset·Σx, the integer dot product in int32 (exact:
//   |Σ| <= 32·255·127). Codes are unsigned, q signed: exactly vpdpbusd's u8 x s8 operands.
//
// Layout (BlockMatrix with int8_layout, kernels_mlp_blocks.cc): as the fp32 path's, rows as vector lanes, 16 rows'
// words j adjacent, block columns contiguous (a skipped block column is not read); a 32-bit lane holds 4 codes of one
// row. 8 bits: word j = inputs 4j..4j+3, the bytes the dot product needs as they are. 4 bits: word j byte i holds input
// 8j+i in its low nibble and 8j+4+i in its high one, so `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` are the codes of
// inputs 8j..8j+3 and 8j+4..8j+7 as bytes, each meeting 4 consecutive bytes of q (one broadcast 32-bit word).
//
// Variants: x86-64-v4-vnni (vpdpbusd: 64 MACs, one instruction), x86-64-v4 and x86-64-v3 (vpmaddubsw + vpmaddwd:
// 8-bit codes as two nibbles, since maddubs' int16 pair sums saturate past 32767 = 2·255·127 would), baseline (int32
// lanes). All compute the same integer sums; the float epilogue is one expression in one order (fused into FMAs where
// the ISA has them), and the single- and multi-token kernels give a token bit-identical results.
#include <immintrin.h>  // declares the __builtin_ia32_* below; each is used only inside a wrapper whose target has it

#include "kernels_util.h"

namespace solm {
namespace {

enum DotKind { kScalar, kMaddubs, kVnni };
constexpr int64_t kB = BlockMatrix::kBlock, kR = BlockMatrix::kRows;

// Σ over each 32-bit lane's 4 byte pairs of u (u8) · s (s8), each pair's int16 sum times k (int16 pair sums: no
// saturation while the codes are <= 15).
template <class VI>
SOLM_INLINE VI MaddPairs(VI u, VI s, short k) {
  if constexpr (sizeof(VI) == 64) {
    typedef char C __attribute__((vector_size(64)));
    typedef short S __attribute__((vector_size(64)));
    const S p = __builtin_ia32_pmaddubsw512_mask((C)u, (C)s, S{}, -1);
    return (VI)__builtin_ia32_pmaddwd512_mask(p, S{} + k, VI{}, -1);
  } else {
    static_assert(sizeof(VI) == 32, "maddubs variants: AVX2 or AVX-512");
    typedef char C __attribute__((vector_size(32)));
    typedef short S __attribute__((vector_size(32)));
    const S p = __builtin_ia32_pmaddubsw256((C)u, (C)s);
    return (VI)__builtin_ia32_pmaddwd256(p, S{} + k);
  }
}

// acc + Σ_{i<4} byte i of a's lane (u8, a code <= MAXC) · byte i of xw (s8), in every 32-bit lane.
template <int DOT, int MAXC, class VI>
SOLM_INLINE VI DotBytes(VI acc, VI a, int32_t xw) {
  if constexpr (DOT == kVnni) {
    return __builtin_ia32_vpdpbusd_v16si(acc, a, VI{} + xw);
  } else if constexpr (DOT == kMaddubs) {
    if constexpr (MAXC <= 15) {
      return acc + MaddPairs(a, VI{} + xw, 1);
    } else {
      const VI m4 = VI{} + 0x0F0F0F0F;
      return acc + MaddPairs(a & m4, VI{} + xw, 1) + MaddPairs((a >> 4) & m4, VI{} + xw, 16);
    }
  } else {
    for (int i = 0; i < 4; ++i) acc += ((a >> (8 * i)) & 0xFF) * static_cast<int32_t>(static_cast<int8_t>(xw >> (8 * i)));
    return acc;
  }
}

// Ln scales (or offsets) as floats: fp32 as they are; half through F16C's vcvtph2ps (the v3/v4 variants' CPUs have
// it), or in software in the baseline variant (4 lanes).
template <class VF, class ST>
SOLM_INLINE VF LoadScale(const ST* p) {
  if constexpr (std::is_same<ST, float>::value) {
    return Load<VF>(p);
  } else if constexpr (sizeof(VF) == 64) {
    typedef short H16 __attribute__((vector_size(32)));
    H16 h;
    __builtin_memcpy(&h, p, sizeof(h));
    return (VF)__builtin_ia32_vcvtph2ps512_mask(h, VF{}, -1, 4);  // 4: _MM_FROUND_CUR_DIRECTION (exact anyway)
  } else if constexpr (sizeof(VF) == 32) {
    typedef short H8 __attribute__((vector_size(16)));
    H8 h;
    __builtin_memcpy(&h, p, sizeof(h));
    return (VF)__builtin_ia32_vcvtph2ps256(h);
  } else {
    VF v;
    for (int l = 0; l < Lanes<VF>(); ++l) v[l] = HalfToFloat(p[l]);
    return v;
  }
}

// y[o..o+Ln) += scale·(d·Σ) + offset·xsum (BlockTerm): the one float expression every variant and path uses (a half
// scale is the same float once loaded, so the result does not depend on how it was stored). Both products are
// rounded to fp32 before they are added (no FMA, whatever the compiler's contraction): DownG
// (kernels_mlp_blocks_hg.cc) computes the same floats, so a batch's rows at rho < 1 may take either path.
template <class VF, class VI>
SOLM_INLINE VF BlockTerm(VI isum, VF scale, VF offset, VF d, VF xsum) {
  VF a = scale * (__builtin_convertvector(isum, VF) * d), b = offset * xsum;
  asm("" : "+v"(a), "+v"(b));
  return a + b;
}
template <class VF, class VI, class ST>
SOLM_INLINE void Epilogue(float* y, const ST* sc, const ST* of, VI isum, VF d, VF xsum) {
  Store<VF>(y, Load<VF>(y) + BlockTerm<VF, VI>(isum, LoadScale<VF>(sc), LoadScale<VF>(of), d, xsum));
}

// Where block column b's scales and offsets of rows from r0 start: fp32 or half.
inline const float* ScaleAt(const BlockMatrix& W, const float*, int64_t b, int64_t r0) {
  return W.scale.data() + b * W.Np + r0;
}
inline const uint16_t* ScaleAt(const BlockMatrix& W, const uint16_t*, int64_t b, int64_t r0) {
  return W.scale_h.data() + b * W.Np + r0;
}
inline const float* OffsetAt(const BlockMatrix& W, const float*, int64_t b, int64_t r0) {
  return W.offset.data() + b * W.Np + r0;
}
inline const uint16_t* OffsetAt(const BlockMatrix& W, const uint16_t*, int64_t b, int64_t r0) {
  return W.offset_h.data() + b * W.Np + r0;
}

// One token: y[g*16 .. (g+G)*16) += block column b of G row groups (col) · the token's block b (xw: its 32 int8 as 8
// words). Accumulators: G groups x H vectors x 2 chains.
template <class VF, int G, int BITS, int DOT, class ST>
SOLM_INLINE void GemvBlock(const BlockMatrix& W, const int32_t* xw, float d, float xsum, const uint8_t* col,
                           int64_t g0, int64_t b, float* y) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  constexpr int Ln = Lanes<VF>(), H = kR / Ln;
  const int64_t gb = W.GroupBytes();
  const VI m4 = VI{} + 0x0F0F0F0F;
  VI a0[G][H], a1[G][H];
  for (int r = 0; r < G; ++r)
    for (int h = 0; h < H; ++h) a0[r][h] = a1[r][h] = VI{};
#pragma GCC unroll 8
  for (int j = 0; j < BITS; ++j) {  // the row's 4-byte words: 4 (4 bits) or 8
#pragma GCC unroll 8
    for (int r = 0; r < G; ++r)
#pragma GCC unroll 8
      for (int h = 0; h < H; ++h) {
        VI w;
        __builtin_memcpy(&w, col + r * gb + (j * kR + h * Ln) * 4, sizeof(VI));
        if constexpr (BITS == 4) {
          a0[r][h] = DotBytes<DOT, 15>(a0[r][h], w & m4, xw[2 * j]);
          a1[r][h] = DotBytes<DOT, 15>(a1[r][h], (w >> 4) & m4, xw[2 * j + 1]);
        } else if (j % 2 == 0) {
          a0[r][h] = DotBytes<DOT, 255>(a0[r][h], w, xw[j]);
        } else {
          a1[r][h] = DotBytes<DOT, 255>(a1[r][h], w, xw[j]);
        }
      }
  }
  const VF dv = Splat<VF>(d), xs = Splat<VF>(xsum);
  const ST* sc = ScaleAt(W, static_cast<const ST*>(nullptr), b, g0 * kR);
  const ST* of = OffsetAt(W, static_cast<const ST*>(nullptr), b, g0 * kR);
  for (int r = 0; r < G; ++r)
    for (int h = 0; h < H; ++h) {
      const int64_t o = r * kR + h * Ln;
      Epilogue<VF, VI, ST>(y + o, sc + o, of + o, a0[r][h] + a1[r][h], dv, xs);
    }
}

// Rows [g0*16, g1*16) of y = W·x, one token: block column by block column, each streamed front to back, a column
// whose 32 inputs are all zero not read.
template <class VF, int G, int BITS, int DOT, class ST>
SOLM_INLINE void GemvBits(const BlockMatrix& W, const BlockQIn& in, int64_t g0, int64_t g1, float* y) {
  const int64_t gb = W.GroupBytes(), ngroups = W.Np / kR;
  std::memset(y + g0 * kR, 0, (g1 - g0) * kR * sizeof(float));
  for (int64_t b = 0; b < W.nb; ++b) {
    if (!in.nz[b]) continue;
    int32_t xw[8];
    std::memcpy(xw, in.q + b * kB, sizeof(xw));
    const uint8_t* col = W.codes.data() + b * ngroups * gb;
    int64_t g = g0;
    for (; g + G <= g1; g += G) {
      if (b + 1 < W.nb) {  // these groups' codes in the next block column: a row range's slice of a column is
                           // 1-5 KiB, then a jump the hardware prefetchers do not follow (+25-60 % GB/s per matrix)
        const char* p = reinterpret_cast<const char*>(col + ngroups * gb + g * gb);
        for (int64_t o = 0; o < G * gb; o += 64) __builtin_prefetch(p + o);
      }
      GemvBlock<VF, G, BITS, DOT, ST>(W, xw, in.d[b], in.xsum[b], col + g * gb, g, b, y + g * kR);
    }
    for (; g < g1; ++g) GemvBlock<VF, 1, BITS, DOT, ST>(W, xw, in.d[b], in.xsum[b], col + g * gb, g, b, y + g * kR);
  }
}

// AVX-512 (32 registers, a row group one vector): NT tokens' outputs of row group g stay in registers over all the
// blocks (the codes unpacked once per block for the NT tokens, the scales loaded once), stored once at the end,
// where GemmBits reads and writes y per token and block. The same integers and, per token and block, the same
// epilogue expression on the same running sum (starting from 0, as GemvBits' memset): bit-identical per token.
template <class VF, int BITS, int DOT, class ST, int NT>
SOLM_INLINE void GemmTile(const BlockMatrix& W, const BlockQIn* in, int64_t g, float* y, int64_t ys) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  static_assert(Lanes<VF>() == kR, "one vector per row group");
  const int64_t gb = W.GroupBytes(), ngroups = W.Np / kR;
  const VI m4 = VI{} + 0x0F0F0F0F;
  VF acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = VF{};
  for (int64_t b = 0; b < W.nb; ++b) {
    bool any = false;
    for (int t = 0; t < NT; ++t) any |= in[t].nz[b];
    if (!any) continue;
    const uint8_t* col = W.codes.data() + (b * ngroups + g) * gb;
    VI w[8];  // w[j]: the codes meeting q word j
#pragma GCC unroll 8
    for (int j = 0; j < BITS; ++j) {
      VI v;
      __builtin_memcpy(&v, col + j * kR * 4, sizeof(VI));
      if constexpr (BITS == 4) {
        w[2 * j] = v & m4;
        w[2 * j + 1] = (v >> 4) & m4;
      } else {
        w[j] = v;
      }
    }
    const VF sc = LoadScale<VF>(ScaleAt(W, static_cast<const ST*>(nullptr), b, g * kR));
    const VF of = LoadScale<VF>(OffsetAt(W, static_cast<const ST*>(nullptr), b, g * kR));
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      if (!in[t].nz[b]) continue;
      const int8_t* qb = in[t].q + b * kB;
      auto xw = [qb](int j) {  // the token's q word j (4 int8), read where it lies (a broadcast operand)
        int32_t v;
        __builtin_memcpy(&v, qb + 4 * j, sizeof(v));
        return v;
      };
      VI a0 = VI{}, a1 = VI{};
#pragma GCC unroll 8
      for (int j = 0; j < 8; j += 2) {
        a0 = DotBytes<DOT, BITS == 4 ? 15 : 255>(a0, w[j], xw(j));
        a1 = DotBytes<DOT, BITS == 4 ? 15 : 255>(a1, w[j + 1], xw(j + 1));
      }
      acc[t] = acc[t] + BlockTerm<VF, VI>(a0 + a1, sc, of, Splat<VF>(in[t].d[b]), Splat<VF>(in[t].xsum[b]));
    }
  }
  for (int t = 0; t < NT; ++t) Store<VF>(y + t * ys + g * kR, acc[t]);
}

// nt tokens: per row group and block the codes are loaded (and unpacked) once into registers, then each token's
// block applied to them. The same integers and epilogue as GemvBits: bit-identical per token. On AVX-512, tiles of
// up to 8 tokens with their sums in registers (GemmTile).
template <class VF, int BITS, int DOT, class ST>
SOLM_INLINE void GemmBits(const BlockMatrix& W, const BlockQIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                          int64_t ys) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  constexpr int Ln = Lanes<VF>(), H = kR / Ln;
  const int64_t gb = W.GroupBytes(), ngroups = W.Np / kR;
  const VI m4 = VI{} + 0x0F0F0F0F;
  if constexpr (Lanes<VF>() == kR) {
    for (int64_t g = g0; g < g1; ++g) {
      int64_t t = 0;
      for (; t + 8 <= nt; t += 8) GemmTile<VF, BITS, DOT, ST, 8>(W, in + t, g, y + t * ys, ys);
      if (t + 4 <= nt) GemmTile<VF, BITS, DOT, ST, 4>(W, in + t, g, y + t * ys, ys), t += 4;
      if (t + 2 <= nt) GemmTile<VF, BITS, DOT, ST, 2>(W, in + t, g, y + t * ys, ys), t += 2;
      if (t < nt) GemmTile<VF, BITS, DOT, ST, 1>(W, in + t, g, y + t * ys, ys);
    }
    return;
  }
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t t = 0; t < nt; ++t) std::memset(y + t * ys + g * kR, 0, kR * sizeof(float));
    for (int64_t b = 0; b < W.nb; ++b) {
      bool any = false;
      for (int64_t t = 0; t < nt && !any; ++t) any = in[t].nz[b];
      if (!any) continue;
      const uint8_t* col = W.codes.data() + (b * ngroups + g) * gb;
      VI w[8][H];  // w[j]: the codes meeting q word j
      for (int j = 0; j < BITS; ++j)
        for (int h = 0; h < H; ++h) {
          VI v;
          __builtin_memcpy(&v, col + (j * kR + h * Ln) * 4, sizeof(VI));
          if constexpr (BITS == 4) {
            w[2 * j][h] = v & m4;
            w[2 * j + 1][h] = (v >> 4) & m4;
          } else {
            w[j][h] = v;
          }
        }
      const ST* sc = ScaleAt(W, static_cast<const ST*>(nullptr), b, g * kR);
      const ST* of = OffsetAt(W, static_cast<const ST*>(nullptr), b, g * kR);
      for (int64_t t = 0; t < nt; ++t) {
        if (!in[t].nz[b]) continue;
        int32_t xw[8];
        std::memcpy(xw, in[t].q + b * kB, sizeof(xw));
        VI a0[H], a1[H];
        for (int h = 0; h < H; ++h) a0[h] = a1[h] = VI{};
#pragma GCC unroll 8
        for (int j = 0; j < 8; j += 2)
          for (int h = 0; h < H; ++h) {
            a0[h] = DotBytes<DOT, BITS == 4 ? 15 : 255>(a0[h], w[j][h], xw[j]);
            a1[h] = DotBytes<DOT, BITS == 4 ? 15 : 255>(a1[h], w[j + 1][h], xw[j + 1]);
          }
        const VF dv = Splat<VF>(in[t].d[b]), xs = Splat<VF>(in[t].xsum[b]);
        float* yt = y + t * ys + g * kR;
        for (int h = 0; h < H; ++h)
          Epilogue<VF, VI, ST>(yt + h * Ln, sc + h * Ln, of + h * Ln, a0[h] + a1[h], dv, xs);
      }
    }
  }
}

// One token's nb blocks of x -> q, d, s = d·Σq (kernels_util.h's contract). The rounding: v + 1.5·2^23 - 1.5·2^23
// is v rounded half to even for |v| < 2^22 (GCC would fuse x·id into the add: an empty asm keeps the product's own
// rounding); then clamped to ±127 (a no-op but for safety).
template <class VF>
SOLM_INLINE void QuantT(const float* x, int64_t nb, int8_t* q, float* d, float* s) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  constexpr int Ln = Lanes<VF>(), NV = kB / Ln;
  const VF magic = Splat<VF>(12582912.f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kB;
    VF m = VF{};
    for (int v = 0; v < NV; ++v) {
      const VF a = Load<VF>(xb + v * Ln);
      m = m > -a ? (m > a ? m : a) : -a;  // max(m, |a|) (x is finite)
    }
    float amax = 0.f;
    for (int l = 0; l < Ln; ++l) amax = amax > m[l] ? amax : m[l];
    const float dd = amax / 127.f, id = dd != 0.f ? 1.f / dd : 0.f;
    d[b] = dd;
    const VF idv = Splat<VF>(id);
    VI qs = VI{};
    for (int v = 0; v < NV; ++v) {
      VF t = Load<VF>(xb + v * Ln) * idv;
      asm("" : "+v"(t));  // x·id rounded to fp32 first, as the reference: no FMA with the magic add
      t = (t + magic) - magic;
      VI qi = __builtin_convertvector(t, VI);
      qi = qi > 127 ? VI{} + 127 : qi;
      qi = qi < -127 ? VI{} - 127 : qi;
      qs += qi;
      for (int l = 0; l < Ln; ++l) q[b * kB + v * Ln + l] = static_cast<int8_t>(qi[l]);
    }
    int32_t isum = 0;  // |Σq| <= 32·127: exact in int32 and in float
    for (int l = 0; l < Ln; ++l) isum += qs[l];
    s[b] = dd * static_cast<float>(isum);
  }
}

template <class VF, int G, int DOT>
SOLM_INLINE void GemvT(const BlockMatrix& W, const BlockQIn& in, int64_t g0, int64_t g1, float* y) {
  if (W.half) {
    if (W.bits == 4) GemvBits<VF, G, 4, DOT, uint16_t>(W, in, g0, g1, y);
    else GemvBits<VF, G, 8, DOT, uint16_t>(W, in, g0, g1, y);
  } else {
    if (W.bits == 4) GemvBits<VF, G, 4, DOT, float>(W, in, g0, g1, y);
    else GemvBits<VF, G, 8, DOT, float>(W, in, g0, g1, y);
  }
}
template <class VF, int DOT>
SOLM_INLINE void GemmT(const BlockMatrix& W, const BlockQIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                       int64_t ys) {
  if (W.half) {
    if (W.bits == 4) GemmBits<VF, 4, DOT, uint16_t>(W, in, nt, g0, g1, y, ys);
    else GemmBits<VF, 8, DOT, uint16_t>(W, in, nt, g0, g1, y, ys);
  } else {
    if (W.bits == 4) GemmBits<VF, 4, DOT, float>(W, in, nt, g0, g1, y, ys);
    else GemmBits<VF, 8, DOT, float>(W, in, nt, g0, g1, y, ys);
  }
}

// Baseline x86-64: int32 lanes of 4 (a group is 4 vectors), one group at a time.
void QuantBase(const float* x, int64_t nb, int8_t* q, float* d, float* s) { QuantT<vf4>(x, nb, q, d, s); }
void GemvBase(const BlockMatrix& W, const BlockQIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<vf4, 1, kScalar>(W, in, g0, g1, y);
}
void GemmBase(const BlockMatrix& W, const BlockQIn* in, int64_t nt, int64_t g0, int64_t g1, float* y, int64_t ys) {
  GemmT<vf4, kScalar>(W, in, nt, g0, g1, y, ys);
}
#if defined(SOLM_ISA_VARIANTS)
// AVX2: vpmaddubsw + vpmaddwd, 8 lanes, two groups at a time.
SOLM_TARGET_V3 void QuantV3(const float* x, int64_t nb, int8_t* q, float* d, float* s) { QuantT<v8>(x, nb, q, d, s); }
SOLM_TARGET_V3 void GemvV3(const BlockMatrix& W, const BlockQIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<v8, 2, kMaddubs>(W, in, g0, g1, y);
}
SOLM_TARGET_V3 void GemmV3(const BlockMatrix& W, const BlockQIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                           int64_t ys) {
  GemmT<v8, kMaddubs>(W, in, nt, g0, g1, y, ys);
}
// AVX-512 without VNNI: the same at 16 lanes (a group is one vector), four groups at a time.
SOLM_TARGET_V4 void QuantV4(const float* x, int64_t nb, int8_t* q, float* d, float* s) { QuantT<vf16>(x, nb, q, d, s); }
SOLM_TARGET_V4 void GemvV4(const BlockMatrix& W, const BlockQIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<vf16, 4, kMaddubs>(W, in, g0, g1, y);
}
SOLM_TARGET_V4 void GemmV4(const BlockMatrix& W, const BlockQIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                           int64_t ys) {
  GemmT<vf16, kMaddubs>(W, in, nt, g0, g1, y, ys);
}
// AVX512_VNNI: one vpdpbusd per 16 rows x 4 inputs.
SOLM_TARGET_V4_VNNI void GemvV4Vnni(const BlockMatrix& W, const BlockQIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<vf16, 4, kVnni>(W, in, g0, g1, y);
}
SOLM_TARGET_V4_VNNI void GemmV4Vnni(const BlockMatrix& W, const BlockQIn* in, int64_t nt, int64_t g0, int64_t g1,
                                    float* y, int64_t ys) {
  GemmT<vf16, kVnni>(W, in, nt, g0, g1, y, ys);
}
#endif

}  // namespace

const BlockInt8Kernels& BlocksInt8() {
  static const BlockInt8Kernels k = [] {
#if defined(SOLM_ISA_VARIANTS)
    if (IsaLevel() == 4 && IsaVnni()) return BlockInt8Kernels{QuantV4, GemvV4Vnni, GemmV4Vnni, "x86-64-v4-vnni"};
    if (IsaLevel() == 4) return BlockInt8Kernels{QuantV4, GemvV4, GemmV4, "x86-64-v4"};
    if (IsaLevel() == 3) return BlockInt8Kernels{QuantV3, GemvV3, GemmV3, "x86-64-v3"};
#endif
    return BlockInt8Kernels{QuantBase, GemvBase, GemmBase, "baseline"};
  }();
  return k;
}

const char* MlpBlocksInt8KernelIsa() { return BlocksInt8().isa; }

}  // namespace solm
