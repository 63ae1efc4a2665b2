// `vitlab study` end to end on a tiny budget, and its config checks.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "common/files.h"
#include "study/study.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

const char* kTinyStudy = R"(study:
  families:
    ViT: {model: vit_patch16_224_16b}
    DeepViT: {model: deepvit_patch16_224_re_attn_16b}
  depths: [2]
  analysis: {images: 24, batch_size: 10}
model: {img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 16, num_heads: 2, mlp_ratio: 2}
data: {type: fashion_mnist, workers: 1, train_limit: 256}
optim: {lr: 1.0e-3}
schedule: {warmup_epochs: 0}
aug: {mean: [0.5], std: [0.5], auto_augment: "", color_jitter: 0, reprob: 0, mixup: 0, cutmix: 0}
train: {epochs: 1, batch_size: 64}
)";

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
                    Catch::Contains("study.depths or study.analysis.KEY"));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.analysis.image=3")}),
                    Catch::Contains("unknown key 'study.analysis.image'") && Catch::Contains("images"));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("model.dept=3")}), Catch::Contains("model.dept"));
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.analysis.maps=post")}),
                    Catch::Contains("study.analysis.maps must be 'applied'") && Catch::Contains("got 'post'"));
  CHECK(StudyConfig::load(dir / "s.yaml", {parse_override("study.analysis.maps=softmax")}).analysis.maps == "softmax");
  CHECK_THROWS_WITH(StudyConfig::load(dir / "s.yaml", {parse_override("study.depths=[0]")}),
                    Catch::Contains("positive integers"));
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
