#include "bench/bench.h"

#include <sys/resource.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <vector>

#include "analysis/analyze.h"
#include "analysis/map_packing.h"
#include "common/device.h"
#include "common/error.h"
#include "common/runtime.h"
#include "kernels/attention.h"
#include "kernels/cosine.h"
#include "train/trainer.h"

namespace vitlab {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double peak_rss_mb() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // kilobytes on Linux
}

void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index() < 0 ? -1 : device.index());
}

// Runs `step` `steps` times under LibTorch's profiler and returns every
// operator's self CPU time (time inside the op minus the ops it called) per
// step, most first: the table PyTorch's profiler prints as "Self CPU".
nlohmann::json profile_ops(const std::function<void()>& step, int64_t steps) {
  namespace prof = torch::autograd::profiler;
  prof::enableProfilerLegacy(torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::CPU));
  for (int64_t i = 0; i < steps; ++i) step();
  const prof::thread_event_lists threads = prof::disableProfilerLegacy();

  struct Total {
    double self_us = 0;
    int64_t calls = 0;
  };
  std::map<std::string, Total> totals;
  double all_us = 0;
  for (const auto& events : threads) {
    struct Open {
      const prof::LegacyEvent* push;
      double child_us;
    };
    std::map<uint64_t, Open> open;  // by RecordFunction handle: pops name their push by it
    std::vector<uint64_t> stack;
    for (const auto& e : events) {
      if (e.kind() == prof::EventKind::PushRange) {
        open[e.handle()] = {&e, 0.0};
        stack.push_back(e.handle());
      } else if (e.kind() == prof::EventKind::PopRange) {
        const auto it = open.find(e.handle());
        if (it == open.end()) continue;
        const double us = it->second.push->cpuElapsedUs(e);
        Total& t = totals[it->second.push->name()];
        t.self_us += us - it->second.child_us;
        t.calls += 1;
        stack.erase(std::find(stack.begin(), stack.end(), e.handle()));
        if (stack.empty())
          all_us += us;
        else
          open[stack.back()].child_us += us;
        open.erase(it);
      }
    }
  }
  std::vector<std::pair<std::string, Total>> sorted(totals.begin(), totals.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.second.self_us > b.second.self_us; });
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [name, t] : sorted)
    rows.push_back({{"op", name},
                    {"self_ms_per_step", t.self_us / 1000.0 / steps},
                    {"share", all_us > 0 ? t.self_us / all_us : 0.0},
                    {"calls_per_step", static_cast<double>(t.calls) / steps}});
  return {{"profiled_ms_per_step", all_us / 1000.0 / steps}, {"ops", rows}};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

double forward_macs(const ModelSpec& spec) {
  const bool cait = spec.family == "cait";
  if (spec.family != "vit" && spec.family != "deepvit" && !cait)
    fail("bench: FLOPs are counted for ViT, DeepViT and CaiT models, not {} ({})", spec.name, spec.family);
  const nlohmann::json& c = spec.config;
  const double img = c["img_size"].get<double>(), patch = c["patch_size"].get<double>();
  const double D = c["embed_dim"].get<double>(), H = c["num_heads"].get<double>();
  const double classes = c["num_classes"].get<double>();
  // As the blocks build their Mlp: int(D * mlp_ratio) hidden features.
  const auto hidden_of = [&](const char* ratio) { return std::floor(D * c[ratio].get<double>()); };
  const double hidden = hidden_of("mlp_ratio");
  const double patches = (img / patch) * (img / patch);
  // CaiT's class token joins only after the self-attention blocks (and has no class_token key).
  const double T = patches + (!cait && c["class_token"].get<bool>() ? 1 : 0);
  const bool mlp = cait || c["mlp"].get<bool>();  // mlp: false drops the MLP half of every block
  double macs = patches * c["in_chans"].get<double>() * patch * patch * D;  // patch embedding
  const auto depth = c["depth"].get<int64_t>();
  for (int64_t l = 0; l < depth; ++l) {
    macs += T * D * 3 * D;                // qkv
    macs += 2 * T * T * D;                // q k^T and attn v over all heads
    macs += T * D * D;                    // projection
    if (mlp) macs += 2 * T * D * hidden;  // fc1, fc2
    if (cait) macs += 2 * H * H * T * T;  // talking heads: proj_l before the softmax, proj_w after
    if (spec.family == "deepvit" && c["apply_transform"][l].get<bool>()) macs += H * H * T * T;  // Θ mixes heads
  }
  if (cait) {  // class attention: only the class token queries, over itself and the patches
    const double keys = patches + 1, hidden_token = hidden_of("mlp_ratio_token_only");
    const double block = 2 * D * D                // q of the class token, projection
                         + 2 * keys * D * D       // k, v
                         + 2 * keys * D           // scores and their weighted sum of V over all heads
                         + 2 * D * hidden_token;  // MLP on the class token
    macs += c["depth_token_only"].get<double>() * block;
  }
  return macs + D * classes;
}

