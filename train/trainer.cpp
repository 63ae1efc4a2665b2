#include "train/trainer.h"

#include <fmt/format.h>
#include <torch/version.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
#include "common/process.h"
#include "common/run_lock.h"
#include "common/runtime.h"
#include "data/mixup.h"
#include "eval/evaluate.h"
#include "io/safetensors.h"
#include "io/tensorboard.h"
#include "models/layers.h"
#include "models/registry.h"
#include "train/distributed.h"
#include "train/loss.h"
#include "train/monitor.h"

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

// Two parameter groups as timm's: weight decay, except on the 1-d parameters
// (biases, norms) and the embeddings. `options` holds the other settings.
template <class Optim, class Options>
std::unique_ptr<torch::optim::Optimizer> grouped_optimizer(torch::nn::Module& model, const Options& options, double lr,
                                                           double weight_decay) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.named_parameters()) {
    const bool skip = p.value().dim() <= 1 || p.key() == "pos_embed" || p.key() == "cls_token";
    (skip ? no_decay : decay).push_back(p.value());
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<Options>(Options(options).weight_decay(weight_decay)));
  groups.emplace_back(no_decay, std::make_unique<Options>(Options(options).weight_decay(0.0)));
  return std::make_unique<Optim>(groups, Options(lr));
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(torch::nn::Module& model, const OptimConfig& o, double lr) {
  if (o.opt == "adamw")
    return grouped_optimizer<torch::optim::AdamW>(model, torch::optim::AdamWOptions(lr).eps(o.eps), lr, o.weight_decay);
  return grouped_optimizer<torch::optim::SGD>(
      model, torch::optim::SGDOptions(lr).momentum(o.momentum).nesterov(o.momentum > 0), lr, o.weight_decay);
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
  std::vector<std::string> curve_rows;  // analysis/curves.csv's (train.analysis.every)
  double loss_scale = 65536.0;          // fp16 only
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

// The default generators a checkpoint keeps, so that a resumed run draws what
// the whole run would have: the CPU's ("cpu") and, where CUDA is, device 0's
// ("cuda").
at::Generator default_generator(bool cuda) {
  return cuda ? at::globalContext().defaultGenerator(torch::Device(torch::kCUDA, 0))
              : at::detail::getDefaultCPUGenerator();
}

StateDict generator_states() {
  StateDict states;
  for (const bool cuda : {false, true}) {
    if (cuda && !torch::cuda::is_available()) continue;
    auto gen = default_generator(cuda);
    std::lock_guard<std::mutex> lock(gen.mutex());
    states[cuda ? "cuda" : "cpu"] = gen.get_state();
  }
  return states;
}

// "cuda" only when the checkpoint has it and CUDA is here.
void set_generator_states(const StateDict& states) {
  for (const bool cuda : {false, true}) {
    if (cuda && !(states.count("cuda") && torch::cuda::is_available())) continue;
    auto gen = default_generator(cuda);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(states.at(cuda ? "cuda" : "cpu"));
  }
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
  files.emplace_back("rng.safetensors", serialize_safetensors(generator_states()));
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
                      {"curve_rows", st.curve_rows},
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
    st.curve_rows = j.value("curve_rows", std::vector<std::string>());
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
  set_generator_states(rng);
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

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The lines of a metrics.jsonl up to and including optimizer step `step`
// ("" when there is no such file): the per-step log of a resumed run agrees
// with the checkpoint it resumes from.
std::string metrics_through_step(const fs::path& file, int64_t step) {
  std::string kept;
  if (!fs::exists(file)) return kept;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("step", int64_t(0)) <= step) kept += line + "\n";
  }
  return kept;
}

// BatchNorm statistics summed over the group for one run (none: per rank).
class BatchNormSync {
 public:
  explicit BatchNormSync(ProcessGroup* group) {
    if (group)
      set_batch_norm_sync([group](std::vector<torch::Tensor>& t) { group->sum(t, "the BatchNorm all-reduce"); });
  }
  ~BatchNormSync() { set_batch_norm_sync({}); }
  BatchNormSync(const BatchNormSync&) = delete;
  BatchNormSync& operator=(const BatchNormSync&) = delete;
};

