// SolmEP: an onnxruntime plugin execution provider that runs the ai.solm ops (QuestAttention, SparseMLP,
// GateControls) with kernels that skip the pruned work (kernels.h). Every other node stays on the CPU EP.
//
// Structure (onnxruntime plugin-EP C API, "compile" flavour):
//   CreateEpFactories -> SolmFactory: one OrtEpDevice per CPU hardware device; also hands ORT the ai.solm custom-op
//     domain with *placeholder* op schemas so models with ai.solm nodes pass graph validation.
//   SolmEp::GetCapability: claims each ai.solm node with fp32 data as its own fused subgraph, asking ORT to drop
//     constant initializers (the EP keeps its own re-laid-out copy of the MLP weights).
//   SolmEp::Compile -> BuildKernel (ep_build_kernel.cc): reads the node's attributes and constant inputs (MLP
//     weights re-laid out there), maps every op input to its slot in the fused node (fused inputs are de-duplicated
//     by name) and builds a kernel. The graph-API helpers both use: ep_graph.h / ep_graph.cc.
//   Compute (ort_kernels.cc): KernelContext inputs -> kernels, parallel-for through onnxruntime's intra-op thread
//     pool (OrtApi::KernelContext_ParallelFor), so `SessionOptions.intra_op_num_threads` controls the threads.
//     Concurrent Run() calls of one session compute a node in parallel: the kernel object is read-only after
//     Compile and each Compute takes its buffers from the node's CallPool (ort_kernels.h).
//
// API level: built against 1.29 headers but asks for and declares API version 24 (kSolmOrtApi), the oldest runtime
// whose plugin-EP API has everything used here (OrtEpFactory::GetCustomOpDomains is 1.24); every OrtApi function
// called is <= 1.24. So the library loads on onnxruntime >= 1.24 (tested on 1.24.4 and 1.32.0).
//
// Debugging: SOLM_EP_DEBUG=1 prints the EP's session options and each compiled node's input and output mapping
// to stderr.
#include "onnxruntime_c_api.h"  // includes onnxruntime_ep_c_api.h at its end; do not include that one again

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "ep_graph.h"
#include "kernels.h"
#include "op_table.h"
#include "ort_kernels.h"

#define SOLM_EXPORT extern "C" __attribute__((visibility("default")))

namespace solm_ep {
const OrtApi* g_ort = nullptr;
}  // namespace solm_ep

using namespace solm_ep;

