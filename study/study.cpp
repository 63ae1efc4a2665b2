#include "study/study.h"

#include <fmt/format.h>
#include <sys/wait.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <sstream>

#include "analysis/analyze.h"
#include "analysis/bootstrap.h"
#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
#include "common/process.h"
#include "eval/evaluate.h"
#include "io/safetensors.h"
#include "models/registry.h"
#include "plot/figures.h"
#include "train/monitor.h"
#include "train/trainer.h"

namespace vitlab {

namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kStudyKeys = {"families", "depths", "seeds", "at_init", "analysis", "members"};
const std::vector<std::string> kFamilyKeys = {"name", "model", "data", "optim", "schedule", "aug", "train"};

void check_keys(const YAML::Node& map, const std::vector<std::string>& valid, const std::string& where) {
  if (!map.IsMap()) fail("{}: expected a map, got '{}'", where, YAML::Dump(map));
  for (const auto& kv : map) {
    const auto key = kv.first.as<std::string>();
    if (std::find(valid.begin(), valid.end(), key) != valid.end()) continue;
    const std::string near = closest_key(key, valid);
    fail("unknown key '{}.{}'{}; valid keys: {}", where, key,
         near.empty() ? "" : fmt::format(" (did you mean '{}.{}'?)", where, near), fmt::join(valid, ", "));
  }
}

// A list of distinct whole numbers >= `least` (depths, seeds).
std::vector<int64_t> read_counts(const YAML::Node& node, int64_t least, const std::string& where) {
  std::vector<double> values;
  read_value(node, values, where);
  std::vector<int64_t> out;
  for (double v : values) {
    if (v < static_cast<double>(least) || v != std::floor(v))
      fail("{} must hold integers >= {}, got {}", where, least, v);
    if (std::find(out.begin(), out.end(), static_cast<int64_t>(v)) != out.end()) fail("{} lists {} twice", where, v);
    out.push_back(static_cast<int64_t>(v));
  }
  if (out.empty()) fail("{} is empty", where);
  return out;
}

// One entry of study.families: its name and the sections it overrides.
StudyFamily read_family(const YAML::Node& node, size_t index) {
  const std::string where = fmt::format("study.families[{}]", index);
  check_keys(node, kFamilyKeys, where);
  StudyFamily f;
  if (!node["name"]) fail("{}.name is required (the family's name in the report and member names)", where);
  read_value(node["name"], f.name, where + ".name");
  // The name becomes a directory and a --member argument.
  const bool plain = !f.name.empty() && std::all_of(f.name.begin(), f.name.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-' || ch == '+' || ch == '.';
  });
  if (!plain) fail("{}.name must be letters, digits and _ - + . only, got '{}'", where, f.name);
  for (const auto& kv : node) {
    const auto section = kv.first.as<std::string>();
    if (section == "name") continue;
    if (!kv.second.IsMap()) fail("{} ({}).{} must be a map of {} keys", where, f.name, section, section);
    f.overrides[section] = YAML::Clone(kv.second);
  }
  // The study sets these per member; a family's would be overwritten silently.
  const YAML::Node& sections = f.overrides;  // const: a lookup adds no key
  if (sections["model"] && sections["model"]["depth"])
    fail("{} ({}).model.depth: depths come from study.depths", where, f.name);
  if (sections["train"] && sections["train"]["seed"])
    fail("{} ({}).train.seed: seeds come from study.seeds", where, f.name);
  return f;
}

// The study section with the `--set study.*` overrides applied; the others
// are the recipe's.
YAML::Node study_section(const YAML::Node& root, const std::vector<Override>& overrides,
                         std::vector<Override>& recipe_overrides) {
  YAML::Node study = YAML::Clone(root["study"]);
  for (const auto& o : overrides) {
    if (o.key.rfind("study.", 0) != 0) {
      recipe_overrides.push_back(o);
    } else if (o.key == "study.depths" || o.key == "study.seeds" || o.key == "study.at_init") {
      study[o.key.substr(6)] = o.value;
    } else if (o.key.rfind("study.analysis.", 0) == 0) {
      if (!study["analysis"]) study["analysis"] = YAML::Node(YAML::NodeType::Map);
      study["analysis"][o.key.substr(15)] = o.value;
    } else {
      fail("--set {}: a study overrides study.depths, study.seeds, study.at_init or study.analysis.KEY", o.key);
    }
  }
  return study;
}

std::vector<StudyWeights> read_weights(const YAML::Node& node, const std::vector<StudyFamily>& families) {
  if (!node.IsSequence()) fail("study.members must be a list of {{family, depth, seed, weights}}");
  std::vector<StudyWeights> out;
  for (const auto& m : node) {
    check_keys(m, {"family", "depth", "seed", "weights"}, "study.members[]");
    StudyWeights w;
    if (m["family"]) read_value(m["family"], w.family, "study.members[].family");
    if (m["depth"]) read_value(m["depth"], w.depth, "study.members[].depth");
    if (m["seed"]) read_value(m["seed"], w.seed, "study.members[].seed");
    if (m["weights"]) read_value(m["weights"], w.weights, "study.members[].weights");
    const bool known = std::any_of(families.begin(), families.end(), [&](auto& f) { return f.name == w.family; });
    if (!known) fail("study.members[]: family '{}' is not in study.families", w.family);
    if (w.weights.empty()) fail("study.members[] ({} depth {}): weights is required", w.family, w.depth);
    out.push_back(w);
  }
  return out;
}

}  // namespace

