// BuildKernel: one ai.solm node, compiled as its fused node, into a kernel (ort_kernels.h): its attributes
// (each declared in op_table.h), its constant inputs re-laid out, its inputs and outputs mapped to the fused
// node's. Declared in ep_graph.h.
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

std::unique_ptr<KernelBase> BuildKernel(const OrtNode* node, const OrtNode* fused, const EpConfig& cfg) {
  const char* opc = nullptr;
  Check(g_ort->Node_GetOperatorType(node, &opc));
  const std::string op = opc ? opc : "";
  const OpSpec* spec = FindSpec(op.c_str());
  if (spec == nullptr) Fail("SolmEP: cannot compile op " + op, ORT_EP_FAIL);
  // Every attribute read below must be declared in op_table.h, the table solm_ep_registered_ops reports.
  auto attr = [&](const char* name) {
    if (!spec->HasAttribute(name))
      Fail("SolmEP: " + op + " reads attribute '" + name + "', which op_table.h does not declare", ORT_EP_FAIL);
    return name;
  };

  // Fused-node inputs, in kernel-context order (de-duplicated by name; constants dropped if ORT honoured
  // drop_constant_initializers).
  std::unordered_map<std::string, int> ctx_index;
  {
    auto fins = NodeInputs(fused);
    for (size_t i = 0; i < fins.size(); ++i) {
      std::string n = ValueName(fins[i]);
      if (!n.empty() && !ctx_index.count(n)) ctx_index[n] = static_cast<int>(i);
    }
  }
  auto ins = NodeInputs(node);
  if (std::getenv("SOLM_EP_DEBUG"))
    std::fprintf(stderr, "SolmEP compile %s: %zu op inputs, %zu fused inputs\n", op.c_str(), ins.size(), ctx_index.size());
  std::vector<InputSlot> slots(spec->inputs.size());
  for (size_t i = 0; i < slots.size() && i < ins.size(); ++i) {
    slots[i].name = ValueName(ins[i]);
    if (slots[i].name.empty()) continue;
    auto it = ctx_index.find(slots[i].name);
    if (it != ctx_index.end()) slots[i].ctx_index = it->second;
    slots[i].saved = SaveConstant(ins[i]);
    if (slots[i].ctx_index < 0 && !slots[i].saved)
      Fail("SolmEP: " + op + " input '" + slots[i].name + "' is neither a fused-node input nor a constant", ORT_EP_FAIL);
  }
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i].name.empty() && !spec->inputs[i].optional)
      Fail("SolmEP: " + op + " is missing required input #" + std::to_string(i));

  // Op outputs -> fused-node outputs, by name. ORT gives the fused node only the outputs that something consumes
  // (another node or a graph output), so an unused output (e.g. GateControls' rho/bits when only kappa is read) is
  // not there and the fused outputs are not positionally the op's.
  std::vector<int> out_index(spec->n_out, -1);
  {
    std::unordered_map<std::string, int> fused_out;
    auto fouts = NodeOutputs(fused);
    for (size_t i = 0; i < fouts.size(); ++i) {
      std::string n = ValueName(fouts[i]);
      if (!n.empty() && !fused_out.count(n)) fused_out[n] = static_cast<int>(i);
    }
    auto outs = NodeOutputs(node);
    for (size_t i = 0; i < out_index.size() && i < outs.size(); ++i) {
      const std::string n = ValueName(outs[i]);
      auto it = n.empty() ? fused_out.end() : fused_out.find(n);
      if (it != fused_out.end()) out_index[i] = it->second;
    }
    if (std::getenv("SOLM_EP_DEBUG")) {
      std::fprintf(stderr, "SolmEP compile %s: %zu op outputs, %zu fused outputs; map", op.c_str(), outs.size(),
                   fouts.size());
      for (int o : out_index) std::fprintf(stderr, " %d", o);
      std::fprintf(stderr, "\n");
    }
  }

  std::unique_ptr<KernelBase> kernel;
  if (op == "QuestAttention" || op == "QuestAttentionRope") {
    const bool rope = op == "QuestAttentionRope";
    std::unique_ptr<QuestKernel> k = rope ? std::make_unique<QuestRopeKernel>() : std::make_unique<QuestKernel>();
    if (rope) {
      auto* r = static_cast<QuestRopeKernel*>(k.get());
      r->num_heads = AttrInt(node, attr("num_heads"), 0);
      r->kv_num_heads = AttrInt(node, attr("kv_num_heads"), 0);
      r->interleaved = AttrInt(node, attr("interleaved"), 0) != 0;
      if (r->num_heads < 1 || r->kv_num_heads < 1 || r->num_heads % r->kv_num_heads != 0)
        Fail("SolmEP: QuestAttentionRope needs num_heads a multiple of kv_num_heads >= 1, got " +
             std::to_string(r->num_heads) + " / " + std::to_string(r->kv_num_heads));
    }
    float scale = 0.f;
    k->has_scale = AttrFloat(node, attr("scale"), &scale);
    k->params.scale = scale;
    k->params.page_size = AttrInt(node, attr("page_size"), 8);
    k->params.sinks = AttrInt(node, attr("sinks"), 0);
    k->params.window = AttrInt(node, attr("window"), 0);
    if (!rope) k->params.is_causal = AttrInt(node, attr("is_causal"), 0) != 0;
    const int64_t per_kv = AttrInt(node, attr("select_per_kv_head"), 0);
    k->params.per_kv_head = cfg.per_kv_head_override >= 0 ? cfg.per_kv_head_override != 0 : per_kv != 0;
    if (k->params.page_size < 1) Fail("SolmEP: QuestAttention page_size must be >= 1");
    if (k->params.sinks < 0 || k->params.window < 0) Fail("SolmEP: QuestAttention sinks/window must be >= 0");
    kernel = std::move(k);
  } else if (op == "SparseMLP") {
    auto k = std::make_unique<MlpKernel>();
    const std::string act = AttrString(node, attr("act"), "silu");
    if (!solm::ParseAct(act, &k->act))
      Fail("SolmEP: SparseMLP act must be silu | gelu | gelu_tanh | relu, got '" + act + "'");
    // Absent: x (artifacts from before the attribute). h: ρ keeps units of h, down reads only their rows.
    const std::string skip = AttrString(node, attr("skip"), "x");
    if (skip != "x" && skip != "h") Fail("SolmEP: SparseMLP skip must be x | h, got '" + skip + "'");
    k->skip_h = skip == "h";
    // Weights that are constants are laid out input-major now and not kept in their original layout.
    bool all_const = true;
    for (size_t i : MlpKernel::kWeightInputs)
      if (!slots[i].name.empty() && !slots[i].saved) all_const = false;
    if (all_const) {
      auto ref = [&](size_t i) {
        TensorRef t;
        if (slots[i].name.empty()) return t;
        t.data = slots[i].saved->bytes.data();
        t.type = slots[i].saved->type;
        t.shape.Assign(slots[i].saved->shape.data(), slots[i].saved->shape.size());
        t.present = true;
        return t;
      };
      k->op = op;
      k->SetWeights(ref(1), ref(2), ref(3), ref(4), ref(5), ref(6), k->weights);
      k->weights_ready = true;
      for (size_t i : MlpKernel::kWeightInputs) {
        slots[i].saved.reset();
        slots[i].consumed = true;
      }
    }
    kernel = std::move(k);
  } else if (op == "SparseMLPBlocks") {
    auto k = std::make_unique<MlpBlocksKernel>();
    const std::string act = AttrString(node, attr("act"), "silu");
    if (!solm::ParseAct(act, &k->act))
      Fail("SolmEP: SparseMLPBlocks act must be silu | gelu | gelu_tanh | relu, got '" + act + "'");
    k->bits_gate = static_cast<int>(AttrInt(node, attr("bits_gate"), 4));
    k->bits_up = static_cast<int>(AttrInt(node, attr("bits_up"), 4));
    k->bits_down = static_cast<int>(AttrInt(node, attr("bits_down"), 4));
    k->bits_down_dense = static_cast<int>(AttrInt(node, attr("bits_down_dense"), 4));
    k->block_size = AttrInt(node, attr("block_size"), 32);
    // Absent: fp32, the exact path (an artifact from before the attribute keeps its meaning).
    const std::string acts = AttrString(node, attr("activations"), "fp32");
    if (acts != "fp32" && acts != "int8")
      Fail("SolmEP: SparseMLPBlocks activations must be fp32 | int8, got '" + acts + "'");
    k->weights.int8 = acts == "int8";
    // Absent: x, SparseMLP's channel top-k (artifacts from before the attribute). h: down comes transposed.
    const std::string skip = AttrString(node, attr("skip"), "x");
    if (skip != "x" && skip != "h") Fail("SolmEP: SparseMLPBlocks skip must be x | h, got '" + skip + "'");
    k->weights.skip_h = skip == "h";
    // The weights must be constants: they are repacked block-column-major now and not kept as given.
    TensorRef t[15];
    for (size_t j = 0; j < 15; ++j) {
      const InputSlot& sl = slots[MlpBlocksKernel::kWeightInputs[j]];
      if (sl.name.empty()) continue;
      if (!sl.saved) Fail("SolmEP: SparseMLPBlocks weight input '" + sl.name + "' must be a constant initializer");
      t[j].data = sl.saved->bytes.data();
      t[j].type = sl.saved->type;
      t[j].shape.Assign(sl.saved->shape.data(), sl.saved->shape.size());
      t[j].present = true;
    }
    k->op = op;
    k->SetWeights(t);
    for (size_t i : MlpBlocksKernel::kWeightInputs) {
      slots[i].saved.reset();
      slots[i].consumed = true;
    }
    kernel = std::move(k);
  } else if (op == "LinearBlocks") {
    auto k = std::make_unique<LinearBlocksKernel>();
    k->bits = static_cast<int>(AttrInt(node, attr("bits"), 4));
    k->block_size = AttrInt(node, attr("block_size"), 32);
    const std::string acts = AttrString(node, attr("activations"), "fp32");
    if (acts != "fp32" && acts != "int8") Fail("SolmEP: LinearBlocks activations must be fp32 | int8, got '" + acts + "'");
    k->int8 = acts == "int8";
    TensorRef t[4];
    for (size_t j = 0; j < 4; ++j) {
      const InputSlot& sl = slots[LinearBlocksKernel::kWeightInputs[j]];
      if (sl.name.empty()) continue;
      if (!sl.saved) Fail("SolmEP: LinearBlocks weight input '" + sl.name + "' must be a constant initializer");
      t[j].data = sl.saved->bytes.data();
      t[j].type = sl.saved->type;
      t[j].shape.Assign(sl.saved->shape.data(), sl.saved->shape.size());
      t[j].present = true;
    }
    for (size_t j = 0; j < 3; ++j)
      if (!t[j].present) Fail("SolmEP: LinearBlocks needs codes, scale and offset");
    k->op = op;
    k->SetWeights(t);
    for (size_t i : LinearBlocksKernel::kWeightInputs) {
      slots[i].saved.reset();
      slots[i].consumed = true;
    }
    kernel = std::move(k);
  } else {
    auto k = std::make_unique<GateKernel>();
    k->min_len = AttrInt(node, attr("min_len"), 0);
    kernel = std::move(k);
  }
  kernel->op = op;
  kernel->inputs = std::move(slots);
  kernel->outputs = std::move(out_index);
  return kernel;
}

}  // namespace solm_ep
