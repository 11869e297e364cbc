// solm_driver: greedy decoding of a solm artifact with onnxruntime's C/C++ API alone, by docs/protocol.md (v1 to v3).
//
//   solm_driver ARTIFACT LIBSOLM_EP ATTN_KEEP MLP_KEEP BITS MAX_NEW_TOKENS [THREADS]  < prompt ids  > new ids
//
// It tokenizes nothing: stdin holds the prompt's token ids (whitespace-separated), stdout gets the generated ids
// on one line. LIBSOLM_EP is SolmEP's library (registered as a plugin EP for the solm and fixed kinds; ignored for
// portable and dense artifacts). THREADS: onnxruntime's intra-op threads (default: onnxruntime's choice).
// One prefill run, then one run per token; every state output is fed back as the next run's input, the KV
// buffers of a buffer-form artifact (solm, fixed, dense) written in place (present bound to past's OrtValue; in
// protocol 2 the page state buffers too). Stops after MAX_NEW_TOKENS or at an id of solm.eos_token_ids (not
// printed). Any error: one line on stderr, exit code 2. Built and tested by runtime/driver_build.py and
// tests/test_driver.py, which compare its ids with `solm run --greedy`'s.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

constexpr int kProtocolMax = 3;  // docs/protocol.md: versions 1 to 3 (one row: they differ in the page state)
constexpr uint32_t kMinApi = 24;  // the plugin-EP API (onnxruntime 1.24)

[[noreturn]] void Die(const std::string& msg) {
  std::string line = msg.substr(0, msg.find('\n'));
  std::fprintf(stderr, "solm_driver: %s\n", line.c_str());
  std::exit(2);
}

bool StartsWith(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// ---------------------------------------------------------------------------------------------- metadata (JSON)
// Each solm.* metadata property is a JSON value; the protocol needs numbers, number lists and two nested fields.
struct Metadata {
  std::map<std::string, std::string> values;

  std::string Raw(const std::string& key) const {
    auto it = values.find(key);
    return it == values.end() ? std::string() : it->second;
  }
  // The numbers in key's JSON value, in order (a number, a list, a nested list); of its field `field` if given.
  std::vector<double> Numbers(const std::string& key, const char* field = nullptr) const {
    std::string s = Raw(key);
    if (field != nullptr) {
      size_t at = s.find(std::string("\"") + field + "\"");
      if (at == std::string::npos) return {};
      s = s.substr(s.find(':', at) + 1);
      s = s.substr(0, s.find_first_of(",}"));
    }
    std::vector<double> out;
    const char* p = s.c_str();
    while (*p) {
      if (std::strchr("-0123456789", *p)) {
        char* end = nullptr;
        double v = std::strtod(p, &end);
        if (end == p) {  // a lone '-': not a number
          ++p;
          continue;
        }
        out.push_back(v);
        p = end;
      } else {
        ++p;
      }
    }
    return out;
  }
  int64_t Int(const std::string& key, const char* field = nullptr) const {
    auto v = Numbers(key, field);
    if (v.size() != 1) Die("artifact metadata solm." + key + (field ? std::string(".") + field : "") +
                           " is missing or not a number (compile the model again with solm-compile)");
    return static_cast<int64_t>(v[0]);
  }
};

// ---------------------------------------------------------------------------------------------- tensors
Ort::AllocatorWithDefaultOptions& Alloc() {
  static Ort::AllocatorWithDefaultOptions alloc;
  return alloc;
}

size_t ElementSize(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    default: Die("an input of an element type outside protocol 1 (float16, float32, int64)");
  }
}

Ort::Value Zeros(const std::vector<int64_t>& shape, ONNXTensorElementDataType type) {
  Ort::Value v = Ort::Value::CreateTensor(Alloc(), shape.data(), shape.size(), type);
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  if (n) std::memset(v.GetTensorMutableRawData(), 0, n * ElementSize(type));
  return v;
}

template <typename T>
Ort::Value Filled(const std::vector<int64_t>& shape, const std::vector<T>& data) {
  Ort::Value v = Ort::Value::CreateTensor<T>(Alloc(), shape.data(), shape.size());
  std::copy(data.begin(), data.end(), v.GetTensorMutableData<T>());
  return v;
}

constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kI64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

