// The torch.save reader against files Python wrote (scripts/make_fixtures.py; each tensor file has a
// .safetensors twin read by the other parser), and against hostile archives built here.
#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <zip.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <random>

#include "common/error.h"
#include "common/files.h"
#include "io/pickle.h"
#include "io/safetensors.h"
#include "io/torch_file.h"
#include "tests/helpers.h"

using namespace vitlab;
using Catch::Contains;
using vitlab::test::fixture;
using Kind = PickleValue::Kind;

namespace {

std::filesystem::path pickle_fixture(const std::string& name) { return fixture("pickle/" + name); }

PickleValue load(const std::string& name) { return parse_torch_file(read_file(pickle_fixture(name)), name); }

StateDict twin(const std::string& name) { return parse_safetensors(read_file(pickle_fixture(name)), name); }

void check_same(const torch::Tensor& got, const torch::Tensor& expected) {
  CHECK(got.scalar_type() == expected.scalar_type());
  CHECK(got.sizes() == expected.sizes());
  CHECK(torch::equal(got, expected));
}

// A string literal with its NUL bytes.
template <size_t N>
std::string raw(const char (&bytes)[N]) {
  return std::string(bytes, N - 1);
}

// A zip archive laid out as torch.save lays it out: data.pkl next to the data/<key> records.
std::string archive(const std::string& pkl, const std::map<std::string, std::string>& records = {}) {
  std::string out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t n) {
    out.append(static_cast<const char*>(data), n);
    return n;
  });
  writer.writeRecord("data.pkl", pkl.data(), pkl.size());
  for (const auto& [name, bytes] : records) writer.writeRecord(name, bytes.data(), bytes.size());
  writer.writeEndOfFile();
  return out;
}

// The same records as a zip tool may repack them: every record deflated.
std::string deflated_archive(const std::string& pkl, const std::map<std::string, std::string>& records) {
  zip_error_t error;
  zip_error_init(&error);
  zip_source_t* out = zip_source_buffer_create(nullptr, 0, 0, &error);
  REQUIRE(out);
  zip_source_keep(out);  // outlives the archive, which writes into it on zip_close
  zip_t* zip = zip_open_from_source(out, ZIP_TRUNCATE, &error);
  REQUIRE(zip);
  auto add = [&](const std::string& name, const std::string& bytes) {
    const zip_int64_t i = zip_file_add(zip, ("archive/" + name).c_str(),
                                       zip_source_buffer(zip, bytes.data(), bytes.size(), 0), ZIP_FL_ENC_UTF_8);
    REQUIRE(i >= 0);
    REQUIRE(zip_set_file_compression(zip, i, ZIP_CM_DEFLATE, 9) == 0);
  };
  add("data.pkl", pkl);
  for (const auto& [name, bytes] : records) add(name, bytes);
  REQUIRE(zip_close(zip) == 0);
  zip_stat_t stat;
  REQUIRE(zip_source_stat(out, &stat) == 0);
  std::string bytes(stat.size, '\0');
  REQUIRE(zip_source_open(out) == 0);
  REQUIRE(zip_source_read(out, bytes.data(), bytes.size()) == static_cast<zip_int64_t>(bytes.size()));
  zip_source_close(out);
  zip_source_free(out);
  return bytes;
}

// Where the central directory header (central) or the local header of the record `name` starts (APPNOTE.TXT
// 4.3.12, 4.3.7).
size_t zip_header(const std::string& zip, const std::string& name, bool central) {
  const std::string signature = central ? "PK\x01\x02" : "PK\x03\x04";
  const size_t name_length_at = central ? 28 : 26, name_at = central ? 46 : 30;
  for (size_t at = zip.find(signature); at != std::string::npos; at = zip.find(signature, at + 1)) {
    uint16_t n = 0;
    std::memcpy(&n, &zip[at + name_length_at], 2);
    if (zip.compare(at + name_at, n, name) == 0) return at;
  }
  FAIL("no zip header for " << name);
  return 0;
}

PickleValue load_pickle(const std::string& pkl, const std::map<std::string, std::string>& records = {}) {
  return load_torch_archive(archive(pkl, records), "bad.pt");
}

struct Records {
  std::string pkl;
  std::map<std::string, std::string> data;  // data/<key>
};

Records records_of(const std::string& name) {
  caffe2::serialize::PyTorchStreamReader reader(pickle_fixture(name).string());
  auto bytes = [&](const std::string& record) {
    auto [ptr, n] = reader.getRecord(record);
    return std::string(static_cast<const char*>(ptr.get()), n);
  };
  Records out{bytes("data.pkl"), {}};
  for (const std::string& record : reader.getAllRecords())
    if (record.rfind("data/", 0) == 0) out.data[record] = bytes(record);
  return out;
}