// Where one epoch of training stands.
struct EpochState {
  int64_t epoch = 0;
  int64_t batch_index = 0;  // micro-batches of the epoch consumed
  int64_t first_index = 0;  // batch_index when this run entered the epoch
  double loss_sum = 0;      // over the finite losses
  int64_t loss_count = 0;
  double lr = 0;  // of the last optimizer step
  Clock::time_point start;
};

struct EpochResult {
  double loss;  // mean over every rank's finite losses; NaN when there was none
  double lr;    // of the epoch's last step
};

struct Validation {
  EvalResult model;
  std::optional<EvalResult> ema;  // with train.ema
};

// One training run, in the steps of timm's train.py: setup (runtime, data and
// model, loaders, optimizer and schedule, resume, outputs), then per epoch
// train_one_epoch, validate and checkpoint, and the summary at the end. The
// members are declared in the order setup makes them (and so are destroyed in
// reverse); the optional ones are made in place by their setup step.
struct Trainer {
  Trainer(const TrainConfig& cfg, const fs::path& run_dir, bool resume);
  double run(int64_t stop_after);

  // setup
  void claim_run_dir();
  void setup_runtime();
  void create_model();
  void create_loaders();
  void create_optimizer();
  void resume_from_checkpoint(bool resume);
  void open_outputs(bool resume);
  // train_one_epoch
  EpochResult train_one_epoch(int64_t epoch);
  double train_batch(Batch& batch, EpochState& e);
  torch::Tensor soft_targets(torch::Tensor& x, const torch::Tensor& y, const EpochState& e) const;
  torch::Tensor forward_loss(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& target);
  void optimizer_step(EpochState& e, double loss_value);
  bool gradients_usable(int64_t epoch);
  void log_step(const EpochState& e, double loss_value);
  void stop_if_signalled(const EpochState& e);
  void sum_epoch_loss(EpochState& e);
  // validate, checkpoint, summary
  Validation validate(double train_loss);
  void log_eval(const std::string& prefix, const EvalResult& r);
  void analyse(int64_t epoch);
  void add_curve_row(const std::string& row, const fs::path& dir);
  void checkpoint(int64_t epoch, const EpochResult& trained, const Validation& v);
  void save(const char* name, bool keep_previous);
  void write_summary();

  double lr_now() const { return lr_at(cfg.schedule, base_lr, st.step, steps_per_epoch, total_steps); }
  // Wall-clock seconds of training, summed over the runs up to this one.
  double total_seconds() const { return earlier_seconds + seconds_since(wall_start); }
  std::string last_good() const {
    const fs::path last = run_dir / "checkpoint-last";
    return fs::exists(last) ? last.string() + " holds the last good checkpoint" : "no checkpoint was written yet";
  }

  const TrainConfig& cfg;
  const fs::path run_dir;
  const Clock::time_point wall_start = Clock::now();
  // claim_run_dir
  DistEnv env;
  std::optional<RunLock> run_lock;  // rank 0's, held to the end
  // setup_runtime
  int threads = 0;
  torch::Device device = torch::kCPU;
  at::ScalarType amp = at::ScalarType::Undefined;
  bool fp16 = false;
  std::optional<ProcessGroup> group;
  bool main = true;  // only rank 0 logs and writes
  bool sync_bn = false;
  std::optional<BatchNormSync> sync_bn_scope;
  // create_model
  DataSplits data;
  int64_t num_classes = 0;
  ModelSpec spec;
  Model model;
  std::vector<torch::Tensor> parameters, buffers;
  // create_loaders
  std::optional<DataLoader> train_loader, val_loader;
  MixupOptions mix;
  int64_t batches = 0, steps_per_epoch = 0, total_steps = 0;
  // create_optimizer
  double base_lr = 0;
  std::unique_ptr<torch::optim::Optimizer> opt;
  std::unique_ptr<Ema> ema;
  Model ema_model;
  // resume_from_checkpoint
  RunState st;
  double earlier_seconds = 0;  // of the runs before this one
  // open_outputs
  std::string config_yaml;
  std::optional<StopSignals> stop_signals;
  std::ofstream steps_log;
  std::unique_ptr<EventWriter> events;  // train.tensorboard
  SumAcrossProcesses sum_across;        // empty: one process
  // train_one_epoch
  Progress progress;
  double samples_seen = 0, train_seconds = 0;
};

