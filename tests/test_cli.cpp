// The CLI as a user runs it: outputs Python can read, and bad input that
// ends in a clear message, a non-zero exit and no output file.
#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <cstring>

#include "common/files.h"
#include "io/torch_file.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

const std::string kSmall = "--model deepvit_S" + fixture_sets(manifest()["deepvit_official_S_style"]["config"]);

std::string forward_args(const std::string& weights, const std::string& input, const TempDir& dir) {
  return fmt::format("forward {} --weights {} --input {} --output {} --attention {}", kSmall, weights, input,
                     (dir / "y.pt").string(), (dir / "a.pt").string());
}

bool empty_dir(const TempDir& dir) { return fs::is_empty(dir.path()); }

}  // namespace

TEST_CASE("vitlab forward writes logits and maps that match PyTorch") {
  TempDir dir;
  RunResult r = run_cli(
      forward_args(fixture("deepvit_official_S_style.safetensors"), fixture("deepvit_official_S_style.input.pt"), dir));
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("215314 parameters"));
  CHECK(max_abs_diff(read_torch_tensor(dir / "y.pt"),
                     read_torch_tensor(fixture("deepvit_official_S_style.logits.pt"))) < 1e-4);
  CHECK(max_abs_diff(read_torch_tensor(dir / "a.pt"), read_torch_tensor(fixture("deepvit_official_S_style.attn.pt"))) <
        1e-5);
  RunResult cmp = run_cli(fmt::format("compare {} {} --atol 1e-4", (dir / "y.pt").string(),
                                      fixture("deepvit_official_S_style.logits.pt").string()));
  CHECK(cmp.status == 0);
  CHECK(run_cli(fmt::format("compare {} {} --atol 1e-4", (dir / "y.pt").string(),
                            fixture("deepvit_official_small.logits.pt").string()))
            .status == 2);
}

TEST_CASE("vitlab models, info and --help") {
  RunResult models = run_cli("models");
  REQUIRE(models.status == 0);
  CHECK_THAT(models.output, Catch::Contains("deepvit_patch16_224_re_attn_32b") && Catch::Contains("48096232"));
  RunResult info = run_cli("info --model vit_small_patch16_224 --set model.num_classes=10 --threads 1");
  REQUIRE(info.status == 0);
  auto j = nlohmann::json::parse(info.output);
  CHECK(j["name"] == "vit_small_patch16_224");
  CHECK(j["parameters"] == 22050664 - 990 * 385);
  CHECK(j["config"]["num_classes"] == 10);
  for (const char* cmd : {"", "models", "info", "forward", "convert", "compare"})
    CHECK(run_cli(fmt::format("{} --help", cmd)).status == 0);
}

TEST_CASE("vitlab convert writes safetensors that reload to the same outputs") {
  TempDir dir;
  const std::string out = (dir / "w.safetensors").string();
  RunResult r = run_cli(
      fmt::format("convert {} --weights {} --out {}", kSmall, fixture("deepvit_official_S_style.pt").string(), out));
  INFO(r.output);
  REQUIRE(r.status == 0);
  StateDict a = read_weights(out), b = read_weights(fixture("deepvit_official_S_style.pt"));
  REQUIRE(a.size() == b.size());
  for (const auto& [k, v] : b) CHECK(torch::equal(a.at(k), v));
}