nlohmann::json bench_model(const ModelSpec& spec, const BenchOptions& o) {
  if (o.mode != "infer" && o.mode != "train") fail("bench: --mode must be infer or train, got {}", o.mode);
  if (o.batch < 1 || o.steps < 1 || o.warmup < 0)
    fail("bench: --batch and --steps must be >= 1 and --warmup >= 0, got {}, {} and {}", o.batch, o.steps, o.warmup);
  Model model = build_model(spec);
  if (!model.vision) fail("bench: {} is not an image model", spec.name);
  model.module->to(o.device);
  const bool train = o.mode == "train";
  model.module->train(train);
  const int64_t img = spec.config["img_size"], chans = spec.config["in_chans"], classes = spec.config["num_classes"];
  torch::manual_seed(0);
  const torch::Tensor x = torch::randn({o.batch, chans, img, img}).to(o.device);
  const torch::Tensor y = torch::randint(classes, {o.batch}, torch::kInt64).to(o.device);
  torch::optim::AdamW opt(model.module->parameters(), torch::optim::AdamWOptions(1e-4).weight_decay(0.05));

  // With --attention, the maps as their users take them: `vitlab analyze`
  // keeps one tensor per block, packed where the CPU kernel hands them
  // over, the trainer's similarity regulariser stacks them.
  std::string maps_layout = o.attention ? "row-major" : "none";
  auto forward = [&]() -> torch::Tensor {
    if (!o.attention) return model.vision->forward(x);
    if (train) return model.vision->forward_with_attention(x).first;
    PackedMaps maps;
    torch::Tensor logits = model.vision->forward_head(model.vision->forward_features(x, &maps));
    if (is_packed_maps(maps.take().front())) maps_layout = "packed";
    return logits;
  };
  auto step = [&] {
    if (train) {
      torch::Tensor logits;
      {
        Autocast autocast(o.device, o.amp);
        logits = forward();
      }
      torch::Tensor loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat), y);
      opt.zero_grad();
      loss.backward();
      opt.step();
    } else {
      torch::NoGradGuard no_grad;
      Autocast autocast(o.device, o.amp);
      forward();
    }
    sync(o.device);
  };
  for (int64_t i = 0; i < o.warmup; ++i) step();
  std::vector<double> ms;
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < o.steps; ++i) {
    const auto s = Clock::now();
    step();
    ms.push_back(1000.0 * seconds_since(s));
  }
  const double total = seconds_since(t0);
  const nlohmann::json profile = o.profile ? profile_ops(step, o.steps) : nlohmann::json();

  const double flop_per_step = 2.0 * forward_macs(spec) * o.batch * (train ? 3.0 : 1.0);
  const double peak = bench_gemm(o.device)["gflops"].get<double>();  // for mfu, same threads
  const double achieved = flop_per_step * o.steps / total / 1e9;
  nlohmann::json j = {{"model", spec.name},
                      {"mode", o.mode},
                      {"batch", o.batch},
                      {"steps", o.steps},
                      {"warmup", o.warmup},
                      {"attention", o.attention},
                      {"attention_maps", maps_layout},
                      {"device", o.device.str()},
                      {"amp", o.amp == at::ScalarType::Undefined ? "off" : c10::toString(o.amp)},
                      {"threads", at::get_num_threads()},
                      {"libtorch", TORCH_VERSION},
                      {"vitlab", version()},
                      {"cpu_kernels", cpu_kernels_enabled()},
                      {"images_per_sec", o.batch * o.steps / total},
                      {"step_ms_median", median(ms)},
                      {"step_ms_min", *std::min_element(ms.begin(), ms.end())},
                      {"peak_rss_mb", peak_rss_mb()},
                      {"gflop_per_step", flop_per_step / 1e9},
                      {"achieved_gflops", achieved},
                      {"gemm_peak_gflops", peak},
                      {"mfu", achieved / peak}};
  if (o.profile) j["profile"] = profile;
  return j;
}