std::string StudyMember::name() const {
  return seed == 0 ? fmt::format("{}_d{}", family->name, depth) : fmt::format("{}_d{}_s{}", family->name, depth, seed);
}

StudyConfig StudyConfig::load(const fs::path& file, const std::vector<Override>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(read_file(file));
  } catch (const YAML::Exception& e) {
    fail("{}: not valid YAML ({})", file.string(), e.what());
  }
  if (!root.IsMap() || !root["study"]) fail("{}: a study config needs a 'study' section", file.string());
  StudyConfig c;
  const YAML::Node study = study_section(root, overrides, c.recipe_overrides);
  check_keys(study, kStudyKeys, "study");

  if (!study["families"] || !study["families"].IsSequence() || study["families"].size() == 0)
    fail("{}: study.families must be a list of {{name: NAME, model: {{name: PRESET, ...}}, train: {{...}}}}",
         file.string());
  for (size_t i = 0; i < study["families"].size(); ++i) {
    c.families.push_back(read_family(study["families"][i], i));
    for (size_t j = 0; j < i; ++j)
      if (c.families[j].name == c.families[i].name)
        fail("study.families: two families are named '{}'", c.families[i].name);
  }
  if (!study["depths"]) fail("{}: study.depths is required (a list of block counts)", file.string());
  c.depths = read_counts(study["depths"], 1, "study.depths");
  if (study["seeds"]) c.seeds = read_counts(study["seeds"], 0, "study.seeds");
  if (study["at_init"]) read_value(study["at_init"], c.at_init, "study.at_init");
  if (study["analysis"]) read_options(c.analysis, study["analysis"], "study.analysis");
  if (c.analysis.images < 1) fail("study.analysis.images must be >= 1, got {}", c.analysis.images);
  if (c.analysis.batch_size < 1) fail("study.analysis.batch_size must be >= 1, got {}", c.analysis.batch_size);
  if (c.analysis.visualize < 0)
    fail("study.analysis.visualize must be >= 0 images (0: none), got {}", c.analysis.visualize);
  check_maps(c.analysis.maps, "study.analysis.maps");
  if (study["members"]) c.weights = read_weights(study["members"], c.families);
  if (c.at_init && !c.weights.empty())
    fail("study.at_init analyses untrained models; study.members (existing weights) cannot go with it");
  root.remove("study");
  c.recipe = root;
  // Every family's config must load: catch a bad key before training the first member.
  const bool recipe_names_model =
      (root["model"] && root["model"]["name"]) ||
      std::any_of(c.recipe_overrides.begin(), c.recipe_overrides.end(), [](auto& o) { return o.key == "model.name"; });
  for (size_t i = 0; i < c.families.size(); ++i) {
    const StudyFamily& f = c.families[i];
    if (!recipe_names_model && !(f.overrides["model"] && f.overrides["model"]["name"]))
      fail(
          "study.families[{}] ({}): model.name is required (a preset, see `vitlab models`), in the family or the "
          "recipe's model section",
          i, f.name);
    try {
      const TrainConfig m = c.member_config(f, c.depths.front(), c.seeds.front());
      resolve_model(m.model, m.model_overrides);
    } catch (const Error& e) {
      fail("study.families[{}] ({}): {}", i, f.name, e.what());
    }
  }
  return c;
}

TrainConfig StudyConfig::member_config(const StudyFamily& family, int64_t depth, int64_t seed) const {
  std::vector<Override> o = recipe_overrides;
  for (const auto& section : family.overrides)
    for (const auto& kv : section.second)
      o.push_back({section.first.as<std::string>() + "." + kv.first.as<std::string>(), kv.second});
  o.push_back({"model.depth", YAML::Node(depth)});
  o.push_back({"train.seed", YAML::Node(seed)});
  return TrainConfig::from_yaml(recipe, o, "study recipe");
}

std::vector<StudyMember> StudyConfig::members() const {
  std::vector<StudyMember> out;
  for (const auto& family : families)
    for (int64_t depth : depths)
      for (int64_t seed : seeds) out.push_back({&family, depth, seed});
  return out;
}

