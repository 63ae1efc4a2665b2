#pragma once
// A training run's configuration: YAML with sections model, data, optim,
// schedule, aug and train; every key checked; `--set section.key=value`
// overrides any of them.
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/config.h"
#include "data/image_folder.h"
#include "data/mixup.h"
#include "data/transforms.h"

namespace vitlab {

struct DataConfig {
  std::string type = "fashion_mnist";  // imagefolder | fashion_mnist | cifar10
  std::string root;                    // fashion_mnist: Debian's dataset-fashion-mnist when empty
  std::string train_split = "train";   // imagefolder
  std::string val_split;               // imagefolder; empty: val, validation, valid or eval
  std::string on_error = "skip";       // skip | fail: unreadable images
  int64_t workers = 2;
  int64_t prefetch = 4;
  int64_t train_limit = 0;                     // > 0: train on the first N images only (quick studies)
  int64_t max_image_pixels = kMaxImagePixels;  // imagefolder: larger images are errors (PIL's MAX_IMAGE_PIXELS)

  template <class F>
  void visit(F&& f) {
    f("type", type);
    f("root", root);
    f("train_split", train_split);
    f("val_split", val_split);
    f("on_error", on_error);
    f("workers", workers);
    f("prefetch", prefetch);
    f("train_limit", train_limit);
    f("max_image_pixels", max_image_pixels);
  }
  void validate() const;
};

struct OptimConfig {
  std::string opt = "adamw";  // adamw | sgd
  double lr = 5e-4;
  double weight_decay = 0.05;  // not on biases, norms, pos_embed, cls_token
  double momentum = 0.9;       // sgd
  double eps = 1e-8;
  double clip_grad = 0.0;    // max gradient norm; 0: off
  int64_t lr_base_size = 0;  // > 0: lr scaled by effective batch / lr_base_size (timm)

  template <class F>
  void visit(F&& f) {
    f("opt", opt);
    f("lr", lr);
    f("weight_decay", weight_decay);
    f("momentum", momentum);
    f("eps", eps);
    f("clip_grad", clip_grad);
    f("lr_base_size", lr_base_size);
  }
  void validate() const;
};

struct ScheduleConfig {
  std::string sched = "cosine";  // cosine | constant (after warmup)
  double warmup_epochs = 5;
  double warmup_lr = 1e-6;
  double min_lr = 1e-5;

  template <class F>
  void visit(F&& f) {
    f("sched", sched);
    f("warmup_epochs", warmup_epochs);
    f("warmup_lr", warmup_lr);
    f("min_lr", min_lr);
  }
  void validate() const;
};

struct AugConfig {
  std::vector<double> mean;  // empty: ImageNet's for 3 channels, 0.5 for 1
  std::vector<double> std;
  std::vector<double> scale = {0.08, 1.0};
  std::vector<double> ratio = {3.0 / 4.0, 4.0 / 3.0};
  std::string interpolation = "bicubic";
  double hflip = 0.5;
  std::string auto_augment = "rand-m9-mstd0.5-inc1";
  double color_jitter = 0.4;
  double reprob = 0.25;
  double crop_pct = 0.875;
  double mixup = 0.8;
  double cutmix = 1.0;
  double mixup_prob = 1.0;
  double mixup_switch_prob = 0.5;
  double smoothing = 0.1;

  template <class F>
  void visit(F&& f) {
    f("mean", mean);
    f("std", std);
    f("scale", scale);
    f("ratio", ratio);
    f("interpolation", interpolation);
    f("hflip", hflip);
    f("auto_augment", auto_augment);
    f("color_jitter", color_jitter);
    f("reprob", reprob);
    f("crop_pct", crop_pct);
    f("mixup", mixup);
    f("cutmix", cutmix);
    f("mixup_prob", mixup_prob);
    f("mixup_switch_prob", mixup_switch_prob);
    f("smoothing", smoothing);
  }
};

// The attention-collapse analysis while a model trains (train/monitor.h):
// at initialisation and every `every` epochs, on the first `images`
// evaluation images.
struct TrainAnalysisConfig {
  int64_t every = 0;  // epochs; 0: off
  int64_t images = 256;
  int64_t batch_size = 64;

  template <class F>
  void visit(F&& f) {
    f("every", every);
    f("images", images);
    f("batch_size", batch_size);
  }
};

struct RunConfig {
  int64_t epochs = 10;
  int64_t batch_size = 64;
  int64_t seed = 0;
  std::string device = "cpu";  // cpu | cuda | cuda:N
  std::string amp = "off";     // off | bf16 | fp16 (CUDA, with loss scaling)
  int64_t threads = 0;         // 0: all logical CPUs
  int64_t grad_accum = 1;      // micro-batches per optimizer step
  bool ema = false;
  double ema_decay = 0.9998;
  int64_t log_interval = 50;  // steps between plain log lines (no terminal) and TensorBoard's train scalars
  // TensorBoard scalars in the run directory (events.out.tfevents.vitlab):
  // train loss and lr every log_interval steps, eval loss/top-1/top-5 per epoch.
  bool tensorboard = false;
  // DeepViT's regulariser: + weight * mean cosine similarity of adjacent
  // blocks' attention maps over the first `cos_reg_pairs` pairs (0: all).
  double cos_reg = 0.0;
  int64_t cos_reg_pairs = 0;
  bool drop_last = true;
  // Data-parallel runs (torchrun, vitlab launch): seconds a collective waits
  // for the other ranks before the run fails (a rank died or hangs).
  double dist_timeout = 300.0;
  // BatchNorm statistics over all ranks (torch.nn.SyncBatchNorm) instead of
  // per rank (DDP's default).
  bool sync_bn = false;
  // A non-finite loss or gradient (fp32/bf16): stop (keeping the last good
  // checkpoint) or skip that optimizer step and go on. fp16 always skips and
  // lowers the loss scale, as GradScaler.
  std::string on_nonfinite = "stop";
  TrainAnalysisConfig analysis;

  template <class F>
  void visit(F&& f) {
    f("epochs", epochs);
    f("batch_size", batch_size);
    f("seed", seed);
    f("device", device);
    f("amp", amp);
    f("threads", threads);
    f("grad_accum", grad_accum);
    f("ema", ema);
    f("ema_decay", ema_decay);
    f("log_interval", log_interval);
    f("tensorboard", tensorboard);
    f("cos_reg", cos_reg);
    f("cos_reg_pairs", cos_reg_pairs);
    f("drop_last", drop_last);
    f("dist_timeout", dist_timeout);
    f("sync_bn", sync_bn);
    f("on_nonfinite", on_nonfinite);
    f("analysis", analysis);
  }
  void validate() const;
};

struct TrainConfig {
  std::string model = "vit_tiny_patch16_224";       // model.name
  YAML::Node model_overrides{YAML::NodeType::Map};  // the other model.* keys, checked by the model registry
  DataConfig data;
  OptimConfig optim;
  ScheduleConfig schedule;
  AugConfig aug;
  RunConfig train;

  // The file (may be empty: defaults), then the overrides; every key checked.
  static TrainConfig load(const std::filesystem::path& file, const std::vector<Override>& overrides);
  // The same from a parsed map of sections; `where` names it in errors.
  static TrainConfig from_yaml(const YAML::Node& root, const std::vector<Override>& overrides,
                               const std::string& where);
  // The resolved configuration, every key, as `vitlab train --config` reads it.
  std::string to_yaml() const;
  // Transforms for a model with this image size and channel count.
  TransformOptions transforms(int64_t img_size, int64_t in_chans) const;
  MixupOptions mixup(int64_t num_classes) const;
};

}  // namespace vitlab
