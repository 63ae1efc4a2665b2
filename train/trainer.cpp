#include "train/trainer.h"

#include <fmt/format.h>
#include <torch/version.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
#include "common/process.h"
#include "common/runtime.h"
#include "eval/evaluate.h"
#include "io/safetensors.h"
#include "io/tensorboard.h"
#include "models/layers.h"
#include "models/registry.h"
#include "train/distributed.h"

namespace vitlab {

namespace fs = std::filesystem;

DataSplits open_data(const DataConfig& data) {
  DataSplits s;
  if (data.type == "fashion_mnist") {
    const fs::path root = data.root.empty() ? kFashionMnistDir : data.root;
    s.train = std::make_shared<MemorySource>(load_fashion_mnist(root, "train"));
    s.val = std::make_shared<MemorySource>(load_fashion_mnist(root, "test"));
  } else if (data.type == "cifar10") {
    s.train = std::make_shared<MemorySource>(load_cifar10(data.root, "train"));
    s.val = std::make_shared<MemorySource>(load_cifar10(data.root, "test"));
  } else {
    ImageFolder train = scan_image_folder(find_split(data.root, data.train_split, {"train"}));
    ImageFolder val = scan_image_folder(find_split(data.root, data.val_split, {"val", "validation", "valid", "eval"}),
                                        &train.classes);
    for (const auto* f : {&train, &val}) {
      for (const auto& w : f->warnings) fmt::print(stderr, "warning: {}\n", w);
      if (f->samples.empty())
        fail("{}: no images found (extensions jpg, jpeg, png, bmp, webp, tif, tiff)", f->dir.string());
    }
    s.train = std::make_shared<FolderSource>(std::move(train), data.max_image_pixels);
    s.val = std::make_shared<FolderSource>(std::move(val), data.max_image_pixels);
  }
  s.classes = s.train->classes();
  if (data.train_limit > 0) s.train = std::make_shared<SubsetSource>(s.train, data.train_limit);
  return s;
}

ModelSpec resolve_train_model(const TrainConfig& cfg, int64_t num_classes) {
  YAML::Node keys = YAML::Clone(cfg.model_overrides);
  if (!keys["num_classes"]) keys["num_classes"] = num_classes;
  ModelSpec spec = resolve_model(cfg.model, keys);
  if (spec.family == "transformer") fail("model.name {} is a sequence model; train takes image models", cfg.model);
  if (spec.config["num_classes"].get<int64_t>() != num_classes)
    fail("model.num_classes is {} but the dataset has {} classes", spec.config["num_classes"].get<int64_t>(),
         num_classes);
  return spec;
}

namespace {

// The lr at an optimizer step: linear warmup from warmup_lr, then cosine
// down to min_lr (or constant), evaluated per step as timm does with
// t_in_epochs=False.
double lr_at(const ScheduleConfig& s, double base_lr, int64_t step, int64_t steps_per_epoch, int64_t total_steps) {
  const auto warmup = static_cast<int64_t>(std::llround(s.warmup_epochs * steps_per_epoch));
  if (step < warmup) return s.warmup_lr + (base_lr - s.warmup_lr) * static_cast<double>(step) / warmup;
  if (s.sched == "constant" || total_steps <= warmup) return base_lr;
  const double t = static_cast<double>(step - warmup) / static_cast<double>(total_steps - warmup);
  return s.min_lr + 0.5 * (base_lr - s.min_lr) * (1.0 + std::cos(M_PI * std::min(1.0, t)));
}

// Exponential moving average of the weights (buffers copied as they are).
// The (average, live tensor) pairs are found once: the update runs every step.
struct Ema {
  StateDict state;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> pairs;
  double decay;
  Ema(const torch::nn::Module& m, double decay) : decay(decay) {
    for (const auto& [k, v] : module_state(m)) {
      state[k] = v.detach().clone();
      pairs.emplace_back(state[k], v);
    }
  }
  void update() {
    torch::NoGradGuard no_grad;
    for (auto& [e, v] : pairs) {
      if (e.is_floating_point())
        e.mul_(decay).add_(v.detach(), 1.0 - decay);
      else
        e.copy_(v);
    }
  }
};

std::unique_ptr<torch::optim::Optimizer> make_optimizer(torch::nn::Module& model, const OptimConfig& o, double lr) {
  // timm: no weight decay on 1-d parameters (biases, norms) and the embeddings.
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.named_parameters()) {
    const bool skip = p.value().dim() <= 1 || p.key() == "pos_embed" || p.key() == "cls_token";
    (skip ? no_decay : decay).push_back(p.value());
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (o.opt == "adamw") {
    auto opts = [&](double wd) {
      return std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(lr).eps(o.eps).weight_decay(wd));
    };
    groups.emplace_back(decay, opts(o.weight_decay));
    groups.emplace_back(no_decay, opts(0.0));
    return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(lr));
  }
  auto opts = [&](double wd) {
    return std::make_unique<torch::optim::SGDOptions>(
        torch::optim::SGDOptions(lr).momentum(o.momentum).nesterov(o.momentum > 0).weight_decay(wd));
  };
  groups.emplace_back(decay, opts(o.weight_decay));
  groups.emplace_back(no_decay, opts(0.0));
  return std::make_unique<torch::optim::SGD>(groups, torch::optim::SGDOptions(lr));
}

