#include "io/torch_file.h"

#include "common/error.h"
#include "common/files.h"

namespace vitlab {

torch::IValue parse_torch_file(std::string_view bytes, const std::string& source) {
  if (bytes.size() < 4 || bytes.substr(0, 2) != "PK")
    fail("{}: not a torch.save file (expected the zip format PyTorch writes since 1.6)", source);
  try {
    return torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const c10::Error& e) {
    fail("{}: cannot read torch.save file: {}", source, e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail("{}: cannot read torch.save file: {}", source, e.what());
  }
}

namespace {

StateDict dict_to_state(const c10::impl::GenericDict& dict, const std::string& source) {
  StateDict state;
  for (const auto& kv : dict) {
    if (!kv.key().isString()) fail("{}: expected string keys in the state dict, got a {}", source, kv.key().tagKind());
    const std::string& key = kv.key().toStringRef();
    if (!kv.value().isTensor())
      fail("{}: entry '{}' is a {}, expected a tensor (the file must hold a dict of tensors)", source, key, kv.value().tagKind());
    state.emplace(key, kv.value().toTensor());
  }
  return state;
}

}  // namespace

StateDict parse_torch_state_dict(std::string_view bytes, const std::string& source) {
  torch::IValue value = parse_torch_file(bytes, source);
  if (!value.isGenericDict())
    fail("{}: holds a {}, expected a dict of tensors (save with torch.save(dict(model.state_dict()), path))", source,
         value.tagKind());
  auto dict = value.toGenericDict();
  for (const char* nested : {"state_dict", "model", "state_dict_ema"}) {
    auto it = dict.find(torch::IValue(std::string(nested)));
    if (it != dict.end() && it->value().isGenericDict()) return dict_to_state(it->value().toGenericDict(), source + ":" + nested);
  }
  return dict_to_state(dict, source);
}

torch::Tensor read_torch_tensor(const std::filesystem::path& path) {
  torch::IValue value = parse_torch_file(read_file(path), path.string());
  if (!value.isTensor()) fail("{}: holds a {}, expected a tensor saved with torch.save(tensor, path)", path.string(), value.tagKind());
  return value.toTensor();
}

std::string serialize_torch(const torch::IValue& value) {
  std::vector<char> bytes = torch::pickle_save(value);
  return std::string(bytes.begin(), bytes.end());
}

std::string serialize_torch_state_dict(const StateDict& state) {
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, tensor] : state) dict.insert(name, tensor.detach().to(torch::kCPU).contiguous());
  return serialize_torch(torch::IValue(dict));
}

}  // namespace vitlab
