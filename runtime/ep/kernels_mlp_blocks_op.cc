// SparseMLPBlocks and LinearBlocks, the ops on low-bit block weights (kernels.h): per token the top-k channels and
// block sums, gate/up, the activation and the down projection, in work items over the block kernels of
// kernels_mlp_blocks.cc (fp32 activations) and kernels_mlp_blocks_int8.cc (int8), with skip="h"'s down in
// kernels_mlp_blocks_h.cc / _hg.cc. The layout and the arithmetic are described in kernels_mlp_blocks.cc.
#include "kernels_util.h"

namespace solm {

namespace {

constexpr int64_t kChunkGroups = 16;  // row groups (256 rows) per work item: each block column streams 4-8 KiB
constexpr int64_t kTokTile = 32;      // tokens per multi-token work item

// Per token: the block sums and non-zero flags of a [N, K] input (K a multiple of 32).
void BlockSums(const float* x, int64_t n, int64_t K, float* xsum, uint8_t* nz) {
  const int64_t nb = K / BlockMatrix::kBlock;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + t * K + b * BlockMatrix::kBlock;
      float s = 0.f;
      bool any = false;
      for (int64_t k = 0; k < BlockMatrix::kBlock; ++k) s += xb[k], any |= xb[k] != 0.f;
      xsum[t * nb + b] = s;
      nz[t * nb + b] = any;
    }
}

// y rows [g0, g1) (groups) of tokens [n0, n0+nt): y + t*ys, x [.., K] with its block sums.
void Apply(const BlockKernels& K, const BlockMatrix& W, const float* x, const float* xsum, const uint8_t* nz,
           int64_t n0, int64_t nt, int64_t g0, int64_t g1, float* y, int64_t ys) {
  BlockIn in[kTokTile];
  for (int64_t t = 0; t < nt; ++t)
    in[t] = BlockIn{x + (n0 + t) * W.K, xsum + (n0 + t) * W.nb, nz + (n0 + t) * W.nb};
  if (nt == 1) K.gemv(W, in[0], g0, g1, y);
  else K.gemm(W, in, nt, g0, g1, y, ys);
}

// The same with int8 activations: q [.., K], d/xsum/nz [.., nb].
void ApplyQ(const BlockInt8Kernels& K, const BlockMatrix& W, const int8_t* q, const float* d, const float* xsum,
            const uint8_t* nz, int64_t n0, int64_t nt, int64_t g0, int64_t g1, float* y, int64_t ys) {
  BlockQIn in[kTokTile];
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t n = n0 + t;
    in[t] = BlockQIn{q + n * W.K, d + n * W.nb, xsum + n * W.nb, nz + n * W.nb};
  }
  if (nt == 1) K.gemv(W, in[0], g0, g1, y);
  else K.gemm(W, in, nt, g0, g1, y, ys);
}

}  // namespace

