#include <catch2/catch.hpp>
#include <cstring>

#include "common/error.h"
#include "common/files.h"
#include "io/safetensors.h"
#include "io/torch_file.h"
#include "models/registry.h"
#include "tests/helpers.h"

using namespace vitlab;
using vitlab::test::fixture;
using vitlab::test::TempDir;

namespace {

std::string with_header(const std::string& json, const std::string& data) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((json.size() >> (8 * i)) & 0xff));
  return out + json + data;
}

}  // namespace

TEST_CASE("safetensors round-trips every dtype bit-exactly") {
  StateDict s;
  s["f32"] = torch::randn({3, 4});
  s["f64"] = torch::randn({2}, torch::kFloat64);
  s["f16"] = torch::randn({5}).to(torch::kFloat16);
  s["bf16"] = torch::randn({2, 2}).to(torch::kBFloat16);
  s["i64"] = torch::arange(6, torch::kInt64).reshape({2, 3});
  s["i32"] = torch::arange(3, torch::kInt32);
  s["u8"] = torch::arange(4, torch::kUInt8);
  s["scalar"] = torch::tensor(3.5f).reshape({});
  s["empty"] = torch::zeros({0, 3});
  const std::string bytes = serialize_safetensors(s, {{"format", "pt"}});
  // Header is padded so the data starts 8-byte aligned.
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  CHECK(header_len % 8 == 0);
  StateDict back = parse_safetensors(bytes, "mem");
  REQUIRE(back.size() == s.size());
  for (const auto& [k, v] : s) {
    INFO(k);
    CHECK(back[k].scalar_type() == v.scalar_type());
    CHECK(back[k].sizes() == v.sizes());
    CHECK(torch::equal(back[k], v));
  }
}

TEST_CASE("safetensors from Python's writer reads like the .pt twin") {
  StateDict a = read_weights(fixture("vit_timm_small.safetensors"));
  StateDict b = read_weights(fixture("vit_timm_small.pt"));
  REQUIRE(a.size() == b.size());
  for (const auto& [k, v] : a) CHECK(torch::equal(v, b.at(k)));
}

