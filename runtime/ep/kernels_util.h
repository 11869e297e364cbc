// Helpers shared by the fp32 kernel files (kernels_attention.cc, kernels_mlp.cc): SIMD dot/axpy, the per-thread
// scratch, and the load-time ISA dispatch macro. Internal to the kernels; not part of kernels.h's contract.
#pragma once

#include "kernels.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>

// The hot per-item functions are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked at load
// time by GCC's ifunc resolver (__builtin_cpu_supports), so the library stays portable across CI machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SOLM_NO_CLONES)
#define SOLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOLM_CLONES
#endif

namespace solm {
namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline __attribute__((always_inline)) float HSum(v8 s) {
  float r = 0.f;
  for (int i = 0; i < 8; ++i) r += s[i];
  return r;
}

inline __attribute__((always_inline)) float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  v8 acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += *reinterpret_cast<const v8*>(a + i) * *reinterpret_cast<const v8*>(b + i);
    acc1 += *reinterpret_cast<const v8*>(a + i + 8) * *reinterpret_cast<const v8*>(b + i + 8);
  }
  float r = HSum(acc0 + acc1);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

inline __attribute__((always_inline)) void Axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct MaskRow {  // the mask restricted to one (b, h, t)
  const uint8_t* b = nullptr;
  const float* f = nullptr;
  int64_t sl = 0;
  int64_t jmax = INT64_MAX;  // is_causal: tokens j > jmax are masked out
};

// Thread-local temporaries for one work item (grown on demand, reused across calls).
struct Tls {
  std::vector<float> f0, f1;
  std::vector<int32_t> i0;
  std::vector<uint8_t> u0;
  std::vector<MaskRow> masks;
};
Tls& ThreadScratch() {
  thread_local Tls tls;
  return tls;
}
template <class V>
typename V::value_type* Grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace
}  // namespace solm
