#include <torch/version.h>

#include <catch2/catch.hpp>
#include <set>
#include <tuple>

#include "bench/bench.h"
#include "io/torch_file.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

TEST_CASE("FLOPs of vit_tiny_patch16_224 and a DeepViT match a hand count") {
  // 196 patches of 16x16x3 -> 192, T = 197; per block qkv 3*T*D^2, scores and
  // attn*V 2*T^2*D, projection T*D^2, MLP 2*T*D*4D; head D*1000.
  const double T = 197, D = 192;
  const double per_block = 3 * T * D * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D;
  const double expected = 196.0 * 768 * D + 12 * per_block + D * 1000;
  CHECK(forward_macs(resolve_model("vit_tiny_patch16_224")) == Approx(expected).epsilon(1e-12));
  CHECK(expected / 1e9 == Approx(1.26).epsilon(0.01));  // timm's table: 1.26 GMACs
  // Re-attention adds H^2 T^2 per block that has it.
  const ModelSpec deep = resolve_model("deepvit_patch16_224_re_attn_16b");
  YAML::Node plain;
  plain["apply_transform"] = "none";
  CHECK(forward_macs(deep) - forward_macs(resolve_model("deepvit_patch16_224_re_attn_16b", plain)) ==
        Approx(16 * 12.0 * 12 * T * T).epsilon(1e-12));
}

TEST_CASE("FLOPs of a small CaiT match a hand count; ViT without MLP drops exactly the MLP") {
  YAML::Node small;
  small["img_size"] = 32;  // 16 patches of 8x8x3
  small["patch_size"] = 8;
  small["embed_dim"] = 48;
  small["depth"] = 3;
  small["num_heads"] = 4;
  small["num_classes"] = 10;
  small["depth_token_only"] = 2;
  small["mlp_ratio_token_only"] = 2.0;  // unlike mlp_ratio 4: the class blocks' MLP has 96 hidden
  // N = 16, D = 48, H = 4. Self-attention over the patches alone: qkv 3ND^2,
  // scores and attn*V 2N^2D, talking heads 2H^2N^2, projection ND^2, MLP
  // 2ND*192. Class attention: q D^2, k and v 2(N+1)D^2, scores and sum
  // 2(N+1)D, projection D^2, MLP 2D*96.
  const double self_block =
      3 * 16 * 48 * 48 + 2 * 16 * 16 * 48 + 2 * 4 * 4 * 16 * 16 + 16 * 48 * 48 + 2 * 16 * 48 * 192;
  const double class_block = 48 * 48 + 2 * 17 * 48 * 48 + 2 * 17 * 48 + 48 * 48 + 2 * 48 * 96;
  const double expected = 16 * 3 * 8 * 8 * 48 + 3 * self_block + 2 * class_block + 48 * 10;
  CHECK(expected == 1760928);
  CHECK(forward_macs(resolve_model("cait_xxs24_224", small)) == expected);
  CHECK(forward_macs(resolve_model("cait_xxs24_224")) / 1e9 == Approx(2.5).epsilon(0.02));  // timm's card: 2.5

  YAML::Node no_mlp;
  no_mlp["mlp"] = false;
  const double T = 197, D = 192, hidden = 768;
  CHECK(forward_macs(resolve_model("vit_tiny_patch16_224")) -
            forward_macs(resolve_model("vit_tiny_patch16_224", no_mlp)) ==
        12 * 2 * T * D * hidden);
}

TEST_CASE("vitlab bench --profile lists operators by self CPU time, the attention kernel among them") {
  // --attention: with LibTorch 2.x a forward pass that keeps no map takes
  // the fused scaled_dot_product_attention instead of the kernel.
  RunResult r = run_cli(
      "bench --model vit_tiny_patch16_224 --set model.img_size=32 --set model.depth=2 --mode train --batch 2 "
      "--steps 2 --warmup 1 --threads 1 --attention --profile");
  INFO(r.output);
  REQUIRE(r.status == 0);
  const std::string last = r.output.substr(r.output.rfind('\n', r.output.size() - 2) + 1);
  const auto profile = nlohmann::json::parse(last)["profile"];
  CHECK(profile["profiled_ms_per_step"].get<double>() > 0);
  const auto& ops = profile["ops"];
  REQUIRE(ops.size() > 5);
  double share = 0, previous = 1e300;
  std::set<std::string> names;
  for (const auto& op : ops) {
    const double ms = op["self_ms_per_step"];
    CHECK(ms <= previous);  // sorted
    previous = ms;
    CHECK(op["calls_per_step"].get<double>() > 0);
    share += op["share"].get<double>();
    names.insert(op["op"]);
  }
  CHECK(share <= 1.0 + 1e-9);  // self times partition the profiled time
  CHECK(share > 0.5);
  CHECK((names.count("aten::mm") + names.count("aten::addmm")) > 0);
  CHECK(names.count("vitlab::attention_probs") == 1);
}

