// `vitlab analyze`: attention collapse of a trained model, over a saved tensor or a validation split.
#include "analysis/analyze.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <limits>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "common/error.h"
#include "io/torch_file.h"
#include "train/trainer.h"

namespace vitlab::cli {
namespace {

struct AnalyzeArgs {
  TrainedModelArgs source;
  std::string input, data, out, maps = "applied";
  int64_t limit = 0, batch = 32, visualize = 4;
  double tau = 0.9, threshold = 0.9;
  bool center = false;
  std::vector<std::string> measures = measure_names();
  int64_t cka_batch = 64;
  RolloutOptions rollout;
  // Another tool's maps instead of a model (analyze_maps).
  std::vector<std::string> maps_files, features_files;
  int64_t prefix_tokens = 1, patch_size = 16;
};

AnalyzeOptions analyze_options(const AnalyzeArgs& a, const torch::Device& device, at::ScalarType amp) {
  AnalyzeOptions ao;
  ao.device = device;
  ao.amp = amp;
  ao.batch_size = a.batch;
  ao.limit = a.limit;
  ao.visualize = a.visualize;
  ao.rollout = a.rollout;
  ao.maps = a.maps;
  ao.similarity.tau = a.tau;
  ao.similarity.similar_threshold = a.threshold;
  ao.similarity.center = a.center;
  ao.measures.clear();
  for (const auto& m : a.measures)
    if (m != "none") ao.measures.push_back(m);
  ao.cka_batch = a.cka_batch;
  return ao;
}

// --input: the model takes its class count from the run's classes.json unless model.num_classes is set.
AnalyzeReport analyze_tensor(const AnalyzeArgs& a, const TrainedRun& run, AnalyzeOptions ao) {
  YAML::Node keys = YAML::Clone(run.config.model_overrides);
  const fs::path classes = fs::path(a.source.checkpoint) / "classes.json";
  if (!a.source.checkpoint.empty() && !keys["num_classes"] && fs::exists(classes))
    keys["num_classes"] = nlohmann::json::parse(read_file(classes)).size();
  Model m = load_trained_model(resolve_model(run.config.model, keys), run.weights);
  const TransformOptions tf = run.config.transforms(m.config["img_size"], m.config["in_chans"]);
  ao.mean = tf.mean;
  ao.std = tf.std;
  torch::Tensor x = read_torch_tensor(a.input);
  const int64_t in_chans = m.config["in_chans"], img = m.config["img_size"];
  if (x.dim() != 4 || x.size(1) != in_chans || x.size(2) != img || x.size(3) != img)
    fail("{}: input shape {} does not match the model's [N, {}, {}, {}]", a.input, x.sizes().vec(), in_chans, img, img);
  if (!x.is_floating_point()) fail("{}: expected a float tensor, got {}", a.input, c10::toString(x.scalar_type()));
  return analyze(m, x, ao, a.out);
}

// --data or the run's own dataset: the first --limit images of its validation split.
AnalyzeReport analyze_split(const AnalyzeArgs& a, const TrainedRun& run, AnalyzeOptions ao) {
  DataSplits data = open_data(run.config.data);
  Model m = load_trained_model(resolve_train_model(run.config, static_cast<int64_t>(data.classes.size())), run.weights);
  const TransformOptions tf = run.config.transforms(m.config["img_size"], m.config["in_chans"]);
  ao.mean = tf.mean;
  ao.std = tf.std;
  std::shared_ptr<const ImageSource> source = data.val;
  if (a.limit > 0) source = std::make_shared<SubsetSource>(source, a.limit);
  DataLoader loader(source, tf, eval_loader_options(run.config, a.batch, ao.device));
  return analyze(m, loader, ao, a.out);
}

void print_report(const AnalyzeReport& report, const std::string& out) {
  const SimilarityResult& r = report.similarity;
  fmt::print("analysed {} images: {} blocks, {} heads, {} tokens\n", r.images, r.layers, r.heads, r.tokens);
  fmt::print(
      "adjacent-block similarity S[k-1,k]: [{:.3f}]\n",
      fmt::join(std::vector<double>(r.adjacent.data_ptr<double>(), r.adjacent.data_ptr<double>() + r.adjacent.numel()),
                ", "));
  fmt::print("similar blocks (S[k-1,k] >= {}): {} of {}\n", r.options.similar_threshold, r.similar_blocks, r.layers);
  fmt::print("forward {:.2f} s, analysis {:.2f} s ({:.1f}% of the forward passes), figures {:.2f} s\n",
             report.forward_seconds, report.analysis_seconds,
             report.forward_seconds > 0 ? 100.0 * report.analysis_seconds / report.forward_seconds : 0.0,
             report.output_seconds);
  fmt::print("wrote {} files to {}\n", report.files.size(), out);
}

// --maps-file: maps (and block outputs) another tool saved.
AnalyzeReport analyze_files(const AnalyzeArgs& a, const CommonOptions& common) {
  if (!a.source.checkpoint.empty() || !a.source.model.empty() || !a.input.empty() || !a.data.empty())
    fail("--maps-file analyses saved maps: give no --checkpoint, --model, --input or --data with it");
  MapsFiles files;
  files.maps.assign(a.maps_files.begin(), a.maps_files.end());
  files.features.assign(a.features_files.begin(), a.features_files.end());
  files.prefix_tokens = a.prefix_tokens;
  files.patch_size = a.patch_size;
  files.name = fs::path(a.maps_files.front()).stem().string();
  const torch::Device device = option_device(common);
  return analyze_maps(files, analyze_options(a, device, at::ScalarType::Undefined), a.out);
}

void run_analyze(const AnalyzeArgs& a, const CommonOptions& common) {
  if (!a.maps_files.empty()) {
    print_report(analyze_files(a, common), a.out);
    return;
  }
  check_trained_model_args(a.source);
  if (!a.input.empty() && !a.data.empty()) fail("give either --input X.pt or --data SPEC, not both");
  if (a.input.empty() && a.data.empty() && a.source.checkpoint.empty()) fail("give either --input X.pt or --data SPEC");
  const TrainedRun run = resolve_trained_run(a.source, common, a.data);
  const AnalyzeOptions ao = analyze_options(a, run.device, run.amp);
  print_report(a.input.empty() ? analyze_split(a, run, ao) : analyze_tensor(a, run, ao), a.out);
}

}  // namespace

Command add_analyze_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<AnalyzeArgs>();
  auto* cmd =
      app.add_subcommand("analyze", "Attention collapse: cross-layer similarity of attention maps, with figures");
  add_trained_model_options(cmd, a->source, common, "Training config for the model, data and transforms",
                            "Override any key, e.g. --set model.num_classes=10");
  cmd->add_option("--input", a->input, "Images [N, C, H, W] saved by torch.save, normalised as the model expects");
  cmd->add_option("--data", a->data, "fashion_mnist, cifar10:ROOT or imagefolder:ROOT (its validation split)");
  cmd->add_option("--limit", a->limit, "At most this many images (the first ones; 0: all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--batch", a->batch, "Images per forward pass")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--tau", a->tau, "Per-image cosine counted as similar in the ratio R")->capture_default_str();
  cmd->add_option("--threshold", a->threshold, "S[k-1,k] at or above which block k is a similar block")
      ->capture_default_str();
  cmd->add_option("--maps", a->maps,
                  "applied: the maps that multiply V (after re-attention in DeepViT); softmax: the softmax maps "
                  "before re-attention")
      ->check(CLI::IsMember({"applied", "softmax"}))
      ->capture_default_str();
  cmd->add_flag("--center", a->center,
                "Subtract each map row's mean first (1/T for softmax): compare deviations from uniform attention");
  cmd->add_option("--measures", a->measures,
                  "Collapse measures beside the similarity (docs/ANALYSIS.md), comma-separated; 'none' for none")
      ->delimiter(',')
      ->check(CLI::IsMember([] {
        std::vector<std::string> names = measure_names();
        names.push_back("none");
        return names;
      }()))
      ->capture_default_str();
  cmd->add_option("--cka-batch", a->cka_batch, "Images per CKA minibatch (in input order)")
      ->check(CLI::Range(int64_t{4}, std::numeric_limits<int64_t>::max()))
      ->capture_default_str();
  cmd->add_option("--maps-file", a->maps_files,
                  "Attention maps [L, B, H, T, T] another tool saved (torch.save or .safetensors), instead of a "
                  "model; several: consecutive batches")
      ->check(CLI::ExistingFile);
  cmd->add_option("--features-file", a->features_files,
                  "With --maps-file: block outputs [L, B, T, D] of the same images, one file per maps file")
      ->check(CLI::ExistingFile);
  cmd->add_option("--prefix-tokens", a->prefix_tokens,
                  "With --maps-file: class/distillation/register tokens before the patch tokens")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--patch-size", a->patch_size, "With --maps-file: pixels per patch side")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--visualize", a->visualize, "Images with attention overlays")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--rollout-fusion", a->rollout.head_fusion, "How the overlays' attention rollout fuses heads")
      ->check(CLI::IsMember({"mean", "max", "min"}))
      ->capture_default_str();
  cmd->add_option("--rollout-discard", a->rollout.discard_ratio,
                  "The lowest fraction of each fused map's entries the rollout drops (Abnar & Zuidema's "
                  "common implementation; 0.9 is usual with max fusion)")
      ->check(CLI::Range(0.0, 0.999))
      ->capture_default_str();
  cmd->add_option("--out", a->out, "Output directory")->required();
  add_threads(cmd, common);
  add_device(cmd, common);
  return make_command(cmd, [a, &common] { run_analyze(*a, common); });
}

}  // namespace vitlab::cli
