// The low-bit block layouts SolmEP repacks a node's weights into at Compile, lossless: BlockMatrix (SparseMLPBlocks'
// gate/up/down and LinearBlocks; the layout is described in kernels_mlp_blocks.cc, the int8 nibble order in
// kernels_mlp_blocks_int8.cc) and BlockRows (skip="h"'s transposed down, kernels_mlp_blocks_h.cc). The kernels
// that read them live beside those descriptions.
#include "kernels_util.h"

namespace solm {

void BlockMatrix::Set(const uint8_t* src, const float* scale_, const float* offset_, int64_t N_, int64_t K_,
                      int bits_, bool int8) {
  N = N_, K = K_, bits = bits_, nb = K / kBlock, Np = (N + kRows - 1) / kRows * kRows;
  int8_layout = int8 && bits == 4;
  half = false;
  scale_h.clear(), offset_h.clear();
  uint8_t sb8[kBlock / 2];  // int8_layout: a row's block re-paired, byte 4j+i = input 8j+i (low) | 8j+4+i (high)
  const int64_t gb = GroupBytes(), src_row = nb * kBlock * bits / 8;
  codes.assign(static_cast<size_t>(nb * Np / kRows * gb), 0);
  scale.assign(static_cast<size_t>(nb * Np), 0.f);
  offset.assign(static_cast<size_t>(nb * Np), 0.f);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* s = src + n * src_row;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* g = codes.data() + (b * (Np / kRows) + n / kRows) * gb;
      const uint8_t* sb = s + b * kBlock * bits / 8;
      if (int8_layout) {
        auto code = [&](int64_t k) { return (sb[k / 2] >> (4 * (k % 2))) & 15; };
        for (int64_t j = 0; j < kBlock / 8; ++j)
          for (int64_t i = 0; i < 4; ++i)
            sb8[4 * j + i] = static_cast<uint8_t>(code(8 * j + i) | code(8 * j + 4 + i) << 4);
        sb = sb8;
      }
      for (int64_t j = 0; j < kBlock * bits / 32; ++j) std::memcpy(g + j * kRows * 4 + n % kRows * 4, sb + 4 * j, 4);
      scale[b * Np + n] = scale_[n * nb + b];
      offset[b * Np + n] = offset_[n * nb + b];
    }
  }
  if (!int8) return;
  // half when lossless: every scale and offset comes back from half unchanged (NaN never does: it stays fp32)
  std::vector<uint16_t> sh(scale.size()), oh(offset.size());
  for (size_t i = 0; i < scale.size(); ++i) {
    sh[i] = FloatToHalf(scale[i]), oh[i] = FloatToHalf(offset[i]);
    if (!(HalfToFloat(sh[i]) == scale[i]) || !(HalfToFloat(oh[i]) == offset[i])) return;
  }
  half = true;
  scale_h.swap(sh), offset_h.swap(oh);
  std::vector<float>().swap(scale), std::vector<float>().swap(offset);
}

void BlockRows::Set(const uint8_t* codes_, const float* scale_, const float* offset_, int64_t I_, int64_t D_,
                    int bits_) {
  I = I_, D = D_, bits = bits_, nb = D / kBlock;
  const int64_t cb = CodeBytes();
  codes.assign(static_cast<size_t>(I * RowBytes()), 0);
  scale.assign(scale_, scale_ + I * nb);
  offset.assign(offset_, offset_ + I * nb);
  for (int64_t j = 0; j < I; ++j)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* dst = codes.data() + (j * nb + b) * cb;
      const uint8_t* src = codes_ + (j * nb + b) * cb;
      if (bits == 8) {
        std::memcpy(dst, src, static_cast<size_t>(cb));
      } else {
        auto code = [&](int64_t k) { return (src[k / 2] >> (4 * (k % 2))) & 15; };
        for (int64_t i = 0; i < kBlock / 2; ++i) dst[i] = static_cast<uint8_t>(code(i) | code(i + kBlock / 2) << 4);
      }
    }
}

}  // namespace solm
