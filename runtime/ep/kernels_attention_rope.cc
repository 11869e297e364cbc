// QuestAttentionRope (kernels.h): the packed q/k/v projection in, heads split and rotated here, QuestAttentionCache,
// the heads written back beside each other. It replaces, per layer, the graph's Reshape, Transpose, Split, two
// RotaryEmbedding nodes, and the Transpose and Reshape after attention (passes/fuse_rope_attention.py): on a one-token
// decode step each of those was an onnxruntime dispatch around a few hundred floats of work.
//
// The rotation is plain scalar code, the same in every ISA variant: std::fma rounds once, as onnxruntime's MLAS
// RotaryEmbedding kernel does (y1 = fma(x1, cos, -(x2·sin)), y2 = fma(x1, sin, x2·cos), the products inside rounded),
// so q and k are bit-identical to the RotaryEmbedding nodes' outputs, and nothing depends on the thread count.
#include <cmath>

#include "kernels_util.h"

namespace solm {

namespace {

// One head row of d values rotated as ONNX RotaryEmbedding (c, s: its d/2 angles' cosines and sines).
inline void Rotate(const float* x, const float* c, const float* s, int64_t d, bool interleaved, float* y) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float x1 = x[a], x2 = x[b];
    y[a] = std::fma(x1, c[i], -(x2 * s[i]));
    y[b] = std::fma(x1, s[i], x2 * c[i]);
  }
}

}  // namespace

void QuestAttentionRope(const float* qkv, const Rotary& rot, const KvCache& cache, const MaskView& mask,
                        const float* kappa, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t d,
                        const QuestParams& p, float* out, AttnScratch& scratch, const Parallel& par,
                        const PageState* state) {
  const int64_t N = (H + 2 * Hkv) * d, half = d / 2;
  float* q = Grow(scratch.rq, static_cast<size_t>(B * H * T * d));    // [B, H, T, d]
  float* k = Grow(scratch.rk, static_cast<size_t>(B * Hkv * T * d));  // [B, Hkv, T, d]
  float* v = Grow(scratch.rv, static_cast<size_t>(B * Hkv * T * d));  // [B, Hkv, T, d]
  // one token (b, t): its q and k heads rotated, its v heads copied, each to its head-major place
  auto unpack = [&](size_t it) {
    const int64_t b = static_cast<int64_t>(it) / T, t = static_cast<int64_t>(it) % T;
    const float* x = qkv + static_cast<int64_t>(it) * N;  // [H + 2Hkv, d]
    const float* c = rot.cos + b * rot.row_stride + t * half;
    const float* s = rot.sin + b * rot.row_stride + t * half;
    for (int64_t h = 0; h < H; ++h) Rotate(x + h * d, c, s, d, rot.interleaved, q + ((b * H + h) * T + t) * d);
    for (int64_t h = 0; h < Hkv; ++h) {
      Rotate(x + (H + h) * d, c, s, d, rot.interleaved, k + ((b * Hkv + h) * T + t) * d);
      std::memcpy(v + ((b * Hkv + h) * T + t) * d, x + (H + Hkv + h) * d, d * sizeof(float));
    }
  };
  if (T == 1)  // a decode step: ~1k floats, less work than waking a thread
    for (int64_t it = 0; it < B; ++it) unpack(static_cast<size_t>(it));
  else
    par.For(static_cast<size_t>(B * T), unpack);

  // [B, H, 1, d] is [B, 1, H·d]: decode writes the output where it goes
  float* o = T == 1 ? out : Grow(scratch.ro, static_cast<size_t>(B * H * T * d));
  QuestAttentionCache(q, k, v, cache, mask, kappa, B, H, Hkv, T, d, d, p, o, scratch, par, state);
  if (T == 1) return;
  auto to_tokens = [&](size_t it) {  // token (b, t): out[b, t, h·d : (h+1)·d] = o[b, h, t, :]
    const int64_t b = static_cast<int64_t>(it) / T, t = static_cast<int64_t>(it) % T;
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(out + (static_cast<int64_t>(it) * H + h) * d, o + ((b * H + h) * T + t) * d, d * sizeof(float));
  };
  par.For(static_cast<size_t>(B * T), to_tokens);
}

}  // namespace solm
