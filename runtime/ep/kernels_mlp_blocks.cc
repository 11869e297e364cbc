// SparseMLPBlocks: SparseMLP on low-bit block weights (BlockMatrix, SparseMlpBlocks); see kernels.h.
//
// Layout. Each matrix W [N, K] (w = scale·code + offset per block of 32 inputs) is repacked at prepare time
// block-column-major: block column b (inputs 32b..32b+31 of every row) is one contiguous run of bytes, rows in
// groups of kRows = 16, and inside a group the codes are "row-lane" ordered: word j of row r is the row's 4 bytes
// 4j..4j+3 of the block as the op gives them (4 bits: inputs 8j..8j+7, one nibble each, the first lowest; 8 bits:
// inputs 4j..4j+3), and the 16 rows' words j are adjacent. A vector lane is an output row, so one input channel is a broadcast x_k times a vector of 16 rows' codes: no horizontal sums, and
// a skipped block column (all 32 inputs zero now; whole structured blocks in issue 17) costs no byte read at all.
// scale/offset are [nb, Np] (block-column-major too).
//
// With int8 activations (MlpBlockWeights::int8) the 4-bit words are re-paired (int8_layout) and the int8 kernels of
// kernels_mlp_blocks_int8.cc run instead; see there.
//
// Arithmetic. Per row and block the kernel sums s = Σ_k x_k·code_k in fp32 and adds scale·s + offset·Σ_k x_k: the
// same value as Σ_k x_k·(scale·code_k + offset) (the reference's dequantised dot product) up to fp32 rounding, with
// activations kept fp32 throughout (no activation quantisation, unlike MatMulNBits' accuracy_level 4).
#include "kernels_util.h"

namespace solm {

namespace {

// The float codes of one vector of rows from their words shifted right by the code's position: the low `bits`
// bits of each lane. 4 bits at 16 lanes: GCC's __builtin_shuffle takes indices modulo the lane count, i.e. the low
// nibble, so the float is a permute of the table 0..15 (vpermps: no mask, no int->float conversion).
template <class VF, int BITS>
SOLM_INLINE VF Code(typename IntVec<sizeof(VF)>::type w) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  if constexpr (BITS == 4 && Lanes<VF>() == 16) {
    const VF table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return __builtin_shuffle(table, w);
  } else {
    return __builtin_convertvector(w & (VI{} + ((1 << BITS) - 1)), VF);
  }
}

// y[g*16 .. (g+G)*16) += block column b of G row groups · x, one token. Accumulators: G groups x H vectors x 2
// chains; y is read and written once per block (the block column is streamed front to back).
template <class VF, int G, int BITS>
SOLM_INLINE void GemvBlock(const BlockMatrix& W, const float* xb, float xsum, const uint8_t* col, int64_t g0,
                           int64_t b, float* y) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  constexpr int Ln = Lanes<VF>(), H = BlockMatrix::kRows / Ln, PER = 32 / BITS;  // codes per word
  const int64_t gb = W.GroupBytes();
  VF s0[G][H], s1[G][H];
  for (int r = 0; r < G; ++r)
    for (int h = 0; h < H; ++h) s0[r][h] = s1[r][h] = VF{};
  for (int j = 0; j < BlockMatrix::kBlock / PER; ++j) {
    VI w[G][H];
#pragma GCC unroll 8
    for (int r = 0; r < G; ++r)
#pragma GCC unroll 8
      for (int h = 0; h < H; ++h)
        __builtin_memcpy(&w[r][h], col + r * gb + (j * BlockMatrix::kRows + h * Ln) * 4, sizeof(VI));
#pragma GCC unroll 8
    for (int i = 0; i < PER; i += 2) {
      const VF xe = Splat<VF>(xb[j * PER + i]), xo = Splat<VF>(xb[j * PER + i + 1]);
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r)
#pragma GCC unroll 8
        for (int h = 0; h < H; ++h) {
          s0[r][h] += xe * Code<VF, BITS>(w[r][h] >> (BITS * i));
          s1[r][h] += xo * Code<VF, BITS>(w[r][h] >> (BITS * (i + 1)));
        }
    }
  }
  const VF xs = Splat<VF>(xsum);
  const float* sc = W.scale.data() + b * W.Np + g0 * BlockMatrix::kRows;
  const float* of = W.offset.data() + b * W.Np + g0 * BlockMatrix::kRows;
  for (int r = 0; r < G; ++r)
    for (int h = 0; h < H; ++h) {
      const int64_t o = r * BlockMatrix::kRows + h * Ln;
      Store<VF>(y + o, Load<VF>(y + o) + (Load<VF>(sc + o) * (s0[r][h] + s1[r][h]) + Load<VF>(of + o) * xs));
    }
}

