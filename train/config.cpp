#include "train/config.h"

#include "common/error.h"
#include "common/files.h"
#include "data/mixup.h"
#include "data/transforms.h"

namespace vitlab {

namespace {

void one_of(const std::string& key, const std::string& value, std::initializer_list<const char*> allowed) {
  for (const char* a : allowed)
    if (value == a) return;
  fail("{} must be one of {}, got '{}'", key, fmt::join(allowed, ", "), value);
}

const std::vector<std::string> kSections = {"model", "data", "optim", "schedule", "aug", "train"};

// An options struct as a YAML map, nested ones as nested maps.
template <class Options>
void emit_options(YAML::Emitter& out, Options& options) {
  out << YAML::BeginMap;
  options.visit([&](const char* key, auto& v) {
    out << YAML::Key << key << YAML::Value;
    using Field = std::decay_t<decltype(v)>;
    if constexpr (is_options<Field>::value)
      emit_options(out, v);
    else if constexpr (std::is_same_v<Field, std::vector<double>>)
      out << YAML::Flow << v;
    else
      out << v;
  });
  out << YAML::EndMap;
}

}  // namespace

void DataConfig::validate() const {
  one_of("data.type", type, {"imagefolder", "fashion_mnist", "cifar10"});
  one_of("data.on_error", on_error, {"skip", "fail"});
  if (type != "fashion_mnist" && root.empty()) fail("data.root is required for data.type {}", type);
  if (workers < 1) fail("data.workers must be >= 1, got {}", workers);
  if (prefetch < 1) fail("data.prefetch must be >= 1, got {}", prefetch);
  if (train_limit < 0) fail("data.train_limit must be >= 0 (0: all), got {}", train_limit);
  if (max_image_pixels < 1) fail("data.max_image_pixels must be >= 1, got {}", max_image_pixels);
}

void OptimConfig::validate() const {
  one_of("optim.opt", opt, {"adamw", "sgd"});
  if (!(lr > 0)) fail("optim.lr must be > 0, got {}", lr);
  if (weight_decay < 0) fail("optim.weight_decay must be >= 0, got {}", weight_decay);
  if (momentum < 0 || momentum >= 1) fail("optim.momentum must be in [0, 1), got {}", momentum);
  if (!(eps > 0)) fail("optim.eps must be > 0, got {}", eps);
  if (clip_grad < 0) fail("optim.clip_grad must be >= 0 (0: off), got {}", clip_grad);
  if (lr_base_size < 0) fail("optim.lr_base_size must be >= 0 (0: no scaling), got {}", lr_base_size);
}

void ScheduleConfig::validate() const {
  one_of("schedule.sched", sched, {"cosine", "constant"});
  if (warmup_epochs < 0) fail("schedule.warmup_epochs must be >= 0, got {}", warmup_epochs);
  if (warmup_lr < 0) fail("schedule.warmup_lr must be >= 0, got {}", warmup_lr);
  if (min_lr < 0) fail("schedule.min_lr must be >= 0, got {}", min_lr);
}

void RunConfig::validate() const {
  // 0: no training; the run keeps the initial weights (and their analysis with analysis.every).
  if (epochs < 0) fail("train.epochs must be >= 0 (0: the initial weights, untrained), got {}", epochs);
  if (batch_size < 1) fail("train.batch_size must be >= 1, got {}", batch_size);
  if (seed < 0) fail("train.seed must be >= 0, got {}", seed);
  if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0)
    fail("train.device must be cpu, cuda or cuda:N, got '{}'", device);
  one_of("train.amp", amp, {"off", "bf16", "fp16"});
  if (threads < 0) fail("train.threads must be >= 0 (0: all CPUs), got {}", threads);
  if (grad_accum < 1) fail("train.grad_accum must be >= 1, got {}", grad_accum);
  if (!(ema_decay > 0 && ema_decay < 1)) fail("train.ema_decay must be in (0, 1), got {}", ema_decay);
  if (log_interval < 1) fail("train.log_interval must be >= 1, got {}", log_interval);
  if (!(dist_timeout > 0)) fail("train.dist_timeout must be > 0 seconds, got {}", dist_timeout);
  one_of("train.on_nonfinite", on_nonfinite, {"stop", "skip"});
  if (cos_reg < 0) fail("train.cos_reg must be >= 0, got {}", cos_reg);
  if (cos_reg_pairs < 0) fail("train.cos_reg_pairs must be >= 0 (0: all), got {}", cos_reg_pairs);
  if (analysis.every < 0) fail("train.analysis.every must be >= 0 epochs (0: off), got {}", analysis.every);
  if (analysis.images < 1) fail("train.analysis.images must be >= 1, got {}", analysis.images);
  if (analysis.batch_size < 1) fail("train.analysis.batch_size must be >= 1, got {}", analysis.batch_size);
}