// The adjacent-block attention similarity of DeepViT's official regulariser.
torch::Tensor attention_similarity_loss(const torch::Tensor& attn, int64_t pairs) {
  const int64_t L = attn.size(0);
  pairs = pairs > 0 ? std::min(pairs, L - 1) : L - 1;
  torch::Tensor sum = torch::zeros({}, attn.options());
  for (int64_t k = 0; k < pairs; ++k)
    sum = sum + torch::nn::functional::cosine_similarity(attn[k], attn[k + 1],
                                                         torch::nn::functional::CosineSimilarityFuncOptions().dim(1))
                    .mean();
  return pairs > 0 ? sum / pairs : sum;
}

struct RunState {
  int64_t epoch = 0;  // epochs completed
  int64_t step = 0;   // optimizer steps taken
  // Inside epoch `epoch` (a checkpoint written when a signal stopped the
  // run): the loader's next batch, batches consumed, and the loss so far.
  int64_t batch = 0, batch_index = 0, loss_count = 0;
  double loss_sum = 0;
  double best_top1 = -1.0;
  std::vector<std::string> csv_rows;
  double loss_scale = 65536.0;  // fp16 only
  int64_t scale_growth_tracker = 0;
  int64_t skipped_steps = 0;
  // Wall-clock seconds of training up to this state, summed over the runs
  // (a resumed training's time counts every run up to its checkpoint).
  double seconds = 0;
};

// fp16 loss scaling as torch.cuda.amp.GradScaler does it: a step whose
// unscaled gradients hold inf/NaN is skipped and the scale halved; after
// 2000 clean steps in a row the scale doubles.
bool unscale_and_check(torch::nn::Module& model, RunState& st) {
  const double inv = 1.0 / st.loss_scale;
  for (auto& p : model.parameters())
    if (p.grad().defined()) p.mutable_grad().mul_(inv);
  const bool finite = first_nonfinite_gradient(model).empty();
  if (!finite) {
    st.loss_scale *= 0.5;
    st.scale_growth_tracker = 0;
    ++st.skipped_steps;
  } else if (++st.scale_growth_tracker == 2000) {
    st.loss_scale *= 2.0;
    st.scale_growth_tracker = 0;
  }
  return finite;
}

}  // namespace

std::string first_nonfinite_gradient(torch::nn::Module& model) {
  std::vector<torch::Tensor> extremes;
  std::vector<std::string> names;
  for (const auto& p : model.named_parameters()) {
    const torch::Tensor& g = p.value().grad();
    if (!g.defined() || g.numel() == 0) continue;
    // max and min carry NaN and +-Inf through without a full-size temporary.
    extremes.push_back(torch::stack({g.max(), g.min()}).to(torch::kFloat));
    names.push_back(p.key());
  }
  if (extremes.empty()) return "";
  const torch::Tensor finite = torch::stack(extremes).isfinite().all(1).cpu();
  if (finite.all().item<bool>()) return "";
  const bool* ok = finite.data_ptr<bool>();
  return names[std::find(ok, ok + finite.numel(), false) - ok];
}

