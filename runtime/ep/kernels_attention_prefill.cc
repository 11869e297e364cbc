// Multi-token (prefill) QuestAttention: dense attention under the mask, blocked like flash attention.
//
// The per-query-position loop this replaces scored every key of a row with a dot product, a scalar exp and an
// Axpy per (query head, position): no K/V row was reused across positions, so it ran at ~1/3 of onnxruntime's
// dense GEMM attention. Here one work item is (row, KV head, query tile): a tile holds TQ query positions x the G
// query heads of the GQA group (~24 query rows sharing one K/V head), and walks the keys in blocks of kKeyBlock:
//   1. per query row, the mask (bool or additive float, any broadcast strides) and is_causal are read for the
//      block: every key allowed, every key masked out, or mixed (then an additive bias row, -inf where masked);
//      a block that every row masks out (above the causal diagonal) is skipped, as are micro-tiles of rows that
//      all mask it out;
//   2. S = Q·Kᵀ by a register-tiled micro-GEMM (the block's keys packed d-major once, so a q element is
//      broadcast against a vector of keys);
//   3. online softmax per row: the running max m and sum l, P = 2^(S - m) by a vector exp2, the accumulated
//      output rescaled by 2^(m_old - m_new);
//   4. O += P·V, a register tile of rows x output columns, each V row loaded once per micro-tile of rows.
// Q is pre-scaled by scale·log2(e) (and a float mask by log2(e)), so the softmax runs in base 2; the result equals
// softmax(q·kᵀ·scale + mask)·v up to float rounding. A row with no allowed key (every key masked: bool false, or an
// additive value at or below the lowest finite float) comes out zeros, a NaN logit NaN, as in the reference.
#include "kernels_util.h"

namespace solm {
namespace {

constexpr int64_t kKeyBlock = 64;   // keys per block (a multiple of every variant's key tile)
constexpr int64_t kTileRows = 24;   // target query rows per tile (positions x GQA heads)
constexpr float kLog2e = 1.4426950408889634f;

// How query row m sees keys [j0, j0 + n): 0 every key allowed with no additive term, 1 every key masked out,
// 2 mixed: bias[0, n) = the additive term in log2 units, -inf where masked.
int ClassifyRow(const MaskRow& m, int64_t j0, int64_t n, float* bias) {
  int64_t nc = n;  // keys at or before the causal limit
  if (m.jmax != INT64_MAX) {
    if (j0 > m.jmax) return 1;
    nc = std::min(n, m.jmax - j0 + 1);
  }
  if (m.b) {
    const uint8_t* p = m.b + j0 * m.sl;
    if (m.sl == 1 && nc == n) {  // the common case (a causal/padding mask): a whole block on or off, 8 keys a load
      bool ones = true, zeros = true;
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        uint64_t w;
        std::memcpy(&w, p + j, 8);
        ones = ones && w == 0x0101010101010101ull;
        zeros = zeros && w == 0;
      }
      for (; j < n; ++j) ones = ones && p[j] == 1, zeros = zeros && p[j] == 0;
      if (ones) return 0;
      if (zeros) return 1;
    }
    int64_t on = 0;
    if (m.sl == 1) {
      for (int64_t j = 0; j < nc; ++j) on += p[j] != 0;
    } else {
      for (int64_t j = 0; j < nc; ++j) on += p[j * m.sl] != 0;
    }
    if (on == 0) return 1;
    if (on == n) return 0;
    for (int64_t j = 0; j < n; ++j) bias[j] = j < nc && p[j * m.sl] != 0 ? 0.f : kNegInf;
    return 2;
  }
  if (m.f) {
    const float* p = m.f + j0 * m.sl;
    bool zero = nc == n, dead = true;
    for (int64_t j = 0; j < nc; ++j) {
      const float a = p[j * m.sl];
      const bool off = a <= std::numeric_limits<float>::lowest();  // masked out (reference.valid_keys)
      bias[j] = off ? kNegInf : a * kLog2e;
      zero = zero && a == 0.f;
      dead = dead && off;
    }
    for (int64_t j = nc; j < n; ++j) bias[j] = kNegInf;
    return dead ? 1 : zero ? 0 : 2;
  }
  if (nc == n) return 0;
  for (int64_t j = 0; j < n; ++j) bias[j] = j < nc ? 0.f : kNegInf;
  return 2;
}

struct PrefillArgs {
  const float* q;
  const float* kt;  // [B, Hkv, nblk, d, kKeyBlock]: K transposed per key block, zero-padded past L
  const float* v;
  const MaskView* mask;
  int64_t H, Hkv, G, T, L, d, dv, TQ, ntiles, nblk;
  float qscale;  // scale * log2(e)
  bool is_causal;
  float* out;
};

// S[MR rows][NV vectors of keys] = Qp rows · Kt columns, over d. Kt is d-major [d][kKeyBlock].
template <class V, int MR, int NV>
inline __attribute__((always_inline)) void QkTile(const float* qp, int64_t d, const float* kt, float* s) {
  constexpr int Ln = Lanes<V>();
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = V{};
  RankUpdates<V, MR, NV>(acc, d, [qp, d](int r, int64_t i) { return qp[r * d + i]; },
                         [kt](int64_t i) { return kt + i * kKeyBlock; });
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) Store<V>(s + r * kKeyBlock + c * Ln, acc[r][c]);
}

