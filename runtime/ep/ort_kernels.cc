// Compute of the ai.solm op kernels (ort_kernels.h): kernel-context inputs and outputs -> kernels.h.
#include "ort_kernels.h"

#include <cmath>
#include <limits>

namespace solm_ep {

namespace {

void ParallelLaunch(void* impl, size_t n, void (*fn)(void*, size_t), void* arg) {
  auto* kc = static_cast<const OrtKernelContext*>(impl);
  if (OrtStatus* s = g_ort->KernelContext_ParallelFor(kc, fn, n, 0, arg)) {
    g_ort->ReleaseStatus(s);
    for (size_t i = 0; i < n; ++i) fn(arg, i);
  }
}

solm::Parallel MakeParallel(OrtKernelContext* kc) {
  solm::Parallel p;
  p.launch = ParallelLaunch;
  p.impl = kc;
  return p;
}

// A [B] control vector (kappa / rho / bits): one value per batch row, or one value broadcast to every row.
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

}  // namespace

solm::MaskView QuestKernel::MaskOf(const TensorRef& m, int64_t B, int64_t H, int64_t T, int64_t L) const {
  solm::MaskView mv;
  if (m.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) mv.is_bool = true;
  else if (m.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) mv.is_bool = false;
  else Fail("SolmEP: QuestAttention attn_mask must be bool or float32");
  if (m.shape.size() > 4) Fail("SolmEP: QuestAttention attn_mask rank > 4");
  int64_t dims[4] = {1, 1, 1, 1};
  const size_t off = 4 - m.shape.size();
  for (size_t i = 0; i < m.shape.size(); ++i) dims[off + i] = m.shape[i];
  const int64_t full[4] = {B, H, T, L};
  int64_t stride[4];
  int64_t acc = 1;
  for (int i = 3; i >= 0; --i) {
    if (dims[i] != 1 && dims[i] != full[i])
      Fail("SolmEP: QuestAttention attn_mask " + ShapeStr(m.shape) + " does not broadcast to [B,H,T,L] = " +
           ShapeStr(Shape{B, H, T, L}));
    stride[i] = dims[i] == 1 ? 0 : acc;
    acc *= dims[i];
  }
  mv.data = m.data;
  mv.sb = stride[0], mv.sh = stride[1], mv.st = stride[2], mv.sl = stride[3];
  return mv;
}

bool QuestKernel::CacheOf(OrtKernelContext* kc, int64_t B, int64_t Hkv, int64_t T, int64_t L, int64_t d,
                          int64_t dv, solm::KvCache* c) const {
  TensorRef pk = In(kc, 7), pv = In(kc, 8), pl = In(kc, 9);
  if (!pk.present && !pv.present && !pl.present) return false;
  if (!pk.present || !pv.present || !pl.present)
    Fail("SolmEP: QuestAttention takes past_key, past_value and past_length together (the KV cache buffer)");
  if (L != T)
    Fail("SolmEP: QuestAttention with a KV cache buffer takes the new keys only as k, got " + std::to_string(L) +
         " keys for " + std::to_string(T) + " queries");
  const bool f16 = pk.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if ((!f16 && pk.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) || pv.type != pk.type)
    Fail("SolmEP: QuestAttention past_key and past_value must both be float16 or both float32");
  if (pk.shape.size() != 4 || pk.shape[0] != B || pk.shape[1] != Hkv || pk.shape[3] != d || pv.shape.size() != 4 ||
      pv.shape[0] != B || pv.shape[1] != Hkv || pv.shape[2] != pk.shape[2] || pv.shape[3] != dv)
    Fail("SolmEP: QuestAttention KV cache buffers " + ShapeStr(pk.shape) + " / " + ShapeStr(pv.shape) +
         " are not [B,Hkv,C,d] = [" + std::to_string(B) + "," + std::to_string(Hkv) + ",C," + std::to_string(d) + "]");
  if (pl.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || pl.numel() != B)
    Fail("SolmEP: QuestAttention past_length must be int64 [B] with B=" + std::to_string(B) + ", got " +
         ShapeStr(pl.shape));
  const int64_t* len = static_cast<const int64_t*>(pl.data);
  const int64_t C = pk.shape[2];
  int64_t past = 0;
  bool equal = true;
  for (int64_t b = 0; b < B; ++b) {  // step protocol 2: each row its own length (single-token steps)
    if (len[b] < 0 || len[b] + T > C)
      Fail("SolmEP: QuestAttention KV cache overflow: past_length " + std::to_string(len[b]) + " + " +
           std::to_string(T) + " new tokens > capacity " + std::to_string(C) + " (row " + std::to_string(b) + ")");
    past = std::max(past, len[b]);
    equal = equal && len[b] == len[0];
  }
  if (!equal && T != 1)
    Fail("SolmEP: QuestAttention past_length differs between rows in a " + std::to_string(T) +
         "-token run; run a joining row's prefill on its own (B = 1, bound to its rows of the buffers)");
  if (!HasOut(3) || !HasOut(4))
    Fail("SolmEP: QuestAttention with a KV cache buffer must produce present_key and present_value");
  c->past_k = pk.data, c->past_v = pv.data;
  c->k = Out(kc, 3, pk.shape), c->v = Out(kc, 4, pv.shape);
  c->f16 = f16, c->capacity = C, c->past = past;
  c->lengths = equal ? nullptr : len;
  return true;
}

void QuestKernel::Compute(OrtKernelContext* kc) {
  const CallPool<Call>::Lease call = calls.Get();
  TensorRef q = In(kc, 0), k = In(kc, 1), v = In(kc, 2), m = In(kc, 3), kap = In(kc, 4);
  RequireFloat(q, "q");
  RequireFloat(k, "k");
  RequireFloat(v, "v");
  if (q.shape.size() != 4 || k.shape.size() != 4 || v.shape.size() != 4)
    Fail("SolmEP: QuestAttention expects q [B,H,T,d] and k/v [B,Hkv,L,d], got " + ShapeStr(q.shape) + " " +
         ShapeStr(k.shape) + " " + ShapeStr(v.shape));
  const int64_t B = q.shape[0], H = q.shape[1], T = q.shape[2], d = q.shape[3];
  const int64_t Hkv = k.shape[1], L = k.shape[2], dv = v.shape[3];
  if (k.shape[0] != B || k.shape[3] != d || v.shape[0] != B || v.shape[1] != Hkv || v.shape[2] != L || Hkv <= 0 ||
      H % Hkv != 0)
    Fail("SolmEP: QuestAttention shape mismatch q " + ShapeStr(q.shape) + " k " + ShapeStr(k.shape) + " v " +
         ShapeStr(v.shape));
  const float* kappa = RowValues(kap, B, "kappa", op, call->kappa_b);
  solm::KvCache cache;
  const bool buffered = CacheOf(kc, B, Hkv, T, L, d, dv, &cache);
  const int64_t Lk = buffered ? cache.past + T : L;  // the keys attended: the cache's valid rows after the append
  solm::MaskView mv;
  if (m.present) mv = MaskOf(m, B, H, T, Lk);
  solm::PageState ps;
  const bool stateful = PageStateOf(kc, B, Hkv, T, Lk, d, buffered ? &cache : nullptr, &ps, call->spare_state);
  float* out = Out(kc, 0, {B, H, T, dv});
  if (out == nullptr && ps.min == nullptr && !buffered) return;
  if (out == nullptr) out = Grow(call->spare_out, B * H * T * dv);  // only the page state is consumed
  if (L == 0) {  // no keys (and no pages): no allowed key, zeros as in the reference
    for (int64_t i = 0; i < B * H * T * dv; ++i) out[i] = 0.f;
    return;
  }
  if (B * H * T * dv == 0 && ps.min == nullptr && !buffered) return;
  solm::QuestParams p = params;
  if (!has_scale) p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  if (buffered) {
    solm::QuestAttentionCache(q.f(), k.f(), v.f(), cache, mv, kappa, B, H, Hkv, T, d, dv, p, out, call->scratch,
                              MakeParallel(kc), stateful ? &ps : nullptr);
    return;
  }
  solm::QuestAttention(q.f(), k.f(), v.f(), mv, kappa, B, H, Hkv, T, L, d, dv, p, out, call->scratch, MakeParallel(kc),
                       stateful ? &ps : nullptr);
}

void QuestRopeKernel::Compute(OrtKernelContext* kc) {
  const CallPool<Call>::Lease call = calls.Get();
  TensorRef x = In(kc, 0), c = In(kc, 1), s = In(kc, 2), m = In(kc, 3), kap = In(kc, 4);
  RequireFloat(x, "qkv");
  RequireFloat(c, "cos");
  RequireFloat(s, "sin");
  const int64_t H = num_heads, Hkv = kv_num_heads, heads = H + 2 * Hkv;
  if (x.shape.size() != 3 || x.shape[2] % heads != 0 || (x.shape[2] / heads) % 2 != 0)
    Fail("SolmEP: QuestAttentionRope expects qkv [B,T,(H+2Hkv)·d] with H=" + std::to_string(H) + ", Hkv=" +
         std::to_string(Hkv) + " and d even, got " + ShapeStr(x.shape));
  const int64_t B = x.shape[0], T = x.shape[1], d = x.shape[2] / heads;
  if (c.shape != s.shape || c.shape.size() != 3 || (c.shape[0] != B && c.shape[0] != 1) || c.shape[1] != T ||
      c.shape[2] != d / 2)
    Fail("SolmEP: QuestAttentionRope cos/sin " + ShapeStr(c.shape) + " / " + ShapeStr(s.shape) +
         " are not [B|1,T,d/2] = [" + std::to_string(B) + "," + std::to_string(T) + "," + std::to_string(d / 2) + "]");
  const float* kappa = RowValues(kap, B, "kappa", op, call->kappa_b);
  solm::KvCache cache;
  if (!CacheOf(kc, B, Hkv, T, T, d, d, &cache))
    Fail("SolmEP: QuestAttentionRope needs the KV cache buffer (past_key, past_value, past_length)");
  const int64_t Lk = cache.past + T;
  solm::MaskView mv;
  if (m.present) mv = MaskOf(m, B, H, T, Lk);
  solm::PageState ps;
  const bool stateful = PageStateOf(kc, B, Hkv, T, Lk, d, &cache, &ps, call->spare_state);
  float* out = Out(kc, 0, {B, T, H * d});
  if (out == nullptr) out = Grow(call->spare_out, B * H * T * d);  // only the caches are consumed
  if (B * T == 0) return;
  solm::QuestParams p = params;
  if (!has_scale) p.scale = 1.0f / std::sqrt(static_cast<float>(d));
  solm::Rotary rot;
  rot.cos = c.f(), rot.sin = s.f(), rot.row_stride = c.shape[0] == 1 ? 0 : T * (d / 2), rot.interleaved = interleaved;
  solm::QuestAttentionRope(x.f(), rot, cache, mv, kappa, B, H, Hkv, T, d, p, out, call->scratch, MakeParallel(kc),
                           stateful ? &ps : nullptr);
}

bool QuestKernel::PageStateOf(OrtKernelContext* kc, int64_t B, int64_t Hkv, int64_t T, int64_t L, int64_t d,
                              const solm::KvCache* cache, solm::PageState* ps, std::vector<float>& spare_state) const {
  TensorRef mn = In(kc, 5), mx = In(kc, 6);
  if (mn.present != mx.present) Fail("SolmEP: QuestAttention takes past_page_min and past_page_max together");
  const int64_t S = params.page_size, P = (L + S - 1) / S;
  // step protocol 2: with a KV cache buffer of C rows, page state of C/S pages is the buffer form (kernels.h:
  // PageState), written in place at each row's own pages like the KV rows
  const int64_t Pc = cache != nullptr && cache->capacity % S == 0 ? cache->capacity / S : -1;
  if (mn.present && Pc > 0 && mn.shape.size() == 4 && mn.shape == mx.shape && mn.shape[0] == B &&
      mn.shape[1] == Hkv && mn.shape[2] == Pc && mn.shape[3] == d) {
    // float32 pages (protocol 2), or IEEE half pages over an fp16 cache (protocol 3): exactly the same values
    const auto f16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    ps->f16 = cache->f16 && mn.type == f16 && mx.type == f16;
    if (!ps->f16) {
      RequireFloat(mn, "past_page_min");
      RequireFloat(mx, "past_page_max");
    }
    ps->past_min = mn.f(), ps->past_max = mx.f(), ps->stride = Pc;
    ps->min = Out(kc, 1, mn.shape);
    ps->max = Out(kc, 2, mx.shape);
    if (ps->min == nullptr || ps->max == nullptr)
      Fail("SolmEP: QuestAttention with page state buffers must produce present_page_min and present_page_max");
    return true;
  }
  if (cache != nullptr && cache->lengths != nullptr && mn.present && mn.shape.size() == 4 && mn.shape[2] > 0)
    Fail("SolmEP: QuestAttention rows of different past_length need the page state as buffers [B,Hkv,C/S,d] = [" +
         std::to_string(B) + "," + std::to_string(Hkv) + "," + std::to_string(Pc) + "," + std::to_string(d) +
         "] (step protocol 2), got " + ShapeStr(mn.shape));
  if (mn.present) {
    RequireFloat(mn, "past_page_min");
    RequireFloat(mx, "past_page_max");
    const int64_t L_past = L - T;
    const int64_t P_past = mn.shape.size() == 4 ? mn.shape[2] : -1;
    const bool ok = mn.shape == mx.shape && P_past >= 0 && mn.shape[1] == Hkv && mn.shape[3] == d &&
                    (P_past == 0 || (mn.shape[0] == B && L_past >= 0 && P_past == (L_past + S - 1) / S));
    if (!ok)
      Fail("SolmEP: QuestAttention past_page_min/max " + ShapeStr(mn.shape) + " / " + ShapeStr(mx.shape) +
           " are not the pages of the " + std::to_string(L_past) + " past keys: expected [" + std::to_string(B) +
           "," + std::to_string(Hkv) + ",ceil(L_past/" + std::to_string(S) + ")," + std::to_string(d) +
           "] or an empty [*," + std::to_string(Hkv) + ",0," + std::to_string(d) + "]");
    if (P_past > 0) ps->past_min = mn.f(), ps->past_max = mx.f(), ps->P_past = P_past;
  }
  ps->min = Out(kc, 1, {B, Hkv, P, d});
  ps->max = Out(kc, 2, {B, Hkv, P, d});
  if ((ps->min == nullptr) != (ps->max == nullptr)) {  // one of the two consumed: the other goes to scratch
    float* spare = Grow(spare_state, B * Hkv * P * d);
    if (ps->min == nullptr) ps->min = spare;
    else ps->max = spare;
  }
  return mn.present || ps->min != nullptr;
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
