#pragma once
// State dicts: named tensors read from and written to the files that PyTorch
// users exchange, and copied into or out of a torch::nn::Module by the same
// key names PyTorch uses.
#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace vitlab {

using StateDict = std::map<std::string, torch::Tensor>;

// Reads .safetensors, or a torch.save file (.pt/.pth/.bin, zip or legacy
// format) holding a dict of tensors or a dict whose `state_dict`, `model` or
// `state_dict_ema` entry holds one. The format is told by the file's bytes,
// not its name; a file of none of them is an error that shows its first
// bytes.
StateDict read_weights(const std::filesystem::path& path);

// Writes .safetensors, or a torch.save-compatible .pt/.pth/.bin by extension;
// atomically.
void write_weights(const std::filesystem::path& path, const StateDict& state);

// Parameters and buffers by their dotted names (`blocks.0.attn.qkv.weight`).
StateDict module_state(const torch::nn::Module& module);

struct LoadReport {
  std::vector<std::string> missing;     // in the module, not in the file
  std::vector<std::string> unexpected;  // in the file, not in the module
  std::vector<std::string> mismatched;  // "key: file [a, b] vs model [c, d]"
  bool clean() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  std::string describe() const;
};

// Copies `state` into the module's parameters and buffers (converting dtype).
// strict: any missing, unexpected or shape-mismatched key is one error that
// lists them all, and nothing is copied. Not strict: matching keys are
// copied, the rest reported (e.g. a new classifier head for fine-tuning).
LoadReport load_state(torch::nn::Module& module, const StateDict& state, bool strict = true,
                      const std::string& source = "state dict");

}  // namespace vitlab