// ---- setup ----

Trainer::Trainer(const TrainConfig& cfg, const fs::path& run_dir, bool resume)
    : cfg(cfg), run_dir(run_dir), progress(cfg.train.log_interval) {
  claim_run_dir();
  setup_runtime();
  create_model();
  create_loaders();
  create_optimizer();
  resume_from_checkpoint(resume);
  open_outputs(resume);
}

// One run writes into run_dir at a time: its writer, rank 0, locks it before
// anything else, so that a second run stops before it loads data or waits
// for a process group. The ranks of one run share it.
void Trainer::claim_run_dir() {
  env = dist_env_from_environment();
  if (env.rank == 0) run_lock.emplace(run_dir);
}

// Threads, device, precision and seed, and the process group: a
// data-parallel rank when started by torchrun, srun or vitlab launch.
void Trainer::setup_runtime() {
  // The processes on one machine share its CPUs unless train.threads says otherwise.
  threads = static_cast<int>(cfg.train.threads);
  if (threads == 0 && env.local_world_size > 1)
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / env.local_world_size);
  threads = configure_threads(threads);
  device = parse_device(cfg.train.device, "train.device");
  if (device.is_cuda() && !device.has_index() && env.distributed())
    device = torch::Device(torch::kCUDA, env.local_rank);
  amp = parse_amp(cfg.train.amp, device, "train.amp");
  fp16 = amp == at::kHalf;
  torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  group.emplace(env, device,
                std::chrono::milliseconds(static_cast<int64_t>(std::ceil(cfg.train.dist_timeout * 1000.0))));
  main = group->main();
  sync_bn = cfg.train.sync_bn && group->size() > 1;
  sync_bn_scope.emplace(sync_bn ? &*group : nullptr);
}

// The dataset (its classes size the model's head) and the model, with the
// same initial weights and buffers on every rank.
void Trainer::create_model() {
  data = open_data(cfg.data);
  num_classes = static_cast<int64_t>(data.classes.size());
  spec = resolve_train_model(cfg, num_classes);
  model = build_model(spec);
  model.module->to(device);
  parameters = model.module->parameters();
  buffers = model.module->buffers();
  group->broadcast(parameters, "the initial weights' broadcast");
  group->broadcast(buffers, "the initial buffers' broadcast");
}

// The train and eval loaders (this rank's shard), Mixup/CutMix, and the
// optimizer steps an epoch makes.
void Trainer::create_loaders() {
  const int64_t img_size = spec.config["img_size"], in_chans = spec.config["in_chans"];
  LoaderOptions lo;
  lo.batch_size = cfg.train.batch_size;
  lo.workers = static_cast<int>(cfg.data.workers);
  lo.prefetch = static_cast<int>(cfg.data.prefetch);
  lo.seed = static_cast<uint64_t>(cfg.train.seed);
  lo.skip_errors = cfg.data.on_error == "skip";
  lo.drop_last = cfg.train.drop_last;
  lo.pin_memory = device.is_cuda();
  lo.rank = group->rank();
  lo.world_size = group->size();
  const TransformOptions tf = cfg.transforms(img_size, in_chans);
  train_loader.emplace(data.train, tf, lo);
  lo.train = false;
  val_loader.emplace(data.val, tf, lo);
  mix = cfg.mixup(num_classes);

  batches = train_loader->num_batches();
  if (batches < cfg.train.grad_accum)
    fail("{} training images make {} batches of {}, fewer than train.grad_accum {}", data.train->size(), batches,
         cfg.train.batch_size, cfg.train.grad_accum);
  steps_per_epoch = batches / cfg.train.grad_accum;
  total_steps = steps_per_epoch * cfg.train.epochs;
}