TEST_CASE("vitlab bench runs a few steps and prints one JSON line with every field") {
  // Inference keeps the maps as `vitlab analyze` does: packed by the CPU
  // kernel (17 tokens at 64x64); training as the regulariser stacks them.
  for (const auto& [mode, img_size, maps] : {std::tuple{"infer", 64, "packed"}, {"train", 32, "row-major"}}) {
    INFO(mode);
    RunResult r = run_cli(fmt::format(
        "bench --model vit_tiny_patch16_224 --set model.img_size={} --set model.depth=2 --mode {} --batch 2 "
        "--steps 2 --warmup 1 --attention --threads 1",
        img_size, mode));
    INFO(r.output);
    REQUIRE(r.status == 0);
    const auto j = nlohmann::json::parse(r.output.substr(r.output.rfind('{')));
    for (const char* key : {"images_per_sec", "step_ms_median", "step_ms_min", "peak_rss_mb", "gflop_per_step", "mfu",
                            "gemm_peak_gflops", "model", "batch", "threads", "libtorch"})
      CHECK(j.contains(key));
    CHECK(j["images_per_sec"].get<double>() > 0);
    CHECK(j["mfu"].get<double>() > 0);
    CHECK(j["threads"] == 1);
    CHECK(j["mode"] == mode);
    CHECK(j["attention_maps"] == maps);
  }
  RunResult g = run_cli("bench --gemm --threads 1");
  REQUIRE(g.status == 0);
  CHECK(nlohmann::json::parse(g.output)["gflops"].get<double>() > 0);
  TempDir dir;
  REQUIRE(
      run_cli(fmt::format("data export --dataset fashion_mnist --out {} --limit 40", (dir / "data").string())).status ==
      0);
  RunResult l = run_cli(
      fmt::format("bench --loader --data imagefolder:{} --batch 8 --steps 3 --img-size 32", (dir / "data").string()));
  INFO(l.output);
  REQUIRE(l.status == 0);
  CHECK(nlohmann::json::parse(l.output.substr(l.output.rfind('{')))["images_per_sec"].get<double>() > 0);
  CHECK(run_cli("bench --mode train").status != 0);  // no model
  CHECK_THAT(run_cli("bench --loader").output, Catch::Contains("--data"));
}

TEST_CASE("VITLAB_CPU_KERNELS=0 runs LibTorch's ops instead of vitlab's kernels, with the same results") {
  const std::string bench =
      " bench --model vit_tiny_patch16_224 --set model.img_size=64 --set model.depth=2 --mode infer --batch 2 "
      "--steps 1 --warmup 1 --threads 1 --attention --profile";
  RunResult on = run_cli(bench);
  RunResult off = run_shell("VITLAB_CPU_KERNELS=0 " + std::string(VITLAB_BIN) + bench + " 2>&1");
  INFO(on.output << off.output);
  REQUIRE(on.status == 0);
  REQUIRE(off.status == 0);
  auto json = [](const std::string& out) {  // the last line
    return nlohmann::json::parse(out.substr(out.rfind('\n', out.size() - 2) + 1));
  };
  auto ops = [&](const std::string& out) {
    std::set<std::string> names;
    const nlohmann::json j = json(out);  // a range-for over a temporary's member would dangle
    for (const auto& op : j["profile"]["ops"]) names.insert(op["op"]);
    return names;
  };
  CHECK(json(on.output)["cpu_kernels"] == true);
  CHECK(json(off.output)["cpu_kernels"] == false);
  CHECK(json(on.output)["attention_maps"] == "packed");
  CHECK(json(off.output)["attention_maps"] == "row-major");
  CHECK(ops(on.output).count("vitlab::attention_inference") == 1);
  CHECK(ops(off.output).count("vitlab::attention_inference") == 0);

  // DeepViT's fixture on LibTorch's ops: the official code's logits and maps.
  TempDir dir;
  const std::string name = "deepvit_official_small";
  RunResult r = run_shell(fmt::format(
      "VITLAB_CPU_KERNELS=0 {} forward --model deepvit_S{} --weights {} --input {} --output {} --attention {} "
      "--threads 1 2>&1",
      VITLAB_BIN, fixture_sets(manifest()[name]["config"]), fixture(name + ".safetensors").string(),
      fixture(name + ".input.pt").string(), (dir / "y.pt").string(), (dir / "a.pt").string()));
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK(max_abs_diff(read_torch_tensor(dir / "y.pt"), read_torch_tensor(fixture(name + ".logits.pt"))) < 1e-4);
  CHECK(max_abs_diff(read_torch_tensor(dir / "a.pt"), read_torch_tensor(fixture(name + ".attn.pt"))) < 1e-5);
}

TEST_CASE("vitlab bench --attention-op times the kernel, SDPA and the explicit op at a model's shapes") {
  for (const char* mode : {"infer", "train"}) {
    INFO(mode);
    RunResult r = run_cli(fmt::format(
        "bench --model vit_tiny_patch16_224 --set model.img_size=32 --attention-op --mode {} --batch 2 --steps 2 "
        "--warmup 1 --threads 1",
        mode));
    INFO(r.output);
    REQUIRE(r.status == 0);
    const auto j = nlohmann::json::parse(r.output.substr(r.output.rfind('{')));
    CHECK(j["shape"] == nlohmann::json({2, 3, 5, 64}));  // 2x2 patches + class token, 192 / 3 heads
    CHECK(j["vitlab_ms_median"].get<double>() > 0);
    CHECK(j["explicit_ms_median"].get<double>() > 0);
    CHECK(j.contains("sdpa_ms_median") == (TORCH_VERSION_MAJOR >= 2));
  }
  RunResult off = run_shell("VITLAB_CPU_KERNELS=0 " + std::string(VITLAB_BIN) +
                            " bench --model vit_tiny_patch16_224 --set model.img_size=32 --attention-op --steps 1 "
                            "--warmup 0 --batch 1 2>&1");
  CHECK(off.status == 1);
  CHECK_THAT(off.output, Catch::Contains("VITLAB_CPU_KERNELS=0"));
}