TEST_CASE("corrupt safetensors are clear errors, never crashes") {
  const std::string data(16, '\0');
  auto parse = [](const std::string& bytes) { return parse_safetensors(bytes, "bad.safetensors"); };
  CHECK_THROWS_WITH(parse("abc"), Catch::Contains("bad.safetensors") && Catch::Contains("shorter than"));
  std::string huge = with_header("{}", "");
  huge[0] = '\x7f';
  huge[7] = '\x7f';
  CHECK_THROWS_WITH(parse(huge), Catch::Contains("runs past the end"));
  CHECK_THROWS_WITH(parse(with_header("{not json", data)), Catch::Contains("not a JSON object"));
  CHECK_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,32]}})", data)),
                    Catch::Contains("tensor 'w'") && Catch::Contains("out of range"));
  CHECK_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,4]}})", data)),
                    Catch::Contains("out of range"));
  CHECK_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}})", data)),
                    Catch::Contains("unknown dtype 'Q4'"));
  CHECK_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data)),
                    Catch::Contains("16 bytes for shape [3] of F32 (expected 12)"));
  CHECK_THROWS_WITH(parse(with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                      data)),
                    Catch::Contains("overlap"));
  CHECK_THROWS_WITH(parse(with_header(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,16]}})", data)),
                    Catch::Contains("non-negative"));
  CHECK_THROWS_WITH(
      parse(with_header(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", data)),
      Catch::Contains("too large"));
  CHECK_THROWS_WITH(parse(with_header(R"({"w":[1,2]})", data)),
                    Catch::Contains("expected {dtype, shape, data_offsets}"));
  // Every truncation of a valid file is an error, not a crash.
  const std::string good = read_file(fixture("vit_timm_small.safetensors"));
  for (size_t cut : {size_t(0), size_t(7), size_t(9), size_t(100), good.size() / 2, good.size() - 1})
    CHECK_THROWS_AS(parse(good.substr(0, cut)), vitlab::Error);
}

TEST_CASE("torch.save files: dicts, nested checkpoints, and what is not a state dict") {
  StateDict s = read_weights(fixture("deepvit_official_small.pt"));
  CHECK(s.count("blocks.0.attn.reatten_matrix.weight"));
  CHECK(s.at("blocks.0.attn.var_norm.num_batches_tracked").scalar_type() == torch::kInt64);

  // A checkpoint with the weights under "state_dict" plus other entries.
  c10::impl::GenericDict ckpt(c10::StringType::get(), c10::AnyType::get());
  c10::Dict<std::string, torch::Tensor> weights;
  weights.insert("w", torch::ones({2}));
  ckpt.insert("epoch", torch::IValue(int64_t(3)));
  ckpt.insert("state_dict", torch::IValue(weights));
  StateDict nested = parse_torch_state_dict(serialize_torch(torch::IValue(ckpt)), "ckpt.pt");
  REQUIRE(nested.size() == 1);
  CHECK(torch::equal(nested.at("w"), torch::ones({2})));

  CHECK_THROWS_WITH(parse_torch_state_dict(serialize_torch(torch::ones({2})), "t.pt"),
                    Catch::Contains("t.pt: holds a Tensor, expected a dict of tensors"));
  c10::impl::GenericDict mixed(c10::StringType::get(), c10::AnyType::get());
  mixed.insert("w", torch::IValue(torch::ones({1})));
  mixed.insert("lr", torch::IValue(0.1));
  CHECK_THROWS_WITH(parse_torch_state_dict(serialize_torch(torch::IValue(mixed)), "m.pt"),
                    Catch::Contains("entry 'lr' is a float, expected a tensor"));
  CHECK_THROWS_WITH(parse_torch_state_dict("PK\x03\x04garbage", "z.pt"),
                    Catch::Contains("z.pt: cannot read torch.save file"));
  CHECK_THROWS_WITH(parse_torch_state_dict("hello", "h.pt"), Catch::Contains("not a torch.save file"));
}

TEST_CASE("load_state: strict lists every problem at once, non-strict loads what matches") {
  torch::nn::Sequential m(torch::nn::Linear(4, 3), torch::nn::Linear(3, 2));
  StateDict s = module_state(*m);
  s.erase("1.bias");
  s["extra"] = torch::zeros({1});
  s["0.weight"] = torch::zeros({5, 4});
  s["1.weight"] = torch::full({2, 3}, 7.0f);
  try {
    load_state(*m, s, /*strict=*/true, "w.safetensors");
    FAIL("strict load accepted a bad state dict");
  } catch (const vitlab::Error& e) {
    const std::string msg = e.what();
    CHECK_THAT(msg, Catch::Contains("w.safetensors") && Catch::Contains("missing keys (1): 1.bias") &&
                        Catch::Contains("unexpected keys (1): extra") &&
                        Catch::Contains("0.weight: file [5, 4] vs model [3, 4]"));
  }
  CHECK_FALSE(torch::equal(m[1]->as<torch::nn::Linear>()->weight, torch::full({2, 3}, 7.0f)));  // nothing copied
  LoadReport r = load_state(*m, s, /*strict=*/false);
  CHECK(r.missing.size() == 1);
  CHECK(torch::equal(m[1]->as<torch::nn::Linear>()->weight, torch::full({2, 3}, 7.0f)));
}

TEST_CASE("write_weights: both formats read back, atomically, and unknown extensions are refused") {
  vitlab::test::TempDir dir;
  StateDict s = {{"a", torch::randn({3})}, {"b.c", torch::arange(4)}};
  for (const char* name : {"w.safetensors", "w.pt"}) {
    write_weights(dir / name, s);
    StateDict back = read_weights(dir / name);
    REQUIRE(back.size() == 2);
    CHECK(torch::equal(back.at("a"), s.at("a")));
    CHECK(torch::equal(back.at("b.c"), s.at("b.c")));
  }
  CHECK_THROWS_WITH(write_weights(dir / "w.npz", s), Catch::Contains("unknown weights format '.npz'"));
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++files;
  CHECK(files == 2);  // no temporaries left behind
}

TEST_CASE("read_weights: a file of no known format is an error showing its first bytes") {
  TempDir dir;
  write_file_atomic(dir / "image.bin", std::string("\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10", 20));
  CHECK_THROWS_WITH(
      read_weights(dir / "image.bin"),
      Catch::Contains("image.bin: unknown weights format: not safetensors") && Catch::Contains("zip format") &&
          Catch::Contains("legacy one") &&
          Catch::Contains("its first 16 bytes: 89 50 4e 47 0d 0a 1a 0a 00 00 00 0d 49 48 44 52 \".PNG........IHDR\"") &&
          !Catch::Contains("runs past the end"));
  write_file_atomic(dir / "empty.pt", "");
  CHECK_THROWS_WITH(read_weights(dir / "empty.pt"),
                    Catch::Contains("empty.pt: unknown weights format") && Catch::Contains("the file is empty"));
  // A pickle that torch.save did not write.
  write_file_atomic(dir / "pickle.pt", "\x80\x02K\x01.");
  CHECK_THROWS_WITH(read_weights(dir / "pickle.pt"),
                    Catch::Contains("pickle.pt: cannot read legacy torch.save file: its first pickle is not "
                                    "torch.save's magic number"));
}

TEST_CASE("read_weights: safetensors whose header length starts like a zip or a pickle") {
  TempDir dir;
  // Header lengths 0x4b50 ("PK") and 0x0280 (0x80 0x02), the JSON padded with spaces as the format allows.
  for (const size_t length : {size_t(0x4b50), size_t(0x0280)}) {
    INFO(length);
    std::string json = R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
    json.resize(length, ' ');
    const float value = 2.5f;
    write_file_atomic(dir / "w.safetensors", with_header(json, std::string(reinterpret_cast<const char*>(&value), 4)));
    CHECK(torch::equal(read_weights(dir / "w.safetensors").at("w"), torch::tensor({value})));
  }
}

TEST_CASE("torch.save's legacy format: vit_timm_small reads as its zip twin and gives the same logits") {
  const StateDict zip = read_weights(fixture("vit_timm_small.pt"));
  const StateDict legacy = read_weights(fixture("vit_timm_small.legacy.pt"));
  REQUIRE(legacy.size() == zip.size());
  for (const auto& [name, tensor] : zip) {
    INFO(name);
    REQUIRE(legacy.count(name));
    CHECK(legacy.at(name).scalar_type() == tensor.scalar_type());
    CHECK(torch::equal(legacy.at(name), tensor));
  }

  const nlohmann::json& entry = vitlab::test::manifest()["vit_timm_small"];
  YAML::Node config = YAML::Load(entry["config"].dump());
  config.remove("layer_norm_eps");  // fixed in vitlab's ViTs
  Model m = create_model("vit_base_patch16_224", config);
  m.module->eval();
  const torch::Tensor x = read_torch_tensor(fixture("vit_timm_small.input.pt"));
  torch::NoGradGuard no_grad;
  auto logits_from = [&](const std::string& file) {
    for (auto& p : m.module->parameters()) p.normal_();  // a load that skips a tensor shows
    CHECK(load_weights(m, fixture(file)).clean());
    return m.vision->forward(x);
  };
  const torch::Tensor from_zip = logits_from("vit_timm_small.pt");
  CHECK(torch::equal(logits_from("vit_timm_small.legacy.pt"), from_zip));
  CHECK(vitlab::test::max_abs_diff(from_zip, read_torch_tensor(fixture("vit_timm_small.logits.pt"))) <=
        entry["tolerance"]["logits_max_abs"].get<double>());
}

TEST_CASE("torch.save's legacy format: vit_tiny_patch16_224 converted by PyTorch gives its zip twin's logits") {
  TempDir dir;
  torch::manual_seed(0);
  Model m = create_model("vit_tiny_patch16_224");
  m.module->eval();
  write_weights(dir / "zip.pt", module_state(*m.module));
  // Exit status 77 where this Python has no PyTorch, 127 where there is no such Python.
  const std::string python = VITLAB_TEST_PYTHON;
  const auto converted = vitlab::test::run_shell(
      fmt::format("'{}' -c 'import sys\ntry:\n  import torch\nexcept ImportError:\n  "
                  "sys.exit(77)\ntorch.save(torch.load(sys.argv[1], "
                  "weights_only=False), sys.argv[2], _use_new_zipfile_serialization=False)' '{}' '{}'",
                  python, (dir / "zip.pt").string(), (dir / "legacy.pt").string()));
  if (converted.status == 77 || converted.status == 127) VITLAB_SKIP("no PyTorch in " + python);
  INFO(converted.output);
  REQUIRE(converted.status == 0);
  REQUIRE(read_file(dir / "legacy.pt").substr(0, 2) == "\x80\x02");  // a pickle, not a zip archive

  const torch::Tensor x = torch::randn({1, 3, 224, 224});
  torch::NoGradGuard no_grad;
  const torch::Tensor expected = m.vision->forward(x);
  for (const char* file : {"zip.pt", "legacy.pt"}) {
    INFO(file);
    for (auto& p : m.module->parameters()) p.normal_();  // a load that skips a tensor shows
    CHECK(load_weights(m, dir / file).clean());
    CHECK(torch::equal(m.vision->forward(x), expected));
  }
}
