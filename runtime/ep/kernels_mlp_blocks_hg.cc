// SparseMLPBlocks skip="h", activations="int8", with down's 4-bit source-layout copy: the rows at rho < 1 run the
// source's own down on their masked h, reading only the kept units (DownGroups, kernels.h).
//
// Semantics (reference.sparse_mlp_blocks_h_ref with `dense`): h masked to its kept units is quantised per block of
// 32 units as any int8 input is (d = max|h|/127 over the block, q = round-half-even(h·(1/d)); d·Σq for the offset
// term), and y_d = Σ_g scale_dg·(d_g·Σ_j q_j·code_dj) + offset_dg·d_g·Σ_j q_j: the source blocks' int8 dot product,
// the one the rows at rho >= 1 run through BlockMatrix. A dropped unit has q = 0 and adds nothing, so its codes are
// never read; a group with no kept unit is skipped whole. The floats are BlockMatrix's on the masked h too (the
// same integers, BlockTerm's expression, groups ascending), so a batch's rows at rho < 1 may run there instead
// (kernels_mlp_blocks_op.cc), and equal the same rows run one by one here.
//
// The VNNI kernel: per tile of 128 output rows, per group, per quad of kept units, four 64-byte loads (each unit's
// codes of the tile), two rounds of byte/word unpacks that turn them into 32-bit lanes holding the 4 units' codes
// of one row (within each 128-bit lane: no cross-lane shuffle), and a vpdpbusd per nibble half against the quad's
// 4 q bytes broadcast. The accumulators' lanes are rows in a scrambled order, which DownGroups::Set stores the
// scales and offsets in, so the per-group epilogue is plain vector loads; the order is undone once per tile.
#include <immintrin.h>

#include "kernels_util.h"

namespace solm {

namespace {
constexpr int64_t kGroup = 32;

// Row of accumulator a (0..7), lane l (0..15) within a tile: a = 2i + half, l = 4L + k (L the 128-bit lane).
inline int64_t TileRow(int a, int l) { return 64 * (a % 2) + 16 * (l / 4) + 4 * (a / 2) + (l % 4); }
}  // namespace

void DownGroups::Set(const uint8_t* src, const float* sc, const float* of, int64_t D_, int64_t I_) {
  D = D_, I = I_, G = I / kGroup, Dp = (D + kTile - 1) / kTile * kTile;
  codes.assign(static_cast<size_t>(G * kGroup * UnitBytes()), 0);
  scale.assign(static_cast<size_t>(G * Dp), 0.f);
  offset.assign(static_cast<size_t>(G * Dp), 0.f);
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < I; ++j) {
      const int64_t g = j / kGroup;
      const int code = (src[(d * G + g) * 16 + (j % kGroup) / 2] >> (4 * (j % 2))) & 15;
      uint8_t* tile = codes.data() + j * UnitBytes() + d / kTile * 64;
      const int64_t r = d % kTile;
      tile[r % 64] |= static_cast<uint8_t>(code << (r < 64 ? 0 : 4));
    }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < Dp / kTile; ++k)
      for (int a = 0; a < 8; ++a)
        for (int l = 0; l < 16; ++l) {
          const int64_t d = k * kTile + TileRow(a, l), at = g * Dp + k * kTile + a * 16 + l;
          if (d < D) scale[at] = sc[d * G + g], offset[at] = of[d * G + g];
        }
  bool exact = true;  // halves when they hold every value exactly (bit for bit: -0 and subnormals included)
  for (size_t i = 0; i < scale.size() && exact; ++i)
    for (float v : {scale[i], offset[i]}) {
      const float r = HalfToFloat(FloatToHalf(v));
      exact = exact && std::memcmp(&r, &v, sizeof(float)) == 0;
    }
  scale_h.clear(), offset_h.clear();
  if (!exact) return;
  for (size_t i = 0; i < scale.size(); ++i)
    scale_h.push_back(FloatToHalf(scale[i])), offset_h.push_back(FloatToHalf(offset[i]));
  std::vector<float>().swap(scale), std::vector<float>().swap(offset);
}

