// A plain C API over kernels.h for callers outside onnxruntime (solm_compile/fast_c.py: the torch.compile path's
// custom ops call it through ctypes), so both runtimes run the same kernels; and solm_ep_registered_ops, which
// reports the EP's op table (op_table.h) to Python. Raw fp32 pointers, contiguous row-major tensors unless strides
// are given; no onnxruntime symbol is used here.
//
// Threads: every call runs serially on the calling thread (torch's own intra-op pool is not reachable from here);
// scratch is thread-local, so concurrent calls from different threads are safe, also on one MLP handle (its
// weights are read-only after creation).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "kernels.h"
#include "op_table.h"

#define SOLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

solm::AttnScratch& AttnTls() {
  thread_local solm::AttnScratch s;
  return s;
}

solm::MlpScratch& MlpTls() {
  thread_local solm::MlpScratch s;
  return s;
}

// JSON string for `s` (the table's names are plain identifiers; quotes and backslashes are escaped anyway).
std::string Quoted(const char* s) {
  std::string out = "\"";
  for (; *s; ++s) {
    if (*s == '"' || *s == '\\') out += '\\';
    out += *s;
  }
  return out + "\"";
}

std::string IndexList(const std::vector<size_t>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  return out + "]";
}

std::string RegisteredOpsJson() {
  std::string out = "[";
  bool first = true;
  for (const auto& spec : solm_ep::OpSpecs()) {
    std::vector<size_t> opt_in, opt_out;
    for (size_t i = 0; i < spec.inputs.size(); ++i)
      if (spec.inputs[i].optional) opt_in.push_back(i);
    for (size_t i = spec.n_out_required; i < spec.n_out; ++i) opt_out.push_back(i);
    std::string attrs = "[";
    for (size_t i = 0; i < spec.attributes.size(); ++i) attrs += (i ? ", " : "") + Quoted(spec.attributes[i]);
    out += std::string(first ? "" : ", ") + "{\"op_type\": " + Quoted(spec.name) +
           ", \"domain\": " + Quoted(solm_ep::kDomain) +
           ", \"since_version\": " + std::to_string(solm_ep::kDomainVersion) +
           ", \"inputs\": " + std::to_string(spec.inputs.size()) + ", \"optional_inputs\": " + IndexList(opt_in) +
           ", \"outputs\": " + std::to_string(spec.n_out) + ", \"optional_outputs\": " + IndexList(opt_out) +
           ", \"attributes\": " + attrs + "]}";
    first = false;
  }
  return out + "]";
}

}  // namespace

// The ai.solm ops this library registers with onnxruntime, straight from its op table (op_table.h, the one
// solm_ep.cc registers and compiles from), as a JSON array of {"op_type", "domain", "since_version", "inputs",
// "optional_inputs", "outputs", "optional_outputs", "attributes"} (counts, optional positions, attribute names).
// The string is built once and lives as long as the library.
SOLM_EXPORT const char* solm_ep_registered_ops() {
  static const std::string json = RegisteredOpsJson();
  return json.c_str();
}

// Which ISA variant each kernel family runs, as JSON: {"selected": <the variant IsaLevel picks: the CPU capped by
// SOLM_EP_ISA>, "cap": <SOLM_EP_ISA or null>, "decode_attention": ..., "prefill_attention": ..., "sparse_mlp": ...},
// each family's value the variant ("baseline", "x86-64-v3", "x86-64-v4") its last call in this process ran, or null
// if it has not run. The string is valid until the next call on the same thread.
SOLM_EXPORT const char* solm_ep_isa_report() {
  thread_local std::string json;
  auto str = [](const char* s) { return s ? Quoted(s) : std::string("null"); };
  json = "{\"selected\": " + str(solm::SelectedIsa()) + ", \"cap\": " + str(std::getenv("SOLM_EP_ISA")) +
         ", \"decode_attention\": " + str(solm::LastIsa(solm::kIsaDecode)) +
         ", \"prefill_attention\": " + str(solm::LastIsa(solm::kIsaPrefill)) +
         ", \"sparse_mlp\": " + str(solm::LastIsa(solm::kIsaMlp)) +
         ", \"sparse_mlp_blocks\": " + str(solm::LastIsa(solm::kIsaMlpBlocks)) +
         ", \"sparse_mlp_blocks_int8\": " + str(solm::LastIsa(solm::kIsaMlpBlocksInt8)) + "}";
  return json.c_str();
}

// Bumped when a signature below changes (the Python side checks it before binding).
SOLM_EXPORT int solm_c_api_version() { return 3; }

