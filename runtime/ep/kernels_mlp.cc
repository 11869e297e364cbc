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

constexpr int64_t kTokBlock = 8;   // tokens per selection block (the union of kept channels; the sparse unit)
// Dense multi-token calls (prefill): token blocks per GEMM item, 128 tokens. With one item per 8-token block
// every 3.5 MiB gate/up slice (SmolLM2) was streamed from L3 128 times per layer at 1024 tokens; an item of 128
// tokens keeps a tile of weight rows in L1 while all its tokens pass over it.
constexpr int64_t kSuperBlock = 16;
constexpr int64_t kTile = 64;      // output columns per dense GEMM tile (a multiple of every variant's tile width)
constexpr int64_t kColChunk = MlpWeights::kPanel;  // output columns per work item = one weight panel

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

// The dense GEMMs' coefficients for the tokens [n0, n0+nt) of x [N, width] over the union rows[0, nu): x itself
// when the union is every channel (stride width), else the nu union channels gathered into buf [nt, nu].
const float* UnionCoefficients(const float* x, int64_t n0, int64_t nt, int64_t width, const int32_t* rows,
                               int64_t nu, float* buf, int64_t* stride) {
  if (nu == width) {
    *stride = width;
    return x + n0 * width;
  }
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t u = 0; u < nu; ++u) buf[t * nu + u] = x[(n0 + t) * width + rows[u]];
  *stride = nu;
  return buf;
}

// Dense gate/up (+ activation) of the tokens [n0, n0+nt) (the token blocks [blk0, blk0+nb)) over slice sl, as
// one GEMM: the rows are the union U of the blocks' kept channels (a token that dropped one gets a zero
// coefficient, exact as in MlpUpItem), the columns are taken a kTile-wide gate tile and its up tile at a time,
// so the accumulators of all nt tokens for one tile stay in L1/L2 and the activation is applied per tile.
// Returns false, doing nothing, when the tokens are too sparse for it (then MlpUpItem runs per token block).
bool MlpUpDense(const MlpWeights& W, const float* xs, const int32_t* uidx, const int32_t* ucnt, int64_t blk0,
                int64_t nb, int64_t n0, int64_t nt, int64_t sl, Act act, float* h) {
  const int64_t D = W.D, I = W.I, parts = W.parts;
  Tls& tls = ThreadScratch();
  uint8_t* in = Grow(tls.u0, static_cast<size_t>(D));
  int32_t* rows = Grow(tls.i0, static_cast<size_t>(D));
  std::memset(in, 0, D);
  for (int64_t blk = blk0; blk < blk0 + nb; ++blk)
    for (int32_t u = 0; u < ucnt[blk]; ++u) in[uidx[blk * D + u]] = 1;
  int64_t nu = 0;
  for (int64_t c = 0; c < D; ++c)
    if (in[c]) rows[nu++] = static_cast<int32_t>(c);
  int64_t work = 0;
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t c = 0; c < D; ++c) work += xs[(n0 + t) * D + c] != 0.f;
  if (static_cast<double>(work) < kMultiTokenFill * static_cast<double>(nt * nu)) return false;
  const int64_t accs = parts * kTile;  // accumulator floats per token: [gate tile | up tile]
  float* acc = Grow(tls.f1, static_cast<size_t>(nt * accs + (nu < D ? nt * nu : 0)));
  int64_t cs = 0;
  const float* coef = UnionCoefficients(xs, n0, nt, D, rows, nu, acc + nt * accs, &cs);
  const PanelKernels& K = Panel();
  const int64_t i0 = sl * W.slice, w = W.SliceWidth(sl), wp = MlpWeights::Padded(w);
  const float* base = W.gu_t.data() + sl * W.slice * parts;
  for (int64_t c0 = 0; c0 < w; c0 += kTile) {
    const int64_t tw = std::min(kTile, w - c0);  // real columns of the tile; the rest is zero padding
    for (int64_t part = 0; part < parts; ++part) {
      const std::vector<float>& bias = part == 0 && W.gated ? W.b_gate : W.b_up;
      for (int64_t t = 0; t < nt; ++t) {
        float* a = acc + t * accs + part * kTile;
        std::memset(a, 0, kTile * sizeof(float));
        if (!bias.empty()) std::memcpy(a, bias.data() + i0 + c0, tw * sizeof(float));
      }
      K.gemm_rows(acc + part * kTile, accs, nt, kTile, base + part * wp + c0, W.gu_stride, rows, coef, cs, nu);
    }
    for (int64_t t = 0; t < nt; ++t) {
      float* hr = h + (n0 + t) * I + i0 + c0;
      const float* g = acc + t * accs;
      const float* u = g + (parts - 1) * kTile;
      if (W.gated)
        for (int64_t i = 0; i < tw; ++i) hr[i] = Activate(act, g[i]) * u[i];
      else
        for (int64_t i = 0; i < tw; ++i) hr[i] = Activate(act, u[i]);
    }
  }
  return true;
}