// Opcodes for hand-made pickles.
// GLOBAL of a qualified name: "collections.OrderedDict".
std::string global(const std::string& name) {
  const size_t dot = name.rfind('.');
  return "c" + name.substr(0, dot) + "\n" + name.substr(dot + 1) + "\n";
}

std::string binint(int32_t value) {
  std::string out = "J" + std::string(4, '\0');
  std::memcpy(&out[1], &value, 4);
  return out;
}

std::string str(const std::string& value) {
  std::string out = "X" + std::string(4, '\0') + value;
  const uint32_t n = static_cast<uint32_t>(value.size());
  std::memcpy(&out[1], &n, 4);
  return out;
}

std::string int_tuple(const std::vector<int32_t>& values) {
  std::string out = "(";
  for (int32_t v : values) out += binint(v);
  return out + "t";
}

// The persistent id of a storage of `numel` elements, ('storage', type, key, 'cuda:0', numel), with `more` (the
// legacy format's view) pickled before its end.
std::string storage_id(const std::string& type, const std::string& key, int32_t numel, const std::string& more = "") {
  return "(" + str("storage") + global(type) + str(key) + str("cuda:0") + binint(numel) + more + "tQ";
}

// The call that builds a tensor over the storage `id` names, as torch.save writes it: _rebuild_tensor_v2 over a
// typed storage ("torch.FloatStorage"), or with a dtype ("torch.float32") _rebuild_tensor_v3, as PyTorch 2 writes
// dtypes that have no storage class.
std::string rebuild_tensor(const std::string& id, int32_t offset, const std::vector<int32_t>& size,
                           const std::vector<int32_t>& stride, const std::string& dtype = "") {
  return global(dtype.empty() ? "torch._utils._rebuild_tensor_v2" : "torch._utils._rebuild_tensor_v3") + "(" + id +
         binint(offset) + int_tuple(size) + int_tuple(stride) + "\x89" + global("collections.OrderedDict") + ")R" +
         (dtype.empty() ? "" : global(dtype)) + "tR";
}

// A tensor over storage '0' of `numel` elements.
std::string tensor_pickle(const std::string& storage_type, int32_t numel, int32_t offset,
                          const std::vector<int32_t>& size, const std::vector<int32_t>& stride,
                          const std::string& dtype = "") {
  return "\x80\x02" + rebuild_tensor(storage_id(storage_type, "0", numel), offset, size, stride, dtype) + ".";
}

std::string floats(const std::vector<float>& values) {
  std::string out(values.size() * sizeof(float), '\0');
  std::memcpy(&out[0], values.data(), out.size());
  return out;
}

// A storage's data in a legacy file: its element count, then its bytes.
struct LegacyData {
  std::string key;
  uint64_t count;
  std::string bytes;
};

// A legacy torch.save file as _legacy_save lays it out: pickles of the magic number, the protocol version, the
// system info, the object (`object_pkl`) and the storage keys, then each storage's count and bytes.
std::string legacy_file(const std::string& object_pkl, const std::vector<LegacyData>& storages,
                        int32_t protocol_version = 1001) {
  std::string keys = "\x80\x02(";
  std::string data;
  for (const LegacyData& s : storages) {
    keys += str(s.key);
    data += std::string(reinterpret_cast<const char*>(&s.count), 8) + s.bytes;
  }
  return raw("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.") + "\x80\x02" + binint(protocol_version) +
         ".\x80\x02}." + object_pkl + keys + "l." + data;
}

// A legacy file of one float tensor [1, 2, 3, 4] over storage '0'.
std::string legacy_floats() {
  return legacy_file(tensor_pickle("torch.FloatStorage", 4, 0, {4}, {1}), {{"0", 4, floats({1, 2, 3, 4})}});
}

// Whether parse() loads: false when it fails with a vitlab::Error; anything else it throws fails the test.
template <typename Parse>
bool survive(Parse&& parse) {
  try {
    parse();
    return true;
  } catch (const vitlab::Error&) {
    return false;
  }
}

