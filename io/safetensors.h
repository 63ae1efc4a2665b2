#pragma once
// The safetensors format: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
// then the raw little-endian tensor data.
#include <map>
#include <string>
#include <string_view>

#include "io/state_dict.h"

namespace vitlab {

// Whether the bytes start as a safetensors file does: the 8-byte header
// length, then the JSON header's '{'. No zip archive or pickle does.
bool is_safetensors(std::string_view bytes);

// Every structural fault (header past the end, offsets out of range or
// overlapping, unknown dtype, byte count not matching the shape) is an error
// naming `source` and the tensor.
StateDict parse_safetensors(std::string_view bytes, const std::string& source);

std::string serialize_safetensors(const StateDict& state, const std::map<std::string, std::string>& metadata = {});

}  // namespace vitlab