// The optimizer, its lr scaled to the global batch (timm's --lr-base) and
// then scheduled per step (lr_now), the gradients' all-reduce, and the EMA.
void Trainer::create_optimizer() {
  base_lr = cfg.optim.lr;
  if (cfg.optim.lr_base_size > 0)
    base_lr *=
        static_cast<double>(cfg.train.batch_size * cfg.train.grad_accum * group->size()) / cfg.optim.lr_base_size;
  opt = make_optimizer(*model.module, cfg.optim, base_lr);
  group->attach_gradients(parameters);
  if (cfg.train.ema) {
    ema = std::make_unique<Ema>(*model.module, cfg.train.ema_decay);
    ema_model = build_model(spec);
    ema_model.module->to(device);
  }
}

void Trainer::resume_from_checkpoint(bool resume) {
  fs::create_directories(run_dir);
  if (resume) {
    st = resume_state(run_dir, *model.module, *opt, ema.get(), main);
    if (main && st.step > 0)
      fmt::print(stderr, "resuming {} at epoch {}, batch {} (step {})\n", run_dir.string(), st.epoch + 1, st.batch,
                 st.step);
  }
  earlier_seconds = st.seconds;
}

// Rank 0 writes config.yaml and classes.json and opens the per-step log and
// the event file, each kept up to the step resumed from.
void Trainer::open_outputs(bool resume) {
  config_yaml = cfg.to_yaml();
  stop_signals.emplace();
  if (main) {
    write_file_atomic(run_dir / "config.yaml", config_yaml);
    nlohmann::json classes_json = data.classes;
    write_file_atomic(run_dir / "classes.json", classes_json.dump(2) + "\n");
    write_file_atomic(run_dir / "metrics.jsonl",
                      resume ? metrics_through_step(run_dir / "metrics.jsonl", st.step) : std::string());
    steps_log.open(run_dir / "metrics.jsonl", std::ios::app);
    if (cfg.train.tensorboard) events = std::make_unique<EventWriter>(run_dir, resume ? st.step : -1);
    fmt::print(stderr, "training {} ({} parameters) on {} {} images, {} classes, {} threads, device {}{}\n", spec.name,
               spec_parameters(spec), data.train->size(), cfg.data.type, num_classes, threads, device.str(),
               group->size() > 1 ? fmt::format(", {} processes", group->size()) : "");
  }
  // Evaluation: each rank takes its shard, the metrics are the whole split's.
  if (group->size() > 1)
    sum_across = [this](std::vector<torch::Tensor>& t) { group->sum(t, "the evaluation all-reduce"); };
}

// ---- the epochs ----

double Trainer::run(int64_t stop_after) {
  const int64_t last_epoch = stop_after > 0 ? std::min(stop_after, cfg.train.epochs) : cfg.train.epochs;
  if (st.step == 0 && st.batch == 0) analyse(0);
  for (int64_t epoch = st.epoch; epoch < last_epoch; ++epoch) {
    const EpochResult trained = train_one_epoch(epoch);
    const Validation v = validate(trained.loss);
    analyse(epoch + 1);
    checkpoint(epoch, trained, v);
  }
  if (main) write_summary();
  return st.best_top1;
}

