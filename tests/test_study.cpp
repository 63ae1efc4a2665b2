// `vitlab study` end to end on a tiny budget, and its config checks.
#include <fmt/format.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

#include "analysis/bootstrap.h"
#include "common/files.h"
#include "io/safetensors.h"
#include "study/study.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

const char* kTinyStudy = R"(study:
  families:
    - {name: ViT, model: {name: vit_patch16_224_16b}}
    - {name: DeepViT, model: {name: deepvit_patch16_224_re_attn_16b}}
  depths: [2]
  analysis: {images: 24, batch_size: 10}
model: {img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 16, num_heads: 2, mlp_ratio: 2}
data: {type: fashion_mnist, workers: 1, train_limit: 256}
optim: {lr: 1.0e-3}
schedule: {warmup_epochs: 0}
aug: {mean: [0.5], std: [0.5], auto_augment: "", color_jitter: 0, reprob: 0, mixup: 0, cutmix: 0}
train: {epochs: 1, batch_size: 64}
)";

// The study with its study section's families, depths and seeds replaced.
std::string tiny_study(const std::string& families, const std::string& rest = "  seeds: [0, 1]\n") {
  const std::string base = kTinyStudy;
  const size_t from = base.find("  families:"), to = base.find("  analysis:");
  return base.substr(0, from) + "  families:\n" + families + "  depths: [2]\n" + rest + base.substr(to);
}

const char* kTwoFamilies =
    "    - {name: ViT, model: {name: vit_patch16_224_16b}}\n"
    "    - {name: PureAttention, model: {name: vit_patch16_224_16b, skip: false, mlp: false}}\n";

nlohmann::json member_summary(const fs::path& out, const std::string& member, const char* analysis = "analysis") {
  return nlohmann::json::parse(read_file(out / "members" / member / analysis / "summary.json"));
}

// Mean and sample standard deviation (n − 1), as the report writes them.
std::string mean_std(const std::vector<double>& v, int decimals) {
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return fmt::format("{:.{}f} ± {:.{}f}", mean, decimals, std::sqrt(ss / (v.size() - 1)), decimals);
}

// The report's table row of a family at a depth.
std::string table_row(const std::string& report, const std::string& family, int depth) {
  const size_t at = report.find(fmt::format("| {} | {} |", family, depth));
  if (at == std::string::npos) return "";
  return report.substr(at, report.find('\n', at) - at);
}

}  // namespace

TEST_CASE("study config: members, overrides and clear errors") {
  TempDir dir;
  write_file_atomic(dir / "s.yaml", kTinyStudy);
  StudyConfig c =
      StudyConfig::load(dir / "s.yaml", {parse_override("study.depths=[1,3]"), parse_override("train.epochs=2")});
  REQUIRE(c.families.size() == 2);
  CHECK(c.depths == std::vector<int64_t>{1, 3});
  TrainConfig m = c.member_config(c.families[1], 3);
  CHECK(m.model == "deepvit_patch16_224_re_attn_16b");
  CHECK(m.model_overrides["depth"].as<int>() == 3);
  CHECK(m.model_overrides["embed_dim"].as<int>() == 16);
  CHECK(m.train.epochs == 2);
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.depth=[2]")}),
                    Catch::Contains("study.depths, study.seeds, study.at_init or study.analysis.KEY"));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.analysis.image=3")}),
                    Catch::Contains("unknown key 'study.analysis.image'") && Catch::Contains("images"));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("model.dept=3")}), Catch::Contains("model.dept"));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.analysis.maps=post")}),
                    Catch::Contains("study.analysis.maps must be 'applied'") && Catch::Contains("got 'post'"));
  CHECK(StudyConfig::load(dir / "s.yaml", {parse_override("study.analysis.maps=softmax")}).analysis.maps == "softmax");
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.depths=[0]")}),
                    Catch::Contains("study.depths must hold integers >= 1, got 0"));
  write_file_atomic(dir / "plain.yaml", "train: {epochs: 1}\n");
  CHECK_THROWS_WITH(StudyConfig::load(dir / "plain.yaml", {}), Catch::Contains("needs a 'study' section"));
}

