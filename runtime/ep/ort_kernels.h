// The onnxruntime side of SolmEP's op kernels: errors, tensors borrowed from the kernel context, and one kernel
// object per ai.solm op whose Compute maps the node's inputs and outputs onto the kernels of kernels.h.
// solm_ep.cc builds them at Compile time (attributes, constant inputs, input/output slots) and hands them to
// onnxruntime; ort_kernels.cc and ort_kernels_attention.cc hold their Compute.
#pragma once

#include "onnxruntime_c_api.h"  // includes onnxruntime_ep_c_api.h at its end; do not include that one again

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace solm_ep {

extern const OrtApi* g_ort;  // set once by CreateEpFactories (solm_ep.cc)

// ------------------------------------------------------------------------------------------------ errors

struct OrtError : std::runtime_error {
  OrtErrorCode code;
  OrtError(OrtErrorCode c, const std::string& m) : std::runtime_error(m), code(c) {}
};

inline void Check(OrtStatus* s) {
  if (s == nullptr) return;
  OrtError e(g_ort->GetErrorCode(s), g_ort->GetErrorMessage(s));
  g_ort->ReleaseStatus(s);
  throw e;
}

[[noreturn]] inline void Fail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  throw OrtError(code, msg);
}

template <class F>
OrtStatus* Guard(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const OrtError& e) {
    return g_ort->CreateStatus(e.code, e.what());
  } catch (const std::exception& e) {
    return g_ort->CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return g_ort->CreateStatus(ORT_FAIL, "SolmEP: unknown error");
  }
}

// ------------------------------------------------------------------------------------------------ tensors

// A tensor shape held inline (no heap allocation on the Compute path).
struct Shape {
  static constexpr size_t kMaxRank = 8;
  int64_t d[kMaxRank] = {};
  size_t n = 0;
  Shape() = default;
  Shape(std::initializer_list<int64_t> l) { Assign(l.begin(), l.size()); }
  void Assign(const int64_t* p, size_t rank) {
    if (rank > kMaxRank) Fail("SolmEP: tensor rank " + std::to_string(rank) + " > 8");
    n = rank;
    for (size_t i = 0; i < n; ++i) d[i] = p[i];
  }
  size_t size() const { return n; }
  const int64_t* data() const { return d; }
  const int64_t* begin() const { return d; }
  const int64_t* end() const { return d + n; }
  int64_t operator[](size_t i) const { return d[i]; }
  bool operator==(const Shape& o) const { return n == o.n && std::equal(d, d + n, o.d); }
  bool operator!=(const Shape& o) const { return !(*this == o); }
};

struct TensorRef {  // a borrowed tensor (kernel-context input or a saved constant)
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  Shape shape;
  bool present = false;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  const float* f() const { return static_cast<const float*>(data); }
};

inline void Describe(const OrtValue* value, TensorRef* t) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  Check(g_ort->GetTensorTypeAndShape(value, &info));
  size_t nd = 0;
  OrtStatus* s = g_ort->GetDimensionsCount(info, &nd);
  if (!s && nd > Shape::kMaxRank) s = g_ort->CreateStatus(ORT_INVALID_ARGUMENT, "SolmEP: tensor rank > 8");
  if (!s) {
    t->shape.n = nd;
    s = g_ort->GetDimensions(info, t->shape.d, nd);
  }
  if (!s) s = g_ort->GetTensorElementType(info, &t->type);
  g_ort->ReleaseTensorTypeAndShapeInfo(info);
  Check(s);
  Check(g_ort->GetTensorData(value, &t->data));
  t->present = true;
}

struct SavedTensor {  // a constant initializer copied at Compile time
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

inline size_t ElemSize(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return 1;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return 2;
    default: return 0;
  }
}

// A kernel-owned buffer of at least n floats (grown on demand, never shrunk: no allocation once warm).
inline float* Grow(std::vector<float>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

inline std::string ShapeStr(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

// Where an op input comes from at Compute time.
struct InputSlot {
  std::string name;          // empty: optional input absent
  int ctx_index = -1;        // index among the fused node's (= kernel context's) inputs
  std::shared_ptr<SavedTensor> saved;  // constant initializer kept by the EP
  bool consumed = false;     // constant consumed at Compile (MLP weights), not needed at Compute
};

// ------------------------------------------------------------------------------------------------ per-call state

// The buffers one Compute writes (scratch, broadcast control vectors, spare outputs), pooled per kernel kind and
// shared by every node of that kind in the process (Shared): a run computes its nodes one after another, so the 30
// layers' SparseMLPBlocks take turns with one warm state instead of each keeping buffers grown to the longest
// prefill run (per node, SmolLM2's 128-token prefill runs left ~150 MB of scratch behind; session 21). onnxruntime
// calls Compute concurrently when several threads Run() a session (or several sessions run); each call checks out
// its own state (the pool's mutex is held only to pop or push a pointer, never during the work), so the calls proceed
// in parallel without sharing a buffer. A pool holds as many states as calls were ever in flight at once; a state is
// reused warm (no allocation once every state has grown). Nothing in a state outlives its call.
template <class T>
class CallPool {
 public:
  class Lease {
   public:
    Lease(CallPool& pool, std::unique_ptr<T> t) : pool_(pool), t_(std::move(t)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_.Put(std::move(t_)); }
    T& operator*() const { return *t_; }
    T* operator->() const { return t_.get(); }

   private:
    CallPool& pool_;
    std::unique_ptr<T> t_;
  };

  // The process's pool for T (never destroyed: kernels may outlive static destruction at exit).
  static CallPool& Shared() {
    static CallPool* const pool = new CallPool();
    return *pool;
  }

  Lease Get() {
    std::unique_ptr<T> t;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        t = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!t) t = std::make_unique<T>();
    return Lease(*this, std::move(t));
  }

 private:
  void Put(std::unique_ptr<T> t) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(t));
  }
  std::mutex mu_;
  std::vector<std::unique_ptr<T>> free_;
};

