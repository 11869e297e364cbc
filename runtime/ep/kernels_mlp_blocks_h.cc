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
  VF acc[CB][NV];  // every loop over acc fully unrolled: constant indices keep the sums in registers
  alignas(32) float os[CB];
#pragma GCC unroll 16
  for (int b = 0; b < CB; ++b) {
    os[b] = 0.f;
#pragma GCC unroll 4
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
#pragma GCC unroll 16
    for (int b = 0; b < CB; ++b) {
      const uint8_t* blk = row + b * cb;
      const VF sv = Splat<VF>(s[b]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[b][v] += sv * CodesAt<VF, BITS>(blk, v);
    }
  }
#pragma GCC unroll 16
  for (int b = 0; b < CB; ++b) {
    const VF o = Splat<VF>(os[b]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store<VF>(y + (c + b) * BlockRows::kBlock + v * Ln, acc[b][v] + o);
  }
}

template <class VF, int BITS, int CB>
SOLM_INLINE void DownBits(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                          float* y) {
  int64_t c = c0;
  for (; c + CB <= c1; c += CB) DownTile<VF, BITS, CB>(W, h, idx, n, c, y);
  // the rest in one pass over the kept units when it is 2 or 4 blocks (each pass re-reads every unit's scale and
  // offset), else a block at a time
  if (c1 - c == 4 && CB > 4) {
    DownTile<VF, BITS, 4>(W, h, idx, n, c, y);
    return;
  }
  if (c1 - c == 2 && CB > 2) {
    DownTile<VF, BITS, 2>(W, h, idx, n, c, y);
    return;
  }
  for (; c < c1; ++c) DownTile<VF, BITS, 1>(W, h, idx, n, c, y);
}
template <class VF, int CB>
SOLM_INLINE void DownT(const BlockRows& W, const float* h, const int32_t* idx, int64_t n, int64_t c0, int64_t c1,
                       float* y) {
  if (W.bits == 4) DownBits<VF, 4, CB>(W, h, idx, n, c0, c1, y);
  else DownBits<VF, 8, CB>(W, h, idx, n, c0, c1, y);
}

// Several tokens at once (B > 1, prefill): output block c of NT tokens over the union of their kept units,
// units[0..nu) ascending, coef [I, NT] by unit (h_t[j] where token t kept unit j, 0 elsewhere; padding tokens 0).
// Each unit's codes are read and widened once and FMAd into every token, so the conversion µops and the bytes are
// paid once per unit instead of once per token that kept it. A token's sum is the per-token tile's exactly: the
// same terms in the same (ascending unit) order, s = coef·scale and os += offset·coef in the same expressions, plus
// terms whose coefficient is 0 (0·code = ±0 and acc ± 0 = acc for finite weights: rows of downT are finite).
template <int NT>
struct TokVec {
  typedef float type __attribute__((vector_size(NT * 4)));  // NT a power of two
};

template <class VF, int BITS, int NT>
SOLM_INLINE void DownTileMany(const BlockRows& W, const int32_t* units, const float* coef, int64_t nu, int64_t c,
                              int64_t nt, float* y, int64_t ys) {
  constexpr int Ln = Lanes<VF>(), NV = BlockRows::kBlock / Ln;
  constexpr int64_t kAhead = 16;
  typedef typename TokVec<NT>::type VT;  // one lane per token
  const int64_t cb = W.CodeBytes(), rb = W.RowBytes(), nb = W.nb;
  const uint8_t* base = W.codes.data() + c * cb;
  const float* scb = W.scale.data() + c;
  const float* ofb = W.offset.data() + c;
  VF acc[NT][NV];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[t][v] = VF{};
  VT os = VT{};
  for (int64_t i = 0; i < nu; ++i) {
    if (i + kAhead < nu) {
      const int64_t ja = units[i + kAhead];
      __builtin_prefetch(base + ja * rb);
      __builtin_prefetch(scb + ja * nb);
      __builtin_prefetch(ofb + ja * nb);
    }
    const int64_t j = units[i];
    VT a;
    __builtin_memcpy(&a, coef + j * NT, sizeof(VT));
    const float sc = scb[j * nb], of = ofb[j * nb];
    alignas(64) float s[NT];
    const VT sv = a * sc;  // the per-token tile's a·scale, lane by lane
    __builtin_memcpy(s, &sv, sizeof(VT));
    // s goes through memory, so each Splat below is a broadcast load (load ports) instead of a lane extract and a
    // register broadcast (vector port 5, which the FMAs and conversions need)
    asm("" : "+m"(s));
    os += of * a;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const VF w = CodesAt<VF, BITS>(base + j * rb, v);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) acc[t][v] += Splat<VF>(s[t]) * w;
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) {
    if (t >= nt) break;
    const VF o = Splat<VF>(os[t]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Store<VF>(y + t * ys + c * BlockRows::kBlock + v * Ln, acc[t][v] + o);
  }
}

template <class VF, int NT>
SOLM_INLINE void DownManyT(const BlockRows& W, const int32_t* units, const float* coef, int64_t nu, int64_t nt,
                           int64_t c0, int64_t c1, float* y, int64_t ys) {
  for (int64_t c = c0; c < c1; ++c) {
    if (W.bits == 4) DownTileMany<VF, 4, NT>(W, units, coef, nu, c, nt, y, ys);
    else DownTileMany<VF, 8, NT>(W, units, coef, nu, c, nt, y, ys);
  }
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
// Tokens per union tile: AVX2 2 tokens x 4 vectors = 8 accumulators (16 ymm); AVX-512 8 tokens x 2 vectors = 16
// accumulators (32 zmm). Baseline (16 xmm, 8 vectors a block) has none: per token only.
SOLM_TARGET_V3 void DownManyV3(const BlockRows& W, const int32_t* units, const float* coef, int64_t nu, int64_t nt,
                               int64_t c0, int64_t c1, float* y, int64_t ys) {
  DownManyT<v8, 2>(W, units, coef, nu, nt, c0, c1, y, ys);
}
SOLM_TARGET_V4 void DownManyV4(const BlockRows& W, const int32_t* units, const float* coef, int64_t nu, int64_t nt,
                               int64_t c0, int64_t c1, float* y, int64_t ys) {
  DownManyT<vf16, 8>(W, units, coef, nu, nt, c0, c1, y, ys);
}
#endif

}  // namespace

const BlockHKernels& BlocksH() {
  static const BlockHKernels k = [] {
#if defined(SOLM_ISA_VARIANTS)
    if (IsaLevel() == 4) return BlockHKernels{DownV4, DownManyV4, 8, "x86-64-v4"};
    if (IsaLevel() == 3) return BlockHKernels{DownV3, DownManyV3, 2, "x86-64-v3"};
#endif
    return BlockHKernels{DownBase, nullptr, 1, "baseline"};
  }();
  return k;
}

// skip="h": per token keep the top-k units of h (TopK on the row: reference.topk_channels_ref's rule) and list the
// non-zero kept ones; then y = Σ_kept h_j·downT[j] (+ b_down). Tokens go in groups of the ISA's union tile
// (BlockHKernels::tile): a group whose union of kept units is cheaper to stream once for all its tokens than each
// token's own list (Unite's estimate) runs DownTileMany over the union, work items (group, 2 output blocks); any
// other token runs the per-token DownTile, work items (token, 9 output blocks). Both give a token the same floats.
namespace {

// output blocks per work item: per token, per union group. 9 per token: SmolLM2's 18 output blocks are two equal
// items (two threads busy alike), where 8 made items of 8, 8, 2 (one thread waiting). (A 9-block register tile was
// tried: 18 accumulators plus the widened codes spill on AVX-512 and ran slower than 8 + 1.)
constexpr int64_t kColsTok = 9, kColsMany = 2;

// Group g's union (units, ascending) and coefficients [I, tile] by unit; returns nu, or -1 where per-token lists
// are cheaper: a union unit costs ~kWiden vector µops to widen its codes plus one FMA per token of the tile (padding
// included), a kept unit of the per-token path the widening plus one FMA. A unit is in the union iff some token's
// coefficient is non-zero (the lists hold only non-zero kept units).
int64_t Unite(const float* h, int64_t Ip, const int32_t* idx, const int64_t* cnt, int64_t I, int64_t n0, int64_t nt,
              int64_t tile, int32_t* units, float* coef) {
  constexpr int64_t kWiden = 3;
  if (nt < 2) return -1;
  std::memset(coef, 0, static_cast<size_t>(I * tile) * sizeof(float));
  int64_t sum = 0;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t n = n0 + t;
    sum += cnt[n];
    for (int64_t i = 0; i < cnt[n]; ++i) {
      const int32_t j = idx[n * I + i];
      coef[j * tile + t] = h[n * Ip + j];
    }
  }
  int64_t nu = 0;
  for (int64_t j = 0; j < I; ++j) {
    bool any = false;
    for (int64_t t = 0; t < tile; ++t) any |= coef[j * tile + t] != 0.f;
    units[nu] = static_cast<int32_t>(j);
    nu += any;
  }
  return nu * (kWiden + tile) < sum * (kWiden + 1) ? nu : -1;
}

}  // namespace