// Rows [g0*16, g1*16) of y = W·x for one token (y has Np entries; the rows past N are padding): block column by
// block column (each streamed front to back over the rows), a column whose 32 inputs are all zero not read at all.
template <class VF, int G, int BITS>
SOLM_INLINE void GemvBits(const BlockMatrix& W, const BlockIn& in, int64_t g0, int64_t g1, float* y) {
  const int64_t gb = W.GroupBytes(), ngroups = W.Np / BlockMatrix::kRows, R = BlockMatrix::kRows;
  std::memset(y + g0 * R, 0, (g1 - g0) * R * sizeof(float));
  for (int64_t b = 0; b < W.nb; ++b) {
    if (!in.nz[b]) continue;
    const float* xb = in.x + b * BlockMatrix::kBlock;
    const uint8_t* col = W.codes.data() + b * ngroups * gb;
    int64_t g = g0;
    for (; g + G <= g1; g += G) GemvBlock<VF, G, BITS>(W, xb, in.xsum[b], col + g * gb, g, b, y + g * R);
    for (; g < g1; ++g) GemvBlock<VF, 1, BITS>(W, xb, in.xsum[b], col + g * gb, g, b, y + g * R);
  }
}
template <class VF, int G>
SOLM_INLINE void GemvT(const BlockMatrix& W, const BlockIn& in, int64_t g0, int64_t g1, float* y) {
  if (W.bits == 4) GemvBits<VF, G, 4>(W, in, g0, g1, y);
  else GemvBits<VF, G, 8>(W, in, g0, g1, y);
}

// The fp32 codes of block b, group g: q[k][16 rows].
template <class VF, int BITS>
SOLM_INLINE void Dequant(const uint8_t* col, float* q) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  constexpr int Ln = Lanes<VF>(), H = BlockMatrix::kRows / Ln, PER = 32 / BITS, R = BlockMatrix::kRows;
  for (int j = 0; j < BlockMatrix::kBlock / PER; ++j)
    for (int h = 0; h < H; ++h) {
      VI w;
      __builtin_memcpy(&w, col + (j * R + h * Ln) * 4, sizeof(VI));
      for (int i = 0; i < PER; ++i) Store<VF>(q + (j * PER + i) * R + h * Ln, Code<VF, BITS>(w >> (BITS * i)));
    }
}