// ---------------------------------------------------------------------------------------------- the driver
struct Args {
  std::string artifact, ep_library;
  float attn_keep = 1, mlp_keep = 1, bits = 16;
  int max_new = 0, threads = 0;
};

Args ParseArgs(int argc, char** argv) {
  if (argc < 7 || argc > 8)
    Die("usage: solm_driver ARTIFACT LIBSOLM_EP ATTN_KEEP MLP_KEEP BITS MAX_NEW_TOKENS [THREADS] < prompt ids");
  Args a;
  a.artifact = argv[1];
  a.ep_library = argv[2];
  auto number = [&](int i, const char* name) {
    char* end = nullptr;
    double v = std::strtod(argv[i], &end);
    if (end == argv[i] || *end || !std::isfinite(v)) Die(std::string(name) + " must be a number, got " + argv[i]);
    return v;
  };
  a.attn_keep = static_cast<float>(number(3, "ATTN_KEEP"));
  a.mlp_keep = static_cast<float>(number(4, "MLP_KEEP"));
  a.bits = static_cast<float>(number(5, "BITS"));
  a.max_new = static_cast<int>(number(6, "MAX_NEW_TOKENS"));
  if (a.max_new < 1) Die("MAX_NEW_TOKENS must be >= 1");
  if (argc == 8) a.threads = static_cast<int>(number(7, "THREADS"));
  return a;
}

class Driver {
 public:
  Driver(const Args& args, Ort::Env& env) : args_(args) {
    const bool have_ep = args.ep_library != "-";
    session_ = Open(env, have_ep);
    ReadMetadata(*session_);
    if (have_ep && kind_ != "solm" && kind_ != "fixed") session_ = Open(env, false);  // stock onnxruntime, as solm
    for (const auto& n : session_->GetInputNames()) inputs_.push_back(n);
    for (const auto& n : session_->GetOverridableInitializerNames())  // the page state: inputs with a default
      if (StartsWith(n, "past_page_")) inputs_.push_back(n);
    for (const auto& n : session_->GetOutputNames()) outputs_.push_back(n);
    for (size_t i = 0; i < session_->GetInputCount(); ++i)
      types_[inputs_[i]] = session_->GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
    buffered_ = types_.count("past_length") > 0;
  }

  std::vector<int64_t> Generate(const std::vector<int64_t>& prompt) {
    const int64_t T = static_cast<int64_t>(prompt.size());
    Start(T);
    std::vector<int64_t> positions(T);
    for (int64_t t = 0; t < T; ++t) positions[t] = t;
    feeds_["input_ids"] = Filled<int64_t>({1, T}, prompt);
    feeds_["position_ids"] = Filled<int64_t>({1, T}, positions);
    std::vector<int64_t> out;
    for (;;) {
      int64_t tok = Step();
      if (std::find(eos_.begin(), eos_.end(), tok) != eos_.end()) break;
      out.push_back(tok);
      if (static_cast<int>(out.size()) == args_.max_new) break;
      feeds_["input_ids"] = Filled<int64_t>({1, 1}, {tok});
      feeds_["position_ids"] = Filled<int64_t>({1, 1}, {T + static_cast<int64_t>(out.size()) - 1});
    }
    return out;
  }

 private:
  // A session on the CPU EP, SolmEP in front of it if `with_ep` (a plugin EP: the library registered, then its
  // devices appended to the session options).
  std::unique_ptr<Ort::Session> Open(Ort::Env& env, bool with_ep) {
    Ort::SessionOptions so;
    if (args_.threads > 0) {
      so.SetIntraOpNumThreads(args_.threads);
      so.SetInterOpNumThreads(1);
    }
    so.AddConfigEntry("session.intra_op.allow_spinning", "0");  // solm's settings (runtime/session.py)
    so.SetLogSeverityLevel(3);
    if (with_ep) {
      env.RegisterExecutionProviderLibrary("SolmEP", args_.ep_library);
      std::vector<Ort::ConstEpDevice> devices;
      for (const auto& d : env.GetEpDevices())
        if (std::string(d.EpName()) == "SolmEP") devices.push_back(d);
      if (devices.empty()) Die(args_.ep_library + ": registered, but SolmEP offers no device");
      so.AppendExecutionProvider_V2(env, devices, std::unordered_map<std::string, std::string>{});
    }
    try {
      return std::make_unique<Ort::Session>(env, args_.artifact.c_str(), so);
    } catch (const Ort::Exception& e) {
      Die(args_.artifact + ": onnxruntime cannot load it" + (with_ep ? "" : " without SolmEP (give LIBSOLM_EP)") +
          ": " + e.what());
    }
  }