TrainConfig TrainConfig::load(const std::filesystem::path& file, const std::vector<Override>& overrides) {
  YAML::Node root(YAML::NodeType::Map);
  if (!file.empty()) {
    try {
      root = YAML::Load(read_file(file));
    } catch (const YAML::Exception& e) {
      fail("{}: not valid YAML ({})", file.string(), e.what());
    }
    if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
    if (!root.IsMap()) fail("{}: expected a map of sections ({})", file.string(), fmt::join(kSections, ", "));
  }
  return from_yaml(root, overrides, file.empty() ? "config" : file.string());
}

TrainConfig TrainConfig::from_yaml(const YAML::Node& root, const std::vector<Override>& overrides,
                                   const std::string& where) {
  for (const auto& kv : root) {
    const auto name = kv.first.as<std::string>();
    if (std::find(kSections.begin(), kSections.end(), name) == kSections.end()) {
      const std::string near = closest_key(name, kSections);
      fail("{}: unknown section '{}'{}; sections: {}", where, name,
           near.empty() ? "" : fmt::format(" (did you mean '{}'?)", near), fmt::join(kSections, ", "));
    }
  }
  TrainConfig c;
  auto section = [&](const std::string& name) {
    YAML::Node merged(YAML::NodeType::Map);
    if (root[name]) {
      if (!root[name].IsMap()) fail("{}: section '{}' must be a map of key: value", where, name);
      merge_into(merged, root[name]);
    }
    merge_into(merged, section_overrides(overrides, name, kSections));
    return merged;
  };
  YAML::Node model = section("model");
  if (model["name"]) read_value(model["name"], c.model, "model.name");
  model.remove("name");
  c.model_overrides = model;
  read_options(c.data, section("data"), "data");
  read_options(c.optim, section("optim"), "optim");
  read_options(c.schedule, section("schedule"), "schedule");
  read_options(c.aug, section("aug"), "aug");
  read_options(c.train, section("train"), "train");
  c.data.validate();
  c.optim.validate();
  c.schedule.validate();
  c.train.validate();
  return c;
}

std::string TrainConfig::to_yaml() const {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap << YAML::Key << "name" << YAML::Value << model;
  for (const auto& kv : model_overrides) out << YAML::Key << kv.first << YAML::Value << kv.second;
  out << YAML::EndMap;
  auto emit = [&](const char* name, auto options) {
    out << YAML::Key << name << YAML::Value;
    emit_options(out, options);
  };
  emit("data", data);
  emit("optim", optim);
  emit("schedule", schedule);
  emit("aug", aug);
  emit("train", train);
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

TransformOptions TrainConfig::transforms(int64_t img_size, int64_t in_chans) const {
  TransformOptions t;
  t.img_size = img_size;
  t.in_chans = in_chans;
  if (!aug.mean.empty())
    t.mean = aug.mean;
  else if (in_chans == 1)
    t.mean = {0.5};
  if (!aug.std.empty())
    t.std = aug.std;
  else if (in_chans == 1)
    t.std = {0.5};
  t.scale = aug.scale;
  t.ratio = aug.ratio;
  t.interpolation = aug.interpolation;
  t.hflip = aug.hflip;
  t.auto_augment = aug.auto_augment;
  t.color_jitter = aug.color_jitter;
  t.reprob = aug.reprob;
  t.crop_pct = aug.crop_pct;
  t.validate();
  return t;
}

MixupOptions TrainConfig::mixup(int64_t num_classes) const {
  MixupOptions m;
  m.mixup_alpha = aug.mixup;
  m.cutmix_alpha = aug.cutmix;
  m.prob = aug.mixup_prob;
  m.switch_prob = aug.mixup_switch_prob;
  m.label_smoothing = aug.smoothing;
  m.num_classes = num_classes;
  if (m.mixup_alpha < 0 || m.cutmix_alpha < 0) fail("aug.mixup and aug.cutmix must be >= 0 (0: off)");
  if (m.prob < 0 || m.prob > 1) fail("aug.mixup_prob must be in [0, 1], got {}", m.prob);
  if (m.switch_prob < 0 || m.switch_prob > 1) fail("aug.mixup_switch_prob must be in [0, 1], got {}", m.switch_prob);
  if (m.label_smoothing < 0 || m.label_smoothing >= 1)
    fail("aug.smoothing must be in [0, 1), got {}", m.label_smoothing);
  return m;
}

}  // namespace vitlab
