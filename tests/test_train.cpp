#include <algorithm>
#include <catch2/catch.hpp>
#include <limits>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <sstream>

#include "common/error.h"
#include "common/files.h"
#include "data/loader.h"
#include "io/tensorboard.h"
#include "models/registry.h"
#include "study/study.h"
#include "tests/helpers.h"
#include "train/config.h"
#include "train/trainer.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

std::vector<Override> sets(std::initializer_list<const char*> items) {
  std::vector<Override> o;
  for (const char* s : items) o.push_back(parse_override(s));
  return o;
}

}  // namespace

TEST_CASE("train config: unknown sections and keys, bad values, and a YAML round trip") {
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"train.epoch=3"})),
                    Catch::Contains("unknown key 'train.epoch'") && Catch::Contains("did you mean 'train.epochs'"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"trian.epochs=3"})), Catch::Contains("model, data, optim"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"train.batch_size=0"})),
                    Catch::Contains("train.batch_size must be >= 1"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"optim.opt=adam"})),
                    Catch::Contains("optim.opt must be one of adamw, sgd"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"data.type=imagefolder"})), Catch::Contains("data.root is required"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"data.max_image_pixels=0"})),
                    Catch::Contains("data.max_image_pixels must be >= 1, got 0"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"aug.scale=0.5"})),
                    Catch::Contains("aug.scale: expected a list of numbers"));
  TempDir dir;
  write_file_atomic(dir / "bad.yaml", "model: {name: deepvit_S}\ntrainn: {}\n");
  CHECK_THROWS_WITH(TrainConfig::load(dir / "bad.yaml", {}), Catch::Contains("bad.yaml: unknown section 'trainn'"));

  TrainConfig c =
      TrainConfig::load(fixture("../../configs/fashion_mnist_vit.yaml"), sets({"train.epochs=3", "model.depth=2"}));
  CHECK(c.train.epochs == 3);
  CHECK(c.model_overrides["depth"].as<int>() == 2);
  write_file_atomic(dir / "resolved.yaml", c.to_yaml());
  TrainConfig again = TrainConfig::load(dir / "resolved.yaml", {});
  CHECK(again.to_yaml() == c.to_yaml());
  CHECK(again.aug.mean == std::vector<double>{0.2860});
}

TEST_CASE("data.max_image_pixels reaches the ImageFolder decoder") {
  TempDir dir;
  for (const char* split : {"train", "val"}) {
    fs::create_directories(dir / split / "a");
    REQUIRE(cv::imwrite((dir / split / "a" / "x.png").string(), cv::Mat(16, 12, CV_8UC3, cv::Scalar(1, 2, 3))));
  }
  const std::string root = "data.root=" + dir.path().string();
  TrainConfig c = TrainConfig::load("", sets({"data.type=imagefolder", root.c_str(), "data.max_image_pixels=192"}));
  CHECK(open_data(c.data).val->image(0, 3).size() == cv::Size(12, 16));
  c.data.max_image_pixels = 191;
  CHECK_THROWS_WITH(open_data(c.data).train->image(0, 3),
                    Catch::Contains("x.png") && Catch::Contains("12 x 16 image") && Catch::Contains("over 191 pixels"));
}

