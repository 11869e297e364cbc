// The per-token selections and the output quantisation that SparseMLP (kernels_mlp.cc), SparseMLPBlocks
// (kernels_mlp_blocks_op.cc, _h.cc) and QuestAttention's page choice (kernels_attention_select.h) share: the k-th
// largest by radix select, TopK's threshold and mask (reference.topk_channels_ref), and SOL's fake quantisation
// (reference.fake_quant_ref). Declared in kernels_util.h.
#include "kernels_util.h"

namespace solm {

// The k-th largest (1 <= k <= n) of x[0, n), overwriting x. A radix select on order-preserving keys of the float
// bits, 8 bits a pass from the top, each pass keeping (compacted, branch-free) only the keys of the bucket that
// holds the k-th: no data-dependent branches (std::nth_element's comparisons mispredicted about half the time,
// ~5 % of a sparse decode step at ctx 2048 with its 270 selections over 256 pages; TopK's over h, ~2 %). The result
// is the k-th value in float order (-0 and +0 are equal there and for the callers' >= tests alike).
float KthLargest(float* x, int64_t n, int64_t k) {
  typedef uint32_t u32a __attribute__((may_alias));
  u32a* key = reinterpret_cast<u32a*>(x);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = key[i];
    key[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  uint32_t prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t cnt[256] = {};
    for (int64_t i = 0; i < n; ++i) ++cnt[(key[i] >> shift) & 255u];
    uint32_t bucket = 255;
    for (; bucket > 0 && cnt[bucket] < static_cast<uint64_t>(k); --bucket) k -= cnt[bucket];
    prefix |= bucket << shift;
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      key[m] = key[i];
      m += ((key[i] >> shift) & 255u) == bucket;
    }
    n = m;
    if (n == 1) {  // the k-th is the one key left (k == 1 now)
      prefix = key[0];
      break;
    }
  }
  const uint32_t u = (prefix & 0x80000000u) ? (prefix & 0x7fffffffu) : ~prefix;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// TopK's threshold for rho < 1: the ceil(rho*D)-th largest |x| (tmp [D] overwritten).
float TopKThreshold(const float* x, int64_t D, double rho, float* tmp) {
  const double kd = std::ceil(rho * static_cast<double>(D) - 1e-9);
  int64_t kk = kd >= static_cast<double>(D) ? D : (kd > 1 ? static_cast<int64_t>(kd) : 1);
  for (int64_t c = 0; c < D; ++c) tmp[c] = std::fabs(x[c]);
  return KthLargest(tmp, D, kk);
}

// Keep the ceil(rho*D) channels of largest |x| (ties at the threshold kept), zero the rest
// (reference.topk_channels_ref). Returns the number of non-zero channels written. xs may be x (in place).
int64_t TopK(const float* x, int64_t D, double rho, float* xs, float* tmp) {
  if (rho >= 1.0) {
    int64_t nz = 0;
    for (int64_t c = 0; c < D; ++c) {
      xs[c] = x[c];
      nz += x[c] != 0.f;
    }
    return nz;
  }
  const float thr = TopKThreshold(x, D, rho, tmp);
  int64_t nz = 0;
  for (int64_t c = 0; c < D; ++c) {
    const bool keep = std::fabs(x[c]) >= thr;
    xs[c] = keep ? x[c] : 0.f;
    nz += xs[c] != 0.f;
  }
  return nz;
}

// Symmetric per-token fake quantisation, q_max = 2^(b-1)-1; b >= 16 is the identity (reference.fake_quant_ref).
void FakeQuant(float* y, int64_t n, double bits) {
  if (bits >= 16) return;
  const double rb = std::nearbyint(bits);  // Python round(): half to even
  const float qmax = static_cast<float>(std::pow(2.0, rb - 1.0) - 1.0);
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(y[i]));
  const float s = amax / qmax;
  if (s == 0.f) return;
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(y[i] / s);  // torch.round: half to even
    r = std::min(std::max(r, -qmax), qmax);
    y[i] = r * s;
  }
}

void FakeQuantTokens(float* y, int64_t B, int64_t T, int64_t Dout, const float* bits, const Parallel& par) {
  bool any_quant = false;
  for (int64_t b = 0; b < B; ++b) any_quant = any_quant || static_cast<double>(bits[b]) < 16;
  if (!any_quant) return;
  auto quant = [&](size_t n) {
    FakeQuant(y + static_cast<int64_t>(n) * Dout, Dout, static_cast<double>(bits[static_cast<int64_t>(n) / T]));
  };
  par.For(static_cast<size_t>(B * T), quant);
}

}  // namespace solm