namespace {

std::string csv_header(bool ema) {
  return std::string("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr") +
         (ema ? ",ema_eval_loss,ema_eval_top1,ema_eval_top5" : "") + "\n";
}

// A checkpoint is a directory written under a temporary name, fsync'ed and
// renamed into place. With keep_previous, the one it replaces stays as
// DIR-prev until the next save: a crash at any point leaves a whole
// checkpoint. state.json lists every other file's size and CRC-32, checked
// on load, with the vitlab and LibTorch versions and the run's config.
void save_checkpoint(const fs::path& dir, torch::nn::Module& model, torch::optim::Optimizer& opt, const Ema* ema,
                     const RunState& st, const std::string& config_yaml, bool keep_previous) {
  fs::path tmp = dir, previous = dir;
  tmp += ".tmp";
  previous += keep_previous ? "-prev" : ".old";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  std::vector<std::pair<std::string, std::string>> files;
  files.emplace_back("model.safetensors", serialize_safetensors(module_state(model), {{"format", "pt"}}));
  if (ema) files.emplace_back("ema.safetensors", serialize_safetensors(ema->state, {{"format", "pt"}}));
  std::ostringstream optimizer;
  torch::save(opt, optimizer);
  files.emplace_back("optimizer.pt", optimizer.str());
  torch::Tensor rng;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng = gen.get_state();
  }
  StateDict rng_state{{"cpu", rng}};
  if (torch::cuda::is_available()) {
    auto gen = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0));
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng_state["cuda"] = gen.get_state();
  }
  files.emplace_back("rng.safetensors", serialize_safetensors(rng_state));
  StagedOutputs staged;  // each file fsync'ed, the directory synced once
  nlohmann::json manifest = nlohmann::json::object();
  for (const auto& [name, bytes] : files) {
    staged.add(tmp / name, bytes);
    manifest[name] = {{"bytes", bytes.size()}, {"crc32", crc32_of(bytes)}};
  }
  nlohmann::json j = {{"epoch", st.epoch},
                      {"step", st.step},
                      {"batch", st.batch},
                      {"batch_index", st.batch_index},
                      {"loss_sum", st.loss_sum},
                      {"loss_count", st.loss_count},
                      {"best_top1", st.best_top1},
                      {"csv_rows", st.csv_rows},
                      {"loss_scale", st.loss_scale},
                      {"scale_growth_tracker", st.scale_growth_tracker},
                      {"skipped_steps", st.skipped_steps},
                      {"seconds", st.seconds},
                      {"files", manifest},
                      {"vitlab", version()},
                      {"libtorch", TORCH_VERSION},
                      {"config", config_yaml}};
  staged.add(tmp / "state.json", j.dump(2) + "\n");
  staged.commit();
  fs::remove_all(previous);
  if (fs::exists(dir)) fs::rename(dir, previous);
  fs::rename(tmp, dir);
  sync_directory(dir.parent_path());
  if (!keep_previous) fs::remove_all(previous);
}

// A checkpoint file's bytes, checked against state.json's size and CRC-32.
std::string read_checked(const fs::path& dir, const std::string& name, const nlohmann::json& state) {
  const fs::path path = dir / name;
  std::string bytes = read_file(path);
  if (!state.contains("files")) return bytes;  // written before checksums
  const auto& files = state["files"];
  if (!files.contains(name)) fail("{}: not listed in {}", path.string(), (dir / "state.json").string());
  const uint64_t size = files[name]["bytes"], crc = files[name]["crc32"];
  if (bytes.size() != size || crc32_of(bytes) != crc)
    fail("{}: damaged: {} bytes with CRC-32 {:08x}, state.json expects {} bytes with CRC-32 {:08x}", path.string(),
         bytes.size(), crc32_of(bytes), size, crc);
  return bytes;
}

