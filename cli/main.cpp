// vitlab command line: one subcommand per job, each with --help.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <iostream>

#include "analysis/analyze.h"
#include "analysis/study.h"
#include "bench/bench.h"
#include "common/config.h"
#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
#include "common/runtime.h"
#include "data/datasets.h"
#include "data/export.h"
#include "eval/evaluate.h"
#include "io/torch_file.h"
#include "models/registry.h"
#include "train/distributed.h"
#include "train/trainer.h"

namespace {

using namespace vitlab;

struct CommonOptions {
  int threads = 0;
  std::string device, amp;  // empty: the config's (train, eval) or cpu / off
  std::vector<std::string> sets;
};

void add_threads(CLI::App* cmd, CommonOptions& common) {
  cmd->add_option("--threads", common.threads, "CPU threads (default: all logical CPUs)")
      ->check(CLI::NonNegativeNumber);
}

void add_device(CLI::App* cmd, CommonOptions& common) {
  cmd->add_option("--device", common.device, "cpu, cuda or cuda:N (train, eval: sets train.device)");
  cmd->add_option("--amp", common.amp, "Autocast: off, bf16 or fp16 (CUDA) (train, eval: sets train.amp)");
}

void add_model_options(CLI::App* cmd, std::string& model, CommonOptions& common) {
  cmd->add_option("--model", model, "Model preset (see `vitlab models`)")->required();
  cmd->add_option("--set", common.sets, "Override a model key, e.g. --set model.depth=6 (repeatable)");
}

std::vector<Override> parse_overrides(const std::vector<std::string>& sets) {
  std::vector<Override> out;
  for (const auto& s : sets) out.push_back(parse_override(s));
  return out;
}

void run_models() {
  fmt::print("{:<34} {:<12} {:>14}  {}\n", "name", "family", "parameters", "description");
  for (const auto& p : presets()) {
    fmt::print("{:<34} {:<12} {:>14}  {}\n", p.name, p.family, spec_parameters(resolve_model(p.name)), p.description);
  }
}

void run_info(const std::string& name, const CommonOptions& common) {
  ModelSpec spec = resolve_model(name, parse_overrides(common.sets));
  nlohmann::json j = {
      {"name", spec.name}, {"family", spec.family}, {"parameters", spec_parameters(spec)}, {"config", spec.config}};
  fmt::print("{}\n", j.dump(2));
}

struct ForwardArgs {
  std::string model, weights, input, output, attention;
  bool no_strict = false;
};

void run_forward(const ForwardArgs& a, const CommonOptions& common) {
  Model m = create_model(a.model, parse_overrides(common.sets));
  if (!m.vision) fail("forward runs image models; '{}' is a {} model", a.model, m.family);
  LoadReport report = load_weights(m, a.weights, !a.no_strict);
  if (!report.clean()) fmt::print(stderr, "warning: {} loaded partially:{}\n", a.weights, report.describe());
  torch::Tensor x = read_torch_tensor(a.input);
  if (x.dim() != 4) fail("{}: expected an image batch [B, C, H, W], got shape {}", a.input, x.sizes().vec());
  if (!x.is_floating_point()) fail("{}: expected a float tensor, got {}", a.input, c10::toString(x.scalar_type()));
  const int64_t in_chans = m.config["in_chans"], img = m.config["img_size"];
  if (x.size(1) != in_chans || x.size(2) != img || x.size(3) != img)
    fail("{}: input shape {} does not match the model's [B, {}, {}, {}] (model.in_chans, model.img_size)", a.input,
         x.sizes().vec(), in_chans, img, img);

  const torch::Device device = parse_device(common.device.empty() ? "cpu" : common.device, "--device");
  const at::ScalarType amp = parse_amp(common.amp.empty() ? "off" : common.amp, device, "--amp");
  m.module->to(device);
  m.vision->eval();
  torch::NoGradGuard no_grad;
  x = x.to(device, torch::kFloat);
  torch::Tensor logits, attn;
  {
    Autocast autocast(device, amp);
    if (a.attention.empty())
      logits = m.vision->forward(x);
    else
      std::tie(logits, attn) = m.vision->forward_with_attention(x);
  }
  logits = logits.to(torch::kCPU, torch::kFloat);
  if (attn.defined()) attn = attn.to(torch::kCPU, torch::kFloat);

  StagedOutputs out;
  out.add(a.output, serialize_torch(logits));
  if (attn.defined()) out.add(a.attention, serialize_torch(attn));
  out.commit();

  fmt::print("model {} ({} parameters), input {}\n", m.name, count_parameters(*m.module), x.sizes().vec());
  auto top = logits.argmax(-1);
  for (int64_t b = 0; b < std::min<int64_t>(logits.size(0), 8); ++b) {
    auto row = logits[b].narrow(0, 0, std::min<int64_t>(logits.size(1), 10));
    fmt::print("  [{}] top-1 class {:>4}  logits[:{}] = [{:.4f}]\n", b, top[b].item<int64_t>(), row.size(0),
               fmt::join(std::vector<float>(row.data_ptr<float>(), row.data_ptr<float>() + row.size(0)), ", "));
  }
  fmt::print("wrote {}{}\n", a.output,
             attn.defined() ? fmt::format(" and {} {}", a.attention, attn.sizes().vec()) : "");
}

struct ConvertArgs {
  std::string model, weights, out;
};

void run_convert(const ConvertArgs& a, const CommonOptions& common) {
  Model m = create_model(a.model, parse_overrides(common.sets));
  load_weights(m, a.weights, /*strict=*/true);
  const StateDict state = module_state(*m.module);
  write_weights(a.out, state);
  fmt::print("wrote {} ({} tensors, {} parameters)\n", a.out, state.size(), count_parameters(*m.module));
}

struct CompareArgs {
  std::string a, b;
  double atol = 1e-4;
};

// Exit status 2 when the tensors differ by more than atol.
int run_compare(const CompareArgs& a) {
  torch::Tensor x = read_torch_tensor(a.a), y = read_torch_tensor(a.b);
  if (x.sizes() != y.sizes()) fail("{} has shape {} but {} has shape {}", a.a, x.sizes().vec(), a.b, y.sizes().vec());
  const double diff = x.numel() ? (x.to(torch::kDouble) - y.to(torch::kDouble)).abs().max().item<double>() : 0.0;
  const bool ok = diff <= a.atol;
  fmt::print("{} vs {}: shape {}, max |a - b| = {:.3g} ({} atol {:g})\n", a.a, a.b, x.sizes().vec(), diff,
             ok ? "within" : "EXCEEDS", a.atol);
  return ok ? 0 : 2;
}

struct ExportArgs {
  std::string dataset, root, out;
  int64_t limit = 0;
};

void run_data_export(const ExportArgs& a) {
  ImageSet train, val;
  if (a.dataset == "fashion_mnist") {
    const std::string root = a.root.empty() ? kFashionMnistDir : a.root;
    train = load_fashion_mnist(root, "train");
    val = load_fashion_mnist(root, "test");
  } else {
    if (a.root.empty()) fail("--root is required for cifar10 (the folder of data_batch_*.bin)");
    train = load_cifar10(a.root, "train");
    val = load_cifar10(a.root, "test");
  }
  export_image_folder(train, val, a.out, a.limit);
  const int64_t n_train = a.limit > 0 ? std::min(a.limit, train.size()) : train.size();
  const int64_t n_val = a.limit > 0 ? std::min(a.limit, val.size()) : val.size();
  fmt::print("wrote {}: train {} and val {} PNG images in {} class folders\n", a.out, n_train, n_val,
             train.classes.size());
}

struct TrainArgs {
  std::string config, out;
  bool resume = false;
  int64_t stop_after = 0;
};

// --threads, --device and --amp are shorthands for their train.* keys.
std::vector<Override> run_overrides(const CommonOptions& common) {
  std::vector<Override> o = parse_overrides(common.sets);
  if (common.threads > 0) o.push_back(parse_override(fmt::format("train.threads={}", common.threads)));
  if (!common.device.empty()) o.push_back(parse_override("train.device=" + common.device));
  if (!common.amp.empty()) o.push_back(parse_override("train.amp=" + common.amp));
  return o;
}

void run_train(const TrainArgs& a, const CommonOptions& common) {
  fs::path config = a.config;
  if (config.empty() && a.resume && fs::exists(fs::path(a.out) / "config.yaml"))
    config = fs::path(a.out) / "config.yaml";
  train(TrainConfig::load(config, run_overrides(common)), a.out, a.resume, a.stop_after);
}

struct AnalyzeArgs {
  std::string checkpoint, model, weights, config, input, data, out, maps = "applied";
  int64_t limit = 0, batch = 32, visualize = 4;
  double tau = 0.9, threshold = 0.9;
  bool center = false;
};

// --data SPEC: fashion_mnist, cifar10:ROOT or imagefolder:ROOT (its validation split).
std::vector<Override> data_spec_overrides(const std::string& spec) {
  const auto colon = spec.find(':');
  const std::string type = spec.substr(0, colon);
  if (type != "fashion_mnist" && type != "cifar10" && type != "imagefolder")
    fail("--data {}: expected fashion_mnist, cifar10:ROOT or imagefolder:ROOT", spec);
  std::vector<Override> o = {parse_override("data.type=" + type)};
  if (colon != std::string::npos) o.push_back({"data.root", YAML::Node(spec.substr(colon + 1))});
  return o;
}

void run_analyze(const AnalyzeArgs& a, const CommonOptions& common) {
  if (a.checkpoint.empty() == a.model.empty()) fail("give either --checkpoint RUN_DIR or --model NAME --weights FILE");
  if (!a.input.empty() && !a.data.empty()) fail("give either --input X.pt or --data SPEC, not both");
  if (a.input.empty() && a.data.empty() && a.checkpoint.empty()) fail("give either --input X.pt or --data SPEC");
  fs::path config = a.config, weights = a.weights;
  if (!a.checkpoint.empty()) {
    if (config.empty()) config = fs::path(a.checkpoint) / "config.yaml";
    if (weights.empty()) weights = fs::path(a.checkpoint) / "model.safetensors";
  } else if (weights.empty()) {
    fail("--model needs --weights FILE");
  }
  std::vector<Override> overrides = run_overrides(common);
  if (!a.model.empty()) overrides.push_back(parse_override("model.name=" + a.model));
  if (!a.data.empty())
    for (auto& o : data_spec_overrides(a.data)) overrides.push_back(o);
  const TrainConfig cfg = TrainConfig::load(config, overrides);
  configure_threads(static_cast<int>(cfg.train.threads));

  AnalyzeOptions ao;
  ao.device = parse_device(cfg.train.device, "train.device");
  ao.amp = parse_amp(cfg.train.amp, ao.device, "train.amp");
  ao.batch_size = a.batch;
  ao.limit = a.limit;
  ao.visualize = a.visualize;
  ao.maps = a.maps;
  ao.similarity.tau = a.tau;
  ao.similarity.similar_threshold = a.threshold;
  ao.similarity.center = a.center;
  AnalyzeReport report;
  if (!a.input.empty()) {
    YAML::Node keys = YAML::Clone(cfg.model_overrides);
    const fs::path classes = fs::path(a.checkpoint) / "classes.json";
    if (!a.checkpoint.empty() && !keys["num_classes"] && fs::exists(classes))
      keys["num_classes"] = nlohmann::json::parse(read_file(classes)).size();
    Model m = build_model(resolve_model(cfg.model, keys));
    load_weights(m, weights);
    const TransformOptions tf = cfg.transforms(m.config["img_size"], m.config["in_chans"]);
    ao.mean = tf.mean;
    ao.std = tf.std;
    torch::Tensor x = read_torch_tensor(a.input);
    const int64_t in_chans = m.config["in_chans"], img = m.config["img_size"];
    if (x.dim() != 4 || x.size(1) != in_chans || x.size(2) != img || x.size(3) != img)
      fail("{}: input shape {} does not match the model's [N, {}, {}, {}]", a.input, x.sizes().vec(), in_chans, img,
           img);
    if (!x.is_floating_point()) fail("{}: expected a float tensor, got {}", a.input, c10::toString(x.scalar_type()));
    report = analyze(m, x, ao, a.out);
  } else {
    DataSplits data = open_data(cfg.data);
    Model m = build_model(resolve_train_model(cfg, static_cast<int64_t>(data.classes.size())));
    load_weights(m, weights);
    const TransformOptions tf = cfg.transforms(m.config["img_size"], m.config["in_chans"]);
    ao.mean = tf.mean;
    ao.std = tf.std;
    LoaderOptions lo;
    lo.train = false;
    lo.batch_size = a.batch;
    lo.workers = static_cast<int>(cfg.data.workers);
    lo.skip_errors = cfg.data.on_error == "skip";
    lo.pin_memory = ao.device.is_cuda();
    std::shared_ptr<const ImageSource> source = data.val;
    if (a.limit > 0) source = std::make_shared<SubsetSource>(source, a.limit);
    DataLoader loader(source, tf, lo);
    report = analyze(m, loader, ao, a.out);
  }
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
  fmt::print("wrote {} files to {}\n", report.files.size(), a.out);
}

struct StudyArgs {
  std::string config, out;
  int jobs = 1;
  std::vector<std::string> members;
};

void run_study_cmd(const StudyArgs& a, const CommonOptions& common) {
  StudyRunOptions run;
  run.jobs = a.jobs;
  run.members = a.members;
  // Each member process gets the same options and a share of the threads in effect.
  const int threads = torch::get_num_threads();
  run.member_command = {"study",
                        "--config",
                        a.config,
                        "--out",
                        a.out,
                        "--threads",
                        std::to_string(std::max(1, threads / std::max(1, a.jobs)))};
  for (const auto& s : common.sets) run.member_command.insert(run.member_command.end(), {"--set", s});
  if (!common.device.empty()) run.member_command.insert(run.member_command.end(), {"--device", common.device});
  if (!common.amp.empty()) run.member_command.insert(run.member_command.end(), {"--amp", common.amp});
  const fs::path report = run_study(StudyConfig::load(a.config, run_overrides(common)), a.out, run);
  if (report.empty())
    fmt::print("study: {} done\n", fmt::join(a.members, ", "));
  else
    fmt::print("study done: {}\n", report.string());
}

struct BenchArgs {
  std::string model, mode = "infer", data;
  int64_t batch = 32, steps = 20, warmup = 5, img_size = 224;
  int workers = 1;
  bool attention = false, attention_op = false, gemm = false, loader = false, profile = false;
};

// One JSON object on the last line of stdout.
void run_bench(const BenchArgs& a, const CommonOptions& common) {
  const torch::Device device = parse_device(common.device.empty() ? "cpu" : common.device, "--device");
  nlohmann::json j;
  if (a.gemm) {
    j = bench_gemm(device);
  } else if (a.loader) {
    if (a.data.empty()) fail("bench --loader needs --data imagefolder:ROOT (or fashion_mnist, cifar10:ROOT)");
    j = bench_loader({a.data, a.img_size, a.batch, a.steps, a.workers});
  } else {
    if (a.model.empty()) fail("bench needs --model NAME (or --gemm, or --loader --data SPEC)");
    BenchOptions o;
    o.mode = a.mode;
    o.batch = a.batch;
    o.steps = a.steps;
    o.warmup = a.warmup;
    o.device = device;
    o.amp = parse_amp(common.amp.empty() ? "off" : common.amp, device, "--amp");
    o.attention = a.attention;
    o.profile = a.profile;
    const ModelSpec spec = resolve_model(a.model, parse_overrides(common.sets));
    j = a.attention_op ? bench_attention_op(spec, o) : bench_model(spec, o);
  }
  fmt::print("{}\n", j.dump());
}

struct EvalArgs {
  std::string checkpoint, model, weights, config, out;
};

void run_eval(const EvalArgs& a, const CommonOptions& common) {
  if (a.checkpoint.empty() == a.model.empty()) fail("give either --checkpoint RUN_DIR or --model NAME --weights FILE");
  fs::path config = a.config, weights = a.weights;
  if (!a.checkpoint.empty()) {
    if (config.empty()) config = fs::path(a.checkpoint) / "config.yaml";
    if (weights.empty()) weights = fs::path(a.checkpoint) / "model.safetensors";
  } else if (weights.empty()) {
    fail("--model needs --weights FILE");
  }
  std::vector<Override> overrides = run_overrides(common);
  if (!a.model.empty()) overrides.push_back(parse_override("model.name=" + a.model));
  TrainConfig cfg = TrainConfig::load(config, overrides);
  configure_threads(static_cast<int>(cfg.train.threads));
  const torch::Device device = parse_device(cfg.train.device, "train.device");
  const at::ScalarType amp = parse_amp(cfg.train.amp, device, "train.amp");
  DataSplits data = open_data(cfg.data);
  const auto num_classes = static_cast<int64_t>(data.classes.size());
  Model m = build_model(resolve_train_model(cfg, num_classes));
  load_weights(m, weights);
  m.module->to(device);
  LoaderOptions lo;
  lo.train = false;
  lo.batch_size = cfg.train.batch_size;
  lo.workers = static_cast<int>(cfg.data.workers);
  lo.skip_errors = cfg.data.on_error == "skip";
  lo.pin_memory = device.is_cuda();
  DataLoader loader(data.val, cfg.transforms(m.config["img_size"], m.config["in_chans"]), lo);
  EvalResult r = evaluate(*m.vision, loader, num_classes, device, amp);
  if (!a.out.empty())
    write_eval_outputs(r, data.classes, a.out,
                       fmt::format("{} on {} ({} images): top-1 {:.2f}%", m.name, cfg.data.type, r.images, r.top1));
  nlohmann::json j = r.to_json(data.classes);
  j["model"] = m.name;
  j["weights"] = weights.string();
  j["skipped_files"] = loader.skipped();
  fmt::print("{}\n", j.dump(2));
}

}  // namespace

