// The per-token selections and the output quantisation that SparseMLP (kernels_mlp.cc), SparseMLPBlocks
// (kernels_mlp_blocks_op.cc, _h.cc) and QuestAttention's page choice (kernels_attention_select.h) share: the k-th
// largest, TopK's threshold and mask (reference.topk_channels_ref), and SOL's fake quantisation
// (reference.fake_quant_ref). Declared in kernels_util.h.
#include "kernels_util.h"

namespace solm {

namespace {

// Order-preserving keys of x's float bits, in place (larger float, larger key; -0 and +0 are apart here, equal below).
SOLM_INLINE uint32_t* FloatKeys(float* x, int64_t n) {
  typedef uint32_t u32a __attribute__((may_alias));
  u32a* key = reinterpret_cast<u32a*>(x);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = key[i];
    key[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return key;
}

// The float whose key is u.
inline float KeyFloat(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The k-th largest key by radix select: 8 bits a pass from the top, each pass keeping (compacted, branch-free) only
// the keys of the bucket that holds the k-th. No data-dependent branches (std::nth_element's comparisons
// mispredicted about half the time).
uint32_t KthKeyRadix(uint32_t* key, int64_t n, int64_t k) {
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
    if (n == 1) return key[0];  // the k-th is the one key left (k == 1 now)
  }
  return prefix;
}

// The k-th largest key bit by bit from the top: t is the largest value with at least k keys >= t, which is the k-th
// key itself. The bits above the highest one in which the smallest and largest keys differ are every key's; each
// bit below is one counting pass (a compare and an add per key, 16 keys an AVX-512 instruction). One thread, warm,
// half of n kept: 256 page scores 0.76 -> 0.55 us, 1536 |h| 3.2 -> 1.9 us against the radix select (whose counters
// wait on each other's stores). Under AVX2 it was no faster than the radix, so only the AVX-512 variant uses it.
SOLM_INLINE uint32_t KthKeyBitsBody(uint32_t* key, int64_t n, int64_t k) {
  uint32_t lo = ~0u, hi = 0;
  for (int64_t i = 0; i < n; ++i) lo = key[i] < lo ? key[i] : lo, hi = key[i] > hi ? key[i] : hi;
  if (lo == hi) return lo;
  const int top = 31 - __builtin_clz(lo ^ hi);  // the bits above it are every key's
  uint32_t t = top == 31 ? 0u : lo & ~((2u << top) - 1u);
  for (int b = top; b >= 0; --b) {
    const uint32_t cand = t | (1u << b);
    uint32_t c = 0;
    for (int64_t i = 0; i < n; ++i) c += key[i] >= cand;
    if (c >= static_cast<uint64_t>(k)) t = cand;
  }
  return t;
}

#ifdef SOLM_ISA_VARIANTS
SOLM_TARGET_V4 uint32_t KthKeyBitsV4(uint32_t* key, int64_t n, int64_t k) { return KthKeyBitsBody(key, n, k); }
#endif

}  // namespace

// The k-th largest (1 <= k <= n) of x[0, n), overwriting x: the bit-by-bit search under AVX-512, the radix select
// otherwise (the same value either way). The result is the k-th value in float order (-0 and +0 are equal there
// and for the callers' >= tests alike).
float KthLargest(float* x, int64_t n, int64_t k) {
  uint32_t* key = FloatKeys(x, n);
#ifdef SOLM_ISA_VARIANTS
  static const int isa = IsaLevel();
  if (isa == 4) return KeyFloat(KthKeyBitsV4(key, n, k));
#endif
  return KeyFloat(KthKeyRadix(key, n, k));
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