// Two unpickled values alike: the same kinds, numbers, strings and containers, and tensors of the same dtype,
// shape, strides, offset and values.
void check_alike(const PickleValue& a, const PickleValue& b, const std::string& where) {
  INFO(where);
  REQUIRE(a.describe() == b.describe());
  switch (a.kind()) {
    case Kind::Bool:
      CHECK(a.to_bool() == b.to_bool());
      break;
    case Kind::Int:
      CHECK(a.to_int() == b.to_int());
      break;
    case Kind::Float:
      CHECK(a.to_double() == b.to_double());
      break;
    case Kind::String:
    case Kind::Bytes:
    case Kind::Global:
      CHECK(a.to_string() == b.to_string());
      break;
    case Kind::Tensor:
    case Kind::Storage:
      check_same(a.to_tensor(), b.to_tensor());
      CHECK(a.to_tensor().strides() == b.to_tensor().strides());
      CHECK(a.to_tensor().storage_offset() == b.to_tensor().storage_offset());
      break;
    case Kind::List:
    case Kind::Tuple:
    case Kind::Set:
      REQUIRE(a.items().size() == b.items().size());
      for (size_t i = 0; i < a.items().size(); ++i)
        check_alike(a.items()[i], b.items()[i], where + "[" + std::to_string(i) + "]");
      break;
    case Kind::Dict:
      REQUIRE(a.entries().size() == b.entries().size());
      for (size_t i = 0; i < a.entries().size(); ++i) {
        check_alike(a.entries()[i].first, b.entries()[i].first, where + " key " + std::to_string(i));
        check_alike(a.entries()[i].second, b.entries()[i].second, where + " value " + std::to_string(i));
      }
      break;
    case Kind::Object:
      check_alike(a.to_object().args, b.to_object().args, where + ".args");
      check_alike(a.to_object().state, b.to_object().state, where + ".state");
      break;
    case Kind::None:
      break;
  }
}

}  // namespace

TEST_CASE("pickle: torch.save(model.state_dict()) reads like its safetensors twin") {
  const PickleValue value = load("state_dict.pt");
  REQUIRE(value.is(Kind::Dict));                                   // an OrderedDict, its _metadata dropped
  CHECK(value.entries().front().first.to_string() == "0.weight");  // file order
  const StateDict state = read_weights(pickle_fixture("state_dict.pt"));
  const StateDict expected = twin("state_dict.safetensors");
  REQUIRE(state.size() == expected.size());
  for (const auto& [name, tensor] : expected) {
    INFO(name);
    REQUIRE(state.count(name));
    check_same(state.at(name), tensor);
  }
  CHECK(state.at("1.num_batches_tracked").scalar_type() == torch::kInt64);
  CHECK(state.at("1.num_batches_tracked").item<int64_t>() == 1);
}

TEST_CASE("pickle: a training checkpoint with optimizer state, numbers and an argparse.Namespace") {
  const StateDict expected = twin("checkpoint.safetensors");
  const StateDict model = parse_torch_state_dict(read_file(pickle_fixture("checkpoint.pth")), "checkpoint.pth");
  size_t model_entries = 0;
  for (const auto& [name, tensor] : expected) {
    if (name.rfind("model.", 0) != 0) continue;
    INFO(name);
    ++model_entries;
    REQUIRE(model.count(name.substr(6)));
    check_same(model.at(name.substr(6)), tensor);
  }
  CHECK(model.size() == model_entries);

  const PickleValue ckpt = load("checkpoint.pth");
  CHECK(ckpt.find("epoch")->to_int() == 3);
  const PickleValue* args = ckpt.find("args");
  REQUIRE(args);
  CHECK(args->describe() == "an argparse.Namespace object");
  CHECK(args->to_object().type == "argparse.Namespace");
  CHECK(args->to_object().state.find("lr")->to_double() == 0.1);

  // Adam's state, keyed by parameter index: a 0-d step tensor and two buffers each.
  const PickleValue& optimizer = *ckpt.find("optimizer");
  const PickleValue& state = *optimizer.find("state");
  CHECK(state.entries().size() == 6);
  size_t buffers = 0;
  for (const auto& [index, slots] : state.entries()) {
    REQUIRE(index.is(Kind::Int));
    CHECK(slots.find("step")->to_tensor().dim() == 0);
    for (const auto& [slot, tensor] : slots.entries()) {
      const std::string name = fmt::format("optimizer.{}.{}", index.to_int(), slot.to_string());
      INFO(name);
      REQUIRE(expected.count(name));
      check_same(tensor.to_tensor(), expected.at(name));
      ++buffers;
    }
  }
  CHECK(buffers + model_entries == expected.size());
  const PickleValue& group = optimizer.find("param_groups")->items().at(0);
  CHECK(group.find("lr")->to_double() == 0.1);
  CHECK(group.find("betas")->items().at(1).to_double() == 0.999);
  CHECK(group.find("weight_decay")->to_int() == 0);
  CHECK_FALSE(group.find("amsgrad")->to_bool());
  CHECK(group.find("foreach")->is(Kind::None));
  std::vector<int64_t> params;
  for (const PickleValue& p : group.find("params")->items()) params.push_back(p.to_int());
  CHECK(params == std::vector<int64_t>{0, 1, 2, 3, 4, 5});
}

