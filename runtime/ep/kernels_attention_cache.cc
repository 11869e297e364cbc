// QuestAttention on a pre-allocated KV cache (kernels.h: QuestAttentionCache): append the new rows in place, then
// attend over the valid rows where they lie. The layout's rationale is in README.md ("KV cache").
#include "kernels_util.h"

namespace solm {

namespace {

// dst[i] = src[i] as the cache's element type (half: rounded to nearest even). With F16C, 4 at a time through
// vcvtps2ph (imm 0: nearest even, as FloatToHalf; inline asm on xmm, so this target-free file needs no AVX): the
// software conversion cost ~10 ns an element, 0.1-0.2 ms a SmolLM2 decode step.
inline void StoreRow(void* dst, bool f16, int64_t at, const float* src, int64_t n) {
  if (f16) {
    uint16_t* o = static_cast<uint16_t*>(dst) + at;
    static const bool f16c = __builtin_cpu_supports("f16c");
    int64_t i = 0;
    if (f16c)
      for (; i + 4 <= n; i += 4) {
        vf4 x;
        __builtin_memcpy(&x, src + i, sizeof(x));
        asm("vcvtps2ph $0, %1, %0" : "=m"(*reinterpret_cast<char(*)[8]>(o + i)) : "x"(x));
      }
    for (; i < n; ++i) o[i] = FloatToHalf(src[i]);
  } else {
    std::memcpy(static_cast<float*>(dst) + at, src, n * sizeof(float));
  }
}

// dst[i] = src[at + i] as float (half: exact). With F16C, 4 at a time through vcvtph2ps, as StoreRow: the software
// conversion made a chunked prefill's gather of the past rows ~10 % of a serving step.
inline void LoadRows(float* dst, const void* src, bool f16, int64_t at, int64_t n) {
  if (f16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + at;
    static const bool f16c = __builtin_cpu_supports("f16c");
    int64_t i = 0;
    if (f16c)
      for (; i + 4 <= n; i += 4) {
        vf4 x;
        asm("vcvtph2ps %1, %0" : "=x"(x) : "m"(*reinterpret_cast<const char(*)[8]>(s + i)));
        __builtin_memcpy(dst + i, &x, sizeof(x));
      }
    for (; i < n; ++i) dst[i] = HalfToFloat(s[i]);
  } else {
    std::memcpy(dst, static_cast<const float*>(src) + at, n * sizeof(float));
  }
}

}  // namespace

void QuestAttentionCache(const float* q, const float* k_new, const float* v_new, const KvCache& c,
                         const MaskView& mask, const float* kappa, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                         int64_t d, int64_t dv, const QuestParams& p, float* out, AttnScratch& scratch,
                         const Parallel& par, const PageState* state) {
  const int64_t C = c.capacity, past = c.past, L = past + T;
  const size_t es = c.f16 ? 2 : 4;
  // per (row, KV head): the past rows when the present cache is another buffer, then the new rows at the row's own
  // length (step protocol 2: rows may differ)
  auto append = [&](size_t it) {
    const int64_t o = static_cast<int64_t>(it);  // b * Hkv + hk
    const int64_t pb = c.lengths != nullptr ? c.lengths[o / Hkv] : past;
    if (c.past_k != nullptr && c.past_k != c.k)
      std::memcpy(static_cast<char*>(c.k) + o * C * d * es, static_cast<const char*>(c.past_k) + o * C * d * es,
                  pb * d * es);
    if (c.past_v != nullptr && c.past_v != c.v)
      std::memcpy(static_cast<char*>(c.v) + o * C * dv * es, static_cast<const char*>(c.past_v) + o * C * dv * es,
                  pb * dv * es);
    StoreRow(c.k, c.f16, (o * C + pb) * d, k_new + o * T * d, T * d);
    StoreRow(c.v, c.f16, (o * C + pb) * dv, v_new + o * T * dv, T * dv);
  };
  const bool copies = (c.past_k != nullptr && c.past_k != c.k) || (c.past_v != nullptr && c.past_v != c.v);
  if (T == 1 && !copies)  // one row per item written in place: less work than waking a thread for it
    for (int64_t it = 0; it < B * Hkv; ++it) append(static_cast<size_t>(it));
  else
    par.For(static_cast<size_t>(B * Hkv), append);

  if (T == 1) {  // decode: read the cache where it lies
    KvView kv;
    kv.k = c.k, kv.v = c.v, kv.f16 = c.f16, kv.stride = C;
    if (c.lengths != nullptr) {  // each row attends over its own valid rows
      int64_t* lens = Grow(scratch.lens, static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) lens[b] = c.lengths[b] + T;
      kv.lengths = lens;
    }
    QuestAttentionView(q, kv, mask, kappa, B, H, Hkv, T, L, d, dv, p, out, scratch, par, state);
    return;
  }
  // prefill (and other multi-token calls, every row of the same length: ort_kernels.cc checks): the dense path reads
  // tight fp32 tensors, so gather the valid rows once (exactly the values the cache now holds: after rounding, for
  // half)
  float* kf = Grow(scratch.kf, static_cast<size_t>(B * Hkv * L * d));
  float* vf = Grow(scratch.vf, static_cast<size_t>(B * Hkv * L * dv));
  auto gather = [&](size_t it) {
    const int64_t o = static_cast<int64_t>(it);
    LoadRows(kf + o * L * d, c.k, c.f16, o * C * d, L * d);
    LoadRows(vf + o * L * dv, c.v, c.f16, o * C * dv, L * dv);
  };
  par.For(static_cast<size_t>(B * Hkv), gather);
  QuestAttention(q, kf, vf, mask, kappa, B, H, Hkv, T, L, d, dv, p, out, scratch, par, state);
}

}  // namespace solm