// ------------------------------------------------------------------------------------------------ kernels

// A kernel object is shared by every Run() of its session: after Compile it is read-only; what a Compute writes
// lives in a CallPool state.
struct KernelBase {
  std::string op;
  std::vector<InputSlot> inputs;
  // Per op output: its index among the fused node's (= kernel context's) outputs, or -1 when ORT left it out of
  // the fused node (an output no node consumes and that is no graph output; e.g. GateControls' unused rho/bits).
  std::vector<int> outputs;
  virtual ~KernelBase() = default;
  virtual void Compute(OrtKernelContext* kc) = 0;

  TensorRef In(OrtKernelContext* kc, size_t i) const {
    TensorRef t;
    if (i >= inputs.size()) return t;
    const InputSlot& s = inputs[i];
    if (s.name.empty()) return t;
    if (s.ctx_index >= 0) {
      const OrtValue* v = nullptr;
      Check(g_ort->KernelContext_GetInput(kc, static_cast<size_t>(s.ctx_index), &v));
      if (v == nullptr) return t;
      Describe(v, &t);
      return t;
    }
    if (s.saved) {
      t.data = s.saved->bytes.data();
      t.type = s.saved->type;
      t.shape.Assign(s.saved->shape.data(), s.saved->shape.size());
      t.present = true;
      return t;
    }
    Fail("SolmEP: " + op + " input '" + s.name + "' is not available at run time", ORT_FAIL);
  }

  bool HasOut(size_t i) const { return i < outputs.size() && outputs[i] >= 0; }

  // The buffer of op output i, allocated with `shape`; nullptr if the fused node does not produce it (HasOut).
  float* Out(OrtKernelContext* kc, size_t i, const Shape& shape) const {
    if (!HasOut(i)) return nullptr;
    OrtValue* v = nullptr;
    Check(g_ort->KernelContext_GetOutput(kc, static_cast<size_t>(outputs[i]), shape.data(), shape.size(), &v));
    if (v == nullptr)
      Fail("SolmEP: " + op + " output #" + std::to_string(i) + " is not available at run time", ORT_FAIL);
    void* p = nullptr;
    Check(g_ort->GetTensorMutableData(v, &p));
    return static_cast<float*>(p);
  }

  void RequireFloat(const TensorRef& t, const char* what) const {
    if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      Fail("SolmEP: " + op + " input '" + what + "' must be float32");
  }
};

// What the Compute files (ort_kernels.cc, ort_kernels_attention.cc) share: onnxruntime's thread pool as the kernels'
// Parallel, and a [B] control vector (kappa / rho / bits), one value per batch row or one broadcast to every row
// (then copied into `broadcast`).
solm::Parallel MakeParallel(OrtKernelContext* kc);
const float* RowValues(const TensorRef& t, int64_t B, const char* what, const std::string& op,
                       std::vector<float>& broadcast);

// inputs: 0 q, 1 k, 2 v, 3 attn_mask?, 4 kappa, 5 past_page_min?, 6 past_page_max?, 7 past_key?, 8 past_value?,
// 9 past_length?; outputs: 0 out, 1 present_page_min?, 2 present_page_max?, 3 present_key?, 4 present_value?
struct QuestKernel : KernelBase {
  solm::QuestParams params;
  bool has_scale = false;
  struct Call {
    solm::AttnScratch scratch;
    std::vector<float> kappa_b, spare_out, spare_state;
  };
  CallPool<Call>& calls = CallPool<Call>::Shared();

  void Compute(OrtKernelContext* kc) override;

  // The optional carried page state: inputs 5/6 past_page_min/max [B,Hkv,P_past,d] (P_past = ceil(L_past/S) with
  // L_past = L - T, or 0: compute every page; then the batch dimension is not checked, so a [1,Hkv,0,d] default
  // serves any batch) and outputs 1/2 present_page_min/max [B,Hkv,P,d]. With a KV cache buffer of C rows (cache),
  // inputs of [B,Hkv,C/S,d] are the buffer form instead (step protocol 2: written in place at each row's pages,
  // outputs the same shape). Returns whether the node carries state.
  bool PageStateOf(OrtKernelContext* kc, int64_t B, int64_t Hkv, int64_t T, int64_t L, int64_t d,
                   const solm::KvCache* cache, solm::PageState* ps, std::vector<float>& spare_state) const;