TEST_CASE("pickle: views keep their offset and strides and share one storage") {
  const PickleValue value = load("views.pt");
  const StateDict expected = twin("views.safetensors");
  REQUIRE(value.entries().size() == expected.size());
  for (const auto& [name, tensor] : expected) {
    INFO(name);
    check_same(value.find(name)->to_tensor(), tensor);
  }
  const torch::Tensor& base = value.find("base")->to_tensor();
  const torch::Tensor& slice = value.find("slice")->to_tensor();
  CHECK_FALSE(slice.is_contiguous());
  CHECK(slice.storage_offset() == 6);
  CHECK(slice.strides().vec() == std::vector<int64_t>{6, 2});
  CHECK(value.find("transposed")->to_tensor().strides().vec() == std::vector<int64_t>{1, 6});
  CHECK(value.find("element")->to_tensor().storage_offset() == 23);
  for (const char* view : {"slice", "transposed", "row", "element"}) {
    INFO(view);
    CHECK(value.find(view)->to_tensor().is_alias_of(base));
  }
}

TEST_CASE("pickle: every dtype, a 0-d and an empty tensor") {
  const PickleValue value = load("dtypes.pt");
  const StateDict expected = twin("dtypes.safetensors");
  REQUIRE(value.entries().size() == expected.size());
  for (const auto& [name, tensor] : expected) {
    INFO(name);
    check_same(value.find(name)->to_tensor(), tensor);
  }
  CHECK(value.find("scalar")->to_tensor().dim() == 0);
  CHECK(value.find("scalar")->to_tensor().item<float>() == 2.5f);
  CHECK(value.find("bool")->to_tensor().scalar_type() == torch::kBool);
}

TEST_CASE("pickle: an nn.Parameter and a plain tensor saved on their own") {
  const StateDict expected = twin("tensors.safetensors");
  check_same(read_torch_tensor(pickle_fixture("parameter.pt")), expected.at("parameter"));
  check_same(read_torch_tensor(pickle_fixture("tensor.pt")), expected.at("tensor"));
  CHECK_THROWS_WITH(read_weights(pickle_fixture("tensor.pt")),
                    Contains("tensor.pt: holds a Tensor, expected a dict of tensors"));
  CHECK_THROWS_WITH(read_torch_tensor(pickle_fixture("state_dict.pt")),
                    Contains("state_dict.pt: holds a dict, expected a tensor"));
  CHECK_THROWS_WITH(read_weights(pickle_fixture("values_p2.pt")),
                    Contains("values_p2.pt: entry 'none' is None, expected a tensor"));
}

TEST_CASE("pickle: Python values through protocols 2 and 4") {
  for (const std::string name : {"values_p2.pt", "values_p4.pt"}) {
    INFO(name);
    const PickleValue v = load(name);
    CHECK(v.find("none")->is(Kind::None));
    CHECK(v.find("true")->to_bool());
    CHECK_FALSE(v.find("false")->to_bool());
    std::vector<int64_t> ints;
    for (const PickleValue& i : v.find("ints")->items()) ints.push_back(i.to_int());
    CHECK(ints == std::vector<int64_t>{0, 255, 256, 65535, 65536, -1, -2147483648LL, 2147483648LL, 1099511627776LL,
                                       std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()});
    CHECK(v.find("float")->to_double() == -1.5e-3);
    CHECK(v.find("str")->to_string() == "h\xc3\xa9llo");
    CHECK(v.find("empty")->to_string().empty());

    const PickleValue& tuple = *v.find("tuple");
    REQUIRE(tuple.is(Kind::Tuple));
    REQUIRE(tuple.items().size() == 3);
    CHECK(tuple.items()[0].to_int() == 1);
    CHECK(tuple.items()[1].to_string() == "a");
    CHECK(tuple.items()[2].items().at(0).to_double() == 2.0);

    const PickleValue& nested = *v.find("nested");
    const PickleValue::Items& list = nested.find("list")->items();
    REQUIRE(list.size() == 2);
    CHECK((list[0].is(Kind::List) && list[0].items().empty()));
    CHECK((list[1].is(Kind::Dict) && list[1].entries().empty()));
    REQUIRE(nested.entries().size() == 2);
    CHECK(nested.entries()[1].first.to_int() == 7);
    CHECK(nested.entries()[1].second.to_string() == "int key");

    CHECK(v.find("set")->is(Kind::Set));
    CHECK(v.find("set")->items().at(0).to_int() == 3);
    CHECK(v.find("frozenset")->items().at(0).to_int() == 4);
    CHECK(v.find("dtype")->is(Kind::Global));
    CHECK(v.find("dtype")->to_string() == "torch.float16");
    const PickleValue::Items& shared = v.find("shared")->items();
    REQUIRE(shared.size() == 2);
    CHECK(&shared[0].items() == &shared[1].items());  // one list, memoized
    CHECK(shared[0].items().size() == 2);

    // Protocol 2 has no bytes opcode: Python writes a call to _codecs.encode.
    const PickleValue& bytes = *v.find("bytes");
    if (name == "values_p4.pt")
      CHECK((bytes.is(Kind::Bytes) && bytes.to_string() == raw("\x00\xff")));
    else
      CHECK(bytes.describe() == "a _codecs.encode object");
  }
}

