// SparseMLPBlocks with skip="h" (issue 17): the down projection on the kept units of h only (BlockRows, DownH).
//
// Semantics (reference.sparse_mlp_blocks_h_ref): gate and up run on all of x, h = act(gate)·up, the k = ⌈ρ·I⌉
// units of largest |h| are kept (ties at the threshold kept: TopK), and y = Σ_kept h_j · downT[j, :]. downT [I, D]
// is W_downᵀ as blocks of 32 along D (w = scale·code + offset), so a unit's D weights are one row.
//
// Layout (BlockRows, repacked at Compile, lossless): unit-major, a unit's codes one contiguous run of its nb blocks
// (8-bit codes in output order; 4-bit codes re-paired so byte i holds output i (low nibble) and output i+16 (high),
// i.e. the low nibbles of 16 bytes are outputs 0..15 and the high nibbles outputs 16..31: no interleave to undo),
// its scales and offsets a run of nb floats each. A skipped unit's rows are never touched.
//
// Arithmetic. A kept unit adds to each output block b: (h_j·scale_jb)·code + h_j·offset_jb. The first term is one
// broadcast times a vector of codes (an FMA per vector of outputs); the second is a scalar per block, summed over
// the kept units in fp32 and added once at the end. Equal to Σ_j h_j·(scale·code + offset) up to fp32 rounding.
// There is no int8 variant: downT's scale varies with j, the summed index, so an integer dot product over j would
// need one scale per term (h stays fp32 in both activation modes; x is int8 for gate/up under activations="int8").
//
// Register tiling: CB blocks of outputs (32·CB floats, 16 accumulator vectors at v3/v4) stay in registers while
// the kept units stream by; the next units' rows are prefetched (their addresses are data-dependent, which the
// hardware prefetcher cannot follow).
#include "kernels_util.h"

namespace solm {

void BlockRows::Set(const uint8_t* codes_, const float* scale_, const float* offset_, int64_t I_, int64_t D_,
                    int bits_) {
  I = I_, D = D_, bits = bits_, nb = D / kBlock;
  const int64_t cb = CodeBytes();
  codes.assign(static_cast<size_t>(I * RowBytes()), 0);
  scale.assign(scale_, scale_ + I * nb);
  offset.assign(offset_, offset_ + I * nb);
  for (int64_t j = 0; j < I; ++j)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* dst = codes.data() + (j * nb + b) * cb;
      const uint8_t* src = codes_ + (j * nb + b) * cb;
      if (bits == 8) {
        std::memcpy(dst, src, static_cast<size_t>(cb));
      } else {
        auto code = [&](int64_t k) { return (src[k / 2] >> (4 * (k % 2))) & 15; };
        for (int64_t i = 0; i < kBlock / 2; ++i) dst[i] = static_cast<uint8_t>(code(i) | code(i + kBlock / 2) << 4);
      }
    }
}

