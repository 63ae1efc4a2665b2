// Devices and mixed precision. The CUDA cases run where LibTorch sees a GPU
// (scripts/gpu-check.sh runs them); on a CPU-only machine they report that
// and check the CPU side only.
#include <ATen/autocast_mode.h>

#include <catch2/catch.hpp>
#include <map>

#include "common/device.h"
#include "common/files.h"
#include "io/torch_file.h"
#include "models/registry.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

// max|a - b| / max|b|: the fixtures' logits are O(1), so this reads as a
// relative error without blowing up on entries near zero.
double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  return max_abs_diff(a.cpu(), b.cpu()) / b.abs().max().item<double>();
}

Model fixture_model(const std::string& name) {
  const auto& config = manifest()[name]["config"];
  YAML::Node node = YAML::Load(config.dump());
  node.remove("layer_norm_eps");
  Model m = create_model(name.rfind("deepvit", 0) == 0 ? "deepvit_S" : "vit_base_patch16_224", node);
  load_weights(m, fixture(name + ".safetensors"));
  m.module->eval();
  return m;
}

torch::Tensor logits_on(Model& m, const torch::Tensor& x, const torch::Device& device, at::ScalarType amp) {
  m.module->to(device);
  torch::NoGradGuard no_grad;
  Autocast autocast(device, amp);
  return m.vision->forward(x.to(device)).to(torch::kCPU, torch::kFloat);
}

const char* kFixtures[] = {"vit_timm_small", "deepvit_official_small", "deepvit_official_S_style"};

}  // namespace

TEST_CASE("device and amp strings: clear errors") {
  CHECK(parse_device("cpu") == torch::Device(torch::kCPU));
  CHECK_THROWS_WITH(parse_device("gpu", "--device"),
                    Catch::Contains("--device must be cpu, cuda or cuda:N, got 'gpu'"));
  CHECK_THROWS_WITH(parse_device("cuda:x"), Catch::Contains("got 'cuda:x'"));
  if (!torch::cuda::is_available())
    CHECK_THROWS_WITH(parse_device("cuda", "train.device"),
                      Catch::Contains("train.device is cuda but") && Catch::Contains("no CUDA device"));
  CHECK(parse_amp("off", torch::kCPU) == at::ScalarType::Undefined);
  CHECK(parse_amp("bf16", torch::kCPU) == at::kBFloat16);
  CHECK_THROWS_WITH(parse_amp("fp16", torch::kCPU, "train.amp"), Catch::Contains("train.amp fp16 needs a CUDA device"));
  CHECK_THROWS_WITH(parse_amp("fp8", torch::kCPU), Catch::Contains("must be off, bf16 or fp16"));
}

TEST_CASE("bf16 autocast on the CPU: fixture logits within 2e-2, and the guard restores the state") {
  for (const char* name : kFixtures) {
    INFO(name);
    Model m = fixture_model(name);
    const torch::Tensor x = read_torch_tensor(fixture(std::string(name) + ".input.pt"));
    const torch::Tensor ref = read_torch_tensor(fixture(std::string(name) + ".logits.pt"));
    const torch::Tensor bf16 = logits_on(m, x, torch::kCPU, at::kBFloat16);
    const double err = relative_error(bf16, ref);
    INFO("relative error " << err);
    CHECK(err <= 2e-2);
    CHECK(err > 0);  // it really ran in bf16
    CHECK_FALSE(at::autocast::is_cpu_enabled());
    CHECK(relative_error(logits_on(m, x, torch::kCPU, at::ScalarType::Undefined), ref) <= 1e-5);
  }
}

TEST_CASE("CUDA: fixture logits in fp32 and bf16, and training steps in bf16 and fp16") {
  if (!torch::cuda::is_available())
    VITLAB_SKIP("LibTorch sees no CUDA device here: the CUDA checks run in scripts/gpu-check.sh on a GPU machine");
  for (const char* name : kFixtures) {
    INFO(name);
    Model m = fixture_model(name);
    const torch::Tensor x = read_torch_tensor(fixture(std::string(name) + ".input.pt"));
    const torch::Tensor ref = read_torch_tensor(fixture(std::string(name) + ".logits.pt"));
    const double fp32 = relative_error(logits_on(m, x, torch::kCUDA, at::ScalarType::Undefined), ref);
    const double bf16 = relative_error(logits_on(m, x, torch::kCUDA, at::kBFloat16), ref);
    INFO("fp32 " << fp32 << ", bf16 " << bf16);
    CHECK(fp32 <= 1e-3);
    CHECK(bf16 <= 2e-2);
  }
  TempDir dir;
  const std::string tiny =
      " --set model.name=vit_tiny_patch16_224 --set model.img_size=28 --set model.patch_size=7 --set model.in_chans=1"
      " --set model.embed_dim=64 --set model.depth=2 --set model.num_heads=2 --set 'aug.mean=[0.5]'"
      " --set 'aug.std=[0.5]' --set 'aug.auto_augment=\"\"' --set aug.mixup=0 --set aug.cutmix=0 --set aug.reprob=0"
      " --set train.batch_size=256 --set optim.lr=2e-3 --set schedule.warmup_epochs=0 --set train.epochs=1"
      " --set train.ema=true --device cuda";
  std::map<std::string, double> top1;
  for (const char* amp : {"bf16", "fp16"}) {
    INFO(amp);
    RunResult r = run_cli(std::string("train") + tiny + " --amp " + amp + " --out " + (dir / amp).string());
    INFO(r.output);
    REQUIRE(r.status == 0);
    auto summary = nlohmann::json::parse(read_file(dir / amp / "summary.json"));
    CHECK(summary["device"] == "cuda:0");
    top1[amp] = summary["best_top1"].get<double>();
    CHECK(top1[amp] > 50.0);  // 234 steps of a 105k-parameter ViT: ~60%
    CHECK(summary["skipped_steps"].get<int64_t>() <= 10);
    RunResult ev = run_cli("eval --checkpoint " + (dir / amp).string() + " --device cuda --amp " + amp);
    CHECK(ev.status == 0);
  }
  CHECK(std::abs(top1["bf16"] - top1["fp16"]) < 3.0);  // the same run up to rounding
}
