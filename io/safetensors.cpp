#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "common/error.h"

namespace vitlab {

namespace {

struct DtypeInfo {
  const char* name;
  torch::Dtype dtype;
};

const DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16},
    {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},   {"I8", torch::kInt8},
    {"U8", torch::kUInt8},    {"BOOL", torch::kBool},
};

const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

const char* dtype_name(torch::Dtype dtype) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d.name;
  fail("safetensors: cannot store dtype {}", c10::toString(dtype));
}

uint64_t read_u64_le(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

uint64_t as_u64(const nlohmann::json& j, const std::string& what) {
  if (!j.is_number_unsigned() && !(j.is_number_integer() && j.get<int64_t>() >= 0))
    fail("{}: expected a non-negative integer, got {}", what, j.dump());
  return j.get<uint64_t>();
}

struct Entry {
  std::string name;
  const DtypeInfo* dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

}  // namespace

bool is_safetensors(std::string_view bytes) { return bytes.size() > 8 && bytes[8] == '{'; }

StateDict parse_safetensors(std::string_view bytes, const std::string& source) {
  if (bytes.size() < 8)
    fail("{}: not a safetensors file ({} bytes, shorter than the 8-byte header length)", source, bytes.size());
  const uint64_t header_len = read_u64_le(bytes.data());
  if (header_len > bytes.size() - 8)
    fail("{}: safetensors header length {} runs past the end of the file ({} bytes)", source, header_len, bytes.size());
  const std::string_view header_text = bytes.substr(8, header_len);
  const std::string_view data = bytes.substr(8 + header_len);

  nlohmann::json header = nlohmann::json::parse(header_text.begin(), header_text.end(), nullptr, false);
  if (header.is_discarded() || !header.is_object()) fail("{}: safetensors header is not a JSON object", source);

  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = fmt::format("{}: tensor '{}'", source, it.key());
    const auto& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      fail("{}: expected {{dtype, shape, data_offsets}}, got {}", where, e.dump());
    if (!e["dtype"].is_string()) fail("{}: dtype must be a string", where);
    Entry entry{it.key(), dtype_by_name(e["dtype"].get<std::string>()), {}, 0, 0};
    if (!entry.dtype)
      fail("{}: unknown dtype '{}' (expected F64, F32, F16, BF16, I64, I32, I16, I8, U8 or BOOL)", where,
           e["dtype"].get<std::string>());
    if (!e["shape"].is_array()) fail("{}: shape must be a list of integers", where);
    uint64_t numel = 1;
    for (const auto& d : e["shape"]) {
      uint64_t n = as_u64(d, where + " shape");
      if (n > 0 && numel > std::numeric_limits<uint64_t>::max() / n / 8)
        fail("{}: shape {} is too large", where, e["shape"].dump());
      numel *= n;
      entry.shape.push_back(static_cast<int64_t>(n));
    }
    const auto& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2) fail("{}: data_offsets must be [begin, end]", where);
    entry.begin = as_u64(off[0], where + " data_offsets");
    entry.end = as_u64(off[1], where + " data_offsets");
    if (entry.begin > entry.end || entry.end > data.size())
      fail("{}: data_offsets [{}, {}] out of range (data section is {} bytes)", where, entry.begin, entry.end,
           data.size());
    const uint64_t expected = numel * c10::elementSize(entry.dtype->dtype);
    if (entry.end - entry.begin != expected)
      fail("{}: {} bytes for shape {} of {} (expected {})", where, entry.end - entry.begin, e["shape"].dump(),
           entry.dtype->name, expected);
    entries.push_back(std::move(entry));
  }

  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < entries.size(); ++i)
    if (entries[i].begin < entries[i - 1].end && entries[i].begin != entries[i].end)
      fail("{}: tensors '{}' and '{}' overlap in the data section", source, entries[i - 1].name, entries[i].name);

  StateDict state;
  for (const auto& e : entries) {
    torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype->dtype));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), data.data() + e.begin, e.end - e.begin);
    state.emplace(e.name, std::move(t));
  }
  return state;
}

std::string serialize_safetensors(const StateDict& state, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> blobs;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : state) {
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t n = t.numel() * t.element_size();
    header[name] = {
        {"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    blobs.push_back(t);
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + text.size() + offset);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((text.size() >> (8 * i)) & 0xff));
  out += text;
  for (const auto& t : blobs) out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return out;
}

}  // namespace vitlab