namespace {

// Ln bytes at p zero-extended to int32 lanes: vpmovzxbd at AVX-512 / AVX2 (inline asm, as F16cRows does, so this
// target-free body is shared; GCC 12 scalarises __builtin_convertvector from a byte vector), a loop at baseline.
template <class VF>
SOLM_INLINE typename IntVec<sizeof(VF)>::type Zext(const uint8_t* p) {
  typedef typename IntVec<sizeof(VF)>::type VI;
  VI r;
#if defined(SOLM_ISA_VARIANTS)
  if constexpr (Lanes<VF>() == 16) {
    asm("vpmovzxbd %1, %0" : "=v"(r) : "m"(*reinterpret_cast<const char(*)[16]>(p)));
    return r;
  } else if constexpr (Lanes<VF>() == 8) {
    asm("vpmovzxbd %1, %0" : "=x"(r) : "m"(*reinterpret_cast<const char(*)[8]>(p)));
    return r;
  }
#endif
  for (int l = 0; l < Lanes<VF>(); ++l) r[l] = p[l];
  return r;
}

// Vector v (outputs v·Ln .. v·Ln+Ln-1) of a block's 32 codes as floats.
template <class VF, int BITS>
SOLM_INLINE VF CodesAt(const uint8_t* codes, int v) {
  constexpr int Ln = Lanes<VF>();
  typedef typename IntVec<sizeof(VF)>::type VI;
  VI w;
  if constexpr (BITS == 8) {
    w = Zext<VF>(codes + v * Ln);
  } else {
    const int o = v * Ln;
    w = Zext<VF>(codes + (o % 16));
    if constexpr (Ln == 16) {  // vpermps of the table 0..15 reads only an index's low 4 bits: no mask, no convert
      const VF table = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      return __builtin_shuffle(table, o < 16 ? w : (w >> 4));
    }
    w = o < 16 ? (w & 15) : (w >> 4);
  }
  return __builtin_convertvector(w, VF);
}

// CB output blocks [c, c+CB) of one token over the n kept units.
template <class VF, int BITS, int CB>
SOLM_INLINE void DownTile(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c, float* y) {
  constexpr int Ln = Lanes<VF>(), NV = BlockRows::kBlock / Ln;
  constexpr int64_t kAhead = 16;  // units prefetched ahead
  const int64_t cb = W.CodeBytes(), rb = W.RowBytes(), nb = W.nb;
  const uint8_t* base = W.codes.data() + c * cb;
  VF acc[CB][NV];
  alignas(32) float os[CB];
  for (int b = 0; b < CB; ++b) {
    os[b] = 0.f;
    for (int v = 0; v < NV; ++v) acc[b][v] = VF{};
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      const int64_t ja = idx[i + kAhead];
      const uint8_t* p = base + ja * rb;
      for (int64_t off = 0; off < CB * cb; off += 64) __builtin_prefetch(p + off);
      __builtin_prefetch(W.scale.data() + ja * nb + c);
      __builtin_prefetch(W.offset.data() + ja * nb + c);
    }
    const int32_t j = idx[i];
    const float a = h[j];
    const uint8_t* row = base + j * rb;
    const float* sc = W.scale.data() + j * nb + c;
    const float* of = W.offset.data() + j * nb + c;
    alignas(32) float s[CB];
    if constexpr (CB == 8 || CB == 4) {  // one vector multiply and FMA over the tile's blocks; broadcast from memory
      typedef float VS __attribute__((vector_size(CB * 4)));
      VS t, o, acc_o;
      __builtin_memcpy(&t, sc, sizeof(VS));
      __builtin_memcpy(&o, of, sizeof(VS));
      __builtin_memcpy(&acc_o, os, sizeof(VS));
      t = t * a;
      acc_o += o * a;
      __builtin_memcpy(s, &t, sizeof(VS));
      __builtin_memcpy(os, &acc_o, sizeof(VS));
    } else {
      for (int b = 0; b < CB; ++b) {
        s[b] = a * sc[b];
        os[b] += a * of[b];
      }
    }
#pragma GCC unroll 8
    for (int b = 0; b < CB; ++b) {
      const uint8_t* blk = row + b * cb;
      const VF sv = Splat<VF>(s[b]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[b][v] += sv * CodesAt<VF, BITS>(blk, v);
    }
  }
  for (int b = 0; b < CB; ++b) {
    const VF o = Splat<VF>(os[b]);
    for (int v = 0; v < NV; ++v) Store<VF>(y + (c + b) * BlockRows::kBlock + v * Ln, acc[b][v] + o);
  }
}

template <class VF, int BITS, int CB>
SOLM_INLINE void DownBits(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                          float* y) {
  int64_t c = c0;
  for (; c + CB <= c1; c += CB) DownTile<VF, BITS, CB>(W, h, idx, n, c, y);
  for (; c < c1; ++c) DownTile<VF, BITS, 1>(W, h, idx, n, c, y);
}
template <class VF, int CB>
SOLM_INLINE void DownT(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                       float* y) {
  if (W.bits == 4) DownBits<VF, 4, CB>(W, h, idx, n, c0, c1, y);
  else DownBits<VF, 8, CB>(W, h, idx, n, c0, c1, y);
}

// Baseline (SSE2, 16 xmm registers): one block (8 accumulators) at a time.
void DownBase(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1, float* y) {
  DownT<vf4, 1>(W, h, idx, n, c0, c1, y);
}
#if defined(SOLM_ISA_VARIANTS)
// AVX2: 4 blocks x 4 vectors = 16 accumulators; AVX-512: 8 blocks x 2 vectors = 16 of the 32 zmm registers.
SOLM_TARGET_V3 void DownV3(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                           float* y) {
  DownT<v8, 4>(W, h, idx, n, c0, c1, y);
}
SOLM_TARGET_V4 void DownV4(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                           float* y) {
  DownT<vf16, 8>(W, h, idx, n, c0, c1, y);
}
#endif

}  // namespace

const BlockHKernels& BlocksH() {
  static const BlockHKernels k = [] {
#if defined(SOLM_ISA_VARIANTS)
    if (IsaLevel() == 4) return BlockHKernels{DownV4, "x86-64-v4"};
    if (IsaLevel() == 3) return BlockHKernels{DownV3, "x86-64-v3"};
#endif
    return BlockHKernels{DownBase, "baseline"};
  }();
  return k;
}

}  // namespace solm