TEST_CASE("pickle: truncated files and truncated data.pkl records are errors") {
  // Each cut costs a LibTorch exception with a backtrace: every byte of the zip's head and tail (the local and
  // central directories), every 13th in between.
  for (const char* name : {"state_dict.pt", "values_p4.pt"}) {
    INFO(name);
    const std::string good = read_file(pickle_fixture(name));
    for (size_t cut = 0; cut < good.size(); cut += (cut < 64 || cut + 128 >= good.size()) ? 1 : 13) {
      INFO("cut at " << cut);
      CHECK_THROWS_AS(parse_torch_file(std::string_view(good).substr(0, cut), name), vitlab::Error);
    }
  }
  const Records ckpt = records_of("checkpoint.pth");
  for (size_t cut = 0; cut < ckpt.pkl.size(); ++cut) {
    INFO("data.pkl cut at " << cut);
    CHECK_THROWS_WITH(load_pickle(ckpt.pkl.substr(0, cut), ckpt.data),
                      Contains("bad.pt: cannot read torch.save file: data.pkl byte"));
  }
}

TEST_CASE("pickle: deflated records load, and a zip header claiming more than its record holds is an error") {
  const std::vector<float> values{1.5f, -2.f, 3.25f, 0.f};
  const std::map<std::string, std::string> records{{"data/0", floats(values)}};
  const std::string pkl = tensor_pickle("torch.FloatStorage", 4, 0, {4}, {1});
  CHECK(torch::equal(load_torch_archive(deflated_archive(pkl, records), "deflated.pt").to_tensor(),
                     torch::tensor(values)));
  // 1 MiB of zeros deflates about 1000:1, close to deflate's limit, and still loads.
  const int32_t zeros = 1 << 18;
  const PickleValue big =
      load_torch_archive(deflated_archive(tensor_pickle("torch.FloatStorage", zeros, 0, {zeros}, {1}),
                                          {{"data/0", std::string(zeros * sizeof(float), '\0')}}),
                         "zeros.pt");
  CHECK(torch::equal(big.to_tensor(), torch::zeros({zeros})));

  // The 16-byte record's headers turned into a deflated 1 GiB one, in agreement (the local header leaves sizes to
  // the central one, as PyTorch writes it): an error before anything is allocated for it (a fuzzer's finding).
  std::string inflated = archive(pkl, records);
  auto put = [&](size_t at, auto value) { std::memcpy(&inflated[at], &value, sizeof(value)); };
  const size_t central = zip_header(inflated, "archive/data/0", true);
  const size_t local = zip_header(inflated, "archive/data/0", false);
  put(central + 10, uint16_t{ZIP_CM_DEFLATE});
  put(central + 24, uint32_t{1} << 30);
  put(local + 8, uint16_t{ZIP_CM_DEFLATE});
  CHECK_THROWS_WITH(load_torch_archive(inflated, "inflated.pt"),
                    Contains("record 'archive/data/0' claims 1073741824 bytes from 16 compressed"));

  // A flipped bit in the stored data: the CRC catches it.
  std::string flipped = archive(pkl, records);
  flipped[flipped.find(floats(values)) + 1] ^= 1;
  CHECK_THROWS_WITH(load_torch_archive(flipped, "flipped.pt"),
                    Contains("record 'archive/data/0' is corrupt") && Contains("CRC"));
}