int main(int argc, char** argv) {
  vitlab::configure_allocator();
  CLI::App app{"vitlab: vision transformers in C++ (ViT, DeepViT, Transformer) on LibTorch"};
  app.require_subcommand(1);
  app.set_version_flag("--version", vitlab::version());
  CommonOptions common;

  auto* models = app.add_subcommand("models", "List model presets with their parameter counts");
  add_threads(models, common);

  std::string info_model;
  auto* info = app.add_subcommand("info", "Print a model's resolved configuration and parameter count as JSON");
  add_model_options(info, info_model, common);
  add_threads(info, common);

  ForwardArgs fwd;
  auto* forward = app.add_subcommand("forward", "Run an image model in eval mode on a tensor saved by torch.save");
  add_model_options(forward, fwd.model, common);
  forward->add_option("--weights", fwd.weights, "Weights (.safetensors, or .pt/.pth/.bin from torch.save)")->required();
  forward->add_option("--input", fwd.input, "Input tensor [B, C, H, W] (torch.save)")->required();
  forward->add_option("--output", fwd.output, "Where to write the logits (torch.load reads it)")->required();
  forward->add_option("--attention", fwd.attention, "Also write the attention maps [L, B, H, T, T] here");
  forward->add_flag("--no-strict", fwd.no_strict, "Load matching keys only (e.g. a new classifier head)");
  add_threads(forward, common);
  add_device(forward, common);

  ConvertArgs conv;
  auto* convert = app.add_subcommand("convert", "Check weights against a model and write them as .safetensors or .pt");
  add_model_options(convert, conv.model, common);
  convert->add_option("--weights", conv.weights, "Input weights")->required();
  convert->add_option("--out", conv.out, "Output file (.safetensors, .pt, .pth or .bin)")->required();
  add_threads(convert, common);

  CompareArgs cmp;
  auto* compare = app.add_subcommand("compare", "Max absolute difference of two tensors saved by torch.save");
  compare->add_option("a", cmp.a, "First tensor file")->required();
  compare->add_option("b", cmp.b, "Second tensor file")->required();
  compare->add_option("--atol", cmp.atol, "Tolerance: exit status 2 when exceeded")->capture_default_str();
  add_threads(compare, common);

  ExportArgs exp;
  auto* data = app.add_subcommand("data", "Datasets");
  data->require_subcommand(1);
  auto* data_export = data->add_subcommand("export", "Write a built-in dataset as an ImageFolder of PNG files");
  data_export->add_option("--dataset", exp.dataset, "Dataset")
      ->required()
      ->check(CLI::IsMember({"fashion_mnist", "cifar10"}));
  data_export->add_option("--root", exp.root, "Where its files are (fashion_mnist: Debian's dataset-fashion-mnist)");
  data_export->add_option("--out", exp.out, "New ImageFolder directory (OUT/train/<class>, OUT/val/<class>)")
      ->required();
  data_export->add_option("--limit", exp.limit, "At most this many images per split (0: all)")
      ->check(CLI::NonNegativeNumber);
  add_threads(data_export, common);

  TrainArgs tr;
  auto* train_cmd = app.add_subcommand("train", "Train a ViT or DeepViT from a YAML config");
  train_cmd->add_option("--config", tr.config, "YAML with sections model, data, optim, schedule, aug, train");
  train_cmd->add_option("--set", common.sets, "Override any key, e.g. --set train.epochs=2 (repeatable)");
  train_cmd->add_option("--out", tr.out, "Run directory")->required();
  train_cmd->add_flag("--resume", tr.resume, "Continue from RUN_DIR/checkpoint-last");
  train_cmd->add_option("--stop-after", tr.stop_after, "Stop after this many epochs of the schedule (resume later)")
      ->check(CLI::NonNegativeNumber);
  add_threads(train_cmd, common);
  add_device(train_cmd, common);

  EvalArgs ev;
  auto* eval_cmd = app.add_subcommand("eval", "Evaluate a trained model on the validation split");
  eval_cmd->add_option("--checkpoint", ev.checkpoint, "Run directory of `vitlab train`");
  eval_cmd->add_option("--model", ev.model, "Model preset (with --weights)");
  eval_cmd->add_option("--weights", ev.weights, "Weights file");
  eval_cmd->add_option("--config", ev.config, "Training config for data and model keys");
  eval_cmd->add_option("--set", common.sets, "Override any key, e.g. --set data.type=imagefolder");
  eval_cmd->add_option("--out", ev.out, "Also write metrics.json, per_class.csv, confusion.csv and confusion.png here");
  add_threads(eval_cmd, common);
  add_device(eval_cmd, common);

  AnalyzeArgs an;
  auto* analyze_cmd =
      app.add_subcommand("analyze", "Attention collapse: cross-layer similarity of attention maps, with figures");
  analyze_cmd->add_option("--checkpoint", an.checkpoint, "Run directory of `vitlab train`");
  analyze_cmd->add_option("--model", an.model, "Model preset (with --weights)");
  analyze_cmd->add_option("--weights", an.weights, "Weights file");
  analyze_cmd->add_option("--config", an.config, "Training config for the model, data and transforms");
  analyze_cmd->add_option("--set", common.sets, "Override any key, e.g. --set model.num_classes=10");
  analyze_cmd->add_option("--input", an.input,
                          "Images [N, C, H, W] saved by torch.save, normalised as the model expects");
  analyze_cmd->add_option("--data", an.data, "fashion_mnist, cifar10:ROOT or imagefolder:ROOT (its validation split)");
  analyze_cmd->add_option("--limit", an.limit, "At most this many images (the first ones; 0: all)")
      ->check(CLI::NonNegativeNumber);
  analyze_cmd->add_option("--batch", an.batch, "Images per forward pass")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  analyze_cmd->add_option("--tau", an.tau, "Per-image cosine counted as similar in the ratio R")->capture_default_str();
  analyze_cmd->add_option("--threshold", an.threshold, "S[k-1,k] at or above which block k is a similar block")
      ->capture_default_str();
  analyze_cmd
      ->add_option(
          "--maps", an.maps,
          "applied: the maps that multiply V (after re-attention in DeepViT); softmax: the softmax maps before "
          "re-attention")
      ->check(CLI::IsMember({"applied", "softmax"}))
      ->capture_default_str();
  analyze_cmd->add_flag(
      "--center", an.center,
      "Subtract each map row's mean first (1/T for softmax): compare deviations from uniform attention");
  analyze_cmd->add_option("--visualize", an.visualize, "Images with attention overlays")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  analyze_cmd->add_option("--out", an.out, "Output directory")->required();
  add_threads(analyze_cmd, common);
  add_device(analyze_cmd, common);

  StudyArgs st;
  auto* study_cmd =
      app.add_subcommand("study", "DeepViT's depth-scaling experiment: train, evaluate and analyse each member");
  study_cmd->add_option("--config", st.config, "YAML with a study section and the shared training recipe")->required();
  study_cmd->add_option("--set", common.sets,
                        "Override a recipe key (train.epochs=2) or study.depths / study.analysis.KEY (repeatable)");
  study_cmd->add_option("--out", st.out, "Study directory (rerun to continue)")->required();
  study_cmd
      ->add_option("--jobs", st.jobs,
                   "Members trained at once, each in its own process with a share of the threads (a GPU "
                   "fits several small models)")
      ->check(CLI::PositiveNumber);
  study_cmd->add_option("--member", st.members,
                        "Only this member, e.g. ViT_d32 (repeatable): trained and analysed, no report");
  add_threads(study_cmd, common);
  add_device(study_cmd, common);

  BenchArgs be;
  auto* bench_cmd = app.add_subcommand("bench", "Throughput of a model (infer or train), the data loader, or sgemm");
  bench_cmd->add_option("--model", be.model, "Model preset (see `vitlab models`)");
  bench_cmd->add_option("--set", common.sets, "Override a model key, e.g. --set model.depth=6 (repeatable)");
  bench_cmd->add_option("--mode", be.mode, "infer, or train (forward, loss, backward, AdamW step)")
      ->check(CLI::IsMember({"infer", "train"}))
      ->capture_default_str();
  bench_cmd->add_option("--batch", be.batch, "Images per step")->check(CLI::PositiveNumber)->capture_default_str();
  bench_cmd->add_option("--steps", be.steps, "Timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  bench_cmd->add_option("--warmup", be.warmup, "Untimed steps first")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  bench_cmd->add_flag("--attention", be.attention,
                      "Also capture every block's attention maps, as `analyze` (inference: packed on the CPU kernel) "
                      "and the trainer take them");
  bench_cmd->add_flag("--profile", be.profile,
                      "Then run --steps more steps under LibTorch's profiler and add every operator's self CPU "
                      "time per step, most first");
  bench_cmd->add_flag("--attention-op", be.attention_op,
                      "Time the attention op alone at the model's shapes instead: vitlab's CPU kernel, "
                      "scaled_dot_product_attention and LibTorch's explicit matmul/softmax, in turn");
  bench_cmd->add_flag("--gemm", be.gemm, "Measure the float32 matrix-multiply peak instead");
  bench_cmd->add_flag("--loader", be.loader, "Measure the data loader (decode + training transforms) instead");
  bench_cmd->add_option("--data", be.data,
                        "--loader: imagefolder:ROOT (its train split), fashion_mnist or cifar10:ROOT");
  bench_cmd->add_option("--workers", be.workers, "--loader: decoding threads")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_cmd->add_option("--img-size", be.img_size, "--loader: output image size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  add_threads(bench_cmd, common);
  add_device(bench_cmd, common);

  int launch_nproc = 1, launch_port = 0;
  std::vector<std::string> launch_args;
  auto* launch_cmd = app.add_subcommand(
      "launch", "Run a subcommand as N data-parallel processes on this machine (as torchrun --standalone)");
  launch_cmd->add_option("--nproc", launch_nproc, "Processes (ranks)")->required()->check(CLI::PositiveNumber);
  launch_cmd->add_option("--master-port", launch_port, "Rendezvous port on 127.0.0.1 (0: a free one)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  launch_cmd->add_option("command", launch_args, "After --: the subcommand and its options, e.g. -- train --config F")
      ->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    vitlab::configure_threads(common.threads);
    if (*models) run_models();
    if (*info) run_info(info_model, common);
    if (*forward) run_forward(fwd, common);
    if (*convert) run_convert(conv, common);
    if (*compare) return run_compare(cmp);
    if (*data_export) run_data_export(exp);
    if (*train_cmd) run_train(tr, common);
    if (*eval_cmd) run_eval(ev, common);
    if (*analyze_cmd) run_analyze(an, common);
    if (*study_cmd) run_study_cmd(st, common);
    if (*bench_cmd) run_bench(be, common);
    if (*launch_cmd) return vitlab::launch_local(launch_nproc, launch_port, launch_args);
  } catch (const vitlab::TrainingStopped& e) {
    fmt::print(stderr, "{}\n", e.what());
    return 128 + e.signal;  // the shell's code for death by that signal: a scheduler sees an interrupted job
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