TEST_CASE("a tiny model overfits a small batch") {
  torch::manual_seed(0);
  ImageSet set = load_fashion_mnist(kFashionMnistDir, "test");
  torch::Tensor x = set.images.narrow(0, 0, 32).permute({0, 3, 1, 2}).to(torch::kFloat) / 255.0;
  torch::Tensor y = set.labels.narrow(0, 0, 32);
  Model m = create_model("vit_tiny_patch16_224", YAML::Load("{img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 32, "
                                                            "depth: 2, num_heads: 2, num_classes: 10}"));
  torch::optim::AdamW opt(m.module->parameters(), torch::optim::AdamWOptions(3e-3));
  double first = 0, last = 0;
  for (int step = 0; step < 150; ++step) {
    torch::Tensor loss = torch::nn::functional::cross_entropy(m.vision->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.1 * first);
}

TEST_CASE("loader batches do not depend on the number of workers") {
  ImageSet set = load_fashion_mnist(kFashionMnistDir, "test");
  set.images = set.images.narrow(0, 0, 100);
  set.labels = set.labels.narrow(0, 0, 100);
  auto source = std::make_shared<MemorySource>(set);
  TransformOptions tf;
  tf.img_size = 28;
  tf.in_chans = 1;
  tf.mean = {0.5};
  tf.std = {0.5};
  tf.reprob = 0.5;
  auto epoch_batches = [&](int workers) {
    LoaderOptions lo;
    lo.batch_size = 16;
    lo.workers = workers;
    lo.prefetch = 2;
    lo.seed = 7;
    DataLoader loader(source, tf, lo);
    loader.begin_epoch(3);
    std::vector<Batch> out;
    while (auto b = loader.next()) out.push_back(*b);
    return out;
  };
  auto a = epoch_batches(1), b = epoch_batches(3);
  REQUIRE(a.size() == 6);  // drop_last: 100 / 16
  REQUIRE(b.size() == a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(torch::equal(a[i].images, b[i].images));
    CHECK(torch::equal(a[i].labels, b[i].labels));
  }
  CHECK_FALSE(torch::equal(a[0].labels, set.labels.narrow(0, 0, 16)));  // shuffled
}

TEST_CASE("vitlab train and eval end to end on an ImageFolder with bad files") {
  TempDir dir;
  const auto data = dir / "data";
  REQUIRE(run_cli("data export --dataset fashion_mnist --limit 64 --out " + data.string()).status == 0);
  write_file_atomic(data / "train" / "Bag" / "corrupt.png", "\x89PNG\r\n\x1a\n broken");
  write_file_atomic(data / "train" / "Coat" / "notes.jpg", "not an image at all");
  const std::string args = std::string(kTinyTrain) + " --set data.type=imagefolder --set data.root=" + data.string() +
                           " --set train.epochs=2 --set train.ema=true --out " + (dir / "run").string();
  RunResult r = run_cli("train" + args);
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("2 files skipped"));
  for (const char* f : {"config.yaml", "classes.json", "metrics.csv", "metrics.jsonl", "model.safetensors",
                        "model_ema.safetensors", "summary.json", "checkpoint-last/model.safetensors",
                        "checkpoint-last/optimizer.pt", "checkpoint-best/state.json"})
    CHECK(fs::exists(dir / "run" / f));
  const std::string csv = read_file(dir / "run" / "metrics.csv");
  CHECK_THAT(csv, Catch::StartsWith("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"));
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 3);
  CHECK(nlohmann::json::parse(read_file(dir / "run" / "summary.json"))["skipped_files"] == 2);

  RunResult ev = run_cli("eval --checkpoint " + (dir / "run").string() + " --out " + (dir / "eval").string());
  INFO(ev.output);
  REQUIRE(ev.status == 0);
  auto j = nlohmann::json::parse(ev.output.substr(ev.output.find('{')));
  CHECK(j["images"] == 64);
  CHECK(j["top1"].get<double>() >= 0.0);
  for (const char* f : {"metrics.json", "per_class.csv", "confusion.csv", "confusion.png"})
    CHECK(fs::exists(dir / "eval" / f));

  RunResult bad = run_cli("train --set data.type=imagefolder --set data.root=" + (dir / "nothing").string() +
                          " --out " + (dir / "run2").string());
  CHECK(bad.status == 1);
  CHECK_THAT(bad.output, Catch::Contains("not a directory"));
}