TEST_CASE("a two-member study completes, reports both, and a rerun skips them") {
  TempDir dir;
  write_file_atomic(dir / "s.yaml", kTinyStudy);
  // The members' collapse measures through training, every epoch.
  const std::string during = " --set train.analysis.every=1 --set train.analysis.images=16";
  RunResult r =
      run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "out").string() + during);
  INFO(r.output);
  REQUIRE(r.status == 0);
  const std::string report = read_file(dir / "out" / "REPORT.md");
  CHECK_THAT(report, Catch::Contains("| ViT | 2 |") && Catch::Contains("| DeepViT | 2 |"));
  CHECK_THAT(report, Catch::Contains("![collapse measures against epoch](measures_vs_epoch.png)"));
  for (const char* f : {"top1_vs_depth.png", "similar_blocks_vs_depth.png", "adjacent_similarity.png",
                        "cross_layer_heatmaps.png", "measures_vs_epoch.png", "members/ViT_d2/model.safetensors",
                        "members/ViT_d2/analysis/curves.csv", "members/DeepViT_d2/analysis/epoch_000/summary.json",
                        "members/DeepViT_d2/analysis/similarity.pt", "members/DeepViT_d2/analysis/summary.json"})
    CHECK(fs::exists(dir / "out" / f));
  const auto trained = fs::last_write_time(dir / "out" / "members" / "ViT_d2" / "model.safetensors");

  RunResult again =
      run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "out").string());
  INFO(again.output);
  REQUIRE(again.status == 0);
  CHECK_THAT(again.output,
             Catch::Contains("ViT_d2 is trained, skipping") && Catch::Contains("DeepViT_d2 is trained, skipping"));
  CHECK(fs::last_write_time(dir / "out" / "members" / "ViT_d2" / "model.safetensors") == trained);
  CHECK(read_file(dir / "out" / "REPORT.md").find("| DeepViT | 2 |") != std::string::npos);

  // Other maps: the trained members are analysed again, not retrained.
  RunResult softmax =
      run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "out").string() +
              " --set study.analysis.maps=softmax" + " --set study.analysis.center=true");
  INFO(softmax.output);
  REQUIRE(softmax.status == 0);
  CHECK_THAT(softmax.output, Catch::Contains("DeepViT_d2 is trained, skipping") &&
                                 Catch::Contains("analysing DeepViT_d2") && !Catch::Contains("is analysed, skipping"));
  CHECK(fs::last_write_time(dir / "out" / "members" / "ViT_d2" / "model.safetensors") == trained);
  const auto summary =
      nlohmann::json::parse(read_file(dir / "out" / "members" / "DeepViT_d2" / "analysis" / "summary.json"));
  CHECK(summary["parameters"]["maps"] == "softmax");
  CHECK(summary["parameters"]["center"] == true);
  CHECK_THAT(read_file(dir / "out" / "REPORT.md"), Catch::Contains("centred softmax maps"));
}

TEST_CASE("study --jobs trains members in parallel processes, each as it would train alone") {
  TempDir dir;
  write_file_atomic(dir / "s.yaml", kTinyStudy);
  const std::string study = "study --config " + (dir / "s.yaml").string();

  RunResult bad = run_cli(study + " --out " + (dir / "one").string() + " --member ViT_d3");
  CHECK(bad.status != 0);
  CHECK_THAT(bad.output, Catch::Contains("no member 'ViT_d3'") && Catch::Contains("ViT_d2, DeepViT_d2"));

  // One member alone, one thread: trained and analysed, no report.
  RunResult one = run_cli(study + " --out " + (dir / "one").string() + " --member ViT_d2 --threads 1");
  INFO(one.output);
  REQUIRE(one.status == 0);
  CHECK(fs::exists(dir / "one" / "members" / "ViT_d2" / "analysis" / "summary.json"));
  CHECK_FALSE(fs::exists(dir / "one" / "members" / "DeepViT_d2"));
  CHECK_FALSE(fs::exists(dir / "one" / "REPORT.md"));

  // Both at once, two threads shared: one thread each.
  RunResult both = run_cli(study + " --out " + (dir / "both").string() + " --jobs 2 --threads 2");
  INFO(both.output);
  REQUIRE(both.status == 0);
  CHECK_THAT(both.output, Catch::Contains("ViT_d2 started in its own process") &&
                              Catch::Contains("DeepViT_d2 started in its own process"));
  const std::string report = read_file(dir / "both" / "REPORT.md");
  CHECK_THAT(report, Catch::Contains("| ViT | 2 |") && Catch::Contains("| DeepViT | 2 |"));
  for (const char* member : {"ViT_d2", "DeepViT_d2"}) {
    INFO(member);
    CHECK_THAT(read_file(dir / "both" / "members" / member / "study.log"), Catch::Contains("1 threads"));
  }
  CHECK(read_file(dir / "both" / "members" / "ViT_d2" / "model.safetensors") ==
        read_file(dir / "one" / "members" / "ViT_d2" / "model.safetensors"));
}

