// `vitlab eval`: a trained model's metrics on the validation split.
#include <fmt/format.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "eval/evaluate.h"
#include "train/trainer.h"

namespace vitlab::cli {
namespace {

struct EvalArgs {
  TrainedModelArgs source;
  std::string out;
};

void run_eval(const EvalArgs& a, const CommonOptions& common) {
  check_trained_model_args(a.source);
  const TrainedRun run = resolve_trained_run(a.source, common);
  const TrainConfig& cfg = run.config;
  DataSplits data = open_data(cfg.data);
  const auto num_classes = static_cast<int64_t>(data.classes.size());
  Model m = load_trained_model(resolve_train_model(cfg, num_classes), run.weights);
  m.module->to(run.device);
  DataLoader loader(data.val, cfg.transforms(m.config["img_size"], m.config["in_chans"]),
                    eval_loader_options(cfg, cfg.train.batch_size, run.device));
  EvalResult r = evaluate(*m.vision, loader, num_classes, run.device, run.amp);
  if (!a.out.empty())
    write_eval_outputs(r, data.classes, a.out,
                       fmt::format("{} on {} ({} images): top-1 {:.2f}%", m.name, cfg.data.type, r.images, r.top1));
  nlohmann::json j = r.to_json(data.classes);
  j["model"] = m.name;
  j["weights"] = run.weights.string();
  j["skipped_files"] = loader.skipped();
  fmt::print("{}\n", j.dump(2));
}

}  // namespace

Command add_eval_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<EvalArgs>();
  auto* cmd = app.add_subcommand("eval", "Evaluate a trained model on the validation split");
  add_trained_model_options(cmd, a->source, common, "Training config for data and model keys",
                            "Override any key, e.g. --set data.type=imagefolder");
  cmd->add_option("--out", a->out, "Also write metrics.json, per_class.csv, confusion.csv and confusion.png here");
  add_threads(cmd, common);
  add_device(cmd, common);
  return make_command(cmd, [a, &common] { run_eval(*a, common); });
}

}  // namespace vitlab::cli