  void ReadMetadata(Ort::Session& s) {
    Ort::ModelMetadata md = s.GetModelMetadata();
    for (const auto& key : md.GetCustomMetadataMapKeysAllocated(Alloc())) {
      std::string k(key.get());
      if (StartsWith(k, "solm.")) meta_.values[k.substr(5)] = md.LookupCustomMetadataMapAllocated(key.get(),
                                                                                                   Alloc()).get();
    }
    if (meta_.Raw("kind").empty()) Die(args_.artifact + ": an ONNX model without solm metadata");
    kind_ = meta_.Raw("kind").substr(1, meta_.Raw("kind").size() - 2);
    const std::string protocol = meta_.Raw("protocol");  // a JSON integer; absent: written before version 1
    if (protocol != "" && protocol != "1" && protocol != "2" && protocol != "3")
      Die(args_.artifact + ": step protocol " + protocol + " is not one this driver drives (1 to " +
          std::to_string(kProtocolMax) + "); compile the model again or update the driver");
    paged_ = (protocol == "2" || protocol == "3") && !meta_.Raw("kv_cache").empty();  // page state: buffers
    for (double id : meta_.Numbers("eos_token_ids")) eos_.push_back(static_cast<int64_t>(id));
    if (kind_ != "dense") {  // the budget within the artifact's ranges, as `solm run` checks it
      auto r = meta_.Numbers("budget_ranges");
      float b[3] = {args_.attn_keep, args_.mlp_keep, args_.bits};
      const char* names[3] = {"ATTN_KEEP", "MLP_KEEP", "BITS"};
      for (int i = 0; i < 3 && r.size() == 6; ++i)
        if (b[i] < r[2 * i] || b[i] > r[2 * i + 1])
          Die(std::string(names[i]) + " " + std::to_string(b[i]) + " is outside this artifact's range [" +
              std::to_string(r[2 * i]) + ", " + std::to_string(r[2 * i + 1]) + "]");
    }
  }

  // Every input at its initial value (docs/protocol.md, "initial value (prefill)"), for a prompt of T tokens.
  void Start(int64_t T) {
    const int64_t hkv = meta_.Int("kv_heads"), d = meta_.Int("head_dim");
    const int64_t S = meta_.Raw("gate").empty() ? 8 : meta_.Int("gate", "page_size");
    const int64_t C = std::max((T + args_.max_new + S - 1) / S * S, S);  // prompt + new tokens, whole pages
    for (const std::string& name : inputs_) {
      if (name == "input_ids" || name == "position_ids") continue;
      Ort::Value v{nullptr};
      if (StartsWith(name, "past_key_") || StartsWith(name, "past_value_")) {
        v = buffered_ ? Zeros({1, hkv, C, d}, types_[name]) : Zeros({1, hkv, 0, d}, kF32);
      } else if (name == "past_length") {
        v = Zeros({1}, kI64);
      } else if (StartsWith(name, "past_page_")) {  // 2-3: a buffer of C/S pages (3: the cache's dtype, as the
        v = Zeros({1, hkv, paged_ ? C / S : 0, d}, paged_ ? types_[name] : kF32);  // input declares); 1: carried
      } else if (name == "policy_key" || name == "policy_value") {
        v = Zeros({1, meta_.Int("policy_heads"), meta_.Int("episode_len"), meta_.Int("policy_head_dim")}, kF32);
      } else if (name == "policy_prev_action") {
        v = Filled<int64_t>({1}, {meta_.Int("num_actions")});
      } else if (name == "policy_usage") {
        v = Zeros({1, 3}, kF32);
      } else if (name == "policy_count") {
        v = Zeros({1}, kF32);
      } else if (name == "policy_step") {
        v = Zeros({1}, kI64);
      } else if (name == "policy_hidden") {
        v = Zeros({1, meta_.Int("hidden_size")}, kF32);
      } else if (name == "budget") {
        v = Filled<float>({1, 3}, {args_.attn_keep, args_.mlp_keep, args_.bits / 16.0f});
      } else if (name == "attn_keep" || name == "mlp_keep" || name == "bits") {
        float x = name == "attn_keep" ? args_.attn_keep : name == "mlp_keep" ? args_.mlp_keep : args_.bits;
        v = Filled<float>({1}, {x});
      } else {
        Die(args_.artifact + ": input " + name + " is not in step protocols 1 to 3");
      }
      feeds_[name] = std::move(v);
    }
  }