  // The KV cache buffer form (passes/kv_buffer.py): inputs 7-9 past_key/past_value [B,Hkv,C,d] (float16 or float32)
  // and past_length [B] (int64, equal rows), outputs 3/4 present_key/present_value of the same shape and type (the
  // same buffers when the caller binds them so: written in place). k/v are then the T new rows. Returns false when
  // the node has no cache inputs (the concat form: k/v are the whole keys).
  bool CacheOf(OrtKernelContext* kc, int64_t B, int64_t Hkv, int64_t T, int64_t L, int64_t d, int64_t dv,
               solm::KvCache* c) const;
  solm::MaskView MaskOf(const TensorRef& m, int64_t B, int64_t H, int64_t T, int64_t L) const;
};

// QuestAttentionRope: QuestAttention's inputs 3.. and outputs in the same places (so MaskOf / CacheOf / PageStateOf
// serve it), with inputs 0-2 the packed projection qkv [B,T,(H+2Hkv)·d] and RotaryEmbedding's cos/sin [B|1,T,d/2];
// out [B,T,H·d]. Only the KV cache buffer form (what passes/fuse_rope_attention.py writes).
struct QuestRopeKernel : QuestKernel {
  int64_t num_heads = 0, kv_num_heads = 0;
  bool interleaved = false;
  void Compute(OrtKernelContext* kc) override;
};

struct MlpKernel : KernelBase {
  solm::Act act = solm::Act::kSilu;
  bool skip_h = false;         // the skip attribute ("h"), copied into every MlpWeights SetWeights lays out
  solm::MlpWeights weights;    // laid out at Compile when every weight is a constant (weights_ready)
  bool weights_ready = false;
  struct Call {
    solm::MlpScratch scratch;
    std::vector<float> rho_b, bits_b;
    solm::MlpWeights weights;  // this call's layout when the weights are graph inputs (not weights_ready)
  };
  CallPool<Call>& calls = CallPool<Call>::Shared();

  // inputs: 0 x, 1 w_gate, 2 b_gate, 3 w_up, 4 b_up, 5 w_down, 6 b_down, 7 rho, 8 bits
  static constexpr size_t kWeightInputs[6] = {1, 2, 3, 4, 5, 6};

  void SetWeights(const TensorRef& wg, const TensorRef& bg, const TensorRef& wu, const TensorRef& bu,
                  const TensorRef& wd, const TensorRef& bd, solm::MlpWeights& into) const;

  void Compute(OrtKernelContext* kc) override;
};

// SparseMLPBlocks: the weights are always constants (initializers made by passes/pack_mlp.py), repacked at Compile.
struct MlpBlocksKernel : KernelBase {
  solm::Act act = solm::Act::kSilu;
  int bits_gate = 4, bits_up = 4, bits_down = 4, bits_down_dense = 4;
  int64_t block_size = 32;
  solm::MlpBlockWeights weights;  // weights.int8 / skip_h: the activations / skip attributes, set before SetWeights
  struct Call {
    solm::MlpBlockScratch scratch;
    std::vector<float> rho_b, bits_b;
  };
  CallPool<Call>& calls = CallPool<Call>::Shared();
  // inputs: 0 x, 1-4 codes/scale/offset/b of gate, 5-8 up, 9-12 down, 13 rho, 14 bits, 15-17 codes/scale/offset
  // of down in its source layout (skip="h" only: the rows at rho >= 1)
  static constexpr size_t kWeightInputs[15] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17};
  // t[i] for the 15 weight inputs (absent: not present)
  void SetWeights(const TensorRef* t);
  void Compute(OrtKernelContext* kc) override;
};

// LinearBlocks: one dense low-bit projection (passes/fuse_linear_blocks.py); the weights are constants, repacked at
// Compile. inputs: 0 x [.., K], 1 codes [N, K/32, 32·bits/8], 2 scale, 3 offset [N, K/32], 4 bias? [N].
struct LinearBlocksKernel : KernelBase {
  int bits = 4;
  int64_t block_size = 32;
  bool int8 = false;  // the activations attribute ("int8"): set before SetWeights (the layout depends on it)
  solm::BlockMatrix weights;
  std::vector<float> bias;  // empty when absent
  struct Call {
    solm::LinearBlockScratch scratch;
  };
  CallPool<Call>& calls = CallPool<Call>::Shared();
  static constexpr size_t kWeightInputs[4] = {1, 2, 3, 4};
  void SetWeights(const TensorRef* t);  // t[i] for the 4 weight inputs
  void Compute(OrtKernelContext* kc) override;
};

struct GateKernel : KernelBase {
  int64_t min_len = 0;

  void Compute(OrtKernelContext* kc) override;
};

}  // namespace solm_ep