void SparseMlpBlocks(const float* x, int64_t B, int64_t T, const MlpBlockWeights& W, const float* rho,
                     const float* bits, Act act, float* y, MlpBlockScratch& sc, const Parallel& par) {
  Stats& st = GlobalStats();
  st.mlp_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t N = B * T, D = W.up.K, I = W.up.N, Dout = W.Dout();
  const bool hskip = W.skip_h;  // rho keeps units of h (gate/up dense; kernels_mlp_blocks_h.cc), not channels of x
  if (N == 0) return;
  // skip="h" with down in its source layout too: rows at rho >= 1 take the skip="x" down on all of h (`full`).
  // Under int8 with the regrouped 4-bit copy (DownG), two or more tokens at rho < 1 take it too, on their h masked to
  // the kept units (`masked`): one GEMM streams down once for all of them (the union of their kept blocks), where
  // DownG gathers each token's kept units. The same floats either way (kernels_mlp_blocks_hg.cc).
  int64_t nsparse = 0;
  for (int64_t b = 0; b < B && hskip; ++b) nsparse += rho[b] < 1.f ? T : 0;
  const bool gemm_h = hskip && W.int8 && W.down_dense && !W.down_g.empty() && nsparse >= 2;
  auto full = [&](int64_t n) { return !hskip || (W.down_dense && rho[n / T] >= 1.f); };
  auto masked = [&](int64_t n) { return gemm_h && rho[n / T] < 1.f; };
  auto dense = [&](int64_t n) { return full(n) || masked(n); };
  bool any_dense = false, all_dense = true;
  for (int64_t b = 0; b < B; ++b) any_dense |= dense(b * T), all_dense &= dense(b * T);
  const BlockKernels& K = Blocks();
  const BlockInt8Kernels& KQ = BlocksInt8();
  const bool q8 = W.int8;
  if (q8) NoteIsa(kIsaMlpBlocksInt8, KQ.isa);
  else NoteIsa(kIsaMlpBlocks, K.isa);
  if (hskip) NoteIsa(kIsaMlpBlocks, BlocksH().isa);  // its down projection (fp32 h in either mode)
  if (hskip && q8 && !W.down_g.empty()) NoteIsa(kIsaMlpBlocksInt8, BlocksHG().isa);  // or the regrouped source's
  const int64_t nbD = D / BlockMatrix::kBlock, nbI = I / BlockMatrix::kBlock, Ip = W.up.Np;
  const int64_t Dp = any_dense ? W.down.Np : Dout;
  float* xs = Grow(sc.xs, static_cast<size_t>(N * D));
  float* xsum = Grow(sc.xsum, static_cast<size_t>(N * nbD));
  uint8_t* xnz = Grow(sc.xnz, static_cast<size_t>(N * nbD));
  float* h = Grow(sc.h, static_cast<size_t>(N * Ip));
  float* hsum = Grow(sc.hsum, static_cast<size_t>(N * nbI));
  uint8_t* hnz = Grow(sc.hnz, static_cast<size_t>(N * nbI));
  float* yp = Grow(sc.y, static_cast<size_t>(N * Dp));
  int8_t* xq = q8 ? Grow(sc.xq, static_cast<size_t>(N * D)) : nullptr;
  int8_t* hq = q8 && any_dense ? Grow(sc.hq, static_cast<size_t>(N * I)) : nullptr;
  float* xd = q8 ? Grow(sc.xd, static_cast<size_t>(N * nbD)) : nullptr;
  float* hd = q8 ? Grow(sc.hd, static_cast<size_t>(N * nbI)) : nullptr;
  st.mlp_in_rows_dense.fetch_add(static_cast<uint64_t>(N * D), std::memory_order_relaxed);
  st.mlp_down_rows_dense.fetch_add(static_cast<uint64_t>(N * I), std::memory_order_relaxed);

  // A: per token the top-k channels and the input's block sums.
  const int64_t ntile = (N + kTokTile - 1) / kTokTile;
  auto select = [&](size_t it) {
    const int64_t n0 = static_cast<int64_t>(it) * kTokTile, nt = std::min(kTokTile, N - n0);
    float* tmp = Grow(ThreadScratch().f0, static_cast<size_t>(D));
    uint64_t rows = 0;
    for (int64_t n = n0; n < n0 + nt; ++n)
      rows += static_cast<uint64_t>(TopK(x + n * D, D, hskip ? 1.0 : static_cast<double>(rho[n / T]), xs + n * D,
                                         tmp));
    BlockSums(xs + n0 * D, nt, D, xsum + n0 * nbD, xnz + n0 * nbD);
    if (q8)
      for (int64_t n = n0; n < n0 + nt; ++n) KQ.quant(xs + n * D, nbD, xq + n * D, xd + n * nbD, xsum + n * nbD);
    st.mlp_in_rows.fetch_add(rows, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(ntile), select);

  // B: gate and up of a chunk of 64 rows for a tile of tokens, then the activation of those rows.
  const int64_t chunksI = (Ip / BlockMatrix::kRows + kChunkGroups - 1) / kChunkGroups;
  auto up = [&](size_t it) {
    const int64_t c = static_cast<int64_t>(it) % chunksI, n0 = static_cast<int64_t>(it) / chunksI * kTokTile;
    const int64_t nt = std::min(kTokTile, N - n0);
    const int64_t g0 = c * kChunkGroups, g1 = std::min(g0 + kChunkGroups, Ip / BlockMatrix::kRows);
    const int64_t r0 = g0 * BlockMatrix::kRows, r1 = std::min(g1 * BlockMatrix::kRows, I);
    float* gbuf = Grow(ThreadScratch().f1, static_cast<size_t>(kTokTile * Ip));
    // up rows go straight to h (each token's row of h at stride Ip); gate rows to gbuf at the same offsets
    if (q8) {
      ApplyQ(KQ, W.up, xq, xd, xsum, xnz, n0, nt, g0, g1, h + n0 * Ip, Ip);
      if (W.gated) ApplyQ(KQ, W.gate, xq, xd, xsum, xnz, n0, nt, g0, g1, gbuf, Ip);
    } else {
      Apply(K, W.up, xs, xsum, xnz, n0, nt, g0, g1, h + n0 * Ip, Ip);
      if (W.gated) Apply(K, W.gate, xs, xsum, xnz, n0, nt, g0, g1, gbuf, Ip);
    }
    for (int64_t t = 0; t < nt; ++t) {
      float* hr = h + (n0 + t) * Ip;
      const float* gr = gbuf + t * Ip;
      for (int64_t i = r0; i < r1; ++i) {
        const float u = hr[i] + (W.b_up.empty() ? 0.f : W.b_up[i]);
        hr[i] = W.gated ? Activate(act, gr[i] + (W.b_gate.empty() ? 0.f : W.b_gate[i])) * u : Activate(act, u);
      }
      if (q8 && full(n0 + t)) {  // these rows' blocks of h (r0, r1 multiples of 32): sums and int8, for down
        const int64_t n = n0 + t, b0 = r0 / BlockMatrix::kBlock;
        BlockSums(hr + r0, 1, r1 - r0, hsum + n * nbI + b0, hnz + n * nbI + b0);
        KQ.quant(hr + r0, (r1 - r0) / BlockMatrix::kBlock, hq + n * I + r0, hd + n * nbI + b0, hsum + n * nbI + b0);
      }
    }
  };
  par.For(static_cast<size_t>(chunksI * ntile), up);

  // gemm_h: each token at rho < 1 keeps the top-k units of h (TopK's rule, as SparseMlpBlocksDownH keeps them), the
  // others set to 0 in place (only the int8 blocks below are read from here on), then its int8 blocks for down.
  auto mask = [&](size_t it) {
    const int64_t n = static_cast<int64_t>(it);
    if (!masked(n)) return;
    float* hr = h + n * Ip;
    const float thr = TopKThreshold(hr, I, static_cast<double>(rho[n / T]), Grow(ThreadScratch().f0, size_t(I)));
    for (int64_t j = 0; j < I; ++j) hr[j] = std::fabs(hr[j]) >= thr ? hr[j] : 0.f;
    BlockSums(hr, 1, I, hsum + n * nbI, hnz + n * nbI);
    KQ.quant(hr, nbI, hq + n * I, hd + n * nbI, hsum + n * nbI);
  };
  if (gemm_h) par.For(static_cast<size_t>(N), mask);

  // h's block sums (the down projection's input; padding rows of h are never read: nbI blocks of I).
  auto hsums = [&](size_t it) {
    const int64_t n0 = static_cast<int64_t>(it) * kTokTile, nt = std::min(kTokTile, N - n0);
    for (int64_t n = n0; n < n0 + nt; ++n) BlockSums(h + n * Ip, 1, I, hsum + n * nbI, hnz + n * nbI);
  };
  if (!all_dense) {  // a mixed batch runs both (the rows at rho >= 1 overwritten below)
    SparseMlpBlocksDownH(h, Ip, N, T, I, Dout, W, rho, y, sc, par);
    if (!any_dense) return FakeQuantTokens(y, B, T, Dout, bits, par);
  }
  if (!q8) par.For(static_cast<size_t>(ntile), hsums);
  uint64_t hnonzero = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < nbI && dense(n); ++i) hnonzero += hnz[n * nbI + i];
  (hskip ? st.mlp_down_dense_rows : st.mlp_down_rows).fetch_add(hnonzero * BlockMatrix::kBlock,
                                                                 std::memory_order_relaxed);

  // C: down projection, same items; h rows are Ip apart (BlockIn reads K = I of them).
  const int64_t chunksD = (Dp / BlockMatrix::kRows + kChunkGroups - 1) / kChunkGroups;
  auto down = [&](size_t it) {
    const int64_t c = static_cast<int64_t>(it) % chunksD, n0 = static_cast<int64_t>(it) / chunksD * kTokTile;
    const int64_t nt = std::min(kTokTile, N - n0);
    const int64_t g0 = c * kChunkGroups, g1 = std::min(g0 + kChunkGroups, Dp / BlockMatrix::kRows);
    if (q8) {
      ApplyQ(KQ, W.down, hq, hd, hsum, hnz, n0, nt, g0, g1, yp + n0 * Dp, Dp);
    } else {
      BlockIn in[kTokTile];
      for (int64_t t = 0; t < nt; ++t) in[t] = BlockIn{h + (n0 + t) * Ip, hsum + (n0 + t) * nbI, hnz + (n0 + t) * nbI};
      if (nt == 1) K.gemv(W.down, in[0], g0, g1, yp + n0 * Dp);
      else K.gemm(W.down, in, nt, g0, g1, yp + n0 * Dp, Dp);
    }
    const int64_t r0 = g0 * BlockMatrix::kRows, r1 = std::min(g1 * BlockMatrix::kRows, Dout);
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t j = r0; j < r1 && dense(n0 + t); ++j)
        y[(n0 + t) * Dout + j] = yp[(n0 + t) * Dp + j] + (W.b_down.empty() ? 0.f : W.b_down[j]);
  };
  par.For(static_cast<size_t>(chunksD * ntile), down);

  // D: per token fake quantisation.
  FakeQuantTokens(y, B, T, Dout, bits, par);
}