// O[MR rows][NV vectors from column c0] = O * alpha[row] + Σ_j P[row][j] · V row j, j < nk.
template <class V, int MR, int NV>
inline __attribute__((always_inline)) void PvTile(float* o, int64_t dv, int64_t c0, const float* alpha,
                                                  const float* p, const float* vb, int64_t nk) {
  constexpr int Ln = Lanes<V>();
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const V a = Splat<V>(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = Load<V>(o + r * dv + c0 + c * Ln) * a;
  }
  RankUpdates<V, MR, NV>(acc, nk, [p](int r, int64_t j) { return p[r * kKeyBlock + j]; },
                         [vb, dv, c0](int64_t j) { return vb + j * dv + c0; });
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) Store<V>(o + r * dv + c0 + c * Ln, acc[r][c]);
}

// One work item: (row b, KV head hk, query tile). Rows r = tl*G + g (position t0 + tl, query head hk*G + g),
// padded to a multiple of MR with rows that mask every key. Scratch: thread-local, grown on demand.
template <class V, int MR, int NVK, int NVO>
inline __attribute__((always_inline)) void PrefillItem(const PrefillArgs& a, size_t it) {
  constexpr int Ln = Lanes<V>();
  static_assert(kKeyBlock % (NVK * Ln) == 0, "key tile must divide the block");
  const int64_t G = a.G, T = a.T, L = a.L, d = a.d, dv = a.dv, BK = kKeyBlock;
  const int64_t qt = static_cast<int64_t>(it) % a.ntiles, bk = static_cast<int64_t>(it) / a.ntiles;
  const int64_t b = bk / a.Hkv, hk = bk % a.Hkv;
  const int64_t t0 = qt * a.TQ, nq = std::min(a.TQ, T - t0), R = nq * G, Rp = (R + MR - 1) / MR * MR;
  Tls& tls = ThreadScratch();
  float* qp = Grow(tls.f0, static_cast<size_t>(Rp * d + 2 * Rp * BK + Rp * dv + 3 * Rp));
  float* s = qp + Rp * d;         // [Rp][BK]: logits, then probabilities
  float* bias = s + Rp * BK;      // [Rp][BK]: additive mask of mixed rows (log2 units)
  float* o = bias + Rp * BK;      // [Rp][dv]: unnormalised output
  float* m = o + Rp * dv;         // running max (log2 units)
  float* l = m + Rp;              // running sum
  float* alpha = l + Rp;          // this block's rescale of o
  uint8_t* st = Grow(tls.u0, static_cast<size_t>(Rp));
  MaskRow* mr = Grow(tls.masks, static_cast<size_t>(Rp));
  for (int64_t r = 0; r < Rp; ++r) {
    const int64_t tl = r / G, g = r % G, h = hk * G + g;
    float* qr = qp + r * d;
    if (r < R) {
      const float* src = a.q + ((b * a.H + h) * T + t0 + tl) * d;
      for (int64_t i = 0; i < d; ++i) qr[i] = src[i] * a.qscale;
      mr[r] = RowOf(*a.mask, b, h, t0 + tl, a.is_causal);
    } else {
      std::memset(qr, 0, d * sizeof(float));
    }
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  std::memset(o, 0, Rp * dv * sizeof(float));
  const float* Kt = a.kt + (b * a.Hkv + hk) * a.nblk * d * BK;
  const float* Vh = a.v + (b * a.Hkv + hk) * L * dv;
  const int64_t jend = a.is_causal ? std::min(L, t0 + nq) : L;  // is_causal: no key after the last position
  const int64_t cfull = dv / (NVO * Ln) * (NVO * Ln), cvec = dv / Ln * Ln;
  uint64_t scored = 0, kv_rows = 0;
  for (int64_t j0 = 0; j0 < jend; j0 += BK) {
    const int64_t nk = std::min(BK, jend - j0);
    bool any = false;
    for (int64_t r = 0; r < Rp; ++r) {
      if (r >= R) {
        st[r] = 1;
      } else if (r % G > 0 && SameRow(mr[r], mr[r - 1])) {  // a mask broadcast over heads: the group's rows agree
        st[r] = st[r - 1];
        if (st[r] == 2) std::memcpy(bias + r * BK, bias + (r - 1) * BK, nk * sizeof(float));
      } else {
        st[r] = static_cast<uint8_t>(ClassifyRow(mr[r], j0, nk, bias + r * BK));
      }
      any = any || st[r] != 1;
    }
    if (!any) continue;
    kv_rows += static_cast<uint64_t>(nk);
    const float* kt = Kt + (j0 / BK) * d * BK;  // logits past nk (zero keys) are masked below
    // S = Q·Kᵀ, skipping micro-tiles whose rows all mask the block out
    auto live = [&](int64_t r0) {
      for (int64_t r = r0; r < r0 + MR; ++r)
        if (st[r] != 1) return true;
      return false;
    };
    for (int64_t r0 = 0; r0 < Rp; r0 += MR) {
      if (!live(r0)) continue;
      for (int64_t c0 = 0; c0 < BK; c0 += NVK * Ln) QkTile<V, MR, NVK>(qp + r0 * d, d, kt + c0, s + r0 * BK + c0);
    }
    // online softmax, row by row
    for (int64_t r = 0; r < Rp; ++r) {
      float* sr = s + r * BK;
      if (st[r] == 1) {  // nothing allowed here: this block adds nothing to the row
        alpha[r] = 1.f;
        std::memset(sr, 0, BK * sizeof(float));
        continue;
      }
      if (st[r] == 2) {
        const float* br = bias + r * BK;
        for (int64_t j = 0; j < nk; ++j) sr[j] += br[j];
        for (int64_t j = 0; j < nk; ++j) scored += br[j] != kNegInf;
      } else {
        scored += static_cast<uint64_t>(nk);
      }
      for (int64_t j = nk; j < BK; ++j) sr[j] = kNegInf;
      V mx = V{} + kNegInf;
      for (int64_t j = 0; j < BK; j += Ln) {
        const V x = Load<V>(sr + j);
        mx = x > mx ? x : mx;  // a NaN logit is passed over here and poisons the sum below
      }
      float mnew = m[r];
      for (int i = 0; i < Ln; ++i) mnew = mx[i] > mnew ? mx[i] : mnew;
      if (mnew == kNegInf) {  // every key so far masked out (only -inf additive terms): p = 0
        alpha[r] = 1.f;
        std::memset(sr, 0, BK * sizeof(float));
        continue;
      }
      const V mv = Splat<V>(mnew);
      V sum = V{};
      for (int64_t j = 0; j < BK; j += Ln) {
        const V p = Exp2<V>(Load<V>(sr + j) - mv);
        Store<V>(sr + j, p);
        sum += p;
      }
      float ssum = 0.f;
      for (int i = 0; i < Ln; ++i) ssum += sum[i];
      alpha[r] = m[r] == kNegInf ? 0.f : std::exp2(m[r] - mnew);
      l[r] = l[r] * alpha[r] + ssum;
      m[r] = mnew;
    }
    // O = O·alpha + P·V
    const float* vb = Vh + j0 * dv;
    for (int64_t r0 = 0; r0 < Rp; r0 += MR) {
      if (!live(r0)) continue;
      int64_t c0 = 0;
      for (; c0 < cfull; c0 += NVO * Ln) PvTile<V, MR, NVO>(o + r0 * dv, dv, c0, alpha + r0, s + r0 * BK, vb, nk);
      for (; c0 < cvec; c0 += Ln) PvTile<V, MR, 1>(o + r0 * dv, dv, c0, alpha + r0, s + r0 * BK, vb, nk);
      for (int64_t r = r0; r < r0 + MR; ++r)
        for (int64_t c = cvec; c < dv; ++c) {
          float acc = o[r * dv + c] * alpha[r];
          for (int64_t j = 0; j < nk; ++j) acc += s[r * BK + j] * vb[j * dv + c];
          o[r * dv + c] = acc;
        }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t tl = r / G, g = r % G;
    float* dst = a.out + ((b * a.H + hk * G + g) * T + t0 + tl) * dv;
    const float* src = o + r * dv;
    if (!(l[r] > 0.f)) {  // all masked out: zeros; a NaN logit: NaN (the reference)
      for (int64_t c = 0; c < dv; ++c) dst[c] = l[r] == 0.f ? 0.f : kNaN;
      continue;
    }
    const float inv = 1.f / l[r];
    for (int64_t c = 0; c < dv; ++c) dst[c] = src[c] * inv;
  }
  Stats& stats = GlobalStats();
  stats.attn_keys_scored.fetch_add(scored, std::memory_order_relaxed);
  stats.attn_kv_rows_read.fetch_add(kv_rows, std::memory_order_relaxed);
}

using PrefillFn = void (*)(const PrefillArgs&, size_t);

// Register budgets: AVX-512 (32 zmm): 6 rows x 4 vectors (64 keys / 64 output columns) = 24 accumulators;
// AVX2 (16 ymm) and baseline (16 xmm): 6 rows x 2 vectors = 12.
void PrefillBase(const PrefillArgs& a, size_t it) { PrefillItem<vf4, 6, 2, 2>(a, it); }
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
__attribute__((target("arch=x86-64-v3"))) void PrefillV3(const PrefillArgs& a, size_t it) {
  PrefillItem<v8, 6, 2, 2>(a, it);
}
__attribute__((target("arch=x86-64-v4"))) void PrefillV4(const PrefillArgs& a, size_t it) {
  PrefillItem<vf16, 6, 4, 4>(a, it);
}
#endif

// The variant PrefillKernel picks (the same test of IsaLevel).
const char* PrefillIsa() {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
  return IsaName(IsaLevel());
#else
  return IsaName(0);
#endif
}

PrefillFn PrefillKernel() {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
  if (IsaLevel() == 4) return PrefillV4;
  if (IsaLevel() == 3) return PrefillV3;
#endif
  return PrefillBase;
}

}  // namespace

void AttendPrefill(const float* q, const float* k, const float* v, const MaskView& mask, int64_t B, int64_t H,
                   int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv, float scale, bool is_causal,
                   float* out, AttnScratch& scratch, const Parallel& par) {
  if (B == 0 || T == 0) return;
  // K transposed once per key block (d-major, so the micro-GEMM broadcasts a q element against a vector of keys):
  // packing it per tile instead cost as much as a third of the q·k work.
  const int64_t BK = kKeyBlock, nblk = (L + BK - 1) / BK;
  float* kt = Grow(scratch.kt, static_cast<size_t>(B * Hkv * nblk * d * BK));
  auto pack = [&](size_t it) {
    const int64_t bh = static_cast<int64_t>(it) / nblk, j0 = static_cast<int64_t>(it) % nblk * BK;
    const int64_t nk = std::min(BK, L - j0);
    const float* K = k + (bh * L + j0) * d;
    float* dst = kt + static_cast<int64_t>(it) * d * BK;
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < nk; ++j) dst[i * BK + j] = K[j * d + i];
      for (int64_t j = nk; j < BK; ++j) dst[i * BK + j] = 0.f;
    }
  };
  par.For(static_cast<size_t>(B * Hkv * nblk), pack);
  PrefillArgs a;
  a.q = q, a.kt = kt, a.v = v, a.mask = &mask, a.out = out, a.nblk = nblk;
  a.H = H, a.Hkv = Hkv, a.G = H / Hkv, a.T = T, a.L = L, a.d = d, a.dv = dv;
  a.TQ = std::min(T, std::max<int64_t>(1, (kTileRows + a.G - 1) / a.G));
  a.ntiles = (T + a.TQ - 1) / a.TQ;
  a.qscale = scale * kLog2e;
  a.is_causal = is_causal;
  static const PrefillFn fn = PrefillKernel();
  NoteIsa(kIsaPrefill, PrefillIsa());
  auto item = [&](size_t it) { fn(a, it); };
  par.For(static_cast<size_t>(B * Hkv * a.ntiles), item);
}

}  // namespace solm