namespace {

struct MemberResult {
  std::string name;  // the member's, e.g. ViT_d8_s1
  std::string family;
  int64_t depth = 0;
  int64_t seed = 0;
  int64_t parameters = 0;
  double top1 = NAN;         // NaN: not evaluated (at initialisation)
  double train_seconds = 0;  // 0: not trained
  std::string source;        // "trained", "init" or the weights file
  torch::Tensor S;           // [L, L] cross-layer similarity
  std::vector<double> adjacent;
  int64_t similar_blocks = 0;
  double mean_adjacent = NAN;
  double last_residual = NAN, last_uniformity = NAN;  // the last block's; NaN: not measured
  StateDict per_image;                                // the analysis's per_image.safetensors: each image's values
};

// Where a member's analysis goes: apart for the initial weights, so that a
// study at initialisation and a trained one never take each other's.
fs::path analysis_dir(const StudyConfig& config, const fs::path& member_dir) {
  return member_dir / (config.at_init ? "analysis_init" : "analysis");
}

// A member's analysis/summary.json, when it was made with these settings
// from the weights as they are now.
std::optional<nlohmann::json> finished_analysis(const fs::path& dir, const StudyAnalysis& a, const fs::path& weights) {
  for (const char* file : {"summary.json", "similarity.pt", "per_image.safetensors"})
    if (!fs::exists(dir / file)) return std::nullopt;
  if (fs::exists(weights) && fs::last_write_time(weights) > fs::last_write_time(dir / "summary.json"))
    return std::nullopt;  // trained again since
  auto j = nlohmann::json::parse(read_file(dir / "summary.json"), nullptr, false);
  if (j.is_discarded() || j.value("images", int64_t(-1)) != a.images || !j.contains("parameters") ||
      j["parameters"].value("tau", -1.0) != a.tau ||
      j["parameters"].value("similar_threshold", -1.0) != a.similar_threshold ||
      j["parameters"].value("maps", std::string("applied")) != a.maps ||  // analyses before the options: applied,
      j["parameters"].value("center", false) != a.center)                 // not centred
    return std::nullopt;
  return j;
}

// The first n evaluation images with the eval transforms, as one batch.
torch::Tensor analysis_images(const DataSplits& data, const TrainConfig& cfg, const ModelSpec& spec, int64_t n) {
  LoaderOptions lo;
  lo.train = false;
  lo.batch_size = std::min<int64_t>(n, 256);
  lo.workers = static_cast<int>(cfg.data.workers);
  lo.skip_errors = cfg.data.on_error == "skip";
  auto subset = std::make_shared<SubsetSource>(data.val, n);
  DataLoader loader(subset, cfg.transforms(spec.config["img_size"], spec.config["in_chans"]), lo);
  loader.begin_epoch(0);
  std::vector<torch::Tensor> parts;
  while (auto b = loader.next()) parts.push_back(b->images);
  if (parts.empty()) fail("no usable evaluation image for the analysis");
  return torch::cat(parts);
}

// The last row of metrics.csv: eval top-1 of the final weights; NaN when
// the run trained no epoch (train.epochs: 0).
double final_top1(const fs::path& run_dir) {
  if (!fs::exists(run_dir / "metrics.csv")) return NAN;
  std::istringstream in(read_file(run_dir / "metrics.csv"));
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  std::vector<std::string> cells;
  std::istringstream row(last);
  for (std::string cell; std::getline(row, cell, ',');) cells.push_back(cell);
  if (cells.size() < 5 || cells[0] == "epoch") fail("{}: no epoch row in metrics.csv", run_dir.string());
  return std::stod(cells[3]);
}

bool training_finished(const fs::path& run_dir, const TrainConfig& cfg) {
  if (!fs::exists(run_dir / "summary.json") || !fs::exists(run_dir / "model.safetensors")) return false;
  auto j = nlohmann::json::parse(read_file(run_dir / "summary.json"), nullptr, false);
  return !j.is_discarded() && j.value("epochs", int64_t(0)) >= cfg.train.epochs;
}

std::string with_commas(int64_t n) {
  std::string digits = std::to_string(n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// Runs the members whose analysis is not done, `run.jobs` at a time, each as
// a child process; returns when all have ended. A failed member stops no
// other (their work is kept), but ends the study with an error naming it.
void run_member_processes(const StudyConfig& config, const fs::path& out_dir, const StudyRunOptions& run) {
  std::vector<std::string> pending;
  for (const StudyMember& m : config.members()) {
    const fs::path dir = out_dir / "members" / m.name();
    if (!finished_analysis(analysis_dir(config, dir), config.analysis, dir / "model.safetensors"))
      pending.push_back(m.name());
  }
  std::reverse(pending.begin(), pending.end());  // taken from the back: in config order
  std::map<pid_t, std::string> running;
  std::vector<std::string> failed;
  const StopSignals stop_signals;
  int forwarded = 0;
  // No new member after a failure or a stop signal.
  auto may_start = [&] { return !pending.empty() && failed.empty() && StopSignals::received() == 0; };
  while (!running.empty() || may_start()) {
    while (static_cast<int>(running.size()) < run.jobs && may_start()) {
      const std::string name = pending.back();
      pending.pop_back();
      const fs::path dir = out_dir / "members" / name;
      fs::create_directories(dir);
      std::vector<std::string> args = run.member_command;
      args.insert(args.end(), {"--member", name});
      running[spawn_self(args, {}, dir / "study.log")] = name;
      fmt::print(stderr, "study: {} started in its own process (log: {})\n", name, (dir / "study.log").string());
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno != EINTR) fail("study: waiting for the member processes failed: {}", std::strerror(errno));
      const int signal = StopSignals::received();
      if (signal != 0 && forwarded == 0) {  // each member checkpoints and stops
        for (const auto& [child, name] : running) ::kill(child, signal);
        forwarded = signal;
      }
      continue;
    }
    const auto it = running.find(pid);
    if (it == running.end()) continue;
    if (status != 0 && forwarded == 0) {
      fmt::print(stderr, "study: {} {}; see {}\n", it->second, describe_status(status),
                 (out_dir / "members" / it->second / "study.log").string());
      failed.push_back(it->second);
    } else if (status == 0) {
      fmt::print(stderr, "study: {} done\n", it->second);
    }
    running.erase(it);
  }
  if (const int signal = StopSignals::received())
    throw TrainingStopped(signal, fmt::format("study stopped by {}; rerun the same command to continue",
                                              signal == SIGINT ? "SIGINT" : "SIGTERM"));
  if (!failed.empty())
    fail("study: {} failed (their logs: {}/<member>/study.log); the other members' work is kept",
         fmt::join(failed, ", "), (out_dir / "members").string());
}

// The weights a member is analysed with, ready on the device, and its top-1:
// trained (or found trained) in `dir`, given in study.members (evaluated once,
// kept in eval.json), or at initialisation (not evaluated).
Model member_model(const StudyConfig& config, const StudyMember& m, const TrainConfig& cfg, const ModelSpec& spec,
                   const DataSplits& data, const fs::path& dir, MemberResult& r) {
  std::string weights;
  for (const auto& w : config.weights)
    if (w.family == m.family->name && w.depth == m.depth && w.seed == m.seed) weights = w.weights;
  const torch::Device device = parse_device(cfg.train.device, "train.device");
  if (config.at_init) {
    r.source = "init";
    torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));  // as the trainer seeds its model
    Model model = build_model(spec);
    model.module->to(device);
    return model;
  }
  if (weights.empty()) {
    if (training_finished(dir, cfg)) {
      fmt::print(stderr, "study: {} is trained, skipping its training\n", m.name());
    } else {
      const bool resume = fs::exists(dir / "checkpoint-last");
      fmt::print(stderr, "study: {} {} ({} parameters)\n", resume ? "resuming" : "training", m.name(), r.parameters);
      train(cfg, dir, resume);
    }
    r.top1 = final_top1(dir);
    r.train_seconds = nlohmann::json::parse(read_file(dir / "summary.json")).value("wall_seconds", 0.0);
    r.source = "trained";
    weights = (dir / "model.safetensors").string();
  } else {
    r.source = weights;
  }
  Model model = build_model(spec);
  load_weights(model, weights);
  model.module->to(device);
  if (r.source == "trained") return model;
  if (fs::exists(dir / "eval.json")) {
    r.top1 = nlohmann::json::parse(read_file(dir / "eval.json")).at("top1");
    return model;
  }
  // Existing weights: evaluate them on the study's data.
  LoaderOptions lo;
  lo.train = false;
  lo.batch_size = cfg.train.batch_size;
  lo.workers = static_cast<int>(cfg.data.workers);
  lo.skip_errors = cfg.data.on_error == "skip";
  lo.pin_memory = device.is_cuda();
  DataLoader val(data.val, cfg.transforms(spec.config["img_size"], spec.config["in_chans"]), lo);
  EvalResult ev = evaluate(*model.vision, val, static_cast<int64_t>(data.classes.size()), device);
  r.top1 = ev.top1;
  fs::create_directories(dir);
  write_file_atomic(dir / "eval.json", ev.to_json(data.classes).dump(2) + "\n");
  return model;
}