void LinearBlocks(const float* x, int64_t n, const BlockMatrix& W, bool int8, const float* bias, float* y,
                  LinearBlockScratch& sc, const Parallel& par) {
  if (n == 0) return;
  const BlockKernels& K = Blocks();
  const BlockInt8Kernels& KQ = BlocksInt8();
  NoteIsa(int8 ? kIsaMlpBlocksInt8 : kIsaMlpBlocks, int8 ? KQ.isa : K.isa);
  const int64_t R = BlockMatrix::kRows, nb = W.nb, N = W.N, Np = W.Np;
  float* xsum = Grow(sc.xsum, static_cast<size_t>(n * nb));
  uint8_t* xnz = Grow(sc.xnz, static_cast<size_t>(n * nb));
  int8_t* xq = int8 ? Grow(sc.xq, static_cast<size_t>(n * W.K)) : nullptr;
  float* xd = int8 ? Grow(sc.xd, static_cast<size_t>(n * nb)) : nullptr;
  const bool direct = Np == N && bias == nullptr;  // rows straight into y; else padded rows, then copied
  float* yp = direct ? y : Grow(sc.y, static_cast<size_t>(n * Np));
  const int64_t ntile = (n + kTokTile - 1) / kTokTile;
  auto prep = [&](size_t it) {  // per token: block sums, non-zero flags, the int8 blocks
    const int64_t n0 = static_cast<int64_t>(it) * kTokTile, nt = std::min(kTokTile, n - n0);
    BlockSums(x + n0 * W.K, nt, W.K, xsum + n0 * nb, xnz + n0 * nb);
    if (int8)
      for (int64_t t = n0; t < n0 + nt; ++t) KQ.quant(x + t * W.K, nb, xq + t * W.K, xd + t * nb, xsum + t * nb);
  };
  par.For(static_cast<size_t>(ntile), prep);
  // Work items of ~kGroups row groups (256 rows), an even count of equal ranges (SmolLM2's o: 36 groups, 2 items of
  // 18; qkv: 60, 4 of 15), so that two threads get equal rows. A one-token item streams its rows' slice of every
  // block column (the GEMV prefetches the next column's slice): the longer the slice the nearer to streaming speed
  // (items of 4 groups, 1 KiB slices, ran at ~15 GB/s, these at ~20-28 on one or two threads). Rows are split,
  // never sums, so the output does not depend on the items.
  constexpr int64_t kGroups = 16;
  const int64_t groups = Np / R;
  int64_t chunks = (groups + kGroups - 1) / kGroups;
  if (chunks % 2 == 1 && groups >= 2) ++chunks;
  auto rows = [&](size_t it) {
    const int64_t c = static_cast<int64_t>(it) % chunks, n0 = static_cast<int64_t>(it) / chunks * kTokTile;
    const int64_t nt = std::min(kTokTile, n - n0);
    const int64_t g0 = c * groups / chunks, g1 = (c + 1) * groups / chunks;
    if (int8) ApplyQ(KQ, W, xq, xd, xsum, xnz, n0, nt, g0, g1, yp + n0 * Np, Np);
    else Apply(K, W, x, xsum, xnz, n0, nt, g0, g1, yp + n0 * Np, Np);
    if (direct) return;
    const int64_t r0 = g0 * R, r1 = std::min(g1 * R, N);
    for (int64_t t = n0; t < n0 + nt; ++t)
      for (int64_t j = r0; j < r1; ++j) y[t * N + j] = yp[t * Np + j] + (bias != nullptr ? bias[j] : 0.f);
  };
  par.For(static_cast<size_t>(chunks * ntile), rows);
}

}  // namespace solm