// solm.quest_attention (reference.quest_attention_ref): q [B,H,T,d], k [B,Hkv,L,d], v [B,Hkv,L,dv], kappa [B],
// out [B,H,T,dv], all contiguous. mask: null, or bool (1 byte) / float (additive) elements at
// b*sb + h*sh + t*st + j*sl (strides in elements, 0 where broadcast). scale <= 0 (or NaN): 1/sqrt(d).
// Returns 0, or -1 on bad arguments / allocation failure (out is then unspecified).
// The _state variant carries the page min/max (kernels.h PageState): past_min/past_max [B,Hkv,P_past,d] with
// P_past = ceil((L-T)/page_size) (or 0: none, every page is computed), min_out/max_out [B,Hkv,P,d],
// P = ceil(L/page_size), written for every row (both null: not kept); the past buffers may be the output buffers
// when P_past == P (updated in place). prev_key (optional, [B,Hkv,d]) is the key the caller saw last at position
// L-T-1 when it kept the past state: if K holds another key there (a reordered, cropped or foreign cache) the past
// state is not used and every page is recomputed from K, and the call returns 1 instead of 0. last_key_out
// (optional, [B,Hkv,d], may be prev_key) receives the keys at position L-1, the next call's prev_key.
SOLM_EXPORT int solm_quest_attention_state(const float* q, const float* k, const float* v, const void* mask,
                                           int mask_is_bool, int64_t sb, int64_t sh, int64_t st, int64_t sl,
                                           const float* kappa, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                                           int64_t L, int64_t d, int64_t dv, float scale, int64_t page_size,
                                           int64_t sinks, int64_t window, int is_causal, int per_kv_head,
                                           const float* past_min, const float* past_max, int64_t P_past,
                                           float* min_out, float* max_out, const float* prev_key,
                                           float* last_key_out, float* out) {
  if (!q || !k || !v || !kappa || !out || B < 0 || T < 0 || L <= 0 || d <= 0 || dv <= 0 || Hkv <= 0 ||
      H % Hkv != 0 || page_size <= 0 || P_past < 0 || (P_past > 0 && (!past_min || !past_max)))
    return -1;
  const int64_t P = (L + page_size - 1) / page_size;
  if ((min_out == nullptr) != (max_out == nullptr)) return -1;
  if (P_past > 0 && (L - T <= 0 || P_past != (L - T + page_size - 1) / page_size)) return -1;
  if ((past_min == min_out || past_max == max_out) && P_past > 0 && P_past != P) return -1;
  int rc = 0;
  if (P_past > 0 && prev_key != nullptr) {  // the past state continues this K only if its last key is still there
    for (int64_t r = 0; r < B * Hkv && rc == 0; ++r)
      if (std::memcmp(k + (r * L + L - T - 1) * d, prev_key + r * d, d * sizeof(float)) != 0) rc = 1;
    if (rc == 1) past_min = past_max = nullptr, P_past = 0;
  }
  solm::PageState state;
  state.past_min = past_min, state.past_max = past_max, state.P_past = P_past;
  state.min = min_out, state.max = max_out;
  solm::MaskView mv;
  mv.data = mask;
  mv.is_bool = mask_is_bool != 0;
  mv.sb = sb, mv.sh = sh, mv.st = st, mv.sl = sl;
  solm::QuestParams p;
  p.scale = scale > 0.f ? scale : 1.0f / std::sqrt(static_cast<float>(d));
  p.page_size = page_size, p.sinks = sinks, p.window = window;
  p.is_causal = is_causal != 0, p.per_kv_head = per_kv_head != 0;
  try {
    const bool carried = P_past > 0 || min_out != nullptr;
    solm::QuestAttention(q, k, v, mv, kappa, B, H, Hkv, T, L, d, dv, p, out, AttnTls(), solm::Parallel{},
                         carried ? &state : nullptr);
  } catch (const std::bad_alloc&) {
    return -1;
  }
  if (last_key_out != nullptr)
    for (int64_t r = 0; r < B * Hkv; ++r) std::memcpy(last_key_out + r * d, k + (r * L + L - 1) * d, d * sizeof(float));
  return rc;
}

SOLM_EXPORT int solm_quest_attention(const float* q, const float* k, const float* v, const void* mask,
                                     int mask_is_bool, int64_t sb, int64_t sh, int64_t st, int64_t sl,
                                     const float* kappa, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t L,
                                     int64_t d, int64_t dv, float scale, int64_t page_size, int64_t sinks,
                                     int64_t window, int is_causal, int per_kv_head, float* out) {
  return solm_quest_attention_state(q, k, v, mask, mask_is_bool, sb, sh, st, sl, kappa, B, H, Hkv, T, L, d, dv,
                                    scale, page_size, sinks, window, is_causal, per_kv_head, nullptr, nullptr, 0,
                                    nullptr, nullptr, nullptr, nullptr, out);
}

// solm.sparse_mlp weights (nn.Linear layout: w_gate/w_up [I, D], w_down [Dout, I]; w_gate and the biases may be
// null) re-laid out input-major once. Returns an opaque handle for solm_mlp_run, or null on failure.
SOLM_EXPORT void* solm_mlp_create(const float* w_gate, const float* b_gate, const float* w_up, const float* b_up,
                                  const float* w_down, const float* b_down, int64_t D, int64_t I, int64_t Dout) {
  if (!w_up || !w_down || D <= 0 || I <= 0 || Dout <= 0) return nullptr;
  try {
    auto* w = new solm::MlpWeights();
    w->Set(w_gate, b_gate, w_up, b_up, w_down, b_down, D, I, Dout);
    return w;
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
}

// solm.sparse_mlp (reference.sparse_mlp_ref): x [B,T,D], rho/bits [B], y [B,T,Dout], contiguous. act: "silu",
// "gelu", "gelu_tanh" or "relu". Returns 0, or -1 on bad arguments / allocation failure.
SOLM_EXPORT int solm_mlp_run(const void* handle, const float* x, int64_t B, int64_t T, const float* rho,
                             const float* bits, const char* act, float* y) {
  solm::Act a;
  if (!handle || !x || !rho || !bits || !y || !act || B < 0 || T < 0 || !solm::ParseAct(act, &a)) return -1;
  try {
    solm::SparseMlp(x, B, T, *static_cast<const solm::MlpWeights*>(handle), rho, bits, a, y, MlpTls(),
                    solm::Parallel{});
  } catch (const std::bad_alloc&) {
    return -1;
  }
  return 0;
}

SOLM_EXPORT void solm_mlp_free(void* handle) { delete static_cast<solm::MlpWeights*>(handle); }