// The last block's value of a per-block measure in summary.json; NaN when
// the analysis did not compute it.
double last_block(const nlohmann::json& summary, const char* key) {
  if (!summary.contains(key) || !summary[key].is_array() || summary[key].empty()) return NAN;
  const auto& v = summary[key].back();
  return v.is_number() ? v.get<double>() : NAN;
}

// Each dataset opened once per study: members mostly share one, and opening
// Fashion-MNIST costs as much as analysing a small model at initialisation.
class DataCache {
 public:
  const DataSplits& open(DataConfig data) {
    const std::string key = options_to_json(data).dump();
    auto it = opened_.find(key);
    if (it == opened_.end()) it = opened_.emplace(key, open_data(data)).first;
    return it->second;
  }

 private:
  std::map<std::string, DataSplits> opened_;
};

// Trains (or finds trained) one member, then analyses it (or finds its analysis).
MemberResult run_member(const StudyConfig& config, const StudyMember& m, const fs::path& out_dir, DataCache& cache) {
  const fs::path dir = out_dir / "members" / m.name();
  const TrainConfig cfg = config.member_config(*m.family, m.depth, m.seed);
  MemberResult r;
  r.name = m.name();
  r.family = m.family->name;
  r.depth = m.depth;
  r.seed = m.seed;
  const DataSplits& data = cache.open(cfg.data);
  const ModelSpec spec = resolve_train_model(cfg, static_cast<int64_t>(data.classes.size()));
  r.parameters = spec_parameters(spec);
  const fs::path adir = analysis_dir(config, dir);
  std::optional<nlohmann::json> analysis = finished_analysis(adir, config.analysis, dir / "model.safetensors");
  if (analysis && config.at_init) {
    r.source = "init";  // nothing to build: the analysis is all an untrained member has
  } else {
    Model model = member_model(config, m, cfg, spec, data, dir, r);
    if (analysis) analysis = finished_analysis(adir, config.analysis, dir / "model.safetensors");  // trained since?
    if (analysis) {
      fmt::print(stderr, "study: {} is analysed, skipping its analysis\n", m.name());
    } else {
      const torch::Tensor images = analysis_images(data, cfg, spec, config.analysis.images);
      const TransformOptions tf = cfg.transforms(spec.config["img_size"], spec.config["in_chans"]);
      AnalyzeOptions ao;
      ao.batch_size = config.analysis.batch_size;
      ao.similarity.tau = config.analysis.tau;
      ao.similarity.similar_threshold = config.analysis.similar_threshold;
      ao.maps = config.analysis.maps;
      ao.similarity.center = config.analysis.center;
      ao.visualize = config.analysis.visualize;
      ao.device = parse_device(cfg.train.device, "train.device");
      ao.model_name = fmt::format("{} ({} blocks, seed {}{})", m.family->name, m.depth, m.seed,
                                  config.at_init ? ", at initialisation" : "");
      ao.mean = tf.mean;
      ao.std = tf.std;
      fmt::print(stderr, "study: analysing {} on {} images\n", m.name(), images.size(0));
      analysis = analyze(model, images, ao, adir).summary;
    }
  }
  const auto& j = *analysis;
  r.adjacent = j.at("adjacent").get<std::vector<double>>();
  r.similar_blocks = j.at("similar_blocks");
  if (!r.adjacent.empty())
    r.mean_adjacent = std::accumulate(r.adjacent.begin(), r.adjacent.end(), 0.0) / r.adjacent.size();
  r.last_residual = last_block(j, "rank_residual");
  r.last_uniformity = last_block(j, "token_uniformity");
  std::vector<double> flat;
  for (const auto& row : j.at("cross_layer"))
    for (double v : row.get<std::vector<double>>()) flat.push_back(v);
  r.S = torch::tensor(flat, torch::kDouble).reshape({m.depth, m.depth});
  const fs::path per_image = adir / "per_image.safetensors";
  r.per_image = parse_safetensors(read_file(per_image), per_image.string());
  return r;
}