RunState load_checkpoint(const fs::path& dir, torch::nn::Module& model, torch::optim::Optimizer& opt, Ema* ema) {
  if (!fs::is_directory(dir)) fail("{}: no checkpoint there", dir.string());
  const fs::path state_path = dir / "state.json";
  const nlohmann::json j = nlohmann::json::parse(read_file(state_path), nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail("{}: damaged (not a JSON object)", state_path.string());
  // Everything is read and checked before anything is loaded, so a damaged
  // checkpoint leaves the model as it was.
  const StateDict weights =
      parse_safetensors(read_checked(dir, "model.safetensors", j), (dir / "model.safetensors").string());
  const StateDict ema_state =
      ema ? parse_safetensors(read_checked(dir, "ema.safetensors", j), (dir / "ema.safetensors").string())
          : StateDict();
  const std::string optimizer = read_checked(dir, "optimizer.pt", j);
  const StateDict rng = parse_safetensors(read_checked(dir, "rng.safetensors", j), (dir / "rng.safetensors").string());
  RunState st;
  try {
    st.epoch = j.at("epoch");
    st.step = j.at("step");
    st.batch = j.value("batch", int64_t(0));
    st.batch_index = j.value("batch_index", int64_t(0));
    st.loss_sum = j.value("loss_sum", 0.0);
    st.loss_count = j.value("loss_count", int64_t(0));
    st.best_top1 = j.at("best_top1");
    st.csv_rows = j.at("csv_rows").get<std::vector<std::string>>();
    st.loss_scale = j.value("loss_scale", st.loss_scale);
    st.scale_growth_tracker = j.value("scale_growth_tracker", int64_t(0));
    st.skipped_steps = j.value("skipped_steps", int64_t(0));
    st.seconds = j.value("seconds", 0.0);  // 0 in checkpoints written before it was recorded
  } catch (const nlohmann::json::exception& e) {
    fail("{}: damaged ({})", state_path.string(), e.what());
  }

  load_state(model, weights, true, (dir / "model.safetensors").string());
  if (ema)
    for (auto& [k, v] : ema->state) v.copy_(ema_state.at(k));
  std::istringstream optimizer_stream(optimizer);
  torch::load(opt, optimizer_stream);
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng.at("cpu"));
  }
  if (rng.count("cuda") && torch::cuda::is_available()) {
    auto gen = at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0));
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng.at("cuda"));
  }
  return st;
}

// --resume: checkpoint-last, or checkpoint-last-prev when the last one is
// missing or damaged (a crash while it was replaced, a bad disk). A run
// directory with neither but with its config.yaml starts from the beginning:
// killed before its first checkpoint, it has lost nothing else.
RunState resume_state(const fs::path& run_dir, torch::nn::Module& model, torch::optim::Optimizer& opt, Ema* ema,
                      bool main) {
  const fs::path last = run_dir / "checkpoint-last", previous = run_dir / "checkpoint-last-prev";
  if (!fs::exists(last) && !fs::exists(previous)) {
    if (!fs::exists(run_dir / "config.yaml"))
      fail(
          "{}: nothing to resume (no checkpoint-last and no config.yaml of a run); check the path, or leave out "
          "--resume",
          run_dir.string());
    if (main) fmt::print(stderr, "{}: no checkpoint yet, starting from the beginning\n", run_dir.string());
    return {};
  }
  try {
    return load_checkpoint(last, model, opt, ema);
  } catch (const std::exception& e) {
    if (!fs::exists(previous)) throw;
    if (main) fmt::print(stderr, "warning: {}; resuming from {} instead\n", e.what(), previous.string());
    return load_checkpoint(previous, model, opt, ema);
  }
}

// A progress bar on a terminal, plain lines every log_interval steps otherwise.
class Progress {
 public:
  explicit Progress(int64_t log_interval) : tty_(::isatty(STDERR_FILENO)), interval_(log_interval) {}
  void update(int64_t epoch, int64_t epochs, int64_t batch, int64_t batches, double loss, double lr, double ips,
              int64_t step) {
    if (tty_) {
      const int width = 30, filled = static_cast<int>(width * (batch + 1) / std::max<int64_t>(batches, 1));
      fmt::print(stderr, "\repoch {}/{} [{}{}] {}/{} loss {:.4f} lr {:.2e} {:.0f} img/s ", epoch + 1, epochs,
                 std::string(filled, '='), std::string(width - filled, ' '), batch + 1, batches, loss, lr, ips);
    } else if (step % interval_ == 0) {
      fmt::print(stderr, "epoch {}/{} batch {}/{} step {} loss {:.4f} lr {:.2e} {:.0f} img/s\n", epoch + 1, epochs,
                 batch + 1, batches, step, loss, lr, ips);
    }
  }
  void end_epoch() {
    if (tty_) fmt::print(stderr, "\n");
  }

 private:
  bool tty_;
  int64_t interval_;
};

}  // namespace