void SparseMlpBlocksDownH(const float* h, int64_t Ip, int64_t N, int64_t T, int64_t I, int64_t Dout,
                          const MlpBlockWeights& W, const float* rho, float* y, MlpBlockScratch& sc,
                          const Parallel& par) {
  Stats& st = GlobalStats();
  int32_t* idx = Grow(sc.hidx, static_cast<size_t>(N * I));
  int64_t* cnt = Grow(sc.hcount, static_cast<size_t>(N));
  auto select = [&](size_t it) {
    const int64_t n = static_cast<int64_t>(it);
    // TopK's rule (|h| >= its threshold; every unit at ρ >= 1), listing the non-zero kept units branch-free (a kept
    // 0 would add nothing)
    const float* hr = h + n * Ip;
    const double r = static_cast<double>(rho[n / T]);
    int32_t* out = idx + n * I;
    int64_t c = 0;
    if (r >= 1.0) {
      for (int64_t j = 0; j < I; ++j) out[c] = static_cast<int32_t>(j), c += hr[j] != 0.f;
    } else {
      const float thr = TopKThreshold(hr, I, r, Grow(ThreadScratch().f0, static_cast<size_t>(I)));
      for (int64_t j = 0; j < I; ++j)
        out[c] = static_cast<int32_t>(j), c += (std::fabs(hr[j]) >= thr) & (hr[j] != 0.f);
    }
    cnt[n] = c;
    if (!W.down_g.empty()) PrepareDownG(hr, out, c, sc.hg[n]);  // once a token, for every tile chunk below
  };
  if (!W.down_g.empty() && sc.hg.size() < static_cast<size_t>(N)) sc.hg.resize(static_cast<size_t>(N));
  par.For(static_cast<size_t>(N), select);
  uint64_t kept = 0;
  for (int64_t n = 0; n < N; ++n) kept += static_cast<uint64_t>(cnt[n]);
  (W.down_g.empty() ? st.mlp_down_rows : st.mlp_down_dense_rows).fetch_add(kept, std::memory_order_relaxed);

  if (!W.down_g.empty()) {  // int8 h on the source's down, only the kept units (kernels_mlp_blocks_hg.cc)
    const BlockHGKernels& KG = BlocksHG();
    const int64_t tiles = W.down_g.Dp / DownGroups::kTile, per = std::min<int64_t>(8, (tiles + 1) / 2);
    const int64_t chunks = (tiles + per - 1) / per;  // two items a token where they fit (the VNNI kernel: <= 8 tiles)
    auto down = [&](size_t it) {
      const int64_t n = static_cast<int64_t>(it) / chunks, k0 = static_cast<int64_t>(it) % chunks * per;
      const int64_t k1 = std::min(k0 + per, tiles);
      KG.down(W.down_g, sc.hg[n], k0, k1, y + n * Dout);
      for (int64_t j = k0 * DownGroups::kTile; j < std::min(k1 * DownGroups::kTile, Dout) && !W.b_down.empty(); ++j)
        y[n * Dout + j] += W.b_down[j];
    };
    return par.For(static_cast<size_t>(N * chunks), down);
  }
  const BlockHKernels& KH = BlocksH();
  const int64_t tile = KH.many ? KH.tile : 1, groups = (N + tile - 1) / tile;
  int32_t* units = Grow(sc.hunion, static_cast<size_t>(groups * I));
  float* coef = Grow(sc.hcoef, static_cast<size_t>(groups * I * tile));  // [groups, I, tile]
  int64_t* nu = Grow(sc.hnunion, static_cast<size_t>(groups));
  auto unite = [&](size_t it) {
    const int64_t g = static_cast<int64_t>(it), n0 = g * tile;
    nu[g] = Unite(h, Ip, idx, cnt, I, n0, std::min(tile, N - n0), tile, units + g * I, coef + g * I * tile);
  };
  if (KH.many) par.For(static_cast<size_t>(groups), unite);
  else std::fill(nu, nu + groups, int64_t{-1});

  // Work items: (union group, column chunk) as g·2, or (token, column chunk) as n·2 + 1, then the chunk.
  const int64_t nb = W.down_t.nb, chunksTok = (nb + kColsTok - 1) / kColsTok;
  const int64_t chunksMany = (nb + kColsMany - 1) / kColsMany;
  std::vector<int64_t>& jobs = sc.hjobs;
  jobs.clear();
  for (int64_t g = 0; g < groups; ++g) {
    if (nu[g] >= 0) {
      for (int64_t c = 0; c < chunksMany; ++c) jobs.push_back((g * 2) * chunksMany + c);
    } else {
      for (int64_t n = g * tile; n < std::min(N, g * tile + tile); ++n)
        for (int64_t c = 0; c < chunksTok; ++c) jobs.push_back((n * 2 + 1) * chunksMany + c);
    }
  }
  auto bias = [&](int64_t n, int64_t c0, int64_t c1) {
    if (W.b_down.empty()) return;
    float* yr = y + n * Dout;
    for (int64_t j = c0 * BlockRows::kBlock; j < c1 * BlockRows::kBlock; ++j) yr[j] += W.b_down[j];
  };
  auto down = [&](size_t it) {
    const int64_t job = jobs[it], who = job / chunksMany / 2, c = job % chunksMany;
    if ((job / chunksMany) % 2 == 0) {
      const int64_t n0 = who * tile, nt = std::min(tile, N - n0);
      const int64_t c0 = c * kColsMany, c1 = std::min(c0 + kColsMany, nb);
      KH.many(W.down_t, units + who * I, coef + who * I * tile, nu[who], nt, c0, c1, y + n0 * Dout, Dout);
      for (int64_t t = 0; t < nt; ++t) bias(n0 + t, c0, c1);
    } else {
      const int64_t c0 = c * kColsTok, c1 = std::min(c0 + kColsTok, nb);
      KH.down(W.down_t, h + who * Ip, idx + who * I, cnt[who], c0, c1, y + who * Dout);
      bias(who, c0, c1);
    }
  };
  par.For(jobs.size(), down);
}

}  // namespace solm