TEST_CASE("pickle: flipped bits and random opcodes load or fail cleanly, never crash") {
  std::mt19937 rng(20240607);

  // Every byte of a checkpoint's data.pkl with one bit flipped, then bursts of random bytes.
  const Records ckpt = records_of("checkpoint.pth");
  size_t loaded = 0;
  for (size_t i = 0; i < ckpt.pkl.size(); ++i) {
    std::string pkl = ckpt.pkl;
    pkl[i] = static_cast<char>(pkl[i] ^ (1 << (i % 8)));
    loaded += survive([&] { load_pickle(pkl, ckpt.data); });
  }
  for (int round = 0; round < 1000; ++round) {
    std::string pkl = ckpt.pkl;
    for (int k = 0; k < 4; ++k) pkl[rng() % pkl.size()] = static_cast<char>(rng());
    loaded += survive([&] { load_pickle(pkl, ckpt.data); });
  }
  INFO("mutated data.pkl that still loaded: " << loaded);

  // Whole-file flips reach the zip structure.
  const std::string file = read_file(pickle_fixture("state_dict.pt"));
  for (int round = 0; round < 2000; ++round) {
    std::string bytes = file;
    bytes[rng() % bytes.size()] ^= static_cast<char>(1 << (rng() % 8));
    survive([&] { parse_torch_file(bytes, "flipped.pt"); });
  }

  // Random programs over the opcodes the reader knows, with the names torch.save uses.
  std::vector<std::string> tokens = {"q\x01",    "q\x02",   "h\x01",        "h\x02",  "K\x01",   "K\x07",
                                     binint(-1), binint(4), str("storage"), str("0"), str("cpu")};
  for (char op : std::string("(}])tdlsuae01RbQN\x85\x86\x87\x8f\x90\x91\x94\x81\x88\x89")) tokens.emplace_back(1, op);
  for (const char* name : {"torch.FloatStorage", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                           "torch._utils._rebuild_parameter", "builtins.set", "argparse.Namespace"})
    tokens.push_back(global(name));
  const std::map<std::string, std::string> records = {{"data/0", floats({1, 2, 3, 4})}};
  for (int round = 0; round < 5000; ++round) {
    std::string pkl = "\x80\x02";
    for (size_t n = 1 + rng() % 40; n > 0; --n) pkl += tokens[rng() % tokens.size()];
    survive([&] { load_pickle(pkl + ".", records); });
  }
}

TEST_CASE("pickle: unsupported opcodes, malformed pickles and bad storages are named errors") {
  CHECK_THROWS_WITH(
      load_pickle("\x80\x02I1\n."),
      Contains("bad.pt: cannot read torch.save file: data.pkl byte 2: unsupported pickle opcode 0x49 ('I')"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02."), Contains("data.pkl byte 2: stack underflow"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02N(\x85."), Contains("stack underflow"));  // TUPLE1 reaching below a MARK
  CHECK_THROWS_WITH(load_pickle("\x80\x02t."), Contains("no MARK"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02h\x05."), Contains("memo index 5 was never stored"));
  // Containers that hold themselves, directly or through another (found by
  // ASan as leaks: shared ownership never frees a cycle).
  CHECK_THROWS_WITH(load_pickle(raw("\x80\x02]q\0h\0a.")), Contains("a container holds itself"));
  CHECK_THROWS_WITH(load_pickle(raw("\x80\x02}q\0X\x01\0\0\0k]q\x01h\0as.")), Contains("a container holds itself"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02N"), Contains("ends without STOP"));
  CHECK_THROWS_WITH(load_pickle("\x80\x06N."), Contains("unsupported pickle protocol 6"));
  CHECK_THROWS_WITH(load_pickle(raw("\x80\x02X\xff\x00\x00\x00") + "ab."), Contains("truncated: needs 255 more bytes"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02" + global("torch.x").substr(0, 7)), Contains("without a newline"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02K\x01K\x02K\x03s."), Contains("SETITEM on an int, expected a dict"));
  CHECK_THROWS_WITH(load_pickle(std::string("\x80\x02(K\x01") + "d."),
                    Contains("DICT with an odd number of keys and values"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02K\x01)R."), Contains("REDUCE calls an int, expected a class or function"));
  CHECK_THROWS_WITH(load_pickle(raw("\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.")),
                    Contains("integer of 9 bytes does not fit in 64 bits"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02" + global("collections.OrderedDict") + "K\x01\x85R."),
                    Contains("collections.OrderedDict with arguments"));
  CHECK_THROWS_WITH(load_pickle("\x80\x02K\x01Q."), Contains("persistent id is an int, expected ('storage'"));
  CHECK_THROWS_WITH(load_torch_archive(read_file(pickle_fixture("tensor.pt")).substr(0, 100), "cut.pt"),
                    Contains("cut.pt: cannot read torch.save file"));

  // The hand-made tensor pickle is right: a strided view of four floats.
  const std::map<std::string, std::string> records = {{"data/0", floats({0, 1, 2, 3})}};
  check_same(load_pickle(tensor_pickle("torch.FloatStorage", 4, 1, {2}, {2}), records).to_tensor(),
             torch::tensor({1.0f, 3.0f}));
  check_same(load_pickle(tensor_pickle("torch.FloatStorage", 4, 4, {0, 3}, {3, 1}), records).to_tensor(),
             torch::zeros({0, 3}));

  // PyTorch 2's untyped storage: a byte count, the dtype in the rebuild call.
  check_same(
      load_pickle(tensor_pickle("torch.storage.UntypedStorage", 16, 2, {2}, {1}, "torch.float32"), records).to_tensor(),
      torch::tensor({2.0f, 3.0f}));
  CHECK_THROWS_WITH(
      load_pickle(tensor_pickle("torch.storage.UntypedStorage", 16, 0, {2}, {1}, "torch.uint16"), records),
      Contains("dtype is a reference to torch.uint16, expected a dtype such as torch.float32"));
  CHECK_THROWS_WITH(
      load_pickle(tensor_pickle("torch.storage.UntypedStorage", 16, 0, {5}, {1}, "torch.float32"), records),
      Contains("does not fit its storage of 4 Float elements"));

  CHECK_THROWS_WITH(
      load_pickle(tensor_pickle("torch.FloatStorage", 4, 0, {3}, {2}), records),
      Contains("tensor of size [3] and stride [2] at offset 0 does not fit its storage of 4 Float elements"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 4, 4, {}, {}), records), Contains("does not fit"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 4, 5, {0}, {1}), records),
                    Contains("does not fit"));
  const int32_t big = std::numeric_limits<int32_t>::max();
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 4, 0, {big, big, big}, {big, big, big}), records),
                    Contains("does not fit"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 4, 0, {2, 2}, {2}), records),
                    Contains("tensor size [2, 2] and stride [2] differ in length"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 4, 0, {2}, {-1}), records),
                    Contains("is negative"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 5, 0, {4}, {1}), records),
                    Contains("record 'data/0' holds 16 bytes, expected 5 Float elements of 4 bytes"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.DoubleStorage", 4, 0, {4}, {1}), records),
                    Contains("holds 16 bytes, expected 4 Double elements of 8 bytes"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.FloatStorage", 4, 0, {4}, {1})),
                    Contains("record 'archive/data/0' is missing from the archive"));
  CHECK_THROWS_WITH(load_pickle(tensor_pickle("torch.QInt8Storage", 4, 0, {4}, {1}), records),
                    Contains("unsupported storage type torch.QInt8Storage"));
}