namespace {

constexpr uint32_t kSolmOrtApi = 24;
constexpr const char* kEpName = "SolmEP";
constexpr const char* kVersion = "0.1.0";

const OrtEpApi* g_ep = nullptr;

// ------------------------------------------------------------------------------------------------ op table
// The ops, their inputs, outputs and attributes: op_table.h (OpSpecs / FindSpec), shared with c_api.cc.

ONNXTensorElementDataType InputType(const OpSpec& spec, size_t i, bool half_pages) {
  if (half_pages && spec.inputs[i].half_too) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (spec.inputs[i].float32) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  return spec.inputs[i].int64 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

// Placeholder custom ops: they only give ORT a schema for ai.solm so graphs validate; SolmEP compiles the nodes.
// If a node is ever left to the CPU EP (e.g. non-float inputs), its Compute fails with a clear message. An op with
// page state (half_too inputs) has two: page state float32 (protocols 1-2) and float16 (protocol 3 over an fp16
// cache). ORT types each node's outputs by the first whose inputs match: a one-type output by its type (the page
// outputs), an any-type output like the last multi-type input (present_key/value: past_value).
struct PlaceholderOp : OrtCustomOp {
  const OpSpec* spec;
  bool half_pages;
  explicit PlaceholderOp(const OpSpec* s, bool half = false) : OrtCustomOp{}, spec(s), half_pages(half) {
    version = kSolmOrtApi;
    GetName = [](const OrtCustomOp* op) { return static_cast<const PlaceholderOp*>(op)->spec->name; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return kEpName; };
    GetInputTypeCount = [](const OrtCustomOp* op) { return static_cast<const PlaceholderOp*>(op)->spec->inputs.size(); };
    GetInputType = [](const OrtCustomOp* op, size_t i) {
      const auto* self = static_cast<const PlaceholderOp*>(op);
      return InputType(*self->spec, i, self->half_pages);
    };
    GetOutputTypeCount = [](const OrtCustomOp* op) { return static_cast<const PlaceholderOp*>(op)->spec->n_out; };
    GetOutputType = [](const OrtCustomOp* op, size_t i) {
      const auto* self = static_cast<const PlaceholderOp*>(op);
      const size_t p = self->spec->page_out;
      if (self->half_pages && p > 0 && i >= p && i < p + 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      return i < self->spec->n_out_float ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    };
    GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return static_cast<const PlaceholderOp*>(op)->spec->inputs[i].optional ? INPUT_OUTPUT_OPTIONAL
                                                                          : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return i >= static_cast<const PlaceholderOp*>(op)->spec->n_out_required ? INPUT_OUTPUT_OPTIONAL
                                                                                : INPUT_OUTPUT_REQUIRED;
    };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 0; };
    GetStartVersion = [](const OrtCustomOp*) { return kDomainVersion; };
    GetEndVersion = [](const OrtCustomOp*) { return 1 << 30; };
    CreateKernelV2 = [](const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo*, void** kernel) -> OrtStatusPtr {
      *kernel = const_cast<OrtCustomOp*>(op);
      return nullptr;
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext*) -> OrtStatusPtr {
      const auto* self = static_cast<const PlaceholderOp*>(static_cast<OrtCustomOp*>(kernel));
      std::string msg = std::string("ai.solm::") + self->spec->name +
                        " was not claimed by SolmEP (inputs must be float32 as documented); no CPU kernel exists";
      return g_ort->CreateStatus(ORT_NOT_IMPLEMENTED, msg.c_str());
    };
    KernelDestroy = [](void*) {};
  }
};

// ------------------------------------------------------------------------------------------------ compute info

struct SolmComputeInfo : OrtNodeComputeInfo {
  std::unique_ptr<KernelBase> kernel;
  explicit SolmComputeInfo(std::unique_ptr<KernelBase> k) : OrtNodeComputeInfo{}, kernel(std::move(k)) {
    ort_version_supported = kSolmOrtApi;
    CreateState = [](OrtNodeComputeInfo* self, OrtNodeComputeContext*, void** state) noexcept -> OrtStatus* {
      *state = static_cast<SolmComputeInfo*>(self)->kernel.get();
      return nullptr;
    };
    Compute = [](OrtNodeComputeInfo*, void* state, OrtKernelContext* kc) noexcept -> OrtStatus* {
      return Guard([&] { static_cast<KernelBase*>(state)->Compute(kc); });
    };
    ReleaseState = [](OrtNodeComputeInfo*, void*) noexcept {};
  }
};

// ------------------------------------------------------------------------------------------------ EP

struct SolmFactory;

struct SolmEp : OrtEp {
  EpConfig cfg;

