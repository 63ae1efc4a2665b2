// `vitlab bench`: throughput of a model (infer or train), the data loader, or sgemm.
#include "bench/bench.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "analysis/measures.h"
#include "cli/commands.h"
#include "common/error.h"

namespace vitlab::cli {
namespace {

struct BenchArgs {
  std::string model, mode = "infer", data;
  int64_t batch = 32, steps = 20, warmup = 5, img_size = 224;
  int workers = 1;
  bool attention = false, attention_op = false, analysis = false, gemm = false, loader = false, profile = false;
  std::vector<std::string> measures = measure_names();
};

// --model: steps of --mode, the attention op alone at its shapes, or the
// analysis's measures.
nlohmann::json bench_preset(const BenchArgs& a, const CommonOptions& common, const torch::Device& device) {
  if (a.model.empty()) fail("bench needs --model NAME (or --gemm, or --loader --data SPEC)");
  BenchOptions o;
  o.mode = a.mode;
  o.batch = a.batch;
  o.steps = a.steps;
  o.warmup = a.warmup;
  o.device = device;
  o.amp = option_amp(common, device);
  o.attention = a.attention;
  o.profile = a.profile;
  const ModelSpec spec = resolve_model(a.model, parse_overrides(common.sets));
  if (a.analysis) return bench_analysis(spec, o, a.measures);
  return a.attention_op ? bench_attention_op(spec, o) : bench_model(spec, o);
}

// One JSON object on the last line of stdout.
void run_bench(const BenchArgs& a, const CommonOptions& common) {
  const torch::Device device = option_device(common);
  nlohmann::json j;
  if (a.gemm) {
    j = bench_gemm(device);
  } else if (a.loader) {
    if (a.data.empty()) fail("bench --loader needs --data imagefolder:ROOT (or fashion_mnist, cifar10:ROOT)");
    j = bench_loader({a.data, a.img_size, a.batch, a.steps, a.workers});
  } else {
    j = bench_preset(a, common, device);
  }
  fmt::print("{}\n", j.dump());
}

}  // namespace

Command add_bench_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand("bench", "Throughput of a model (infer or train), the data loader, or sgemm");
  add_model_options(cmd, a->model, common, /*required=*/false);
  cmd->add_option("--mode", a->mode, "infer, or train (forward, loss, backward, AdamW step)")
      ->check(CLI::IsMember({"infer", "train"}))
      ->capture_default_str();
  cmd->add_option("--batch", a->batch, "Images per step")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--steps", a->steps, "Timed steps")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--warmup", a->warmup, "Untimed steps first")->check(CLI::NonNegativeNumber)->capture_default_str();
  cmd->add_flag("--attention", a->attention,
                "Also capture every block's attention maps, as `analyze` (inference: packed on the CPU kernel) "
                "and the trainer take them");
  cmd->add_flag("--profile", a->profile,
                "Then run --steps more steps under LibTorch's profiler and add every operator's self CPU "
                "time per step, most first");
  cmd->add_flag("--attention-op", a->attention_op,
                "Time the attention op alone at the model's shapes instead: vitlab's CPU kernel, "
                "scaled_dot_product_attention and LibTorch's explicit matmul/softmax, in turn");
  cmd->add_flag("--analysis", a->analysis,
                "Time `analyze` instead: --steps rounds of --batch images, the similarity alone, each of "
                "--measures alone and all together; each one's cost over the forward passes");
  cmd->add_option("--measures", a->measures, "--analysis: the collapse measures to time, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_flag("--gemm", a->gemm, "Measure the float32 matrix-multiply peak instead");
  cmd->add_flag("--loader", a->loader, "Measure the data loader (decode + training transforms) instead");
  cmd->add_option("--data", a->data, "--loader: imagefolder:ROOT (its train split), fashion_mnist or cifar10:ROOT");
  cmd->add_option("--workers", a->workers, "--loader: decoding threads")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--img-size", a->img_size, "--loader: output image size")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  add_threads(cmd, common);
  add_device(cmd, common);
  return make_command(cmd, [a, &common] { run_bench(*a, common); });
}

}  // namespace vitlab::cli