  // One run: returns the greedy token of the last position, and carries every state output to its input.
  int64_t Step() {
    std::vector<const char*> in_names, out_names;
    std::vector<const OrtValue*> in_values;
    for (const std::string& name : inputs_) {
      in_names.push_back(name.c_str());
      in_values.push_back(static_cast<const OrtValue*>(feeds_.at(name)));
    }
    std::vector<OrtValue*> out_values(outputs_.size(), nullptr);
    std::vector<bool> in_place(outputs_.size(), false);
    for (size_t j = 0; j < outputs_.size(); ++j) {
      out_names.push_back(outputs_[j].c_str());
      if ((buffered_ && (StartsWith(outputs_[j], "present_key_") || StartsWith(outputs_[j], "present_value_"))) ||
          (paged_ && StartsWith(outputs_[j], "present_page_"))) {
        const std::string past = "past_" + outputs_[j].substr(std::strlen("present_"));
        out_values[j] = static_cast<OrtValue*>(feeds_.at(past));  // present bound to past's buffer: in place
        in_place[j] = true;
      }
    }
    Ort::ThrowOnError(Ort::GetApi().Run(*session_, nullptr, in_names.data(), in_values.data(), in_names.size(),
                                        out_names.data(), out_names.size(), out_values.data()));
    std::map<std::string, Ort::Value> out;
    for (size_t j = 0; j < outputs_.size(); ++j)
      if (!in_place[j]) out.emplace(outputs_[j], Ort::Value{out_values[j]});  // owns what onnxruntime made

    auto shape = out.at("logits").GetTensorTypeAndShapeInfo().GetShape();  // [1, T, V]
    const float* row = out.at("logits").GetTensorData<float>() + (shape[1] - 1) * shape[2];
    int64_t best = 0;
    for (int64_t v = 1; v < shape[2]; ++v)
      if (row[v] > row[best]) best = v;  // the first of equal maxima, as numpy's argmax

    if (buffered_) {  // advanced: past_length += T
      int64_t n = feeds_.at("input_ids").GetTensorTypeAndShapeInfo().GetShape()[1];
      int64_t length = feeds_.at("past_length").GetTensorData<int64_t>()[0] + n;
      feeds_["past_length"] = Filled<int64_t>({1}, {length});
    }
    for (auto& [name, value] : out) {  // carried: present_* -> past_*, policy_*_out -> policy_*
      std::string to;
      if (StartsWith(name, "present_")) to = "past_" + name.substr(std::strlen("present_"));
      else if (name.size() > 4 && name.compare(name.size() - 4, 4, "_out") == 0) to = name.substr(0, name.size() - 4);
      if (!to.empty() && feeds_.count(to)) feeds_[to] = std::move(value);
    }
    return best;
  }

  Args args_;
  Metadata meta_;
  std::string kind_;
  bool buffered_ = false;
  bool paged_ = false;
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::string> inputs_, outputs_;
  std::map<std::string, ONNXTensorElementDataType> types_;
  std::map<std::string, Ort::Value> feeds_;
  std::vector<int64_t> eos_;
};

}  // namespace

int main(int argc, char** argv) {
  Args args = ParseArgs(argc, argv);
  const OrtApi* api = OrtGetApiBase()->GetApi(kMinApi);
  if (api == nullptr) Die(std::string("onnxruntime ") + OrtGetApiBase()->GetVersionString() + " is older than 1.24");
  Ort::InitApi(api);
  std::vector<int64_t> prompt;
  for (long long id; std::cin >> id;) prompt.push_back(id);
  if (!std::cin.eof()) Die("stdin must hold the prompt's token ids (integers separated by whitespace)");
  if (prompt.empty()) Die("no prompt token ids on stdin");
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "solm_driver");
    Driver driver(args, env);
    std::vector<int64_t> ids = driver.Generate(prompt);
    for (size_t i = 0; i < ids.size(); ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(ids[i]));
    std::printf("\n");
  } catch (const std::exception& e) {  // Ort::Exception (onnxruntime's message) or the library's own
    Die(e.what());
  }
  return 0;
}