// One epoch of training, from where a stopped run left it (st.batch > 0).
EpochResult Trainer::train_one_epoch(int64_t epoch) {
  model.module->train();
  train_loader->begin_epoch(epoch, st.batch);
  EpochState e;
  e.epoch = epoch;
  e.batch_index = e.first_index = st.batch_index;
  e.loss_sum = st.loss_sum;
  e.loss_count = st.loss_count;
  st.batch = st.batch_index = st.loss_count = 0;
  st.loss_sum = 0;
  e.start = Clock::now();
  e.lr = lr_now();
  while (auto batch = train_loader->next()) {
    if (e.batch_index >= steps_per_epoch * cfg.train.grad_accum) break;  // a partial accumulation is not stepped
    const double loss_value = train_batch(*batch, e);
    if (e.batch_index % cfg.train.grad_accum == 0) optimizer_step(e, loss_value);
  }
  if (main) progress.end_epoch();
  if (e.batch_index == 0) fail("epoch {}: no usable training image (all were skipped as unreadable)", epoch + 1);
  sum_epoch_loss(e);
  train_seconds += seconds_since(e.start);
  // NaN when every step's loss was non-finite (on_nonfinite=skip).
  return {e.loss_count > 0 ? e.loss_sum / e.loss_count : std::nan(""), e.lr};
}

// One micro-batch: targets, forward, loss and backward (the gradients
// accumulate until optimizer_step). Returns the loss.
double Trainer::train_batch(Batch& batch, EpochState& e) {
  torch::Tensor x = batch.images.to(device, true), y = batch.labels.to(device, true);
  const torch::Tensor target = soft_targets(x, y, e);
  // As DDP (broadcast_buffers): every rank starts the step with rank 0's
  // buffers (BatchNorm running statistics); synchronised BatchNorm keeps
  // them equal already.
  if (!sync_bn) group->broadcast(buffers, "the buffers' broadcast");
  const torch::Tensor loss = forward_loss(x, y, target);
  const double loss_value = loss.item<double>();
  // With on_nonfinite=skip the backward pass still runs: its NaN
  // gradients, all-reduced, make every rank skip the same step.
  if (!std::isfinite(loss_value) && (fp16 || cfg.train.on_nonfinite == "stop"))
    fail("non-finite loss ({}) at step {} of epoch {}; {}", loss_value, st.step + 1, e.epoch + 1, last_good());
  group->prepare_gradients((e.batch_index + 1) % cfg.train.grad_accum == 0);
  (loss * ((fp16 ? st.loss_scale : 1.0) / static_cast<double>(cfg.train.grad_accum))).backward();
  if (std::isfinite(loss_value)) {
    e.loss_sum += loss_value;
    ++e.loss_count;
  }
  ++e.batch_index;
  samples_seen += x.size(0);
  return loss_value;
}

// Mixup/CutMix (mixing x in place) with their soft targets, label-smoothed
// one-hots, or undefined: plain cross entropy on the labels.
torch::Tensor Trainer::soft_targets(torch::Tensor& x, const torch::Tensor& y, const EpochState& e) const {
  if (mix.enabled()) {
    std::mt19937_64 rng(
        mix_seed(static_cast<uint64_t>(cfg.train.seed), static_cast<uint64_t>(e.epoch), 0x6d6978ULL + e.batch_index));
    return mixup_batch(x, y, mix, rng);
  }
  if (mix.label_smoothing > 0) return smooth_one_hot(y, num_classes, mix.label_smoothing);
  return {};
}

// The loss under autocast, with DeepViT's attention-similarity term when
// train.cos_reg is set.
torch::Tensor Trainer::forward_loss(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& target) {
  Autocast autocast(device, amp);
  torch::Tensor logits, attn;
  if (cfg.train.cos_reg > 0)
    std::tie(logits, attn) = model.vision->forward_with_attention(x);
  else
    logits = model.vision->forward(x);
  logits = logits.to(torch::kFloat);
  torch::Tensor loss =
      target.defined() ? soft_target_cross_entropy(logits, target) : torch::nn::functional::cross_entropy(logits, y);
  if (attn.defined())
    loss = loss + cfg.train.cos_reg * attention_similarity_loss(attn.to(torch::kFloat), cfg.train.cos_reg_pairs);
  return loss;
}