// The token's runs of kept units by group: d = max|h|/127 over the run (the masked block's),
// q = round-half-even(h·(1/d)) under the default rounding mode, d·Σq over the run for the offset term (as quant's s:
// the sum of the values the codes meet, kernels_mlp_blocks_int8.cc). Once a token:
// the tile chunks of SparseMlpBlocksDownH (two a token for SmolLM2) share it, where each chunk used to prepare its own.
void PrepareDownG(const float* h, const int32_t* idx, int64_t n, DownGToken& t) {
  t.runs.clear(), t.qw.clear(), t.unit.clear();
  for (int64_t i = 0; i < n;) {
    const int64_t g = idx[i] / kGroup;
    int64_t e = i;
    float mx = 0.f;
    for (; e < n && idx[e] / kGroup == g; ++e) mx = std::max(mx, std::fabs(h[idx[e]]));
    const float d = mx / 127.f, inv = d != 0.f ? 1.f / d : 0.f;
    const size_t run = t.runs.size();
    t.runs.push_back({g, i, e - i, d, 0.f});
    int32_t qsum = 0;  // |Σq| <= 32·127
    for (int64_t s = i; s < e; s += 4) {
      uint32_t w = 0;
      for (int64_t u = 0; u < 4; ++u) {
        const bool in = s + u < e;
        const int32_t q = in ? static_cast<int32_t>(std::nearbyint(h[idx[s + u]] * inv)) : 0;
        qsum += q;
        w |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(q))) << (8 * u);
        t.unit.push_back(idx[in ? s + u : e - 1]);
      }
      t.qw.push_back(static_cast<int32_t>(w));
    }
    t.runs[run].hsum = d * static_cast<float>(qsum);
    i = e;
  }
}