// Dense down projection of the tokens [n0, n0+nt) over the output panel at column j0 (w real columns), as one
// GEMM over the union of the tokens' non-zero activations, kTile columns at a time (the zero padding of the last
// panel is skipped). Returns false, doing nothing, when too sparse (then MlpDownItem runs per token block);
// *nonzero as MlpDownItem's.
bool MlpDownDense(const MlpWeights& W, const float* h, int64_t n0, int64_t nt, int64_t j0, int64_t w, float* y,
                  uint64_t* nonzero) {
  const int64_t I = W.I, Dout = W.Dout;
  Tls& tls = ThreadScratch();
  uint8_t* in = Grow(tls.u0, static_cast<size_t>(I));
  int32_t* rows = Grow(tls.i0, static_cast<size_t>(I));
  std::memset(in, 0, I);
  int64_t work = 0;
  for (int64_t t = 0; t < nt; ++t) {
    const float* hr = h + (n0 + t) * I;
    for (int64_t i = 0; i < I; ++i) {
      const bool nz = hr[i] != 0.f;
      in[i] |= nz;
      work += nz;
    }
  }
  int64_t nu = 0;
  for (int64_t i = 0; i < I; ++i)
    if (in[i]) rows[nu++] = static_cast<int32_t>(i);
  if (static_cast<double>(work) < kMultiTokenFill * static_cast<double>(nt * nu)) return false;
  *nonzero = static_cast<uint64_t>(work);
  float* acc = Grow(tls.f1, static_cast<size_t>(nt * kColChunk + (nu < I ? nt * nu : 0)));
  int64_t cs = 0;
  const float* coef = UnionCoefficients(h, n0, nt, I, rows, nu, acc + nt * kColChunk, &cs);
  const PanelKernels& K = Panel();
  const float* panel = W.down_t.data() + j0 * I;  // panel j0/kColChunk
  for (int64_t c0 = 0; c0 < w; c0 += kTile) {
    const int64_t tw = std::min(kTile, w - c0);
    for (int64_t t = 0; t < nt; ++t) {
      float* a = acc + t * kColChunk + c0;
      std::memset(a, 0, kTile * sizeof(float));
      if (!W.b_down.empty()) std::memcpy(a, W.b_down.data() + j0 + c0, tw * sizeof(float));
    }
    K.gemm_rows(acc + c0, kColChunk, nt, kTile, panel + c0, kColChunk, rows, coef, cs, nu);
  }
  for (int64_t t = 0; t < nt; ++t) std::memcpy(y + (n0 + t) * Dout + j0, acc + t * kColChunk, w * sizeof(float));
  return true;
}

}  // namespace

const char* MlpKernelIsa() { return Panel().isa; }

