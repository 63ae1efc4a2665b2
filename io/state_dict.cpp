#include "io/state_dict.h"

#include <fmt/ranges.h>

#include "common/error.h"
#include "common/files.h"
#include "io/safetensors.h"
#include "io/torch_file.h"

namespace vitlab {

StateDict read_weights(const std::filesystem::path& path) {
  const std::string bytes = read_file(path);
  // Safetensors first: its header length may start with "PK" or 0x80.
  if (is_safetensors(bytes)) return parse_safetensors(bytes, path.string());
  if (is_torch_file(bytes)) return parse_torch_state_dict(bytes, path.string());
  fail(
      "{}: unknown weights format: not safetensors (an 8-byte header length, then '{{'), nor torch.save's zip "
      "format (starting 'PK') or legacy one (a pickle, starting 0x80 and protocol 2-5); {}",
      path.string(), leading_bytes(bytes));
}

void write_weights(const std::filesystem::path& path, const StateDict& state) {
  const std::string ext = path.extension().string();
  if (ext == ".safetensors") return write_file_atomic(path, serialize_safetensors(state, {{"format", "pt"}}));
  if (ext == ".pt" || ext == ".pth" || ext == ".bin") return write_file_atomic(path, serialize_torch_state_dict(state));
  fail("{}: unknown weights format '{}' (expected .safetensors, .pt, .pth or .bin)", path.string(), ext);
}

StateDict module_state(const torch::nn::Module& module) {
  StateDict state;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) state.emplace(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) state.emplace(b.key(), b.value());
  return state;
}

std::string LoadReport::describe() const {
  std::string out;
  if (!missing.empty()) out += fmt::format("\n  missing keys ({}): {}", missing.size(), fmt::join(missing, ", "));
  if (!unexpected.empty())
    out += fmt::format("\n  unexpected keys ({}): {}", unexpected.size(), fmt::join(unexpected, ", "));
  if (!mismatched.empty())
    out += fmt::format("\n  shape mismatches ({}): {}", mismatched.size(), fmt::join(mismatched, "; "));
  return out;
}

LoadReport load_state(torch::nn::Module& module, const StateDict& state, bool strict, const std::string& source) {
  StateDict target = module_state(module);
  LoadReport report;
  for (const auto& [name, tensor] : target) {
    auto it = state.find(name);
    if (it == state.end())
      report.missing.push_back(name);
    else if (it->second.sizes() != tensor.sizes())
      report.mismatched.push_back(
          fmt::format("{}: file {} vs model {}", name, it->second.sizes().vec(), tensor.sizes().vec()));
  }
  for (const auto& kv : state)
    if (!target.count(kv.first)) report.unexpected.push_back(kv.first);
  if (strict && !report.clean()) fail("{}: weights do not match the model:{}", source, report.describe());

  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : target) {
    auto it = state.find(name);
    if (it != state.end() && it->second.sizes() == tensor.sizes()) tensor.copy_(it->second);
  }
  return report;
}

}  // namespace vitlab