namespace {

// Tiles [k0, k1) of one token, plainly: the same q, the same integer sums, the epilogue in the same order.
void DownGBase(const DownGroups& W, const DownGToken& t, int64_t k0, int64_t k1, float* y) {
  for (int64_t k = k0; k < k1; ++k) {
    float F[DownGroups::kTile] = {};  // accumulator order
    int64_t quad = 0;
    for (const DownGToken::Run& r : t.runs) {
      int32_t isum[DownGroups::kTile] = {};
      const int64_t nq = (r.count + 3) / 4;
      for (int64_t qd = quad; qd < quad + nq; ++qd)
        for (int u = 0; u < 4; ++u) {
          const int32_t q = static_cast<int8_t>(static_cast<uint32_t>(t.qw[qd]) >> (8 * u));
          const uint8_t* tile = W.codes.data() + t.unit[qd * 4 + u] * W.UnitBytes() + k * 64;
          for (int a = 0; a < 8; ++a)
            for (int l = 0; l < 16; ++l) {
              const int64_t row = TileRow(a, l);
              isum[a * 16 + l] += q * ((tile[row % 64] >> (row < 64 ? 0 : 4)) & 15);
            }
        }
      quad += nq;
      const int64_t at = r.g * W.Dp + k * DownGroups::kTile;
      for (int64_t x = 0; x < DownGroups::kTile; ++x) {
        const float s = W.half() ? HalfToFloat(W.scale_h[at + x]) : W.scale[at + x];
        const float o = W.half() ? HalfToFloat(W.offset_h[at + x]) : W.offset[at + x];
        float a = s * (static_cast<float>(isum[x]) * r.d), b = o * r.hsum;
        asm("" : "+x"(a), "+x"(b));  // BlockTerm's floats (kernels_mlp_blocks_int8.cc): no FMA
        F[x] = F[x] + (a + b);
      }
    }
    for (int a = 0; a < 8; ++a)
      for (int l = 0; l < 16; ++l) {
        const int64_t d = k * DownGroups::kTile + TileRow(a, l);
        if (d < W.D) y[d] = F[a * 16 + l];
      }
  }
}

#if defined(SOLM_ISA_VARIANTS)
// Group by group (ascending), and within a group tile by tile: a kept unit's codes of every tile (one contiguous
// run of Dp/2 bytes) come from memory once, on the group's first tile (the next group's runs are prefetched while
// this one computes; their addresses depend on h), and stay in L1 for its other tiles. The float sums of the
// item's tiles live in a small buffer between groups.
SOLM_TARGET_V4_VNNI void DownGVnni(const DownGroups& W, const DownGToken& t, int64_t k0, int64_t k1, float* y) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t ub = W.UnitBytes(), nk = k1 - k0;
  const bool half = W.half();
  alignas(64) float Fm[8][DownGroups::kTile];  // [tile of the item][accumulator order]; at most 8 tiles an item
  for (int64_t k = 0; k < nk; ++k) std::fill(Fm[k], Fm[k] + DownGroups::kTile, 0.f);
  int64_t quad = 0;
  const int64_t nquads = static_cast<int64_t>(t.qw.size());
  for (size_t ri = 0; ri < t.runs.size(); ++ri) {
    const DownGToken::Run& r = t.runs[ri];
    const int64_t nq = (r.count + 3) / 4;
    for (int64_t s = (quad + nq) * 4; s < std::min(nquads, quad + nq + nq + 1) * 4; ++s)  // the next run's units
      for (int64_t off = k0 * 64; off < k1 * 64; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(W.codes.data() + t.unit[s] * ub + off), _MM_HINT_T0);
    const __m512 dv = _mm512_set1_ps(r.d), hs = _mm512_set1_ps(r.hsum);
    for (int64_t k = k0; k < k1; ++k) {
      __m512i acc[8];
      for (int a = 0; a < 8; ++a) acc[a] = _mm512_setzero_si512();
      const uint8_t* base = W.codes.data() + k * 64;
      for (int64_t qd = quad; qd < quad + nq; ++qd) {
        const int32_t* u = t.unit.data() + qd * 4;
        const __m512i R0 = _mm512_loadu_si512(base + u[0] * ub), R1 = _mm512_loadu_si512(base + u[1] * ub);
        const __m512i R2 = _mm512_loadu_si512(base + u[2] * ub), R3 = _mm512_loadu_si512(base + u[3] * ub);
        const __m512i lo01 = _mm512_unpacklo_epi8(R0, R1), hi01 = _mm512_unpackhi_epi8(R0, R1);
        const __m512i lo23 = _mm512_unpacklo_epi8(R2, R3), hi23 = _mm512_unpackhi_epi8(R2, R3);
        const __m512i P[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                              _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
        const __m512i qv = _mm512_set1_epi32(t.qw[qd]);
        for (int i = 0; i < 4; ++i) {
          acc[2 * i] = _mm512_dpbusd_epi32(acc[2 * i], _mm512_and_si512(P[i], nib), qv);
          acc[2 * i + 1] = _mm512_dpbusd_epi32(acc[2 * i + 1], _mm512_and_si512(_mm512_srli_epi16(P[i], 4), nib), qv);
        }
      }
      const int64_t at = r.g * W.Dp + k * DownGroups::kTile;
      float* F = Fm[k - k0];
      for (int a = 0; a < 8; ++a) {
        __m512 sv, ov;
        if (half) {
          sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W.scale_h.data() + at + a * 16)));
          ov = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W.offset_h.data() + at + a * 16)));
        } else {
          sv = _mm512_loadu_ps(W.scale.data() + at + a * 16), ov = _mm512_loadu_ps(W.offset.data() + at + a * 16);
        }
        __m512 t = _mm512_mul_ps(sv, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[a]), dv)), u = _mm512_mul_ps(ov, hs);
        asm("" : "+v"(t), "+v"(u));  // BlockTerm's floats (kernels_mlp_blocks_int8.cc): no FMA
        _mm512_store_ps(F + a * 16, _mm512_add_ps(_mm512_load_ps(F + a * 16), _mm512_add_ps(t, u)));
      }
    }
    quad += nq;
  }
  for (int64_t k = k0; k < k1; ++k)
    for (int a = 0; a < 8; ++a)
      for (int l = 0; l < 16; ++l) {
        const int64_t d = k * DownGroups::kTile + TileRow(a, l);
        if (d < W.D) y[d] = Fm[k - k0][a * 16 + l];
      }
}
#endif

}  // namespace

const BlockHGKernels& BlocksHG() {
  static const BlockHGKernels k = [] {
#if defined(SOLM_ISA_VARIANTS)
    if (IsaLevel() == 4 && IsaVnni()) return BlockHGKernels{DownGVnni, "x86-64-v4-vnni"};
#endif
    return BlockHGKernels{DownGBase, IsaName(IsaLevel())};
  }();
  return k;
}

}  // namespace solm