// The optimizer step after grad_accum micro-batches: the gradients averaged
// over the ranks, this step's lr, the update (skipped for non-finite
// gradients) and the EMA's; then the step's log and the stop-signal check.
void Trainer::optimizer_step(EpochState& e, double loss_value) {
  group->finish_gradients();
  e.lr = lr_now();
  for (auto& g : opt->param_groups()) g.options().set_lr(e.lr);
  if (gradients_usable(e.epoch)) {
    if (cfg.optim.clip_grad > 0) torch::nn::utils::clip_grad_norm_(model.module->parameters(), cfg.optim.clip_grad);
    opt->step();
    if (ema) ema->update();
  }
  opt->zero_grad();
  ++st.step;
  log_step(e, loss_value);
  stop_if_signalled(e);
}

// fp16: unscaled and checked as GradScaler does. Otherwise a non-finite
// gradient stops the run, or with train.on_nonfinite=skip skips the step.
bool Trainer::gradients_usable(int64_t epoch) {
  if (fp16) return unscale_and_check(*model.module, st);
  const std::string bad = first_nonfinite_gradient(*model.module);
  if (bad.empty()) return true;
  if (cfg.train.on_nonfinite == "stop")
    fail(
        "non-finite gradient at step {} of epoch {}, first in {}; {} (train.on_nonfinite=skip skips such "
        "steps instead)",
        st.step + 1, epoch + 1, bad, last_good());
  ++st.skipped_steps;
  if (main)
    fmt::print(stderr, "warning: non-finite gradient at step {} of epoch {}, first in {}: step skipped\n", st.step + 1,
               epoch + 1, bad);
  return false;
}

// Rank 0: metrics.jsonl's line, the progress bar, TensorBoard's train scalars.
void Trainer::log_step(const EpochState& e, double loss_value) {
  const double elapsed = seconds_since(e.start);
  const double ips =
      elapsed > 0 ? (e.batch_index - e.first_index) * cfg.train.batch_size * group->size() / elapsed : 0.0;
  if (!main) return;
  steps_log << nlohmann::json{{"epoch", e.epoch + 1},
                              {"step", st.step},
                              {"loss", loss_value},
                              {"lr", e.lr},
                              {"images_per_sec", ips}}
                   .dump()
            << std::endl;
  progress.update(e.epoch, cfg.train.epochs, e.batch_index - 1, batches,
                  e.loss_sum / std::max<int64_t>(e.loss_count, 1), e.lr, ips, st.step);
  if (events && st.step % cfg.train.log_interval == 0) {
    events->scalar("train/loss", loss_value, st.step);
    events->scalar("train/lr", e.lr, st.step);
    events->flush();
  }
}

// Every rank stops at the same step when any was signalled, with
// checkpoint-last holding the place inside the epoch.
void Trainer::stop_if_signalled(const EpochState& e) {
  int signal = StopSignals::received();
  if (group->size() > 1) {
    std::vector<torch::Tensor> flag{torch::tensor({static_cast<double>(signal)}, torch::kDouble)};
    group->sum(flag, "the stop-signal all-reduce");
    if (signal == 0 && flag[0].item<double>() > 0) signal = SIGTERM;
  }
  if (signal == 0) return;
  st.batch = train_loader->position();
  st.batch_index = e.batch_index;
  st.loss_sum = e.loss_sum;
  st.loss_count = e.loss_count;
  st.seconds = total_seconds();
  if (main) {
    progress.end_epoch();
    save("checkpoint-last", true);
  }
  throw TrainingStopped(signal, fmt::format("stopped by {} at step {} (epoch {}, batch {}); {} holds it: "
                                            "continue with --resume",
                                            signal == SIGINT ? "SIGINT" : "SIGTERM", st.step, e.epoch + 1, st.batch,
                                            (run_dir / "checkpoint-last").string()));
}