  SolmEp() : OrtEp{} {
    ort_version_supported = kSolmOrtApi;
    GetName = [](const OrtEp*) noexcept { return kEpName; };
    GetCapability = [](OrtEp*, const OrtGraph* graph, OrtEpGraphSupportInfo* info) noexcept -> OrtStatus* {
      return Guard([&] {
        size_t n = 0;
        Check(g_ort->Graph_GetNumNodes(graph, &n));
        std::vector<const OrtNode*> nodes(n);
        if (n) Check(g_ort->Graph_GetNodes(graph, nodes.data(), n));
        for (const OrtNode* node : nodes) {
          const OpSpec* spec = nullptr;
          if (!IsClaimable(node, &spec)) continue;
          OrtNodeFusionOptions fo{};
          fo.ort_version_supported = kSolmOrtApi;
          fo.drop_constant_initializers = true;  // constants are copied (MLP weights: re-laid out) in Compile
          Check(g_ep->EpGraphSupportInfo_AddNodesToFuse(info, &node, 1, &fo));
        }
      });
    };
    Compile = [](OrtEp* self, const OrtGraph** graphs, const OrtNode** fused_nodes, size_t count,
                 OrtNodeComputeInfo** infos, OrtNode** ep_context_nodes) noexcept -> OrtStatus* {
      for (size_t i = 0; i < count; ++i) infos[i] = nullptr;
      OrtStatus* st = Guard([&] {
        auto* ep = static_cast<SolmEp*>(self);
        for (size_t i = 0; i < count; ++i) {
          size_t n = 0;
          Check(g_ort->Graph_GetNumNodes(graphs[i], &n));
          if (n != 1) Fail("SolmEP: expected one node per fused subgraph, got " + std::to_string(n), ORT_EP_FAIL);
          const OrtNode* node = nullptr;
          Check(g_ort->Graph_GetNodes(graphs[i], &node, 1));
          infos[i] = new SolmComputeInfo(BuildKernel(node, fused_nodes[i], ep->cfg));
          if (ep_context_nodes) ep_context_nodes[i] = nullptr;
        }
      });
      if (st) {
        for (size_t i = 0; i < count; ++i) {
          delete static_cast<SolmComputeInfo*>(infos[i]);
          infos[i] = nullptr;
        }
      }
      return st;
    };
    ReleaseNodeComputeInfos = [](OrtEp*, OrtNodeComputeInfo** infos, size_t n) noexcept {
      for (size_t i = 0; i < n; ++i) delete static_cast<SolmComputeInfo*>(infos[i]);
    };
  }
};

// Session config entries "ep.<name>.<option>" (provider options given to add_provider_for_devices).
void ReadConfig(const OrtSessionOptions* so, EpConfig* cfg) {
  if (so == nullptr) return;
  OrtKeyValuePairs* kv = nullptr;
  if (OrtStatus* s = g_ort->GetSessionOptionsConfigEntries(so, &kv)) {
    g_ort->ReleaseStatus(s);
    return;
  }
  const char* const* keys = nullptr;
  const char* const* values = nullptr;
  size_t n = 0;
  g_ort->GetKeyValuePairs(kv, &keys, &values, &n);
  for (size_t i = 0; i < n; ++i) {
    std::string key = keys[i];
    if (std::getenv("SOLM_EP_DEBUG")) std::fprintf(stderr, "SolmEP config %s=%s\n", keys[i], values[i]);
    std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
    const std::string prefix = "ep.solmep.";
    if (key.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string opt = key.substr(prefix.size());
    const std::string val = values[i] ? values[i] : "";
    if (opt == "select_per_kv_head") cfg->per_kv_head_override = (val == "1" || val == "true") ? 1 : 0;
  }
  g_ort->ReleaseKeyValuePairs(kv);
}

struct SolmFactory : OrtEpFactory {
  OrtCustomOpDomain* domain = nullptr;
  std::vector<std::unique_ptr<PlaceholderOp>> ops;

  SolmFactory() : OrtEpFactory{} {
    ort_version_supported = kSolmOrtApi;
    GetName = [](const OrtEpFactory*) noexcept { return kEpName; };
    GetVendor = [](const OrtEpFactory*) noexcept { return "solm"; };
    GetVendorId = [](const OrtEpFactory*) noexcept -> uint32_t { return 0; };
    GetVersion = [](const OrtEpFactory*) noexcept { return kVersion; };
    GetSupportedDevices = [](OrtEpFactory* self, const OrtHardwareDevice* const* devs, size_t nd, OrtEpDevice** out,
                             size_t max_out, size_t* nout) noexcept -> OrtStatus* {
      *nout = 0;
      for (size_t i = 0; i < nd && *nout < max_out; ++i) {
        if (g_ort->HardwareDevice_Type(devs[i]) != OrtHardwareDeviceType_CPU) continue;
        OrtEpDevice* d = nullptr;
        if (OrtStatus* s = g_ep->CreateEpDevice(self, devs[i], nullptr, nullptr, &d)) return s;
        out[(*nout)++] = d;
        break;  // one device is enough: the EP runs on the host
      }
      return nullptr;
    };
    CreateEp = [](OrtEpFactory*, const OrtHardwareDevice* const*, const OrtKeyValuePairs* const*, size_t,
                  const OrtSessionOptions* so, const OrtLogger*, OrtEp** ep) noexcept -> OrtStatus* {
      return Guard([&] {
        auto e = std::make_unique<SolmEp>();
        ReadConfig(so, &e->cfg);
        *ep = e.release();
      });
    };
    ReleaseEp = [](OrtEpFactory*, OrtEp* ep) noexcept { delete static_cast<SolmEp*>(ep); };
    CreateAllocator = [](OrtEpFactory*, const OrtMemoryInfo*, const OrtKeyValuePairs*,
                         OrtAllocator** a) noexcept -> OrtStatus* {
      *a = nullptr;  // host memory: ORT's default CPU allocator
      return nullptr;
    };
    ReleaseAllocator = [](OrtEpFactory*, OrtAllocator*) noexcept {};
    CreateDataTransfer = [](OrtEpFactory*, OrtDataTransferImpl** dt) noexcept -> OrtStatus* {
      *dt = nullptr;
      return nullptr;
    };
    IsStreamAware = [](const OrtEpFactory*) noexcept { return false; };
    CreateSyncStreamForDevice = [](OrtEpFactory*, const OrtMemoryDevice*, const OrtKeyValuePairs*,
                                   OrtSyncStreamImpl** s) noexcept -> OrtStatus* {
      *s = nullptr;
      return nullptr;
    };
    GetNumCustomOpDomains = [](OrtEpFactory*, size_t* n) noexcept -> OrtStatus* {
      *n = 1;
      return nullptr;
    };
    GetCustomOpDomains = [](OrtEpFactory* self, OrtCustomOpDomain** domains, size_t n) noexcept -> OrtStatus* {
      auto* f = static_cast<SolmFactory*>(self);
      if (n < 1) return g_ort->CreateStatus(ORT_INVALID_ARGUMENT, "SolmEP: no room for the ai.solm domain");
      domains[0] = f->domain;
      return nullptr;
    };
  }

  OrtStatus* Init() {
    if (OrtStatus* s = g_ort->CreateCustomOpDomain(kDomain, &domain)) return s;
    for (const auto& spec : OpSpecs()) {
      for (bool half : {false, true}) {
        if (half && spec.page_out == 0) continue;
        ops.push_back(std::make_unique<PlaceholderOp>(&spec, half));
        if (OrtStatus* s = g_ort->CustomOpDomain_Add(domain, ops.back().get())) return s;
      }
    }
    return nullptr;
  }

  ~SolmFactory() {
    if (domain) g_ort->ReleaseCustomOpDomain(domain);
  }
};

}  // namespace

SOLM_EXPORT OrtStatus* CreateEpFactories(const char* /*registered_name*/, const OrtApiBase* base,
                                         const OrtLogger* /*logger*/, OrtEpFactory** factories, size_t max_factories,
                                         size_t* num_factories) {
  *num_factories = 0;
  const OrtApi* api = base->GetApi(kSolmOrtApi);
  if (api == nullptr) return nullptr;  // runtime older than 1.24: provide nothing
  g_ort = api;
  g_ep = g_ort->GetEpApi();
  if (g_ep == nullptr) return g_ort->CreateStatus(ORT_FAIL, "SolmEP: this onnxruntime has no plugin-EP API");
  if (max_factories < 1) return g_ort->CreateStatus(ORT_INVALID_ARGUMENT, "SolmEP: no room for a factory");
  auto f = std::make_unique<SolmFactory>();
  if (OrtStatus* s = f->Init()) return s;
  factories[0] = f.release();
  *num_factories = 1;
  return nullptr;
}

SOLM_EXPORT OrtStatus* ReleaseEpFactory(OrtEpFactory* factory) {
  delete static_cast<SolmFactory*>(factory);
  return nullptr;
}

#ifndef SOLM_EP_BUILD_ID
#define SOLM_EP_BUILD_ID "unknown"
#endif
// Hash of the sources this library was built from (ep_build.source_hash()), to detect a stale build.
SOLM_EXPORT const char* SolmEpBuildId() { return SOLM_EP_BUILD_ID; }

// The MLP micro-kernel variant in use on this CPU ("x86-64-v4", "x86-64-v3" or "baseline").
SOLM_EXPORT const char* SolmEpIsa() { return solm::MlpKernelIsa(); }

// Work counters of the kernels (process-wide), for tests and benchmarks:
// [attn_calls, attn_keys_scored, attn_keys_dense, attn_kv_rows_read, mlp_calls, mlp_in_rows, mlp_in_rows_dense,
//  mlp_down_rows, mlp_down_rows_dense, attn_minmax_rows, mlp_down_dense_rows]. Returns how many values were written.
SOLM_EXPORT size_t SolmEpGetStats(uint64_t* out, size_t n) {
  const solm::Stats& s = solm::GlobalStats();
  const uint64_t v[] = {s.attn_calls.load(),    s.attn_keys_scored.load(), s.attn_keys_dense.load(),
                        s.attn_kv_rows_read.load(), s.mlp_calls.load(),   s.mlp_in_rows.load(),
                        s.mlp_in_rows_dense.load(), s.mlp_down_rows.load(), s.mlp_down_rows_dense.load(),
                        s.attn_minmax_rows.load(),  s.mlp_down_dense_rows.load()};
  const size_t m = std::min(n, sizeof(v) / sizeof(v[0]));
  for (size_t i = 0; i < m; ++i) out[i] = v[i];
  return m;
}

SOLM_EXPORT void SolmEpResetStats() {
  solm::Stats& s = solm::GlobalStats();
  for (auto* a : {&s.attn_calls, &s.attn_keys_scored, &s.attn_keys_dense, &s.attn_kv_rows_read, &s.mlp_calls,
                  &s.mlp_in_rows, &s.mlp_in_rows_dense, &s.mlp_down_rows, &s.mlp_down_rows_dense,
                  &s.attn_minmax_rows, &s.mlp_down_dense_rows})
    a->store(0);
}