TEST_CASE("pickle: deeply nested values load and free without deep recursion") {
  const size_t depth = 200000;
  const std::string nested = "\x80\x02" + std::string(depth, ']') + std::string(depth - 1, 'a');
  {
    const PickleValue value = load_pickle(nested + ".");
    size_t levels = 1;
    for (const PickleValue* v = &value; !v->items().empty(); v = &v->items()[0]) ++levels;
    CHECK(levels == depth);
  }
  CHECK_THROWS_WITH(load_pickle(nested), Contains("ends without STOP"));
}

TEST_CASE("pickle: legacy torch.save files read like their zip twins") {
  const std::vector<std::pair<std::string, std::string>> twins = {{"checkpoint.legacy.pth", "checkpoint.pth"},
                                                                  {"views.legacy.pt", "views.pt"},
                                                                  {"dtypes.legacy.pt", "dtypes.pt"},
                                                                  {"tensor.legacy_p4.pt", "tensor.pt"}};
  for (const auto& [legacy, zip] : twins) {
    INFO(legacy);
    CHECK(read_file(pickle_fixture(legacy)).substr(0, 2) != "PK");
    check_alike(load(legacy), load(zip), legacy);
  }
  const PickleValue views = load("views.legacy.pt");
  for (const char* view : {"slice", "transposed", "row", "element"}) {
    INFO(view);
    CHECK(views.find(view)->to_tensor().is_alias_of(views.find("base")->to_tensor()));
  }
  // The hand-made legacy file is right.
  check_same(load_torch_legacy(legacy_floats(), "floats.pt").to_tensor(), torch::tensor({1.0f, 2.0f, 3.0f, 4.0f}));
}

TEST_CASE("pickle: a legacy storage view is its own storage over its root's memory") {
  // Storage '1' is elements 2, 3, 4 of storage '0', as PyTorch before 0.4 saved a storage slice.
  const std::string root = storage_id("torch.FloatStorage", "0", 6, "N");
  auto view = [](int32_t offset, int32_t numel) {
    return storage_id("torch.FloatStorage", "0", 6, "(" + str("1") + binint(offset) + binint(numel) + "t");
  };
  const std::vector<LegacyData> data = {{"0", 6, floats({0, 1, 2, 3, 4, 5})}};
  const PickleValue pair = load_torch_legacy(
      legacy_file("\x80\x02" + rebuild_tensor(root, 0, {6}, {1}) + rebuild_tensor(view(2, 3), 1, {2}, {1}) + "\x86.",
                  data),
      "view.pt");
  torch::Tensor whole = pair.items().at(0).to_tensor();
  const torch::Tensor part = pair.items().at(1).to_tensor();
  check_same(part, torch::tensor({3.0f, 4.0f}));
  whole[3].fill_(7.0f);
  CHECK(part[0].item<float>() == 7.0f);

  CHECK_THROWS_WITH(
      load_torch_legacy(legacy_file("\x80\x02" + rebuild_tensor(view(4, 3), 0, {3}, {1}) + ".", data), "view.pt"),
      Contains("storage view '1' of 3 elements at offset 4 does not fit its storage of 6 Float elements"));
  CHECK_THROWS_WITH(
      load_torch_legacy(legacy_file("\x80\x02" + rebuild_tensor(view(2, 3), 0, {4}, {1}) + ".", data), "view.pt"),
      Contains("does not fit its storage of 3 Float elements"));
  CHECK_THROWS_WITH(
      load_torch_legacy(
          legacy_file("\x80\x02" + rebuild_tensor(storage_id("torch.FloatStorage", "0", 6, "K\x01"), 0, {6}, {1}) + ".",
                      data),
          "view.pt"),
      Contains("storage view is an int, expected None or (key, offset, size)"));
}