TEST_CASE("resume gives bitwise the same weights as an uninterrupted run") {
  TempDir dir;
  const std::string base = std::string(kTinyTrain) + " --set data.type=fashion_mnist --set train.ema=true" +
                           " --set model.drop_path_rate=0.1 --set model.drop_rate=0.1" +
                           " --set train.tensorboard=true --set train.log_interval=3";
  // A small slice of Fashion-MNIST keeps this fast.
  write_fashion_mnist_slice(dir / "fm", 256);
  const std::string data = " --set data.root=" + (dir / "fm").string();
  REQUIRE(run_cli("train" + base + data + " --set train.epochs=4 --out " + (dir / "straight").string()).status == 0);
  RunResult first =
      run_cli("train" + base + data + " --set train.epochs=4 --stop-after 2 --out " + (dir / "split").string());
  REQUIRE(first.status == 0);
  CHECK_THAT(first.output, Catch::Contains("stopped after epoch 2 of 4"));
  // The training time sums the runs: pretend the first one took 1000 s longer.
  const fs::path state_path = dir / "split" / "checkpoint-last" / "state.json";
  nlohmann::json state = nlohmann::json::parse(read_file(state_path));
  const double first_seconds = state.at("seconds");
  CHECK(first_seconds > 0);
  state["seconds"] = first_seconds + 1000;
  write_file_atomic(state_path, state.dump());
  RunResult r = run_cli("train" + base + data + " --set train.epochs=4 --resume --out " + (dir / "split").string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("resuming"));
  const double wall = nlohmann::json::parse(read_file(dir / "split" / "summary.json")).at("wall_seconds");
  CHECK(wall > first_seconds + 1000);
  CHECK(wall < first_seconds + 1000 + 600);
  CHECK(read_file(dir / "straight" / "model.safetensors") == read_file(dir / "split" / "model.safetensors"));
  CHECK(read_file(dir / "straight" / "model_ema.safetensors") == read_file(dir / "split" / "model_ema.safetensors"));
  CHECK(read_file(dir / "straight" / "metrics.csv") == read_file(dir / "split" / "metrics.csv"));
  // TensorBoard's scalars: the resumed run appended without repeating a step.
  auto scalars = [&](const char* run) {
    bool intact = false;
    auto events = read_scalar_events(dir / run / EventWriter::kFileName, &intact);
    CHECK(intact);
    std::vector<std::string> out;  // strings, which Catch prints when they differ
    for (const auto& e : events) out.push_back(fmt::format("{}@{}={}", e.tag, e.step, e.value));
    return out;
  };
  const auto straight = scalars("straight");
  CHECK(straight.size() > 8);
  CHECK(scalars("split") == straight);
}

TEST_CASE("train.analysis: a nested map in YAML and in --set, its keys checked") {
  TempDir dir;
  write_file_atomic(dir / "a.yaml", "train:\n  epochs: 2\n  analysis: {every: 3, images: 40}\n");
  TrainConfig c = TrainConfig::load(dir / "a.yaml", sets({"train.analysis.images=50"}));
  CHECK(c.train.analysis.every == 3);
  CHECK(c.train.analysis.images == 50);  // the override changes one key, the file keeps the other
  CHECK(c.train.analysis.batch_size == 64);
  write_file_atomic(dir / "resolved.yaml", c.to_yaml());
  CHECK(TrainConfig::load(dir / "resolved.yaml", {}).to_yaml() == c.to_yaml());
  CHECK_THROWS_WITH(
      TrainConfig::load("", sets({"train.analysis.evry=2"})),
      Catch::Contains("unknown key 'train.analysis.evry'") && Catch::Contains("did you mean 'train.analysis.every'"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"train.analysis.every=-1"})),
                    Catch::Contains("train.analysis.every must be >= 0 epochs (0: off), got -1"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"train.analysis=3"})),
                    Catch::Contains("train.analysis: expected a map of key: value"));
}