// Mean and sample standard deviation (n − 1) over a member's seeds, of the
// finite values; n = 0: none (e.g. top-1 at initialisation).
struct Spread {
  double mean = NAN, std = NAN;
  size_t n = 0;
};

Spread spread(const std::vector<double>& values) {
  Spread s;
  std::vector<double> v;
  std::copy_if(values.begin(), values.end(), std::back_inserter(v), [](double x) { return std::isfinite(x); });
  s.n = v.size();
  if (v.empty()) return s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.std = v.size() > 1 ? std::sqrt(ss / (v.size() - 1)) : 0.0;
  return s;
}

// "82.31 ± 0.45", or the value alone from one seed, or "–" for none.
std::string format_spread(const Spread& s, int decimals) {
  if (s.n == 0) return "–";
  if (s.n == 1) return fmt::format("{:.{}f}", s.mean, decimals);
  return fmt::format("{:.{}f} ± {:.{}f}", s.mean, decimals, s.std, decimals);
}

// A family at a depth: its members over the seeds.
struct MemberGroup {
  std::string family;
  int64_t depth = 0;
  int64_t parameters = 0;
  std::vector<const MemberResult*> seeds;
  Spread top1, similar, adjacent, residual, uniformity, train_seconds;
  // 95% bootstrap intervals over the evaluation images, the seeds' members
  // resampled alike and their statistic averaged (analysis/bootstrap.h).
  std::optional<Interval> similar_ci, adjacent_ci, residual_ci, uniformity_ci;  // unset: not measured
  std::vector<Spread> adjacent_by_block;                                        // S[k-1, k] for k = 1 .. L-1
  torch::Tensor S;                                                              // the mean over seeds
  std::string source;                                                           // the first seed's
};

// The group's bootstrap intervals over images, of the statistics the table
// gives: similar blocks and mean adjacent similarity from each image's
// adjacent similarities, the last block's residual and uniformity.
void image_intervals(MemberGroup& g, double similar_threshold) {
  auto values = [&](const char* key) {
    std::vector<torch::Tensor> v;
    for (const MemberResult* r : g.seeds) {
      auto it = r->per_image.find(key);
      if (it == r->per_image.end()) return std::vector<torch::Tensor>();
      v.push_back(it->second);
    }
    return v;
  };
  const auto adjacent = values("adjacent_similarity");
  if (!adjacent.empty() && adjacent[0].size(1) > 0) {
    g.similar_ci = bootstrap_interval(
        adjacent, [&](const torch::Tensor& s) { return s.ge(similar_threshold).sum().item<double>(); });
    g.adjacent_ci = bootstrap_interval(adjacent, [](const torch::Tensor& s) { return s.mean().item<double>(); });
  }
  const auto last = [](const torch::Tensor& m) { return m[-1].item<double>(); };
  if (const auto v = values("rank_residual"); !v.empty()) g.residual_ci = bootstrap_interval(v, last);
  if (const auto v = values("token_uniformity"); !v.empty()) g.uniformity_ci = bootstrap_interval(v, last);
}

std::vector<MemberGroup> group_by_depth(const StudyConfig& config, const std::vector<MemberResult>& results) {
  std::vector<MemberGroup> groups;
  for (const auto& family : config.families)
    for (int64_t depth : config.depths) {
      MemberGroup g;
      g.family = family.name;
      g.depth = depth;
      for (const auto& r : results)
        if (r.family == family.name && r.depth == depth) g.seeds.push_back(&r);
      if (g.seeds.empty()) continue;
      auto over_seeds = [&](auto value) {
        std::vector<double> v;
        for (const MemberResult* r : g.seeds) v.push_back(value(*r));
        return spread(v);
      };
      g.parameters = g.seeds.front()->parameters;
      g.source = g.seeds.front()->source;
      g.top1 = over_seeds([](auto& r) { return r.top1; });
      g.similar = over_seeds([](auto& r) { return static_cast<double>(r.similar_blocks); });
      g.adjacent = over_seeds([](auto& r) { return r.mean_adjacent; });
      g.residual = over_seeds([](auto& r) { return r.last_residual; });
      g.uniformity = over_seeds([](auto& r) { return r.last_uniformity; });
      g.train_seconds = over_seeds([](auto& r) { return r.source == "trained" ? r.train_seconds : NAN; });
      for (size_t k = 0; k < g.seeds.front()->adjacent.size(); ++k)
        g.adjacent_by_block.push_back(over_seeds([k](auto& r) { return r.adjacent[k]; }));
      image_intervals(g, config.analysis.similar_threshold);
      std::vector<torch::Tensor> S;
      for (const MemberResult* r : g.seeds) S.push_back(r->S);
      g.S = torch::stack(S).mean(0);
      groups.push_back(std::move(g));
    }
  return groups;
}

