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
#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
#include "common/process.h"
#include "eval/evaluate.h"
#include "models/registry.h"
#include "plot/figures.h"
#include "train/monitor.h"
#include "train/trainer.h"

namespace vitlab {

namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kStudyKeys = {"families", "depths", "analysis", "members"};

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

std::string member_name(const std::string& family, int64_t depth) { return fmt::format("{}_d{}", family, depth); }

// Every member's name, in config order (families, then depths).
std::vector<std::string> member_names(const StudyConfig& config) {
  std::vector<std::string> names;
  for (const auto& family : config.families)
    for (int64_t depth : config.depths) names.push_back(member_name(family.name, depth));
  return names;
}

}  // namespace

StudyConfig StudyConfig::load(const fs::path& file, const std::vector<Override>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(read_file(file));
  } catch (const YAML::Exception& e) {
    fail("{}: not valid YAML ({})", file.string(), e.what());
  }
  if (!root.IsMap() || !root["study"]) fail("{}: a study config needs a 'study' section", file.string());
  YAML::Node study = YAML::Clone(root["study"]);
  StudyConfig c;
  for (const auto& o : overrides) {
    if (o.key.rfind("study.", 0) != 0) {
      c.recipe_overrides.push_back(o);
    } else if (o.key == "study.depths") {
      study["depths"] = o.value;
    } else if (o.key.rfind("study.analysis.", 0) == 0) {
      if (!study["analysis"]) study["analysis"] = YAML::Node(YAML::NodeType::Map);
      study["analysis"][o.key.substr(15)] = o.value;
    } else {
      fail("--set {}: a study overrides study.depths or study.analysis.KEY", o.key);
    }
  }
  check_keys(study, kStudyKeys, "study");

  if (!study["families"] || !study["families"].IsMap() || study["families"].size() == 0)
    fail("{}: study.families must map a family name to {{model: PRESET, overrides: {{...}}}}", file.string());
  for (const auto& kv : study["families"]) {
    StudyFamily f;
    f.name = kv.first.as<std::string>();
    const std::string where = "study.families." + f.name;
    check_keys(kv.second, {"model", "overrides"}, where);
    if (!kv.second["model"]) fail("{}.model is required (a preset, see `vitlab models`)", where);
    read_value(kv.second["model"], f.model, where + ".model");
    if (kv.second["overrides"]) {
      if (!kv.second["overrides"].IsMap()) fail("{}.overrides must be a map of model keys", where);
      f.overrides = YAML::Clone(kv.second["overrides"]);
    }
    c.families.push_back(std::move(f));
  }
  std::vector<double> depths;
  if (!study["depths"]) fail("{}: study.depths is required (a list of block counts)", file.string());
  read_value(study["depths"], depths, "study.depths");
  for (double d : depths) {
    if (d < 1 || d != static_cast<int64_t>(d)) fail("study.depths must hold positive integers, got {}", d);
    c.depths.push_back(static_cast<int64_t>(d));
  }
  if (c.depths.empty()) fail("study.depths is empty");
  if (study["analysis"]) read_options(c.analysis, study["analysis"], "study.analysis");
  if (c.analysis.images < 1) fail("study.analysis.images must be >= 1, got {}", c.analysis.images);
  if (c.analysis.batch_size < 1) fail("study.analysis.batch_size must be >= 1, got {}", c.analysis.batch_size);
  check_maps(c.analysis.maps, "study.analysis.maps");
  if (study["members"]) {
    if (!study["members"].IsSequence()) fail("study.members must be a list of {{family, depth, weights}}");
    for (const auto& m : study["members"]) {
      check_keys(m, {"family", "depth", "weights"}, "study.members[]");
      StudyWeights w;
      if (m["family"]) read_value(m["family"], w.family, "study.members[].family");
      if (m["depth"]) read_value(m["depth"], w.depth, "study.members[].depth");
      if (m["weights"]) read_value(m["weights"], w.weights, "study.members[].weights");
      const bool known = std::any_of(c.families.begin(), c.families.end(), [&](auto& f) { return f.name == w.family; });
      if (!known) fail("study.members[]: family '{}' is not in study.families", w.family);
      if (w.weights.empty()) fail("study.members[] ({} depth {}): weights is required", w.family, w.depth);
      c.weights.push_back(w);
    }
  }
  root.remove("study");
  c.recipe = root;
  // Every member's config must load: catch a bad recipe key before training the first one.
  for (const auto& f : c.families) {
    const TrainConfig m = c.member_config(f, c.depths.front());
    resolve_model(m.model, m.model_overrides);
  }
  return c;
}

