#include "io/torch_file.h"

#include "common/error.h"
#include "common/files.h"

namespace vitlab {

namespace {

bool is_zip(std::string_view bytes) { return bytes.size() >= 4 && bytes.substr(0, 2) == "PK"; }

}  // namespace

bool is_torch_file(std::string_view bytes) { return is_zip(bytes) || starts_with_pickle(bytes); }

PickleValue parse_torch_file(std::string_view bytes, const std::string& source) {
  if (is_zip(bytes)) return load_torch_archive(bytes, source);
  if (starts_with_pickle(bytes)) return load_torch_legacy(bytes, source);
  fail(
      "{}: not a torch.save file: neither the zip format (starting 'PK') nor the legacy one (a pickle, starting "
      "0x80 and protocol 2-5); {}",
      source, leading_bytes(bytes));
}

std::string leading_bytes(std::string_view bytes) {
  if (bytes.empty()) return "the file is empty";
  const std::string_view head = bytes.substr(0, 16);
  std::string hex, text;
  for (const char c : head) {
    hex += fmt::format("{}{:02x}", hex.empty() ? "" : " ", uint8_t(c));
    text += c >= 0x20 && c < 0x7f ? c : '.';
  }
  return fmt::format("its first {} bytes: {} \"{}\"", head.size(), hex, text);
}

namespace {

StateDict dict_to_state(const PickleValue& dict, const std::string& source) {
  StateDict state;
  for (const auto& [key, value] : dict.entries()) {
    if (!key.is(PickleValue::Kind::String))
      fail("{}: expected string keys in the state dict, got {}", source, key.describe());
    if (!value.is(PickleValue::Kind::Tensor))
      fail("{}: entry '{}' is {}, expected a tensor (the file must hold a dict of tensors)", source, key.to_string(),
           value.describe());
    state.insert_or_assign(key.to_string(), value.to_tensor());  // a repeated key: the last wins, as in Python
  }
  return state;
}

}  // namespace

StateDict parse_torch_state_dict(std::string_view bytes, const std::string& source) {
  PickleValue value = parse_torch_file(bytes, source);
  if (!value.is(PickleValue::Kind::Dict))
    fail(
        "{}: holds {}, expected a dict of tensors (or a checkpoint with one under 'state_dict', 'model' or "
        "'state_dict_ema')",
        source, value.describe());
  for (const char* nested : {"state_dict", "model", "state_dict_ema"}) {
    const PickleValue* inner = value.find(nested);
    if (inner && inner->is(PickleValue::Kind::Dict)) return dict_to_state(*inner, source + ":" + nested);
  }
  return dict_to_state(value, source);
}

torch::Tensor read_torch_tensor(const std::filesystem::path& path) {
  PickleValue value = parse_torch_file(read_file(path), path.string());
  if (!value.is(PickleValue::Kind::Tensor))
    fail("{}: holds {}, expected a tensor saved with torch.save(tensor, path)", path.string(), value.describe());
  return value.to_tensor();
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
