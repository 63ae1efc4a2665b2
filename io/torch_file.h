#pragma once
// Files written by Python's torch.save (zip or legacy format), read by
// io/pickle.h, and files written for Python's torch.load.
#include <torch/torch.h>

#include <filesystem>
#include <string>
#include <string_view>

#include "io/pickle.h"
#include "io/state_dict.h"

namespace vitlab {

// Whether the bytes start as a torch.save file does: a zip archive ("PK"),
// or a pickle (the legacy format).
bool is_torch_file(std::string_view bytes);

// Whatever object the file holds: a state dict, a training checkpoint, a
// tensor. A file that is neither format is an error that shows its first
// bytes.
PickleValue parse_torch_file(std::string_view bytes, const std::string& source);

// A file's first bytes in hex and as text, for errors about a file of no
// known format: `its first 4 bytes: 68 65 6c 0a "hel."`.
std::string leading_bytes(std::string_view bytes);

// A dict of tensors, or a checkpoint dict holding one under `state_dict`,
// `model` or `state_dict_ema`.
StateDict parse_torch_state_dict(std::string_view bytes, const std::string& source);

// A single tensor saved with torch.save(tensor, path).
torch::Tensor read_torch_tensor(const std::filesystem::path& path);

// Bytes that Python's torch.load reads back.
std::string serialize_torch(const torch::IValue& value);
std::string serialize_torch_state_dict(const StateDict& state);

}  // namespace vitlab
