// Compute of the ai.solm op kernels (ort_kernels.h): kernel-context inputs and outputs -> kernels.h. The MLP,
// LinearBlocks and gate kernels here, QuestAttention's in ort_kernels_attention.cc.
#include "ort_kernels.h"

#include <cmath>

namespace solm_ep {

namespace {

void ParallelLaunch(void* impl, size_t n, void (*fn)(void*, size_t), void* arg) {
  auto* kc = static_cast<const OrtKernelContext*>(impl);
  if (OrtStatus* s = g_ort->KernelContext_ParallelFor(kc, fn, n, 0, arg)) {
    g_ort->ReleaseStatus(s);
    for (size_t i = 0; i < n; ++i) fn(arg, i);
  }
}

}  // namespace

solm::Parallel MakeParallel(OrtKernelContext* kc) {
  solm::Parallel p;
  p.launch = ParallelLaunch;
  p.impl = kc;
  return p;
}

const float* RowValues(const TensorRef& t, int64_t B, const char* what, const std::string& op,
                       std::vector<float>& broadcast) {
  if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail("SolmEP: " + op + " input '" + what + "' must be float32");
  const int64_t n = t.numel();
  if (n == B) return t.f();
  if (n == 1) {
    broadcast.assign(static_cast<size_t>(B), t.f()[0]);
    return broadcast.data();
  }
  Fail("SolmEP: " + op + " input '" + what + "' has " + std::to_string(n) + " values for batch " +
       std::to_string(B));
}

void MlpKernel::SetWeights(const TensorRef& wg, const TensorRef& bg, const TensorRef& wu, const TensorRef& bu,
                           const TensorRef& wd, const TensorRef& bd, solm::MlpWeights& into) const {
  auto need_float = [&](const TensorRef& t, const char* what) {
    if (t.present && t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      Fail("SolmEP: SparseMLP " + std::string(what) + " must be float32");
  };
  need_float(wg, "w_gate"), need_float(bg, "b_gate"), need_float(wu, "w_up"), need_float(bu, "b_up");
  need_float(wd, "w_down"), need_float(bd, "b_down");
  if (!wu.present || !wd.present) Fail("SolmEP: SparseMLP needs w_up and w_down");
  if (wu.shape.size() != 2 || wd.shape.size() != 2) Fail("SolmEP: SparseMLP weights must be 2-D");
  const int64_t I = wu.shape[0], D = wu.shape[1], Dout = wd.shape[0];
  if (wd.shape[1] != I) Fail("SolmEP: SparseMLP w_down " + ShapeStr(wd.shape) + " does not match w_up " + ShapeStr(wu.shape));
  if (wg.present && wg.shape != wu.shape) Fail("SolmEP: SparseMLP w_gate shape != w_up shape");
  if (bg.present && bg.numel() != I) Fail("SolmEP: SparseMLP b_gate must have I values");
  if (bu.present && bu.numel() != I) Fail("SolmEP: SparseMLP b_up must have I values");
  if (bd.present && bd.numel() != Dout) Fail("SolmEP: SparseMLP b_down must have Dout values");
  into.Set(wg.present ? wg.f() : nullptr, bg.present ? bg.f() : nullptr, wu.f(), bu.present ? bu.f() : nullptr,
              wd.f(), bd.present ? bd.f() : nullptr, D, I, Dout);
  into.skip_h = skip_h;
}

void MlpKernel::Compute(OrtKernelContext* kc) {
  const CallPool<Call>::Lease call = calls.Get();
  if (!weights_ready)  // weights are graph inputs (not constants): re-layout on every call, into this call's state
    SetWeights(In(kc, 1), In(kc, 2), In(kc, 3), In(kc, 4), In(kc, 5), In(kc, 6), call->weights);
  const solm::MlpWeights& weights = weights_ready ? this->weights : call->weights;
  TensorRef x = In(kc, 0), rho = In(kc, 7), bits = In(kc, 8);
  RequireFloat(x, "x");
  if (x.shape.size() != 3 || x.shape[2] != weights.D)
    Fail("SolmEP: SparseMLP x must be [B,T,D] with D=" + std::to_string(weights.D) + ", got " + ShapeStr(x.shape));
  const int64_t B = x.shape[0], T = x.shape[1];
  const float* r = RowValues(rho, B, "rho", op, call->rho_b);
  const float* b = RowValues(bits, B, "bits", op, call->bits_b);
  float* y = Out(kc, 0, {B, T, weights.Dout});
  if (y == nullptr) return;
  solm::SparseMlp(x.f(), B, T, weights, r, b, act, y, call->scratch, MakeParallel(kc));
}

void MlpBlocksKernel::SetWeights(const TensorRef* t) {
  if (block_size != solm::BlockMatrix::kBlock) Fail("SolmEP: SparseMLPBlocks block_size must be 32");
  // Checks one matrix's operands; returns its N and nb (codes [N, nb, 32·bits/8]).
  auto operands = [&](size_t at, int bits, const char* what) {
    const TensorRef &c = t[at], &s = t[at + 1], &o = t[at + 2];
    const std::string w = what;
    if (bits != 4 && bits != 8) Fail("SolmEP: SparseMLPBlocks bits_" + w + " must be 4 or 8");
    if (!c.present || !s.present || !o.present)
      Fail("SolmEP: SparseMLPBlocks needs codes, scale and offset of " + w);
    if (c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) Fail("SolmEP: SparseMLPBlocks codes_" + w + " must be uint8");
    RequireFloat(s, "scale");
    RequireFloat(o, "offset");
    if (c.shape.size() != 3 || c.shape[2] != solm::BlockMatrix::kBlock * bits / 8)
      Fail("SolmEP: SparseMLPBlocks codes_" + w + " must be [N, K/32, " + std::to_string(32 * bits / 8) + "], got " +
           ShapeStr(c.shape));
    const int64_t N = c.shape[0], nb = c.shape[1];
    if (s.shape != Shape{N, nb} || o.shape != Shape{N, nb})
      Fail("SolmEP: SparseMLPBlocks scale/offset of " + w + " must be [" + std::to_string(N) + "," +
           std::to_string(nb) + "]");
    return std::pair<int64_t, int64_t>(N, nb);
  };
  auto matrix = [&](size_t at, int bits, const char* what, solm::BlockMatrix& m) {
    const auto [N, nb] = operands(at, bits, what);
    m.Set(static_cast<const uint8_t*>(t[at].data), t[at + 1].f(), t[at + 2].f(), N, nb * solm::BlockMatrix::kBlock,
          bits, weights.int8);
  };
  auto bias = [&](const TensorRef& b, int64_t n, const char* what, std::vector<float>& into) {
    into.clear();
    if (!b.present) return;
    RequireFloat(b, what);
    if (b.numel() != n) Fail(std::string("SolmEP: SparseMLPBlocks ") + what + " must have " + std::to_string(n) + " values");
    into.assign(b.f(), b.f() + n);
  };
  solm::MlpBlockWeights& W = weights;
  W.gated = t[0].present;
  matrix(4, bits_up, "up", W.up);
  W.down_dense = t[12].present || t[13].present || t[14].present;
  if (W.down_dense && !W.skip_h) Fail("SolmEP: SparseMLPBlocks codes_down_dense is for skip=h only");
  if (W.skip_h) {  // down given transposed: [I, D/32, ..] blocks of W_downᵀ; maybe also as given (rho >= 1 rows)
    const auto [I, nb] = operands(8, bits_down, "down");
    // int8 with a 4-bit copy: every row reads the copy (rho >= 1 as given, rho < 1 regrouped below), so downᵀ is
    // never read and only its shape is kept (no repacked copy: ~1/4 of the MLP's resident bytes, work at Compile)
    const bool regroup = t[12].present && weights.int8 && bits_down_dense == 4;
    W.down_t = solm::BlockRows{};
    if (regroup) W.down_t.I = I, W.down_t.D = nb * solm::BlockRows::kBlock, W.down_t.nb = nb, W.down_t.bits = bits_down;
    else W.down_t.Set(static_cast<const uint8_t*>(t[8].data), t[9].f(), t[10].f(), I, nb * solm::BlockRows::kBlock,
                      bits_down);
    W.down = solm::BlockMatrix{};
    if (W.down_dense) matrix(12, bits_down_dense, "down_dense", W.down);
    if (W.down_dense && (W.down.N != W.down_t.D || W.down.K != I))
      Fail("SolmEP: SparseMLPBlocks down_dense must be [" + std::to_string(W.down_t.D) + ", " + std::to_string(I) +
           "], the transpose of down");
    W.down_g = solm::DownGroups{};
    if (regroup)  // rows at rho < 1 on the source's down too (shape checked above)
      W.down_g.Set(static_cast<const uint8_t*>(t[12].data), t[13].f(), t[14].f(), W.down.N, I);
  } else {
    matrix(8, bits_down, "down", W.down);
  }
  if (W.gated) {
    matrix(0, bits_gate, "gate", W.gate);
    if (W.gate.N != W.up.N || W.gate.K != W.up.K) Fail("SolmEP: SparseMLPBlocks gate and up shapes differ");
  }
  if (W.skip_h && W.down_t.I != W.up.N)
    Fail("SolmEP: SparseMLPBlocks skip=h: down (transposed) has " + std::to_string(W.down_t.I) + " rows, up has N=" +
         std::to_string(W.up.N));
  if (!W.skip_h && W.down.K != W.up.N)
    Fail("SolmEP: SparseMLPBlocks down has K=" + std::to_string(W.down.K) + ", up has N=" + std::to_string(W.up.N));
  bias(t[3], W.up.N, "b_gate", W.b_gate);
  bias(t[7], W.up.N, "b_up", W.b_up);
  bias(t[11], W.Dout(), "b_down", W.b_down);
  if (!W.gated) W.b_gate.clear();
}

void MlpBlocksKernel::Compute(OrtKernelContext* kc) {
  const CallPool<Call>::Lease call = calls.Get();
  TensorRef x = In(kc, 0), rho = In(kc, 13), bits = In(kc, 14);
  RequireFloat(x, "x");
  if (x.shape.size() != 3 || x.shape[2] != weights.up.K)
    Fail("SolmEP: SparseMLPBlocks x must be [B,T,D] with D=" + std::to_string(weights.up.K) + ", got " +
         ShapeStr(x.shape));
  const int64_t B = x.shape[0], T = x.shape[1];
  const float* r = RowValues(rho, B, "rho", op, call->rho_b);
  const float* b = RowValues(bits, B, "bits", op, call->bits_b);
  float* y = Out(kc, 0, {B, T, weights.Dout()});
  if (y == nullptr) return;
  solm::SparseMlpBlocks(x.f(), B, T, weights, r, b, act, y, call->scratch, MakeParallel(kc));
}

void LinearBlocksKernel::SetWeights(const TensorRef* t) {
  if (block_size != solm::BlockMatrix::kBlock) Fail("SolmEP: LinearBlocks block_size must be 32");
  if (bits != 4 && bits != 8) Fail("SolmEP: LinearBlocks bits must be 4 or 8");
  const TensorRef &c = t[0], &s = t[1], &o = t[2], &b = t[3];
  if (c.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) Fail("SolmEP: LinearBlocks codes must be uint8");
  RequireFloat(s, "scale");
  RequireFloat(o, "offset");
  if (c.shape.size() != 3 || c.shape[2] != solm::BlockMatrix::kBlock * bits / 8)
    Fail("SolmEP: LinearBlocks codes must be [N, K/32, " + std::to_string(32 * bits / 8) + "], got " +
         ShapeStr(c.shape));
  const int64_t N = c.shape[0], nb = c.shape[1];
  if (s.shape != Shape{N, nb} || o.shape != Shape{N, nb})
    Fail("SolmEP: LinearBlocks scale/offset must be [" + std::to_string(N) + "," + std::to_string(nb) + "]");
  weights.Set(static_cast<const uint8_t*>(c.data), s.f(), o.f(), N, nb * solm::BlockMatrix::kBlock, bits, int8);
  bias.clear();
  if (!b.present) return;
  RequireFloat(b, "bias");
  if (b.numel() != N) Fail("SolmEP: LinearBlocks bias must have " + std::to_string(N) + " values");
  bias.assign(b.f(), b.f() + N);
}

void LinearBlocksKernel::Compute(OrtKernelContext* kc) {
  const CallPool<Call>::Lease call = calls.Get();
  TensorRef x = In(kc, 0);
  RequireFloat(x, "x");
  if (x.shape.size() < 1 || x.shape[x.shape.size() - 1] != weights.K)
    Fail("SolmEP: LinearBlocks x must be [.., K] with K=" + std::to_string(weights.K) + ", got " + ShapeStr(x.shape));
  Shape ys = x.shape;
  ys.d[ys.n - 1] = weights.N;
  float* y = Out(kc, 0, ys);
  if (y == nullptr) return;
  solm::LinearBlocks(x.f(), x.numel() / weights.K, weights, int8, bias.empty() ? nullptr : bias.data(), y,
                     call->scratch, MakeParallel(kc));
}

void GateKernel::Compute(OrtKernelContext* kc) {
  TensorRef ids = In(kc, 0), past = In(kc, 1);
  if (ids.shape.size() < 2) Fail("SolmEP: GateControls input_ids must be [B,T]");
  if (past.shape.size() < 3) Fail("SolmEP: GateControls past_key must have rank >= 3 ([B,Hkv,Lpast,d])");
  const int64_t T = ids.shape[1], B = ids.shape[0];
  const int64_t L = past.shape[2] + T;
  // step protocol 2: past_length [B] (optional) gates each row by its own length; else every row by the cache's
  TensorRef pl = In(kc, 5);
  const int64_t* len = nullptr;
  if (pl.present) {
    if (pl.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || pl.numel() != B)
      Fail("SolmEP: GateControls past_length must be int64 [B] with B=" + std::to_string(B) + ", got " +
           ShapeStr(pl.shape));
    len = static_cast<const int64_t*>(pl.data);
  }
  const float dense[3] = {1.f, 1.f, 16.f};
  for (size_t i = 0; i < 3; ++i) {
    TensorRef c = In(kc, 2 + i);
    RequireFloat(c, i == 0 ? "kappa" : i == 1 ? "rho" : "bits");
    float* o = Out(kc, i, c.shape);
    if (o == nullptr) continue;  // output not consumed (left out of the fused node)
    const int64_t n = c.numel();
    if (len != nullptr && n != B)
      Fail("SolmEP: GateControls with past_length needs one control per row, got " + ShapeStr(c.shape));
    for (int64_t j = 0; j < n; ++j) {
      const bool active = T == 1 && (len != nullptr ? len[j] + T : L) > min_len;
      o[j] = active ? c.f()[j] : dense[i];
    }
  }
}

}  // namespace solm_ep