TEST_CASE("pickle: truncated and corrupted legacy files are named errors") {
  const std::string good = read_file(pickle_fixture("checkpoint.legacy.pth"));
  for (size_t cut = 0; cut < good.size(); ++cut) {
    INFO("cut at " << cut);
    CHECK_THROWS_WITH(
        parse_torch_file(std::string_view(good).substr(0, cut), "cut.pt"),
        Contains(cut < 2 ? "cut.pt: not a torch.save file" : "cut.pt: cannot read legacy torch.save file"));
  }

  auto fails = [](const std::string& bytes, const std::string& message) {
    CHECK_THROWS_WITH(load_torch_legacy(bytes, "bad.pt"),
                      Contains("bad.pt: cannot read legacy torch.save file: ") && Contains(message));
  };
  const std::string floats_pkl = tensor_pickle("torch.FloatStorage", 4, 0, {4}, {1});
  const std::string magic_error = "its first pickle is not torch.save's magic number 0x1950a86a20f9469cfc6c";
  std::string bad_magic = good;
  bad_magic[5] ^= 1;
  fails(bad_magic, magic_error);
  fails("\x80\x02K\x01.", magic_error);  // a pickle torch.save did not write
  fails(legacy_file(floats_pkl, {{"0", 4, floats({1, 2, 3, 4})}}, 1000), "protocol version is 1000, expected 1001");
  fails(legacy_file("\x80\x02t.", {}), "object pickle: file byte");
  fails(legacy_file(floats_pkl, {{"0", 5, floats({1, 2, 3, 4})}}), "holds 5 elements, the object pickle declares 4");
  fails(legacy_file(floats_pkl, {}), "storage '0' has no data: the list of storage keys does not name it");
  fails(legacy_file(floats_pkl, {{"0", 4, floats({1, 2, 3, 4})}, {"0", 4, floats({1, 2, 3, 4})}}),
        "storage key '0' is listed twice, or names no storage in the object pickle");
  fails(legacy_file(floats_pkl, {{"0", 4, floats({1, 2, 3, 4})}, {"9", 1, floats({1})}}),
        "storage key '9' is listed twice");
  const std::string whole = legacy_floats();
  fails(whole.substr(0, whole.size() - 1), "truncated: storage '0' at byte");
  fails(whole.substr(0, whole.size() - 20), "needs an 8-byte element count, 4 bytes left");
  // 16 GiB declared by a 300-byte file: refused before anything is allocated.
  const int32_t big = std::numeric_limits<int32_t>::max();
  fails(legacy_file(tensor_pickle("torch.DoubleStorage", big, 0, {4}, {1}), {{"0", 4, floats({1, 2, 3, 4})}}),
        "storage '0' of 2147483647 Double elements does not fit in the");
}

TEST_CASE("pickle: flipped bits in legacy files load or fail cleanly, never crash") {
  for (const char* name : {"dtypes.legacy.pt", "views.legacy.pt"}) {
    const std::string good = read_file(pickle_fixture(name));
    for (size_t i = 0; i < good.size(); ++i) {
      std::string bytes = good;
      bytes[i] = static_cast<char>(bytes[i] ^ (1 << (i % 8)));
      survive([&] { load_torch_legacy(bytes, name); });
    }
  }
  std::mt19937 rng(20250101);
  const std::string checkpoint = read_file(pickle_fixture("checkpoint.legacy.pth"));
  for (int round = 0; round < 2000; ++round) {
    std::string bytes = checkpoint;
    for (int k = 0; k < 3; ++k) bytes[rng() % bytes.size()] = static_cast<char>(rng());
    survive([&] { parse_torch_state_dict(bytes, "flipped.pth"); });
  }
}