void SparseMlp(const float* x, int64_t B, int64_t T, const MlpWeights& W, const float* rho, const float* bits,
               Act act, float* y, MlpScratch& sc, const Parallel& par) {
  Stats& st = GlobalStats();
  st.mlp_calls.fetch_add(1, std::memory_order_relaxed);
  const int64_t N = B * T, D = W.D, I = W.I, Dout = W.Dout;
  if (N == 0) return;
  NoteIsa(kIsaMlp, Panel().isa);  // every gate/up and down tile of this call runs Panel()'s variant
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
      const double r = W.skip_h ? 1.0 : static_cast<double>(rho[n / T]);  // h: gate/up read every channel
      rows += static_cast<uint64_t>(TopK(x + n * D, D, r, xs + n * D, tmp));
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

  // B: gate/up + activation, items (column slice, group of kSuperBlock token blocks), slice-major so a thread keeps
  // a weight slice hot: one dense GEMM over the group when its tokens keep most of the union of their channels
  // (prefill), else per token block (MlpUpItem: a block's union, or token by token).
  const int64_t ns = W.Slices(), nsb = (nblk + kSuperBlock - 1) / kSuperBlock;
  auto up = [&](size_t it) {
    const int64_t sl = static_cast<int64_t>(it) / nsb, blk0 = static_cast<int64_t>(it) % nsb * kSuperBlock;
    const int64_t nb = std::min(kSuperBlock, nblk - blk0);
    const int64_t n0 = blk0 * kTokBlock, nt = std::min(nb * kTokBlock, N - n0);
    if (nb > 1 && MlpUpDense(W, xs, uidx, ucnt, blk0, nb, n0, nt, sl, act, h)) return;
    for (int64_t blk = blk0; blk < blk0 + nb; ++blk) {
      const int64_t bn0 = blk * kTokBlock, bnt = std::min(kTokBlock, N - bn0);
      Tls& tls = ThreadScratch();
      const int64_t accn = kTokBlock * W.parts * W.slice;
      float* acc = Grow(tls.f1, static_cast<size_t>(accn + kTokBlock * D));
      int32_t* rows = Grow(tls.i0, static_cast<size_t>(D));
      MlpUpItem(W, xs, uidx + blk * D, ucnt[blk], bn0, bnt, sl, act, h, acc, acc + accn, rows);
    }
  };
  par.For(static_cast<size_t>(ns * nsb), up);

  // B': skip="h": per token keep the ⌈ρ·I⌉ units of largest |h| (TopK's rule and ties, in place, zeroing the rest),
  // so C reads only the kept units' rows of down (zero units are skipped rows). Exactly reference.sparse_mlp_ref's
  // h path up to the float rounding of h.
  if (W.skip_h) {
    auto keep_h = [&](size_t n) {
      float* hr = h + static_cast<int64_t>(n) * I;
      float* tmp = Grow(ThreadScratch().f0, static_cast<size_t>(I));
      TopK(hr, I, static_cast<double>(rho[static_cast<int64_t>(n) / T]), hr, tmp);
    };
    par.For(static_cast<size_t>(N), keep_h);
  }

  // C: down projection, items (output column panel, group of kSuperBlock token blocks), likewise.
  const int64_t nco = (Dout + kColChunk - 1) / kColChunk;
  auto down = [&](size_t it) {
    const int64_t j = static_cast<int64_t>(it) / nsb, blk0 = static_cast<int64_t>(it) % nsb * kSuperBlock;
    const int64_t nb = std::min(kSuperBlock, nblk - blk0);
    const int64_t n0 = blk0 * kTokBlock, nt = std::min(nb * kTokBlock, N - n0);
    const int64_t j0 = j * kColChunk, w = std::min(kColChunk, Dout - j0);
    uint64_t nz = 0;
    if (!(nb > 1 && MlpDownDense(W, h, n0, nt, j0, w, y, &nz))) {
      for (int64_t blk = blk0; blk < blk0 + nb; ++blk) {
        const int64_t bn0 = blk * kTokBlock, bnt = std::min(kTokBlock, N - bn0);
        Tls& tls = ThreadScratch();
        float* acc = Grow(tls.f1, static_cast<size_t>(kTokBlock * kColChunk + kTokBlock * I));
        int32_t* rows = Grow(tls.i0, static_cast<size_t>(2 * I));
        uint64_t bnz = 0;
        MlpDownItem(W, h, bn0, bnt, j0, w, y, acc, acc + kTokBlock * kColChunk, rows, &bnz);
        nz += bnz;
      }
    }
    if (j == 0) st.mlp_down_rows.fetch_add(nz, std::memory_order_relaxed);
  };
  par.For(static_cast<size_t>(nco * nsb), down);

  // D: per token fake quantisation.
  FakeQuantTokens(y, B, T, Dout, bits, par);
}

}  // namespace solm
