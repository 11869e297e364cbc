// Compute of QuestAttention and QuestAttentionRope (ort_kernels.h): the mask, the KV cache buffers and the page
// state borrowed from the kernel context, then kernels.h's QuestAttention.
#include "ort_kernels.h"

#include <cmath>

namespace solm_ep {

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

}  // namespace solm_ep