// One line per family: a quantity against depth, ± its standard deviation over seeds.
std::vector<LineSeries> against_depth(const StudyConfig& config, const std::vector<MemberGroup>& groups,
                                      Spread MemberGroup::*quantity) {
  std::vector<LineSeries> series;
  for (const auto& family : config.families) {
    LineSeries s{family.name, {}, {}};
    for (const auto& g : groups) {
      if (g.family != family.name) continue;
      s.x.push_back(static_cast<double>(g.depth));
      s.y.push_back((g.*quantity).mean);
      s.err.push_back((g.*quantity).std);
    }
    series.push_back(std::move(s));
  }
  return series;
}

bool any_finite(const std::vector<MemberGroup>& groups, Spread MemberGroup::*quantity) {
  return std::any_of(groups.begin(), groups.end(), [&](auto& g) { return (g.*quantity).n > 0; });
}

std::string group_name(const MemberGroup& g) { return fmt::format("{}_d{}", g.family, g.depth); }

// The report's figures, each with error bars over seeds; returns the
// Markdown that shows them.
std::string draw_figures(const StudyConfig& config, const std::vector<MemberGroup>& groups,
                         const std::vector<MemberResult>& results, const fs::path& out_dir, StagedOutputs& out) {
  const std::string label = maps_label(config.analysis.maps, config.analysis.center);
  // "+/-": the figures' font has no "±".
  const std::string seeds =
      config.seeds.size() > 1 ? fmt::format("; mean +/- std over {} seeds", config.seeds.size()) : "";
  const std::string subtitle = fmt::format("{} evaluation images per member{}{}", config.analysis.images,
                                           label.empty() ? "" : ", " + label, seeds);
  std::string md = "\n## Figures\n\n";
  LinePlotOptions p;
  p.x_label = "blocks";
  p.subtitle = seeds.empty() ? "" : seeds.substr(2);
  if (any_finite(groups, &MemberGroup::top1)) {
    p.title = "Top-1 accuracy against depth";
    p.y_label = "top-1 %";
    out.add(out_dir / "top1_vs_depth.png", line_plot_png(against_depth(config, groups, &MemberGroup::top1), p));
    md += "Top-1 against depth (the paper's Fig. 1):\n\n![top-1 against depth](top1_vs_depth.png)\n\n";
  }
  p.title = "Similar blocks against depth";
  p.subtitle = fmt::format("blocks k with S[k-1,k] >= {}{}", config.analysis.similar_threshold, seeds);
  p.y_label = "similar blocks";
  p.ymin = 0.0;
  out.add(out_dir / "similar_blocks_vs_depth.png",
          line_plot_png(against_depth(config, groups, &MemberGroup::similar), p));
  md += "Similar blocks against depth (Fig. 2b):\n\n![similar blocks](similar_blocks_vs_depth.png)\n\n";

  // Collapse measures of the last block's output, and the attention's, against depth.
  std::vector<cv::Mat> panels;
  p.subtitle = "";
  p.width = 520;
  p.height = 380;
  for (const auto& [quantity, title, y_label] :
       {std::tuple{&MemberGroup::residual, "Last block's rank-collapse residual", "residual"},
        std::tuple{&MemberGroup::uniformity, "Last block's token uniformity", "uniformity"},
        std::tuple{&MemberGroup::adjacent, "Mean adjacent attention similarity", "mean S[k-1,k]"}}) {
    if (!any_finite(groups, quantity)) continue;
    p.title = title;
    p.y_label = y_label;
    panels.push_back(line_plot_image(against_depth(config, groups, quantity), p));
  }
  out.add(out_dir / "measures_vs_depth.png",
          encode_png(panel_grid_image(panels, static_cast<int>(panels.size()), "Collapse against depth", subtitle)));
  md +=
      "Collapse measures against depth (docs/ANALYSIS.md): the last block's rank-collapse residual (0: every "
      "token the same) and token uniformity (1: every token the same direction), and the mean adjacent "
      "attention similarity:\n\n![collapse against depth](measures_vs_depth.png)\n\n";

  std::vector<LineSeries> adjacent;
  for (const auto& g : groups) {
    LineSeries s{group_name(g), {}, {}};
    for (size_t k = 0; k < g.adjacent_by_block.size(); ++k) {
      s.x.push_back(static_cast<double>(k + 1));
      s.y.push_back(g.adjacent_by_block[k].mean);
      s.err.push_back(g.adjacent_by_block[k].std);
    }
    adjacent.push_back(std::move(s));
  }
  p = LinePlotOptions{};
  p.title = "Adjacent-block attention similarity";
  p.subtitle = subtitle;
  p.x_label = "block k";
  p.y_label = "S[k-1, k]";
  p.threshold = config.analysis.similar_threshold;
  p.threshold_label = "threshold";
  out.add(out_dir / "adjacent_similarity.png", line_plot_png(adjacent, p));
  md += "Adjacent-block similarity (Fig. 2a):\n\n![adjacent similarity](adjacent_similarity.png)\n\n";

  // Cross-layer heatmaps, family × depth (the mean over seeds), each panel at
  // its own size and all on one colour scale, so that members compare by colour.
  double vmin = 0.0;
  for (const auto& g : groups) vmin = std::min(vmin, colour_floor(g.S));
  std::vector<cv::Mat> heatmaps;
  for (const auto& g : groups) {
    HeatmapOptions h;
    h.title = group_name(g);
    h.x_label = "block q";
    h.y_label = "block p";
    h.vmin = vmin;
    h.vmax = 1.0;
    h.annotate = g.depth <= 8;
    h.cell = static_cast<int>(std::max<int64_t>(8, 240 / g.depth));
    heatmaps.push_back(heatmap_image(g.S, h));
  }
  out.add(out_dir / "cross_layer_heatmaps.png",
          encode_png(panel_grid_image(heatmaps, static_cast<int>(config.depths.size()),
                                      "Cross-layer attention similarity S[p, q]", subtitle)));
  md += "Cross-layer similarity per family and depth:\n\n![cross-layer heatmaps](cross_layer_heatmaps.png)\n";

  // With train.analysis.every in the recipe: each member's collapse measures against epoch.
  std::vector<AnalysisCurves> curves;
  for (const auto& r : results) {
    std::vector<std::string> rows = read_analysis_curves(out_dir / "members" / r.name / "analysis" / "curves.csv");
    if (!rows.empty()) curves.push_back({r.name, std::move(rows)});
  }
  if (!curves.empty()) {
    out.add(out_dir / "measures_vs_epoch.png",
            analysis_curves_png(curves, "Collapse measures while the members train"));
    const TrainConfig first = config.member_config(config.families.front(), config.depths.front());
    md += fmt::format(
        "\nThe collapse measures while the members train (every {} epochs on the first {} evaluation images; "
        "each member's numbers in `members/<member>/analysis/curves.csv`):\n\n"
        "![collapse measures against epoch](measures_vs_epoch.png)\n",
        first.train.analysis.every, first.train.analysis.images);
  }
  return md;
}