namespace {

struct AnalysisRun {
  std::string name;
  std::vector<std::string> measures;
  double forward = INFINITY, analysis = INFINITY, total = INFINITY;  // the fastest round's seconds
};

// The configurations bench_analysis compares: the similarity alone first
// (every cost's reference), each measure alone, then all together.
std::vector<AnalysisRun> analysis_runs(const std::vector<std::string>& measures) {
  std::vector<AnalysisRun> runs = {{"none", {}}};
  for (const auto& m : measures) runs.push_back({m, {m}});
  if (measures.size() > 1) runs.push_back({"all", measures});
  return runs;
}

}  // namespace

nlohmann::json bench_analysis(const ModelSpec& spec, const BenchOptions& o, const std::vector<std::string>& measures) {
  if (o.batch < 1 || o.steps < 1 || o.warmup < 0)
    fail("bench: --batch and --steps must be >= 1 and --warmup >= 0, got {}, {} and {}", o.batch, o.steps, o.warmup);
  MeasureOptions{measures}.validate();
  Model model = build_model(spec);
  if (!model.vision) fail("bench: {} is not an image model", spec.name);
  model.module->to(o.device);
  const int64_t img = spec.config["img_size"], chans = spec.config["in_chans"];
  torch::manual_seed(0);
  const torch::Tensor x = torch::randn({o.batch, chans, img, img});
  const std::filesystem::path out =
      std::filesystem::temp_directory_path() / fmt::format("vitlab-bench-analysis-{}", ::getpid());
  AnalyzeOptions a;
  a.batch_size = o.batch;
  a.device = o.device;
  a.amp = o.amp;
  a.visualize = 0;
  auto analyse = [&](const std::vector<std::string>& list) {
    a.measures = list;
    return analyze(model, x, a, out);
  };
  for (int64_t i = 0; i < o.warmup; ++i) analyse({});
  std::vector<AnalysisRun> runs = analysis_runs(measures);
  for (int64_t round = 0; round < o.steps; ++round)
    for (auto& run : runs) {
      const AnalyzeReport r = analyse(run.measures);
      run.forward = std::min(run.forward, r.forward_seconds);
      run.analysis = std::min(run.analysis, r.analysis_seconds);
      run.total = std::min(run.total, r.forward_seconds + r.analysis_seconds);
    }
  std::filesystem::remove_all(out);
  const AnalysisRun& none = runs.front();
  nlohmann::json j = {{"model", spec.name},        {"mode", "analyze"},        {"batch", o.batch},
                      {"rounds", o.steps},         {"device", o.device.str()}, {"threads", at::get_num_threads()},
                      {"libtorch", TORCH_VERSION}, {"vitlab", version()},      {"runs", nlohmann::json::array()}};
  for (const auto& run : runs)
    j["runs"].push_back({{"measures", run.name},
                         {"forward_s", run.forward},
                         {"analysis_s", run.analysis},
                         {"analysis_over_forward", run.analysis / run.forward},
                         {"cost", (run.total - none.total) / none.forward},
                         {"analysis_cost", (run.analysis - none.analysis) / none.forward}});
  return j;
}