TEST_CASE("study families: a misspelt key anywhere fails at load before any training") {
  TempDir dir;
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"    - {name: ViT, modle: {name: vit_patch16_224_16b}}\n",
       {"unknown key 'study.families[0].modle'", "did you mean 'study.families[0].model'"}},
      {"    - {name: ViT, model: {name: vit_patch16_224_16b, dpth: 3}}\n", {"study.families[0] (ViT)", "dpth"}},
      {"    - {name: ViT, model: {name: vit_patch16_224_16b}}\n"
       "    - {name: Slow, model: {name: vit_patch16_224_16b}, train: {epochz: 1}}\n",
       {"study.families[1] (Slow)", "unknown key 'train.epochz'"}},
      {"    - {name: ViT, model: {name: vit_patch16_224_16b, depth: 3}}\n", {"depths come from study.depths"}},
      {"    - {name: ViT, model: {name: vit_patch16_224_16b}, train: {seed: 3}}\n", {"seeds come from study.seeds"}},
      {"    - {model: {name: vit_patch16_224_16b}}\n", {"study.families[0].name is required"}},
      {"    - {name: a/b, model: {name: vit_patch16_224_16b}}\n", {"letters, digits"}},
      {"    - {name: ViT}\n", {"study.families[0] (ViT): model.name is required"}},
      {"    - {name: ViT, model: {name: vit_patch16_224_16b}}\n    - {name: ViT, model: {name: vit_patch16_224_16b}}\n",
       {"two families are named 'ViT'"}}};
  for (const auto& [families, expected] : cases) {
    INFO(families);
    write_file_atomic(dir / "s.yaml", tiny_study(families));
    RunResult r = run_cli("study --config " + (dir / "s.yaml").string() + " --out " + (dir / "out").string());
    CHECK(r.status != 0);
    for (const auto& e : expected) CHECK_THAT(r.output, Catch::Contains(e));
    CHECK_FALSE(fs::exists(dir / "out"));  // nothing trained, nothing written
  }
  write_file_atomic(dir / "s.yaml", tiny_study(kTwoFamilies));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.seeds=[1,1]")}),
                    Catch::Contains("study.seeds lists 1 twice"));
  StudyConfig c =
      StudyConfig::load(dir / "s.yaml", {parse_override("study.seeds=[0,2]"), parse_override("study.at_init=true")});
  CHECK(c.at_init);
  std::vector<std::string> names;
  for (const auto& m : c.members()) names.push_back(m.name());
  CHECK(names == std::vector<std::string>{"ViT_d2", "ViT_d2_s2", "PureAttention_d2", "PureAttention_d2_s2"});
  const TrainConfig m = c.member_config(c.families[1], 2, 2);
  CHECK(m.train.seed == 2);
  CHECK(m.model_overrides["skip"].as<bool>() == false);
  CHECK(m.model_overrides["depth"].as<int>() == 2);
}

TEST_CASE("a two-seed two-family study at epoch 0 reports mean and standard deviation over seeds") {
  TempDir dir;
  write_file_atomic(dir / "s.yaml", tiny_study(kTwoFamilies));
  RunResult r = run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "out").string() +
                        " --set train.epochs=0");
  INFO(r.output);
  REQUIRE(r.status == 0);
  const std::string report = read_file(dir / "out" / "REPORT.md");
  INFO(report);
  CHECK_THAT(report, Catch::Contains("at initialisation (train.epochs: 0)"));
  for (const std::string family : {"ViT", "PureAttention"}) {
    INFO(family);
    for (const auto& member : {family + "_d2", family + "_d2_s1"}) {
      CHECK(fs::exists(dir / "out" / "members" / member / "model.safetensors"));
      CHECK_FALSE(fs::exists(dir / "out" / "members" / member / "checkpoint-last"));
    }
    std::vector<double> adjacent, residual, uniformity;
    for (const auto& member : {family + "_d2", family + "_d2_s1"}) {
      const auto j = member_summary(dir / "out", member);
      const auto adj = j.at("adjacent").get<std::vector<double>>();
      adjacent.push_back(std::accumulate(adj.begin(), adj.end(), 0.0) / adj.size());
      residual.push_back(j.at("rank_residual").back().get<double>());
      uniformity.push_back(j.at("token_uniformity").back().get<double>());
    }
    CHECK(residual[0] != residual[1]);  // the seeds give other initial weights
    const std::string row = table_row(report, family, 2);
    CHECK_THAT(row, Catch::Contains("| 2 | – |"));  // two seeds, top-1 not evaluated
    CHECK_THAT(row, Catch::Contains(mean_std(adjacent, 3)));
    CHECK_THAT(row, Catch::Contains(mean_std(residual, 3) + " | " + mean_std(uniformity, 3)));
  }
  // Pure attention collapses at initialisation, a ViT does not.
  CHECK(member_summary(dir / "out", "PureAttention_d2").at("rank_residual").back().get<double>() <
        0.1 * member_summary(dir / "out", "ViT_d2").at("rank_residual").back().get<double>());
  CHECK_THAT(report, Catch::Contains("- depth 2, ViT vs PureAttention: mean adjacent similarity"));
  // The bootstrap intervals over images: both seeds' images resampled alike.
  const size_t intervals = report.find("95% bootstrap intervals over the");
  REQUIRE(intervals != std::string::npos);
  for (const std::string family : {"ViT", "PureAttention"}) {
    INFO(family);
    std::vector<torch::Tensor> adjacent, residual;
    for (const auto& member : {family + "_d2", family + "_d2_s1"}) {
      const fs::path file = dir / "out" / "members" / member / "analysis" / "per_image.safetensors";
      const StateDict values = parse_safetensors(read_file(file), file.string());
      adjacent.push_back(values.at("adjacent_similarity"));
      residual.push_back(values.at("rank_residual"));
    }
    const Interval adj = bootstrap_interval(adjacent, [](const torch::Tensor& m) { return m.mean().item<double>(); });
    const Interval res = bootstrap_interval(residual, [](const torch::Tensor& m) { return m[-1].item<double>(); });
    CHECK(adj.low <= adj.high);
    const std::string row = table_row(report.substr(intervals), family, 2);
    CHECK_THAT(
        row, Catch::Contains(fmt::format("[{:.3f}, {:.3f}] | [{:.3f}, {:.3f}]", adj.low, adj.high, res.low, res.high)));
  }
  CHECK_THAT(report, Catch::Contains("its 95% intervals over images ["));
  for (const char* f : {"measures_vs_depth.png", "similar_blocks_vs_depth.png", "cross_layer_heatmaps.png"})
    CHECK(fs::exists(dir / "out" / f));
  CHECK_FALSE(fs::exists(dir / "out" / "top1_vs_depth.png"));  // no top-1 to draw
}

