// SolmEP's helpers over onnxruntime's graph API (value names and types, node inputs, attributes, constant
// initializers) and the test of which nodes it claims. Declared in ep_graph.h.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "ep_graph.h"
#include "kernels.h"

namespace solm_ep {
std::string ValueName(const OrtValueInfo* vi) {
  if (vi == nullptr) return {};
  const char* n = nullptr;
  Check(g_ort->GetValueInfoName(vi, &n));
  return n ? n : "";
}

// Element type of a value (UNDEFINED if unknown / not a tensor).
ONNXTensorElementDataType ValueElemType(const OrtValueInfo* vi) {
  if (vi == nullptr) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  const OrtTypeInfo* ti = nullptr;
  if (OrtStatus* s = g_ort->GetValueInfoTypeInfo(vi, &ti)) {
    g_ort->ReleaseStatus(s);
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  const OrtTensorTypeAndShapeInfo* tsi = nullptr;
  if (ti == nullptr) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (OrtStatus* s = g_ort->CastTypeInfoToTensorInfo(ti, &tsi)) {
    g_ort->ReleaseStatus(s);
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  if (tsi == nullptr) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ONNXTensorElementDataType t = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  if (OrtStatus* s = g_ort->GetTensorElementType(tsi, &t)) {
    g_ort->ReleaseStatus(s);
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  return t;
}

std::vector<const OrtValueInfo*> NodeInputs(const OrtNode* node) {
  size_t n = 0;
  Check(g_ort->Node_GetNumInputs(node, &n));
  std::vector<const OrtValueInfo*> v(n, nullptr);
  if (n) Check(g_ort->Node_GetInputs(node, v.data(), n));
  return v;
}

std::vector<const OrtValueInfo*> NodeOutputs(const OrtNode* node) {
  size_t n = 0;
  Check(g_ort->Node_GetNumOutputs(node, &n));
  std::vector<const OrtValueInfo*> v(n, nullptr);
  if (n) Check(g_ort->Node_GetOutputs(node, v.data(), n));
  return v;
}

const OrtOpAttr* FindAttr(const OrtNode* node, const char* name) {
  const OrtOpAttr* a = nullptr;
  if (OrtStatus* s = g_ort->Node_GetAttributeByName(node, name, &a)) {  // ORT_NOT_FOUND when absent
    g_ort->ReleaseStatus(s);
    return nullptr;
  }
  return a;
}

int64_t AttrInt(const OrtNode* node, const char* name, int64_t dflt) {
  const OrtOpAttr* a = FindAttr(node, name);
  if (!a) return dflt;
  int64_t v = 0;
  size_t got = 0;
  Check(g_ort->ReadOpAttr(a, ORT_OP_ATTR_INT, &v, sizeof(v), &got));
  return v;
}

bool AttrFloat(const OrtNode* node, const char* name, float* out) {
  const OrtOpAttr* a = FindAttr(node, name);
  if (!a) return false;
  size_t got = 0;
  Check(g_ort->ReadOpAttr(a, ORT_OP_ATTR_FLOAT, out, sizeof(float), &got));
  return true;
}

std::string AttrString(const OrtNode* node, const char* name, const std::string& dflt) {
  const OrtOpAttr* a = FindAttr(node, name);
  if (!a) return dflt;
  size_t need = 0;
  OrtStatus* s = g_ort->ReadOpAttr(a, ORT_OP_ATTR_STRING, nullptr, 0, &need);  // fails, reports the size
  if (s) g_ort->ReleaseStatus(s);
  std::string v(need, '\0');
  size_t got = 0;
  Check(g_ort->ReadOpAttr(a, ORT_OP_ATTR_STRING, v.data(), v.size(), &got));
  v.resize(std::min(got, v.size()));
  while (!v.empty() && v.back() == '\0') v.pop_back();
  return v;
}

// Copy of a constant initializer (nullptr if `vi` is not a constant initializer).
std::shared_ptr<SavedTensor> SaveConstant(const OrtValueInfo* vi) {
  if (vi == nullptr) return nullptr;
  bool is_const = false;
  Check(g_ort->ValueInfo_IsConstantInitializer(vi, &is_const));
  if (!is_const) return nullptr;
  const OrtValue* value = nullptr;
  Check(g_ort->ValueInfo_GetInitializerValue(vi, &value));
  if (value == nullptr) return nullptr;
  TensorRef t;
  Describe(value, &t);
  const size_t es = ElemSize(t.type);
  if (es == 0) Fail("SolmEP: unsupported initializer type for '" + ValueName(vi) + "'");
  auto saved = std::make_shared<SavedTensor>();
  saved->type = t.type;
  saved->shape.assign(t.shape.begin(), t.shape.end());
  const size_t nbytes = static_cast<size_t>(t.numel()) * es;
  const uint8_t* p = static_cast<const uint8_t*>(t.data);
  saved->bytes.assign(p, p + nbytes);
  return saved;
}

bool IsClaimable(const OrtNode* node, const OpSpec** spec_out) {
  const char* dom = nullptr;
  const char* op = nullptr;
  Check(g_ort->Node_GetDomain(node, &dom));
  Check(g_ort->Node_GetOperatorType(node, &op));
  if (dom == nullptr || op == nullptr || std::strcmp(dom, kDomain) != 0) return false;
  const OpSpec* spec = FindSpec(op);
  if (spec == nullptr) return false;
  // fp32 kernels: every declared-float input that is present must be float (or of unknown type).
  auto ins = NodeInputs(node);
  for (size_t i = 0; i < ins.size() && i < spec->inputs.size(); ++i) {
    if (ins[i] == nullptr || !spec->inputs[i].float32) continue;
    const auto t = ValueElemType(ins[i]);
    if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && spec->inputs[i].half_too) continue;  // fp16 page state
    if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) return false;
  }
  if (std::strncmp(op, "QuestAttention", 14) == 0 && ins.size() > 3 && ins[3] != nullptr) {  // and ...Rope
    const auto t = ValueElemType(ins[3]);
    if (t != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
        t != ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
      return false;
  }
  *spec_out = spec;
  return true;
}

}  // namespace solm_ep