nlohmann::json bench_attention_op(const ModelSpec& spec, const BenchOptions& o) {
  const int64_t dim = spec.config["embed_dim"], heads = spec.config["num_heads"];
  const int64_t grid = spec.config["img_size"].get<int64_t>() / spec.config["patch_size"].get<int64_t>();
  const int64_t tokens = grid * grid + (spec.config.value("class_token", true) ? 1 : 0), d = dim / heads;
  const bool train = o.mode == "train";
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  torch::Tensor qkv = torch::randn({o.batch, tokens, 3, heads, d}).requires_grad_(train);
  torch::Tensor grad = torch::randn({o.batch, heads, tokens, d});
  using Attention = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>;
  std::vector<std::pair<std::string, Attention>> impls;
  impls.emplace_back("vitlab", [&](const auto& q, const auto& k, const auto& v) {
    if (!attention_kernel_applies(q, k, v))
      fail("the CPU attention kernel does not apply here (VITLAB_CPU_KERNELS=0?)");
    return train ? attention_apply(attention_probs(q, k, scale), v) : attention_inference(q, k, v, scale);
  });
#if TORCH_VERSION_MAJOR >= 2
  impls.emplace_back(
      "sdpa", [](const auto& q, const auto& k, const auto& v) { return at::scaled_dot_product_attention(q, k, v); });
#endif
  impls.emplace_back("explicit", [&](const auto& q, const auto& k, const auto& v) {
    return torch::matmul(torch::matmul(q * scale, k.transpose(-2, -1)).softmax(-1), v);
  });
  auto run = [&](const Attention& attention) {
    const torch::Tensor views = qkv.permute({2, 0, 3, 1, 4});
    const auto t0 = Clock::now();
    if (train) {
      attention(views[0], views[1], views[2]).backward(grad);
      qkv.mutable_grad().reset();
    } else {
      torch::NoGradGuard no_grad;
      attention(views[0], views[1], views[2]);
    }
    return 1000.0 * seconds_since(t0);
  };
  std::map<std::string, std::vector<double>> ms;
  for (int64_t round = 0; round < o.warmup + o.steps; ++round)
    for (const auto& [name, attention] : impls) {
      const double t = run(attention);
      if (round >= o.warmup) ms[name].push_back(t);
    }
  nlohmann::json j = {{"model", spec.name},       {"op", "attention"},
                      {"mode", o.mode},           {"shape", {o.batch, heads, tokens, d}},
                      {"steps", o.steps},         {"threads", at::get_num_threads()},
                      {"libtorch", TORCH_VERSION}};
  for (const auto& [name, times] : ms) j[name + "_ms_median"] = median(times);
  return j;
}

nlohmann::json bench_gemm(const torch::Device& device) {
  double best = 0;
  int64_t best_n = 0;
  for (int64_t n : {256, 512, 1024}) {
    const torch::Tensor a = torch::randn({n, n}).to(device), b = torch::randn({n, n}).to(device);
    torch::Tensor c = torch::mm(a, b);  // warm-up
    sync(device);
    int64_t reps = 0;
    const auto t0 = Clock::now();
    do {
      torch::mm_out(c, a, b);
      sync(device);
      ++reps;
    } while (seconds_since(t0) < 0.3);
    const double gflops = 2.0 * n * n * n * reps / seconds_since(t0) / 1e9;
    if (gflops > best) {
      best = gflops;
      best_n = n;
    }
  }
  return {{"gflops", best},
          {"size", best_n},
          {"threads", at::get_num_threads()},
          {"device", device.str()},
          {"libtorch", TORCH_VERSION}};
}

nlohmann::json bench_loader(const LoaderBenchOptions& o) {
  if (o.batch < 1 || o.steps < 1 || o.workers < 1)
    fail("bench: --batch, --steps and --workers must be >= 1, got {}, {} and {}", o.batch, o.steps, o.workers);
  TrainConfig cfg;
  const auto colon = o.data.find(':');
  cfg.data.type = o.data.substr(0, colon);
  if (colon != std::string::npos) cfg.data.root = o.data.substr(colon + 1);
  cfg.data.validate();
  // The transforms torchvision's usual training pipeline has: random resized
  // crop, flip, normalise.
  cfg.aug.auto_augment = "";
  cfg.aug.color_jitter = 0.0;
  cfg.aug.reprob = 0.0;
  DataSplits data = open_data(cfg.data);
  LoaderOptions lo;
  lo.batch_size = o.batch;
  lo.workers = o.workers;
  DataLoader loader(data.train, cfg.transforms(o.img_size, 3), lo);
  if (loader.num_batches() < o.steps + 1)
    fail("bench: {} has {} batches of {}, fewer than --steps {} + 1", o.data, loader.num_batches(), o.batch, o.steps);
  loader.begin_epoch(0);
  loader.next();  // warm-up: threads started, first images decoded
  const auto t0 = Clock::now();
  int64_t images = 0;
  for (int64_t i = 0; i < o.steps; ++i)
    if (auto batch = loader.next()) images += batch->images.size(0);
  const double total = seconds_since(t0);
  return {{"data", o.data},
          {"batch", o.batch},
          {"steps", o.steps},
          {"workers", o.workers},
          {"img_size", o.img_size},
          {"images_per_sec", images / total},
          {"images_per_sec_per_worker", images / total / o.workers},
          {"peak_rss_mb", peak_rss_mb()},
          {"libtorch", TORCH_VERSION},
          {"vitlab", version()}};
}

}  // namespace vitlab