double train(const TrainConfig& cfg, const fs::path& run_dir, bool resume, int64_t stop_after) {
  const auto wall_start = std::chrono::steady_clock::now();
  // A data-parallel rank when started by torchrun or vitlab launch; the
  // processes on one machine share its CPUs unless train.threads says otherwise.
  const DistEnv env = dist_env_from_environment();
  int threads = static_cast<int>(cfg.train.threads);
  if (threads == 0 && env.local_world_size > 1)
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / env.local_world_size);
  threads = configure_threads(threads);
  torch::Device device = parse_device(cfg.train.device, "train.device");
  if (device.is_cuda() && !device.has_index() && env.distributed())
    device = torch::Device(torch::kCUDA, env.local_rank);
  const at::ScalarType amp = parse_amp(cfg.train.amp, device, "train.amp");
  const bool fp16 = amp == at::kHalf;
  torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  ProcessGroup group(env, device,
                     std::chrono::milliseconds(static_cast<int64_t>(std::ceil(cfg.train.dist_timeout * 1000.0))));
  const bool main = group.main();  // only rank 0 logs and writes
  const bool sync_bn = cfg.train.sync_bn && group.size() > 1;
  struct SyncBatchNorm {  // for this run only
    explicit SyncBatchNorm(ProcessGroup* group) {
      if (group)
        set_batch_norm_sync([group](std::vector<torch::Tensor>& t) { group->sum(t, "the BatchNorm all-reduce"); });
    }
    ~SyncBatchNorm() { set_batch_norm_sync({}); }
  } sync_bn_scope(sync_bn ? &group : nullptr);

  DataSplits data = open_data(cfg.data);
  const auto num_classes = static_cast<int64_t>(data.classes.size());
  ModelSpec spec = resolve_train_model(cfg, num_classes);
  Model model = build_model(spec);
  model.module->to(device);
  const std::vector<torch::Tensor> parameters = model.module->parameters(), buffers = model.module->buffers();
  group.broadcast(parameters, "the initial weights' broadcast");
  group.broadcast(buffers, "the initial buffers' broadcast");
  const int64_t img_size = spec.config["img_size"], in_chans = spec.config["in_chans"];

  LoaderOptions lo;
  lo.batch_size = cfg.train.batch_size;
  lo.workers = static_cast<int>(cfg.data.workers);
  lo.prefetch = static_cast<int>(cfg.data.prefetch);
  lo.seed = static_cast<uint64_t>(cfg.train.seed);
  lo.skip_errors = cfg.data.on_error == "skip";
  lo.drop_last = cfg.train.drop_last;
  lo.pin_memory = device.is_cuda();
  lo.rank = group.rank();
  lo.world_size = group.size();
  const TransformOptions tf = cfg.transforms(img_size, in_chans);
  DataLoader train_loader(data.train, tf, lo);
  lo.train = false;
  DataLoader val_loader(data.val, tf, lo);
  const MixupOptions mix = cfg.mixup(num_classes);

  const int64_t batches = train_loader.num_batches();
  if (batches < cfg.train.grad_accum)
    fail("{} training images make {} batches of {}, fewer than train.grad_accum {}", data.train->size(), batches,
         cfg.train.batch_size, cfg.train.grad_accum);
  const int64_t steps_per_epoch = batches / cfg.train.grad_accum, total_steps = steps_per_epoch * cfg.train.epochs;
  double base_lr = cfg.optim.lr;
  if (cfg.optim.lr_base_size > 0)
    base_lr *= static_cast<double>(cfg.train.batch_size * cfg.train.grad_accum * group.size()) / cfg.optim.lr_base_size;
  auto opt = make_optimizer(*model.module, cfg.optim, base_lr);
  group.attach_gradients(parameters);
  std::unique_ptr<Ema> ema = cfg.train.ema ? std::make_unique<Ema>(*model.module, cfg.train.ema_decay) : nullptr;
  Model ema_model = cfg.train.ema ? build_model(spec) : Model{};
  if (ema_model.module) ema_model.module->to(device);

  fs::create_directories(run_dir);
  RunState st;
  if (resume) {
    st = resume_state(run_dir, *model.module, *opt, ema.get(), main);
    if (main && st.step > 0)
      fmt::print(stderr, "resuming {} at epoch {}, batch {} (step {})\n", run_dir.string(), st.epoch + 1, st.batch,
                 st.step);
  }
  const double earlier_seconds = st.seconds;
  auto total_seconds = [&] {
    return earlier_seconds + std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  };
  const std::string config_yaml = cfg.to_yaml();
  const StopSignals stop_signals;
  std::ofstream steps_log;
  std::unique_ptr<EventWriter> events;  // train.tensorboard
  if (main) {
    write_file_atomic(run_dir / "config.yaml", config_yaml);
    nlohmann::json classes_json = data.classes;
    write_file_atomic(run_dir / "classes.json", classes_json.dump(2) + "\n");
    // Keep the per-step log consistent with the checkpoint we resume from.
    std::string kept;
    if (resume && fs::exists(run_dir / "metrics.jsonl")) {
      std::ifstream in(run_dir / "metrics.jsonl");
      for (std::string line; std::getline(in, line);) {
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (!j.is_discarded() && j.value("step", int64_t(0)) <= st.step) kept += line + "\n";
      }
    }
    write_file_atomic(run_dir / "metrics.jsonl", kept);
    steps_log.open(run_dir / "metrics.jsonl", std::ios::app);
    if (cfg.train.tensorboard) events = std::make_unique<EventWriter>(run_dir, resume ? st.step : -1);
    fmt::print(stderr, "training {} ({} parameters) on {} {} images, {} classes, {} threads, device {}{}\n", spec.name,
               spec_parameters(spec), data.train->size(), cfg.data.type, num_classes, threads, device.str(),
               group.size() > 1 ? fmt::format(", {} processes", group.size()) : "");
  }
  // Evaluation: each rank takes its shard, the metrics are the whole split's.
  const SumAcrossProcesses sum_across =
      group.size() > 1
          ? SumAcrossProcesses([&](std::vector<torch::Tensor>& t) { group.sum(t, "the evaluation all-reduce"); })
          : SumAcrossProcesses();
  auto last_good = [&] {
    const fs::path last = run_dir / "checkpoint-last";
    return fs::exists(last) ? last.string() + " holds the last good checkpoint" : "no checkpoint was written yet";
  };
  Progress progress(cfg.train.log_interval);
  double samples_seen = 0, train_seconds = 0;
  const int64_t last_epoch = stop_after > 0 ? std::min(stop_after, cfg.train.epochs) : cfg.train.epochs;
  for (int64_t epoch = st.epoch; epoch < last_epoch; ++epoch) {
    model.module->train();
    // st.batch > 0: resuming where a signal stopped this epoch.
    train_loader.begin_epoch(epoch, st.batch);
    double loss_sum = st.loss_sum;
    int64_t loss_count = st.loss_count, batch_index = st.batch_index;
    const int64_t first_index = batch_index;
    st.batch = st.batch_index = st.loss_count = 0;
    st.loss_sum = 0;
    auto t0 = std::chrono::steady_clock::now();
    double lr = lr_at(cfg.schedule, base_lr, st.step, steps_per_epoch, total_steps);
    while (auto batch = train_loader.next()) {
      if (batch_index >= steps_per_epoch * cfg.train.grad_accum) break;  // a partial accumulation is not stepped
      torch::Tensor x = batch->images.to(device, true), y = batch->labels.to(device, true);
      torch::Tensor target;
      if (mix.enabled()) {
        std::mt19937_64 rng(mix_seed(lo.seed, static_cast<uint64_t>(epoch), 0x6d6978ULL + batch_index));
        target = mixup_batch(x, y, mix, rng);
      } else if (mix.label_smoothing > 0) {
        target = smooth_one_hot(y, num_classes, mix.label_smoothing);
      }
      // As DDP (broadcast_buffers): every rank starts the step with rank 0's
      // buffers (BatchNorm running statistics); synchronised BatchNorm keeps
      // them equal already.
      if (!sync_bn) group.broadcast(buffers, "the buffers' broadcast");
      torch::Tensor loss;
      {
        Autocast autocast(device, amp);
        torch::Tensor logits, attn;
        if (cfg.train.cos_reg > 0)
          std::tie(logits, attn) = model.vision->forward_with_attention(x);
        else
          logits = model.vision->forward(x);
        logits = logits.to(torch::kFloat);
        loss = target.defined() ? soft_target_cross_entropy(logits, target)
                                : torch::nn::functional::cross_entropy(logits, y);
        if (attn.defined())
          loss = loss + cfg.train.cos_reg * attention_similarity_loss(attn.to(torch::kFloat), cfg.train.cos_reg_pairs);
      }
      const double loss_value = loss.item<double>();
      // With on_nonfinite=skip the backward pass still runs: its NaN
      // gradients, all-reduced, make every rank skip the same step.
      if (!std::isfinite(loss_value) && (fp16 || cfg.train.on_nonfinite == "stop"))
        fail("non-finite loss ({}) at step {} of epoch {}; {}", loss_value, st.step + 1, epoch + 1, last_good());
      group.prepare_gradients((batch_index + 1) % cfg.train.grad_accum == 0);
      (loss * ((fp16 ? st.loss_scale : 1.0) / static_cast<double>(cfg.train.grad_accum))).backward();
      if (std::isfinite(loss_value)) {
        loss_sum += loss_value;
        ++loss_count;
      }
      ++batch_index;
      samples_seen += x.size(0);
      if (batch_index % cfg.train.grad_accum == 0) {
        group.finish_gradients();
        lr = lr_at(cfg.schedule, base_lr, st.step, steps_per_epoch, total_steps);
        for (auto& g : opt->param_groups()) g.options().set_lr(lr);
        bool apply = true;
        if (fp16) {
          apply = unscale_and_check(*model.module, st);
        } else if (const std::string bad = first_nonfinite_gradient(*model.module); !bad.empty()) {
          if (cfg.train.on_nonfinite == "stop")
            fail(
                "non-finite gradient at step {} of epoch {}, first in {}; {} (train.on_nonfinite=skip skips such "
                "steps instead)",
                st.step + 1, epoch + 1, bad, last_good());
          apply = false;
          ++st.skipped_steps;
          if (main)
            fmt::print(stderr, "warning: non-finite gradient at step {} of epoch {}, first in {}: step skipped\n",
                       st.step + 1, epoch + 1, bad);
        }
        if (apply) {
          if (cfg.optim.clip_grad > 0)
            torch::nn::utils::clip_grad_norm_(model.module->parameters(), cfg.optim.clip_grad);
          opt->step();
          if (ema) ema->update();
        }
        opt->zero_grad();
        ++st.step;
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double ips =
            elapsed > 0 ? (batch_index - first_index) * cfg.train.batch_size * group.size() / elapsed : 0.0;
        if (main) {
          steps_log << nlohmann::json{{"epoch", epoch + 1},
                                      {"step", st.step},
                                      {"loss", loss_value},
                                      {"lr", lr},
                                      {"images_per_sec", ips}}
                           .dump()
                    << std::endl;
          progress.update(epoch, cfg.train.epochs, batch_index - 1, batches,
                          loss_sum / std::max<int64_t>(loss_count, 1), lr, ips, st.step);
          if (events && st.step % cfg.train.log_interval == 0) {
            events->scalar("train/loss", loss_value, st.step);
            events->scalar("train/lr", lr, st.step);
            events->flush();
          }
        }
        // Every rank stops at the same step when any was signalled.
        int signal = StopSignals::received();
        if (group.size() > 1) {
          std::vector<torch::Tensor> flag{torch::tensor({static_cast<double>(signal)}, torch::kDouble)};
          group.sum(flag, "the stop-signal all-reduce");
          if (signal == 0 && flag[0].item<double>() > 0) signal = SIGTERM;
        }
        if (signal != 0) {
          st.batch = train_loader.position();
          st.batch_index = batch_index;
          st.loss_sum = loss_sum;
          st.loss_count = loss_count;
          st.seconds = total_seconds();
          if (main) {
            progress.end_epoch();
            save_checkpoint(run_dir / "checkpoint-last", *model.module, *opt, ema.get(), st, config_yaml, true);
          }
          throw TrainingStopped(signal, fmt::format("stopped by {} at step {} (epoch {}, batch {}); {} holds it: "
                                                    "continue with --resume",
                                                    signal == SIGINT ? "SIGINT" : "SIGTERM", st.step, epoch + 1,
                                                    st.batch, (run_dir / "checkpoint-last").string()));
        }
      }
    }
    if (main) progress.end_epoch();
    if (batch_index == 0) fail("epoch {}: no usable training image (all were skipped as unreadable)", epoch + 1);
    if (group.size() > 1) {  // the epoch's train loss over every rank's batches
      std::vector<torch::Tensor> sums{torch::tensor({loss_sum, static_cast<double>(loss_count)}, torch::kDouble)};
      group.sum(sums, "the train loss all-reduce");
      loss_sum = sums[0][0].item<double>();
      loss_count = sums[0][1].item<int64_t>();
    }
    train_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // NaN when every step's loss was non-finite (on_nonfinite=skip).
    const double train_loss = loss_count > 0 ? loss_sum / loss_count : std::nan("");

    EvalResult ev = evaluate(*model.vision, val_loader, num_classes, device, amp, sum_across);
    if (ev.images == 0) fail("no usable validation image (all were skipped as unreadable)");
    std::string row =
        fmt::format("{},{:.6f},{:.6f},{:.4f},{:.4f},{:.6g}", epoch + 1, train_loss, ev.loss, ev.top1, ev.top5, lr);
    if (events) {
      events->scalar("train/epoch_loss", train_loss, st.step);
      events->scalar("eval/loss", ev.loss, st.step);
      events->scalar("eval/top1", ev.top1, st.step);
      events->scalar("eval/top5", ev.top5, st.step);
    }
    if (ema) {
      load_state(*ema_model.module, ema->state);
      EvalResult ee = evaluate(*ema_model.vision, val_loader, num_classes, device, amp, sum_across);
      row += fmt::format(",{:.6f},{:.4f},{:.4f}", ee.loss, ee.top1, ee.top5);
      if (events) {
        events->scalar("eval_ema/loss", ee.loss, st.step);
        events->scalar("eval_ema/top1", ee.top1, st.step);
        events->scalar("eval_ema/top5", ee.top5, st.step);
      }
    }
    if (events) events->flush();
    st.csv_rows.push_back(row);
    st.epoch = epoch + 1;
    const bool best = ev.top1 > st.best_top1;
    if (best) st.best_top1 = ev.top1;
    st.seconds = total_seconds();
    if (!main) continue;
    std::string csv = csv_header(cfg.train.ema);
    for (const auto& r : st.csv_rows) csv += r + "\n";
    write_file_atomic(run_dir / "metrics.csv", csv);
    save_checkpoint(run_dir / "checkpoint-last", *model.module, *opt, ema.get(), st, config_yaml, true);
    if (best) save_checkpoint(run_dir / "checkpoint-best", *model.module, *opt, ema.get(), st, config_yaml, false);
    fmt::print(stderr, "epoch {}/{}: train loss {:.4f}, eval loss {:.4f}, top-1 {:.2f}%, top-5 {:.2f}%{}\n", epoch + 1,
               cfg.train.epochs, train_loss, ev.loss, ev.top1, ev.top5, best ? " (best)" : "");
  }

  if (!main) return st.best_top1;
  write_weights(run_dir / "model.safetensors", module_state(*model.module));
  if (ema) write_weights(run_dir / "model_ema.safetensors", ema->state);
  const double wall = total_seconds();
  const int64_t skipped = train_loader.skipped() + val_loader.skipped();
  nlohmann::json summary = {
      {"model", spec.name},
      {"epochs", st.epoch},
      {"steps", st.step},
      {"best_top1", st.best_top1},
      {"skipped_files", skipped},
      {"skipped_steps", st.skipped_steps},
      {"device", device.str()},
      {"amp", cfg.train.amp},
      {"wall_seconds", wall},
      {"train_images_per_sec", train_seconds > 0 ? samples_seen * group.size() / train_seconds : 0.0},
      {"threads", threads},
      {"processes", group.size()}};
  write_file_atomic(run_dir / "summary.json", summary.dump(2) + "\n");
  if (st.epoch < cfg.train.epochs)
    fmt::print("stopped after epoch {} of {}; continue with --resume\n", st.epoch, cfg.train.epochs);
  fmt::print("done: {} epochs, best eval top-1 {:.2f}%, {} files skipped, {:.0f} s; outputs in {}\n", st.epoch,
             st.best_top1, skipped, wall, run_dir.string());
  return st.best_top1;
}

}  // namespace vitlab