TrainConfig StudyConfig::member_config(const StudyFamily& family, int64_t depth) const {
  std::vector<Override> o = recipe_overrides;
  o.push_back({"model.name", YAML::Node(family.model)});
  for (const auto& kv : family.overrides) o.push_back({"model." + kv.first.as<std::string>(), kv.second});
  o.push_back({"model.depth", YAML::Node(depth)});
  return TrainConfig::from_yaml(recipe, o, "study recipe");
}

namespace {

struct MemberResult {
  std::string family;
  int64_t depth = 0;
  int64_t parameters = 0;
  double top1 = 0, top5 = 0;
  double train_seconds = 0;  // 0: existing weights
  std::string source;        // "trained" or the weights file
  torch::Tensor S;           // [L, L] cross-layer similarity
  std::vector<double> adjacent;
  int64_t similar_blocks = 0;
};

// A member's analysis/summary.json, when it was made with these settings.
std::optional<nlohmann::json> finished_analysis(const fs::path& dir, const StudyAnalysis& a) {
  if (!fs::exists(dir / "summary.json") || !fs::exists(dir / "similarity.pt")) return std::nullopt;
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

// The last row of metrics.csv: eval top-1 and top-5 of the final weights.
std::pair<double, double> final_accuracy(const fs::path& run_dir) {
  std::istringstream in(read_file(run_dir / "metrics.csv"));
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  std::vector<std::string> cells;
  std::istringstream row(last);
  for (std::string cell; std::getline(row, cell, ',');) cells.push_back(cell);
  if (cells.size() < 5 || cells[0] == "epoch") fail("{}: no epoch row in metrics.csv", run_dir.string());
  return {std::stod(cells[3]), std::stod(cells[4])};
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

std::string fmt_or_dash(double v, const char* spec) {
  return std::isfinite(v) ? fmt::format(fmt::runtime(spec), v) : std::string("–");
}

// Runs the members whose analysis is not done, `run.jobs` at a time, each as
// a child process; returns when all have ended. A failed member stops no
// other (their work is kept), but ends the study with an error naming it.
void run_member_processes(const StudyConfig& config, const fs::path& out_dir, const StudyRunOptions& run) {
  std::vector<std::string> pending;
  for (const std::string& name : member_names(config))
    if (!finished_analysis(out_dir / "members" / name / "analysis", config.analysis)) pending.push_back(name);
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

}  // namespace

fs::path run_study(const StudyConfig& config, const fs::path& out_dir, const StudyRunOptions& run) {
  const std::vector<std::string> names = member_names(config);
  for (const auto& m : run.members)
    if (std::find(names.begin(), names.end(), m) == names.end())
      fail("study: no member '{}'; the members are {}", m, fmt::join(names, ", "));
  if (run.jobs < 1) fail("study: --jobs must be >= 1, got {}", run.jobs);
  fs::create_directories(out_dir / "members");
  if (run.jobs > 1 && run.members.empty()) run_member_processes(config, out_dir, run);
  std::vector<MemberResult> results;
  const auto start = std::chrono::steady_clock::now();
  for (const auto& family : config.families) {
    for (int64_t depth : config.depths) {
      const std::string name = member_name(family.name, depth);
      if (!run.members.empty() && std::find(run.members.begin(), run.members.end(), name) == run.members.end())
        continue;
      const fs::path dir = out_dir / "members" / name;
      const TrainConfig cfg = config.member_config(family, depth);
      MemberResult r;
      r.family = family.name;
      r.depth = depth;
      std::string weights;
      for (const auto& w : config.weights)
        if (w.family == family.name && w.depth == depth) weights = w.weights;

      DataSplits data = open_data(cfg.data);
      const ModelSpec spec = resolve_train_model(cfg, static_cast<int64_t>(data.classes.size()));
      r.parameters = spec_parameters(spec);
      if (weights.empty()) {
        if (training_finished(dir, cfg)) {
          fmt::print(stderr, "study: {} is trained, skipping its training\n", name);
        } else {
          const bool resume = fs::exists(dir / "checkpoint-last");
          fmt::print(stderr, "study: {} {} ({} parameters)\n", resume ? "resuming" : "training", name, r.parameters);
          train(cfg, dir, resume);
        }
        std::tie(r.top1, r.top5) = final_accuracy(dir);
        r.train_seconds = nlohmann::json::parse(read_file(dir / "summary.json")).value("wall_seconds", 0.0);
        r.source = "trained";
        weights = (dir / "model.safetensors").string();
      } else {
        r.source = weights;
      }

      const fs::path analysis_dir = dir / "analysis";
      std::optional<nlohmann::json> analysis = finished_analysis(analysis_dir, config.analysis);
      Model model = build_model(spec);
      load_weights(model, weights);
      const torch::Device device = parse_device(cfg.train.device, "train.device");
      model.module->to(device);
      if (r.source != "trained" && fs::exists(dir / "eval.json")) {
        auto ev = nlohmann::json::parse(read_file(dir / "eval.json"));
        r.top1 = ev.at("top1");
        r.top5 = ev.at("top5");
      } else if (r.source != "trained") {
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
        r.top5 = ev.top5;
        fs::create_directories(dir);
        write_file_atomic(dir / "eval.json", ev.to_json(data.classes).dump(2) + "\n");
      }
      if (analysis) {
        fmt::print(stderr, "study: {} is analysed, skipping its analysis\n", name);
      } else {
        const torch::Tensor images = analysis_images(data, cfg, spec, config.analysis.images);
        const TransformOptions tf = cfg.transforms(spec.config["img_size"], spec.config["in_chans"]);
        AnalyzeOptions ao;
        ao.batch_size = config.analysis.batch_size;
        ao.similarity.tau = config.analysis.tau;
        ao.similarity.similar_threshold = config.analysis.similar_threshold;
        ao.maps = config.analysis.maps;
        ao.similarity.center = config.analysis.center;
        ao.device = device;
        ao.model_name = fmt::format("{} ({} blocks)", family.name, depth);
        ao.mean = tf.mean;
        ao.std = tf.std;
        fmt::print(stderr, "study: analysing {} on {} images\n", name, images.size(0));
        analysis = analyze(model, images, ao, analysis_dir).summary;
      }
      const auto& j = *analysis;
      r.adjacent = j.at("adjacent").get<std::vector<double>>();
      r.similar_blocks = j.at("similar_blocks");
      std::vector<double> flat;
      for (const auto& row : j.at("cross_layer"))
        for (double v : row.get<std::vector<double>>()) flat.push_back(v);
      r.S = torch::tensor(flat, torch::kDouble).reshape({depth, depth});
      results.push_back(std::move(r));
    }
  }

  if (!run.members.empty()) return {};

  // The report: a table and the paper's figures.
  StagedOutputs out;
  std::vector<LineSeries> top1_series, similar_series, adjacent_series;
  std::vector<torch::Tensor> heatmaps;
  std::vector<std::string> heatmap_titles;
  for (const auto& family : config.families) {
    LineSeries top1{family.name, {}, {}}, similar{family.name, {}, {}};
    for (const auto& r : results) {
      if (r.family != family.name) continue;
      top1.x.push_back(static_cast<double>(r.depth));
      top1.y.push_back(r.top1);
      similar.x.push_back(static_cast<double>(r.depth));
      similar.y.push_back(static_cast<double>(r.similar_blocks));
    }
    top1_series.push_back(top1);
    similar_series.push_back(similar);
  }
  for (const auto& r : results) {
    LineSeries s{member_name(r.family, r.depth), {}, {}};
    for (size_t k = 0; k < r.adjacent.size(); ++k) {
      s.x.push_back(static_cast<double>(k + 1));
      s.y.push_back(r.adjacent[k]);
    }
    adjacent_series.push_back(s);
  }
  const std::string label = maps_label(config.analysis.maps, config.analysis.center);
  const std::string subtitle =
      fmt::format("{} evaluation images per member{}", config.analysis.images, label.empty() ? "" : ", " + label);
  LinePlotOptions p;
  p.title = "Top-1 accuracy against depth";
  p.x_label = "blocks";
  p.y_label = "top-1 %";
  out.add(out_dir / "top1_vs_depth.png", line_plot_png(top1_series, p));
  p.title = "Similar blocks against depth";
  p.subtitle = fmt::format("blocks k with S[k-1,k] >= {}", config.analysis.similar_threshold);
  p.y_label = "similar blocks";
  p.ymin = 0.0;
  out.add(out_dir / "similar_blocks_vs_depth.png", line_plot_png(similar_series, p));
  p = LinePlotOptions{};
  p.title = "Adjacent-block attention similarity";
  p.subtitle = subtitle;
  p.x_label = "block k";
  p.y_label = "S[k-1, k]";
  p.threshold = config.analysis.similar_threshold;
  p.threshold_label = "threshold";
  out.add(out_dir / "adjacent_similarity.png", line_plot_png(adjacent_series, p));

  // Cross-layer heatmaps, family × depth, each panel at its own size and all
  // on one colour scale, so that members compare by colour.
  double vmin = 0.0;
  for (const auto& r : results) vmin = std::min(vmin, colour_floor(r.S));
  std::vector<cv::Mat> panels;
  for (const auto& r : results) {
    HeatmapOptions h;
    h.title = member_name(r.family, r.depth);
    h.x_label = "block q";
    h.y_label = "block p";
    h.vmin = vmin;
    h.vmax = 1.0;
    h.annotate = r.depth <= 8;
    h.cell = static_cast<int>(std::max<int64_t>(8, 240 / r.depth));
    panels.push_back(heatmap_image(r.S, h));
  }
  out.add(out_dir / "cross_layer_heatmaps.png",
          encode_png(panel_grid_image(panels, static_cast<int>(config.depths.size()),
                                      "Cross-layer attention similarity S[p, q]", subtitle)));

  // With train.analysis.every in the recipe: each member's collapse
  // measures against epoch.
  std::vector<AnalysisCurves> curves;
  for (const auto& r : results) {
    const std::string name = member_name(r.family, r.depth);
    std::vector<std::string> rows = read_analysis_curves(out_dir / "members" / name / "analysis" / "curves.csv");
    if (!rows.empty()) curves.push_back({name, std::move(rows)});
  }
  if (!curves.empty())
    out.add(out_dir / "measures_vs_epoch.png",
            analysis_curves_png(curves, "Collapse measures while the members train"));

  std::string md = "# Depth-scaling study\n\n";
  md += fmt::format(
      "ViT and DeepViT at {} blocks, trained with one recipe and analysed on the first {} evaluation images "
      "({}{} maps, τ = {}, similar-block threshold {}). Definitions: docs/ANALYSIS.md. Each member's outputs are "
      "under `members/<family>_d<depth>/` (run directory, `analysis/` with similarity.pt, summary.json and "
      "figures).\n\n",
      fmt::join(config.depths, ", "), config.analysis.images, config.analysis.center ? "centred " : "",
      config.analysis.maps, config.analysis.tau, config.analysis.similar_threshold);
  md += "| family | depth | params | top-1 % | top-5 % | similar blocks | mean adjacent similarity | train time |\n";
  md += "|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : results) {
    double mean_adj = NAN;
    if (!r.adjacent.empty()) mean_adj = std::accumulate(r.adjacent.begin(), r.adjacent.end(), 0.0) / r.adjacent.size();
    md += fmt::format("| {} | {} | {} | {:.2f} | {:.2f} | {} / {} | {} | {} |\n", r.family, r.depth,
                      with_commas(r.parameters), r.top1, r.top5, r.similar_blocks, r.depth,
                      fmt_or_dash(mean_adj, "{:.3f}"),
                      r.source == "trained" ? fmt::format("{:.0f} s", r.train_seconds) : "weights: " + r.source);
  }
  md += "\n## Figures\n\n";
  md += "Top-1 against depth (the paper's Fig. 1):\n\n![top-1 against depth](top1_vs_depth.png)\n\n";
  md += "Similar blocks against depth (Fig. 2b):\n\n![similar blocks](similar_blocks_vs_depth.png)\n\n";
  md += "Adjacent-block similarity (Fig. 2a):\n\n![adjacent similarity](adjacent_similarity.png)\n\n";
  md += "Cross-layer similarity per member:\n\n![cross-layer heatmaps](cross_layer_heatmaps.png)\n";
  if (!curves.empty())
    md += fmt::format(
        "\nThe collapse measures while the members train (every {} epochs on the first {} evaluation images; "
        "each member's numbers in `members/<member>/analysis/curves.csv`):\n\n"
        "![collapse measures against epoch](measures_vs_epoch.png)\n",
        config.member_config(config.families.front(), config.depths.front()).train.analysis.every,
        config.member_config(config.families.front(), config.depths.front()).train.analysis.images);
  const double minutes = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 60.0;
  md +=
      fmt::format("\nThis run of `vitlab study` took {:.1f} min (members already done are not retrained).\n", minutes);
  out.add(out_dir / "REPORT.md", md);
  out.commit();
  return out_dir / "REPORT.md";
}

}  // namespace vitlab