// Whether two families' mean ± std intervals overlap, for one quantity;
// empty when either was not measured.
std::string overlap_clause(const char* what, const Spread& a, const Spread& b, int decimals) {
  if (a.n == 0 || b.n == 0) return "";
  if (a.n < 2 || b.n < 2)
    return fmt::format("{} {} and {} (one seed: no interval, so no claim)", what, format_spread(a, decimals),
                       format_spread(b, decimals));
  // A difference below the printed precision is none (two intervals of width 0 at 1.000).
  const bool overlap = std::abs(a.mean - b.mean) <= a.std + b.std + 0.5 * std::pow(10.0, -decimals);
  return fmt::format("{} {} and {} {}", what, format_spread(a, decimals), format_spread(b, decimals),
                     overlap ? "overlap: the difference may be noise" : "do not overlap");
}

// "[0.812, 0.845]", or "–" where not measured.
std::string format_interval(const std::optional<Interval>& i, int decimals) {
  return i ? fmt::format("[{:.{}f}, {:.{}f}]", i->low, decimals, i->high, decimals) : "–";
}

// Whether two families' bootstrap intervals over images overlap; empty when
// either was not measured.
std::string interval_clause(const char* what, const std::optional<Interval>& a, const std::optional<Interval>& b,
                            int decimals) {
  if (!a || !b) return "";
  // Intervals apart by less than the printed precision are not told apart.
  const double slack = 0.5 * std::pow(10.0, -decimals);
  const bool overlap = a->low <= b->high + slack && b->low <= a->high + slack;
  return fmt::format("{} over images {} and {} {}", what, format_interval(a, decimals), format_interval(b, decimals),
                     overlap ? "overlap" : "do not overlap");
}

// The analysis numbers' 95% bootstrap intervals over the evaluation images.
std::string image_interval_table(const StudyConfig& config, const std::vector<MemberGroup>& groups) {
  std::string md = fmt::format(
      "\n95% bootstrap intervals over the {} evaluation images (2,000 resamples; a family's seeds resampled "
      "alike and their values averaged): how much the analysis numbers depend on which images were analysed, "
      "which the seeds do not show.\n\n",
      config.analysis.images);
  md +=
      "| family | depth | similar blocks | mean adjacent similarity | last-block rank residual | last-block token "
      "uniformity |\n|---|---|---|---|---|---|\n";
  for (const auto& g : groups)
    md += fmt::format("| {} | {} | {} | {} | {} | {} |\n", g.family, g.depth, format_interval(g.similar_ci, 1),
                      format_interval(g.adjacent_ci, 3), format_interval(g.residual_ci, 3),
                      format_interval(g.uniformity_ci, 3));
  return md;
}