// Multi-token: rows [g0*16, g1*16) for nt tokens (y + t*ys). Each group's block is dequantised to fp32 codes once
// (q[32][16] in L1) and applied to every token whose block is non-zero, in GemvGroups' order of sums.
template <class VF>
SOLM_INLINE void GemmT(const BlockMatrix& W, const BlockIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                       int64_t ys) {
  constexpr int Ln = Lanes<VF>(), H = BlockMatrix::kRows / Ln, R = BlockMatrix::kRows;
  const int64_t gb = W.GroupBytes(), ngroups = W.Np / R;
  alignas(64) float q[BlockMatrix::kBlock * R];
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t t = 0; t < nt; ++t) std::memset(y + t * ys + g * R, 0, R * sizeof(float));
    for (int64_t b = 0; b < W.nb; ++b) {
      bool any = false;
      for (int64_t t = 0; t < nt && !any; ++t) any = in[t].nz[b];
      if (!any) continue;
      const uint8_t* col = W.codes.data() + (b * ngroups + g) * gb;
      if (W.bits == 4) Dequant<VF, 4>(col, q);
      else Dequant<VF, 8>(col, q);
      const float* sc = W.scale.data() + b * W.Np + g * R;
      const float* of = W.offset.data() + b * W.Np + g * R;
      for (int64_t t = 0; t < nt; ++t) {
        if (!in[t].nz[b]) continue;
        const float* xb = in[t].x + b * BlockMatrix::kBlock;
        VF s0[H], s1[H];
        for (int h = 0; h < H; ++h) s0[h] = s1[h] = VF{};
        for (int p = 0; p < BlockMatrix::kBlock / 2; ++p) {
          const VF xe = Splat<VF>(xb[2 * p]), xo = Splat<VF>(xb[2 * p + 1]);
          for (int h = 0; h < H; ++h) {
            s0[h] += xe * Load<VF>(q + 2 * p * R + h * Ln);
            s1[h] += xo * Load<VF>(q + (2 * p + 1) * R + h * Ln);
          }
        }
        const VF xs = Splat<VF>(in[t].xsum[b]);
        float* yt = y + t * ys + g * R;
        for (int h = 0; h < H; ++h)
          Store<VF>(yt + h * Ln, Load<VF>(yt + h * Ln) + (Load<VF>(sc + h * Ln) * (s0[h] + s1[h]) +
                                                          Load<VF>(of + h * Ln) * xs));
      }
    }
  }
}

// Baseline x86-64 (SSE2): 4 lanes, a group is 4 vectors; one group at a time (8 accumulator chains).
void GemvBase(const BlockMatrix& W, const BlockIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<vf4, 1>(W, in, g0, g1, y);
}
void GemmBase(const BlockMatrix& W, const BlockIn* in, int64_t nt, int64_t g0, int64_t g1, float* y, int64_t ys) {
  GemmT<vf4>(W, in, nt, g0, g1, y, ys);
}
#if defined(SOLM_ISA_VARIANTS)
// AVX2 + FMA: 8 lanes, two groups at a time (2 x 2 vectors x 2 chains = 8 accumulators).
SOLM_TARGET_V3 void GemvV3(const BlockMatrix& W, const BlockIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<v8, 2>(W, in, g0, g1, y);
}
SOLM_TARGET_V3 void GemmV3(const BlockMatrix& W, const BlockIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                           int64_t ys) {
  GemmT<v8>(W, in, nt, g0, g1, y, ys);
}
// AVX-512: 16 lanes (a group is one vector), four groups at a time (8 accumulator chains).
SOLM_TARGET_V4 void GemvV4(const BlockMatrix& W, const BlockIn& in, int64_t g0, int64_t g1, float* y) {
  GemvT<vf16, 4>(W, in, g0, g1, y);
}
SOLM_TARGET_V4 void GemmV4(const BlockMatrix& W, const BlockIn* in, int64_t nt, int64_t g0, int64_t g1, float* y,
                           int64_t ys) {
  GemmT<vf16>(W, in, nt, g0, g1, y, ys);
}
#endif

}  // namespace

const BlockKernels& Blocks() {
  static const BlockKernels k = [] {
#if defined(SOLM_ISA_VARIANTS)
    if (IsaLevel() == 4) return BlockKernels{GemvV4, GemmV4, "x86-64-v4"};
    if (IsaLevel() == 3) return BlockKernels{GemvV3, GemmV3, "x86-64-v3"};
#endif
    return BlockKernels{GemvBase, GemmBase, "baseline"};
  }();
  return k;
}

const char* MlpBlocksKernelIsa() { return Blocks().isa; }

}  // namespace solm