// The epoch's train loss over every rank's batches.
void Trainer::sum_epoch_loss(EpochState& e) {
  if (group->size() == 1) return;
  std::vector<torch::Tensor> sums{torch::tensor({e.loss_sum, static_cast<double>(e.loss_count)}, torch::kDouble)};
  group->sum(sums, "the train loss all-reduce");
  e.loss_sum = sums[0][0].item<double>();
  e.loss_count = sums[0][1].item<int64_t>();
}

// ---- validate, checkpoint, summary ----

// The model's and the EMA weights' metrics on the whole eval split (each
// rank evaluates its shard), logged to TensorBoard with the train loss.
Validation Trainer::validate(double train_loss) {
  Validation v;
  v.model = evaluate(*model.vision, *val_loader, num_classes, device, amp, sum_across);
  if (v.model.images == 0) fail("no usable validation image (all were skipped as unreadable)");
  if (events) {
    events->scalar("train/epoch_loss", train_loss, st.step);
    log_eval("eval", v.model);
  }
  if (ema) {
    load_state(*ema_model.module, ema->state);
    v.ema = evaluate(*ema_model.vision, *val_loader, num_classes, device, amp, sum_across);
    if (events) log_eval("eval_ema", *v.ema);
  }
  if (events) events->flush();
  return v;
}

void Trainer::log_eval(const std::string& prefix, const EvalResult& r) {
  events->scalar(prefix + "/loss", r.loss, st.step);
  events->scalar(prefix + "/top1", r.top1, st.step);
  events->scalar(prefix + "/top5", r.top5, st.step);
}

// train.analysis.every: rank 0 analyses the model after `epoch` epochs (0:
// at initialisation) on the first evaluation images into
// analysis/epoch_NNN/, adds its row to analysis/curves.csv and redraws
// analysis/curves.png. The other ranks go on and wait for it in the next
// collective. The analysis draws no random number, so the training run
// stays the same with it or without it.
void Trainer::analyse(int64_t epoch) {
  const TrainAnalysisConfig& a = cfg.train.analysis;
  if (!main || a.every == 0 || epoch % a.every != 0) return;
  const int64_t img_size = spec.config["img_size"], in_chans = spec.config["in_chans"];
  const TransformOptions tf = cfg.transforms(img_size, in_chans);
  LoaderOptions lo;
  lo.batch_size = std::min(a.batch_size, a.images);
  lo.workers = static_cast<int>(cfg.data.workers);
  lo.skip_errors = cfg.data.on_error == "skip";
  lo.train = false;
  DataLoader loader(data.val, tf, lo);
  AnalyzeOptions ao;
  ao.limit = a.images;
  ao.device = device;
  ao.amp = amp;
  ao.visualize = 2;
  ao.mean = tf.mean;
  ao.std = tf.std;
  ao.model_name = fmt::format("{}, epoch {}", spec.name, epoch);
  const fs::path dir = run_dir / "analysis", out = dir / fmt::format("epoch_{:03d}", epoch);
  const AnalyzeReport report = analyze(model, loader, ao, out);
  add_curve_row(analysis_curve_row(epoch, report), dir);
  fmt::print(stderr, "analysis after epoch {}: {} similar blocks, mean adjacent similarity {:.3f} ({})\n", epoch,
             report.similarity.similar_blocks,
             report.similarity.adjacent.numel() > 0 ? report.similarity.adjacent.mean().item<double>() : 0.0,
             out.string());
}

// analysis/curves.csv and curves.png with `row`, which replaces a row of the
// same epoch (a run resumed from inside an epoch redoes its analysis).
void Trainer::add_curve_row(const std::string& row, const fs::path& dir) {
  const std::string epoch = row.substr(0, row.find(',') + 1);
  auto& rows = st.curve_rows;
  rows.erase(std::remove_if(rows.begin(), rows.end(), [&](const std::string& r) { return r.rfind(epoch, 0) == 0; }),
             rows.end());
  rows.push_back(row);
  std::string csv = analysis_curves_header();
  for (const auto& r : rows) csv += r + "\n";
  write_file_atomic(dir / "curves.csv", csv);
  write_file_atomic(
      dir / "curves.png",
      analysis_curves_png({{"", rows}}, fmt::format("{}: attention collapse while it trains", spec.name)));
}