// The table (mean ± std over seeds per family and depth) and, per depth and
// pair of families, whether their intervals overlap.
std::string report_tables(const StudyConfig& config, const std::vector<MemberGroup>& groups) {
  std::string md =
      "| family | depth | params | seeds | top-1 % | similar blocks | mean adjacent similarity | last-block rank "
      "residual | last-block token uniformity | train time |\n";
  md += "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& g : groups) {
    std::string time = "–";
    if (g.source != "trained" && g.source != "init")
      time = "weights: " + g.source;
    else if (g.train_seconds.n > 0)
      time = fmt::format("{:.0f} s", g.train_seconds.mean);
    md +=
        fmt::format("| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |\n", g.family, g.depth,
                    with_commas(g.parameters), g.seeds.size() == 1 ? "1 (single run)" : std::to_string(g.seeds.size()),
                    format_spread(g.top1, 2), format_spread(g.similar, g.similar.n > 1 ? 1 : 0), g.depth,
                    format_spread(g.adjacent, 3), format_spread(g.residual, 3), format_spread(g.uniformity, 3), time);
  }
  md += image_interval_table(config, groups);
  if (config.families.size() < 2) return md;
  md += "\n## Are the differences real?\n\n";
  md +=
      "Per depth and pair of families: do their intervals mean ± one standard deviation over seeds overlap, and "
      "do the 95% bootstrap intervals over images of the analysis numbers? Overlapping intervals mean "
      "the difference may be noise (of the seeds, of the images); separate ones, with few seeds, are a hint "
      "rather than a test.\n\n";
  for (int64_t depth : config.depths)
    for (size_t a = 0; a < groups.size(); ++a)
      for (size_t b = a + 1; b < groups.size(); ++b) {
        const MemberGroup &x = groups[a], &y = groups[b];
        if (x.depth != depth || y.depth != depth) continue;
        std::vector<std::string> clauses;
        for (std::string c : {overlap_clause("top-1", x.top1, y.top1, 2),
                              overlap_clause("mean adjacent similarity", x.adjacent, y.adjacent, 3),
                              interval_clause("its 95% intervals", x.adjacent_ci, y.adjacent_ci, 3),
                              overlap_clause("last-block rank residual", x.residual, y.residual, 3),
                              interval_clause("its 95% intervals", x.residual_ci, y.residual_ci, 3)})
          if (!c.empty()) clauses.push_back(c);
        if (!clauses.empty())
          md += fmt::format("- depth {}, {} vs {}: {}.\n", depth, x.family, y.family, fmt::join(clauses, "; "));
      }
  return md;
}

// What the study compares: each family's overrides on the recipe, as YAML.
std::string family_lines(const StudyConfig& config) {
  std::string md;
  for (const auto& f : config.families) {
    YAML::Emitter e;
    e << YAML::Flow << f.overrides;
    md += fmt::format("- **{}**: `{}`\n", f.name, e.c_str());
  }
  return md;
}

std::vector<std::string> family_names(const StudyConfig& config) {
  std::vector<std::string> names;
  for (const auto& f : config.families) names.push_back(f.name);
  return names;
}

std::string report_intro(const StudyConfig& config) {
  const TrainConfig first = config.member_config(config.families.front(), config.depths.front());
  const std::string how = config.at_init            ? "at initialisation (untrained, study.at_init)"
                          : first.train.epochs == 0 ? "at initialisation (train.epochs: 0)"
                                                    : "trained with one recipe plus each family's overrides";
  std::string md = "# Depth-scaling study\n\n";
  md += fmt::format(
      "{} at {} blocks, seeds {}, {}, and analysed on the first {} evaluation images ({}{} maps, τ = {}, "
      "similar-block threshold {}). Definitions: docs/ANALYSIS.md. Each member's outputs are under "
      "`members/<family>_d<depth>/` (seed 0) and `members/<family>_d<depth>_s<seed>/` (run directory, `{}/` with "
      "similarity.pt, summary.json and figures). Values are mean ± sample standard deviation (n − 1) over the "
      "seeds.\n\n",
      fmt::join(family_names(config), ", "), fmt::join(config.depths, ", "), fmt::join(config.seeds, ", "), how,
      config.analysis.images, config.analysis.center ? "centred " : "", config.analysis.maps, config.analysis.tau,
      config.analysis.similar_threshold, config.at_init ? "analysis_init" : "analysis");
  md += "The families (overrides on the recipe):\n\n" + family_lines(config) + "\n";
  return md;
}

}  // namespace

fs::path run_study(const StudyConfig& config, const fs::path& out_dir, const StudyRunOptions& run) {
  const std::vector<StudyMember> members = config.members();
  std::vector<std::string> names;
  for (const auto& m : members) names.push_back(m.name());
  for (const auto& m : run.members)
    if (std::find(names.begin(), names.end(), m) == names.end())
      fail("study: no member '{}'; the members are {}", m, fmt::join(names, ", "));
  if (run.jobs < 1) fail("study: --jobs must be >= 1, got {}", run.jobs);
  fs::create_directories(out_dir / "members");
  const auto start = std::chrono::steady_clock::now();  // the member processes' time included
  if (run.jobs > 1 && run.members.empty()) run_member_processes(config, out_dir, run);
  std::vector<MemberResult> results;
  DataCache data;
  for (const auto& m : members)
    if (run.members.empty() || std::find(run.members.begin(), run.members.end(), m.name()) != run.members.end())
      results.push_back(run_member(config, m, out_dir, data));
  if (!run.members.empty()) return {};

  StagedOutputs out;
  const std::vector<MemberGroup> groups = group_by_depth(config, results);
  std::string md =
      report_intro(config) + report_tables(config, groups) + draw_figures(config, groups, results, out_dir, out);
  const double minutes = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 60.0;
  md +=
      fmt::format("\nThis run of `vitlab study` took {:.1f} min (members already done are not retrained).\n", minutes);
  out.add(out_dir / "REPORT.md", md);
  out.commit();
  return out_dir / "REPORT.md";
}

}  // namespace vitlab
