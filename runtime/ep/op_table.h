// The ai.solm ops SolmEP runs, in one table. solm_ep.cc registers their placeholder schemas, claims their nodes and
// compiles them from it; c_api.cc's solm_ep_registered_ops reports it, and tests/test_ops.py asserts the report
// equals the Python registry (solm_compile/ops/registry.py, the artifact form: page-state inputs/outputs and the
// attributes only SolmEP reads included). Free of onnxruntime types, so c_api.cc needs no onnxruntime header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace solm_ep {

constexpr const char* kDomain = "ai.solm";
constexpr int kDomainVersion = 1;  // the first opset version of the domain each op is registered for

struct InputSpec {
  bool float32;   // the kernel reads fp32 data (a node with another type here is not claimed); false: any type
  bool optional;
  bool int64 = false;  // declared int64 in the placeholder schema (ORT types an any-type output like the last
                       // any-type input: QuestAttention's present_key/value must follow past_value, not past_length)
  bool half_too = false;  // float32 or float16: the page state (step protocol 3 keeps it in an fp16 cache's dtype)
};

struct OpSpec {
  const char* name;
  std::vector<InputSpec> inputs;
  size_t n_out;
  size_t n_out_required;                // outputs from this index on are optional
  std::vector<const char*> attributes;  // every attribute the kernel reads (each optional, with a default there)
  size_t n_out_float = SIZE_MAX;        // outputs from this index on may have any type (e.g. an fp16 KV cache)
  // outputs [page_out, page_out + 2) have the type of the half_too inputs: solm_ep.cc registers a second placeholder
  // typed float16 there, so ORT picks the float or the float16 schema from the page state a node is given
  size_t page_out = 0;

  bool HasAttribute(const char* a) const {
    for (const char* x : attributes)
      if (std::strcmp(x, a) == 0) return true;
    return false;
  }
};

// One table for the whole library (an inline function's static is shared by every translation unit).
inline const std::vector<OpSpec>& OpSpecs() {
  constexpr InputSpec F{true, false}, Fo{true, true}, A{false, false}, Ao{false, true}, I64o{false, true, true},
      Fp{true, true, false, true};
  static const std::vector<OpSpec> specs = {
      // q, k, v, attn_mask? (bool or float), kappa, past_page_min?, past_page_max? (float, or float16 over a
      //   float16 cache), past_key?, past_value? (float or float16 [B,Hkv,C,d] caches), past_length? (int64 [B])
      //   -> out, present_page_min?, present_page_max? (as the page inputs), present_key?, present_value?
      {"QuestAttention", {F, F, F, Ao, F, Fp, Fp, Ao, Ao, I64o}, 5, 1,
       {"scale", "is_causal", "page_size", "sinks", "window", "select_per_kv_head"}, 3, 1},
      // qkv [B,T,(H+2Hkv)d], cos, sin [B|1,T,d/2], then QuestAttention's inputs 3.. and outputs (buffer form
      //   required by the kernel); out [B,T,H·d]
      {"QuestAttentionRope", {F, F, F, Ao, F, Fp, Fp, Ao, Ao, I64o}, 5, 1,
       {"scale", "page_size", "sinks", "window", "num_heads", "kv_num_heads", "interleaved", "select_per_kv_head"}, 3,
       1},
      // x, w_gate?, b_gate?, w_up, b_up?, w_down, b_down?, rho, bits -> y
      {"SparseMLP", {F, Fo, Fo, F, Fo, F, Fo, F, F}, 1, 1, {"act", "skip"}},
      // x, codes_gate?, scale_gate?, offset_gate?, b_gate?, codes_up, scale_up, offset_up, b_up?, codes_down,
      //   scale_down, offset_down, b_down?, rho, bits -> y   (codes uint8: A)
      {"SparseMLPBlocks", {F, Ao, Fo, Fo, Fo, A, F, F, Fo, A, F, F, Fo, F, F, Ao, Fo, Fo}, 1, 1,
       {"act", "bits_gate", "bits_up", "bits_down", "block_size", "activations", "skip", "bits_down_dense"}},
      // x [.., K], codes [N, K/32, 32·bits/8] (uint8: A), scale, offset [N, K/32], bias? [N] -> y [.., N]
      {"LinearBlocks", {F, A, F, F, Fo}, 1, 1, {"bits", "block_size", "activations"}},
      // input_ids, past_key (only their shapes are read), kappa, rho, bits, past_length? (int64 [B]: each row gated
      //   by its own length, step protocol 2) -> kappa_e, rho_e, bits_e
      {"GateControls", {A, A, F, F, F, I64o}, 3, 3, {"min_len"}},
  };
  return specs;
}

inline const OpSpec* FindSpec(const char* op) {
  for (const auto& s : OpSpecs())
    if (std::strcmp(s.name, op) == 0) return &s;
  return nullptr;
}

}  // namespace solm_ep