TEST_CASE("bad input: clear error, non-zero exit, no output left behind") {
  TempDir work;
  const std::string weights = fixture("deepvit_official_S_style.safetensors").string();
  const std::string input = fixture("deepvit_official_S_style.input.pt").string();

  const std::string good = read_file(weights);
  write_file_atomic(work / "truncated.safetensors", good.substr(0, good.size() / 2));
  std::string bad_dtype = good;
  bad_dtype.replace(bad_dtype.find("\"F32\""), 5, "\"X32\"");
  write_file_atomic(work / "dtype.safetensors", bad_dtype);
  write_file_atomic(work / "tensor.pt", serialize_torch(torch::ones({2})));
  write_file_atomic(work / "grey.pt", serialize_torch(torch::ones({2, 1, 32, 32})));
  write_file_atomic(work / "rank3.pt", serialize_torch(torch::ones({3, 32, 32})));
  write_file_atomic(work / "ints.pt", serialize_torch(torch::ones({2, 3, 32, 32}, torch::kInt64)));

  const std::vector<std::pair<std::string, std::string>> cases = {
      {forward_args((work / "truncated.safetensors").string(), input, TempDir()), "truncated.safetensors"},
      {forward_args((work / "dtype.safetensors").string(), input, TempDir()), "unknown dtype 'X32'"},
      {forward_args((work / "tensor.pt").string(), input, TempDir()), "expected a dict of tensors"},
      {forward_args(fixture("deepvit_official_small.safetensors").string(), input, TempDir()), "missing keys"},
      {forward_args((work / "missing.safetensors").string(), input, TempDir()), "no such file"},
      {forward_args(weights, (work / "grey.pt").string(), TempDir()), "does not match the model's [B, 3, 32, 32]"},
      {forward_args(weights, (work / "rank3.pt").string(), TempDir()), "expected an image batch [B, C, H, W]"},
      {forward_args(weights, (work / "ints.pt").string(), TempDir()), "expected a float tensor"},
      {forward_args(weights, weights, TempDir()), "not a torch.save file"},
      {"forward --model deepvit_S --set model.depht=3 --weights x --input y --output z", "did you mean 'model.depth'"},
      {"info --model deepvit_S --set model.depth=0", "model.depth must be >= 1"},
      {"info --model deepvit_S --set model.img_size=100", "not divisible by model.patch_size"},
      {"forward --model transformer_base --weights x --input y --output z", "forward runs image models"},
  };
  for (const auto& [args, message] : cases) {
    TempDir out;
    // Point every output into a fresh directory and check it stays empty.
    std::string cmd = args;
    for (const char* flag : {"--output ", "--attention "}) {
      auto pos = cmd.find(flag);
      if (pos == std::string::npos) continue;
      auto start = pos + std::strlen(flag), end = cmd.find(' ', start);
      cmd.replace(start, end == std::string::npos ? std::string::npos : end - start,
                  (out / (flag[2] == 'o' ? "y.pt" : "a.pt")).string());
    }
    RunResult r = run_cli(cmd);
    INFO(cmd << "\n" << r.output);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Catch::Contains(message) && Catch::StartsWith("error: "));
    CHECK_THAT(r.output, !Catch::Contains("Exception raised from"));  // no LibTorch backtraces
    CHECK(empty_dir(out));
  }
}

TEST_CASE("vitlab analyze on a fixture reproduces its similarity and writes the figures") {
  TempDir dir;
  const std::string name = "deepvit_official_S_style";
  RunResult r = run_cli(fmt::format("analyze {} --weights {} --input {} --batch 3 --out {}", kSmall,
                                    fixture(name + ".safetensors").string(), fixture(name + ".input.pt").string(),
                                    (dir / "out").string()));
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("similar blocks") && Catch::Contains("% of the forward passes"));
  const torch::Tensor m = read_torch_tensor(dir / "out" / "similarity.pt");
  CHECK(max_abs_diff(m, read_torch_tensor(fixture(name + ".similarity.pt"))) <= 1e-5);
  for (const char* f : {"summary.json", "cross_layer.png", "adjacent.png", "inter_head.png", "cross_layer.csv"})
    CHECK(fs::exists(dir / "out" / f));
  RunResult centred = run_cli(fmt::format("analyze {} --weights {} --input {} --center --visualize 0 --out {}", kSmall,
                                          fixture(name + ".safetensors").string(), fixture(name + ".input.pt").string(),
                                          (dir / "centred").string()));
  INFO(centred.output);
  REQUIRE(centred.status == 0);
  CHECK(nlohmann::json::parse(read_file(dir / "centred" / "summary.json"))["parameters"]["center"] == true);
  CHECK(max_abs_diff(read_torch_tensor(dir / "centred" / "similarity.pt"), m) > 0.01);

  RunResult both = run_cli(fmt::format("analyze {} --weights {} --input x.pt --data fashion_mnist --out {}", kSmall,
                                       fixture(name + ".safetensors").string(), (dir / "bad").string()));
  CHECK(both.status == 1);
  CHECK_THAT(both.output, Catch::Contains("not both"));
  CHECK_FALSE(fs::exists(dir / "bad"));
}