TEST_CASE("training-time analysis: curves every N epochs, exact on resume, and the training unchanged") {
  TempDir dir;
  write_fashion_mnist_slice(dir / "fm", 128);
  const std::string base = std::string(kTinyTrain) +
                           " --set data.type=fashion_mnist --set data.root=" + (dir / "fm").string() +
                           " --set train.epochs=4";
  const std::string analysis =
      " --set train.analysis.every=2 --set train.analysis.images=24 "
      "--set train.analysis.batch_size=10";
  REQUIRE(run_cli("train" + base + " --out " + (dir / "plain").string()).status == 0);
  REQUIRE(run_cli("train" + base + analysis + " --out " + (dir / "straight").string()).status == 0);
  REQUIRE(run_cli("train" + base + analysis + " --stop-after 3 --out " + (dir / "split").string()).status == 0);
  RunResult r = run_cli("train" + base + analysis + " --resume --out " + (dir / "split").string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  // The analysis draws nothing from the training's random streams.
  CHECK(read_file(dir / "plain" / "model.safetensors") == read_file(dir / "straight" / "model.safetensors"));
  // At initialisation and after epochs 2 and 4, each a full analysis.
  const fs::path a = dir / "straight" / "analysis";
  for (const char* epoch : {"epoch_000", "epoch_002", "epoch_004"}) {
    INFO(epoch);
    const auto summary = nlohmann::json::parse(read_file(a / epoch / "summary.json"));
    CHECK(summary.at("images") == 24);
    CHECK(summary.contains("effective_rank"));
    CHECK(fs::exists(a / epoch / "similarity.pt"));
  }
  CHECK_FALSE(fs::exists(a / "epoch_001"));
  const std::string csv = read_file(a / "curves.csv");
  CHECK_THAT(csv, Catch::StartsWith("epoch,images,similar_blocks,mean_adjacent_similarity"));
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 4);
  // The weights changed between the analyses, and so did what they measure.
  std::vector<std::string> rows;
  std::stringstream lines(csv);
  for (std::string line; std::getline(lines, line);) rows.push_back(line);
  CHECK(rows[1].rfind("0,24,", 0) == 0);
  CHECK(rows[3].rfind("4,24,", 0) == 0);
  CHECK(rows[1].substr(2) != rows[3].substr(2));
  CHECK(read_file(dir / "split" / "analysis" / "curves.csv") == csv);
  for (const char* file : {"similarity.pt", "effective_rank.pt", "cka.pt"})
    CHECK(read_file(dir / "split" / "analysis" / "epoch_004" / file) == read_file(a / "epoch_004" / file));
  for (const fs::path png : {a / "curves.png", dir / "straight" / "curves.png", dir / "plain" / "curves.png"}) {
    INFO(png.string());
    const cv::Mat image = cv::imread(png.string());
    CHECK(image.cols > 600);
  }
  CHECK_FALSE(fs::exists(dir / "plain" / "analysis"));
}

TEST_CASE("every config in configs/ loads and resolves its model and transforms") {
  int n = 0, studies = 0;
  for (const auto& e : fs::directory_iterator(fixture("../../configs"))) {
    INFO(e.path());
    std::vector<TrainConfig> configs;
    if (YAML::LoadFile(e.path().string())["study"]) {
      StudyConfig study = StudyConfig::load(e.path(), {});
      for (const auto& f : study.families)
        for (int64_t depth : study.depths) configs.push_back(study.member_config(f, depth));
      ++studies;
    } else {
      configs.push_back(TrainConfig::load(e.path(), {}));
    }
    for (const auto& c : configs) {
      ModelSpec spec = resolve_model(c.model, c.model_overrides);
      CHECK_NOTHROW(c.transforms(spec.config["img_size"], spec.config["in_chans"]));
      CHECK_NOTHROW(c.mixup(spec.config["num_classes"]));
    }
    ++n;
  }
  CHECK(n >= 6);
  CHECK(studies == 5);
}