// The epoch's bookkeeping, on every rank: its metrics.csv row, the epoch
// count and the best top-1. Rank 0 then writes metrics.csv, checkpoint-last,
// checkpoint-best when top-1 improved, and the epoch's line.
void Trainer::checkpoint(int64_t epoch, const EpochResult& trained, const Validation& v) {
  const EvalResult& ev = v.model;
  std::string row = fmt::format("{},{:.6f},{:.6f},{:.4f},{:.4f},{:.6g}", epoch + 1, trained.loss, ev.loss, ev.top1,
                                ev.top5, trained.lr);
  if (v.ema) row += fmt::format(",{:.6f},{:.4f},{:.4f}", v.ema->loss, v.ema->top1, v.ema->top5);
  st.csv_rows.push_back(row);
  st.epoch = epoch + 1;
  const bool best = ev.top1 > st.best_top1;
  if (best) st.best_top1 = ev.top1;
  st.seconds = total_seconds();
  if (!main) return;
  std::string csv = csv_header(cfg.train.ema);
  for (const auto& r : st.csv_rows) csv += r + "\n";
  write_file_atomic(run_dir / "metrics.csv", csv);
  save("checkpoint-last", true);
  if (best) save("checkpoint-best", false);
  write_file_atomic(run_dir / "curves.png", training_curves_png(st.csv_rows, fmt::format("{}: training", spec.name)));
  fmt::print(stderr, "epoch {}/{}: train loss {:.4f}, eval loss {:.4f}, top-1 {:.2f}%, top-5 {:.2f}%{}\n", epoch + 1,
             cfg.train.epochs, trained.loss, ev.loss, ev.top1, ev.top5, best ? " (best)" : "");
}

void Trainer::save(const char* name, bool keep_previous) {
  save_checkpoint(run_dir / name, *model.module, *opt, ema.get(), st, config_yaml, keep_previous);
}

// Rank 0 at the end: the final weights, summary.json and the closing lines.
void Trainer::write_summary() {
  write_weights(run_dir / "model.safetensors", module_state(*model.module));
  if (ema) write_weights(run_dir / "model_ema.safetensors", ema->state);
  const double wall = total_seconds();
  const int64_t skipped = train_loader->skipped() + val_loader->skipped();
  nlohmann::json summary = {
      {"model", spec.name},
      {"epochs", st.epoch},
      {"steps", st.step},
      {"best_top1", st.epoch > 0 ? nlohmann::json(st.best_top1) : nlohmann::json(nullptr)},  // null: never evaluated
      {"skipped_files", skipped},
      {"skipped_steps", st.skipped_steps},
      {"device", device.str()},
      {"amp", cfg.train.amp},
      {"wall_seconds", wall},
      {"train_images_per_sec", train_seconds > 0 ? samples_seen * group->size() / train_seconds : 0.0},
      {"threads", threads},
      {"processes", group->size()}};
  write_file_atomic(run_dir / "summary.json", summary.dump(2) + "\n");
  if (st.epoch < cfg.train.epochs)
    fmt::print("stopped after epoch {} of {}; continue with --resume\n", st.epoch, cfg.train.epochs);
  if (st.epoch == 0)
    fmt::print("done: 0 epochs, the initial weights (not evaluated), {:.0f} s; outputs in {}\n", wall,
               run_dir.string());
  else
    fmt::print("done: {} epochs, best eval top-1 {:.2f}%, {} files skipped, {:.0f} s; outputs in {}\n", st.epoch,
               st.best_top1, skipped, wall, run_dir.string());
}

}  // namespace

double train(const TrainConfig& cfg, const fs::path& run_dir, bool resume, int64_t stop_after) {
  Trainer trainer(cfg, run_dir, resume);
  return trainer.run(stop_after);
}

}  // namespace vitlab
