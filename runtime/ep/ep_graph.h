// SolmEP's view of onnxruntime's graph API (ep_graph.cc) and its kernel builder (ep_build_kernel.cc): what
// solm_ep.cc's EP calls in GetCapability and Compile.
#pragma once

#include "onnxruntime_c_api.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "op_table.h"
#include "ort_kernels.h"

namespace solm_ep {

std::string ValueName(const OrtValueInfo* vi);
// Element type of a value (UNDEFINED if unknown / not a tensor).
ONNXTensorElementDataType ValueElemType(const OrtValueInfo* vi);
std::vector<const OrtValueInfo*> NodeInputs(const OrtNode* node);
std::vector<const OrtValueInfo*> NodeOutputs(const OrtNode* node);
const OrtOpAttr* FindAttr(const OrtNode* node, const char* name);
int64_t AttrInt(const OrtNode* node, const char* name, int64_t dflt);
bool AttrFloat(const OrtNode* node, const char* name, float* out);
std::string AttrString(const OrtNode* node, const char* name, const std::string& dflt);
// Copy of a constant initializer (nullptr if `vi` is not a constant initializer).
std::shared_ptr<SavedTensor> SaveConstant(const OrtValueInfo* vi);

struct EpConfig {
  int per_kv_head_override = -1;  // provider option select_per_kv_head: -1 = use the node attribute
};

// Whether SolmEP takes `node` (an ai.solm op of op_table.h with fp32 data); its spec in *spec_out.
bool IsClaimable(const OrtNode* node, const OpSpec** spec_out);
// The kernel of `node`, compiled as the fused node `fused`: attributes and constants read, inputs mapped to slots.
std::unique_ptr<KernelBase> BuildKernel(const OrtNode* node, const OrtNode* fused, const EpConfig& cfg);

}  // namespace solm_ep