TEST_CASE("first_nonfinite_gradient names the first parameter with a NaN or Inf gradient") {
  torch::nn::Sequential net(torch::nn::Linear(3, 4), torch::nn::ReLU(), torch::nn::Linear(4, 2));
  net->forward(torch::randn({5, 3})).sum().backward();
  CHECK(first_nonfinite_gradient(*net) == "");
  net->named_parameters()["2.weight"].mutable_grad()[1][3] = std::numeric_limits<float>::infinity();
  CHECK(first_nonfinite_gradient(*net) == "2.weight");
  net->named_parameters()["0.bias"].mutable_grad()[2] = -std::numeric_limits<float>::infinity();
  CHECK(first_nonfinite_gradient(*net) == "0.bias");
  net->named_parameters()["0.weight"].mutable_grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
  CHECK(first_nonfinite_gradient(*net) == "0.weight");
}

TEST_CASE("train.on_nonfinite=skip skips the steps with non-finite gradients and finishes") {
  TempDir dir;
  RunResult r = run_cli("train" + std::string(kTinyTrain) + " --set optim.lr=1e30 --set optim.weight_decay=0 " +
                        "--set schedule.warmup_epochs=0 --set aug.mixup=0 --set train.epochs=1 " +
                        "--set train.on_nonfinite=skip --set data.train_limit=512 --out " + (dir / "run").string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("non-finite gradient at step") && Catch::Contains("step skipped"));
  const auto summary = nlohmann::json::parse(read_file(dir / "run" / "summary.json"));
  CHECK(summary["skipped_steps"].get<int64_t>() > 0);
  CHECK(summary["skipped_steps"].get<int64_t>() < summary["steps"].get<int64_t>());
  CHECK(fs::exists(dir / "run" / "model.safetensors"));
}

TEST_CASE("a non-finite loss stops training with the step named") {
  TempDir dir;
  RunResult r = run_cli("train" + std::string(kTinyTrain) + " --set optim.lr=1e30 --set optim.weight_decay=0 " +
                        "--set schedule.warmup_epochs=0 --set aug.mixup=0 --out " + (dir / "run").string());
  INFO(r.output);
  CHECK(r.status == 1);
  CHECK_THAT(r.output, Catch::Contains("non-finite loss") && Catch::Contains("at step"));
  CHECK_FALSE(fs::exists(dir / "run" / "model.safetensors"));
}

TEST_CASE("train.epochs=0 keeps the seeded initial weights and analyses them") {
  TempDir dir;
  write_fashion_mnist_slice(dir / "fm", 64);
  const std::string base = std::string(kTinyTrain) +
                           " --set data.type=fashion_mnist --set data.root=" + (dir / "fm").string() +
                           " --set train.epochs=0";
  const std::string analysis = " --set train.analysis.every=1 --set train.analysis.images=16";
  RunResult r = run_cli("train" + base + analysis + " --out " + (dir / "init").string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("done: 0 epochs, the initial weights (not evaluated)"));
  const auto summary = nlohmann::json::parse(read_file(dir / "init" / "summary.json"));
  CHECK(summary["epochs"] == 0);
  CHECK(summary["best_top1"].is_null());
  CHECK(fs::exists(dir / "init" / "model.safetensors"));
  CHECK(fs::exists(dir / "init" / "analysis" / "epoch_000" / "summary.json"));
  CHECK_FALSE(fs::exists(dir / "init" / "checkpoint-last"));
  CHECK_FALSE(fs::exists(dir / "init" / "metrics.csv"));
  // The weights are train.seed's: the same seed gives them again, another seed others.
  REQUIRE(run_cli("train" + base + " --out " + (dir / "again").string()).status == 0);
  REQUIRE(run_cli("train" + base + " --set train.seed=1 --out " + (dir / "seed1").string()).status == 0);
  CHECK(read_file(dir / "again" / "model.safetensors") == read_file(dir / "init" / "model.safetensors"));
  CHECK(read_file(dir / "seed1" / "model.safetensors") != read_file(dir / "init" / "model.safetensors"));
  CHECK_THROWS_WITH(TrainConfig::load("", sets({"train.epochs=-1"})), Catch::Contains("train.epochs must be >= 0"));
}