TEST_CASE("a study at initialisation analyses the seeded initial weights without training") {
  TempDir dir;
  write_file_atomic(dir / "s.yaml", tiny_study(kTwoFamilies, "  seeds: [0, 1]\n  at_init: true\n"));
  RunResult r =
      run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "init").string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, !Catch::Contains("training"));
  for (const char* member : {"ViT_d2", "ViT_d2_s1", "PureAttention_d2", "PureAttention_d2_s1"}) {
    INFO(member);
    const fs::path m = dir / "init" / "members" / member;
    CHECK(fs::exists(m / "analysis_init" / "summary.json"));
    for (const char* f : {"checkpoint-last", "model.safetensors", "summary.json", "metrics.csv"})
      CHECK_FALSE(fs::exists(m / f));
  }
  const std::string report = read_file(dir / "init" / "REPORT.md");
  CHECK_THAT(report, Catch::Contains("at initialisation (untrained, study.at_init)"));
  CHECK_THAT(table_row(report, "ViT", 2), Catch::Contains("| 2 | – |"));
  // The same weights a training run starts from: train.epochs=0 analyses the same.
  RunResult zero =
      run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "zero").string() +
              " --set study.at_init=false --set train.epochs=0" + " --member PureAttention_d2_s1");
  INFO(zero.output);
  REQUIRE(zero.status == 0);
  for (const char* measure : {"rank_residual", "token_uniformity", "adjacent"})
    CHECK(member_summary(dir / "zero", "PureAttention_d2_s1").at(measure) ==
          member_summary(dir / "init", "PureAttention_d2_s1", "analysis_init").at(measure));
  // A rerun finds the analyses done.
  RunResult again =
      run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "init").string());
  REQUIRE(again.status == 0);
  CHECK_THAT(again.output, !Catch::Contains("analysing"));
}

TEST_CASE("remedy families: CaiT and LayerScale with CaiT's depth rule, resolved per member") {
  TempDir dir;
  const std::string families =
      "    - {name: ViT+LayerScale, model: {name: vit_patch16_224_16b, init_values: cait}}\n"
      "    - {name: CaiT, model: {name: cait_xxs24_224, init_values: cait}}\n";
  std::string config = tiny_study(families, "  seeds: [0]\n  at_init: true\n");
  config.replace(config.find("  depths: [2]"), 13, "  depths: [2, 20]");
  write_file_atomic(dir / "s.yaml", config);
  RunResult r = run_cli("study --threads 2 --config " + (dir / "s.yaml").string() + " --out " + (dir / "out").string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  // 0.1 up to 18 blocks, 1e-5 up to 24 (Touvron et al. 2021), per member.
  for (const char* family : {"ViT+LayerScale", "CaiT"}) {
    INFO(family);
    CHECK(member_summary(dir / "out", fmt::format("{}_d2", family), "analysis_init").at("config").at("init_values") ==
          0.1);
    CHECK(member_summary(dir / "out", fmt::format("{}_d20", family), "analysis_init").at("config").at("init_values") ==
          1e-5);
  }
  const std::string report = read_file(dir / "out" / "REPORT.md");
  CHECK_FALSE(table_row(report, "CaiT", 20).empty());
  CHECK_FALSE(table_row(report, "ViT+LayerScale", 2).empty());
}
