#pragma once
// `vitlab study`: DeepViT's depth-scaling experiment, and any comparison of
// model families against depth. Every member (a family at a depth, from a
// seed) is trained with one shared recipe plus its family's overrides,
// evaluated, and analysed on the same evaluation images; REPORT.md puts
// accuracy and attention collapse side by side, as mean ± standard deviation
// over seeds. Reruns skip finished members and resume an interrupted one.
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/config.h"
#include "train/config.h"

namespace vitlab {

// A family: overrides on the recipe by section (model, data, optim, schedule,
// aug, train), model.name picking the preset; e.g. {name: ViT+LS, model:
// {name: vit_patch16_224_16b, init_values: 1e-5}}. A family's keys win over
// `--set`, which changes the shared recipe.
struct StudyFamily {
  std::string name;                           // as shown in the report and in member names, e.g. "DeepViT"
  YAML::Node overrides{YAML::NodeType::Map};  // section -> map of keys
};

// A member analysed from existing weights instead of trained.
struct StudyWeights {
  std::string family;
  int64_t depth = 0;
  int64_t seed = 0;
  std::string weights;
};

struct StudyAnalysis {
  int64_t images = 256;  // the first N evaluation images, the same for every member
  int64_t batch_size = 64;
  double tau = 0.9;
  double similar_threshold = 0.9;
  std::string maps = "applied";  // AnalyzeOptions::maps
  bool center = false;           // SimilarityOptions::center
  int64_t visualize = 4;         // AnalyzeOptions::visualize: images with attention overlays (0: none, faster)

  template <class F>
  void visit(F&& f) {
    f("images", images);
    f("batch_size", batch_size);
    f("tau", tau);
    f("similar_threshold", similar_threshold);
    f("maps", maps);
    f("center", center);
    f("visualize", visualize);
  }
};

// One member: a family at a depth from a seed. Its directory and `--member`
// name is <family>_d<depth>, and <family>_d<depth>_s<seed> for seeds other
// than 0: a single-seed study's members keep the names they had before seeds,
// and adding seeds to a study keeps its seed-0 members.
struct StudyMember {
  const StudyFamily* family = nullptr;
  int64_t depth = 0;
  int64_t seed = 0;
  std::string name() const;
};

struct StudyConfig {
  std::vector<StudyFamily> families;
  std::vector<int64_t> depths;
  std::vector<int64_t> seeds = {0};  // each member trains with train.seed set to each
  // Analyse the models at initialisation (seeded by train.seed, the weights a
  // training run starts from), untrained and not evaluated (top-1 "–"): a
  // collapse study in seconds. Its analyses go to members/NAME/analysis_init/,
  // apart from the trained weights'. train.epochs: 0 also analyses the initial
  // weights, but through the trainer (a run directory with model.safetensors).
  bool at_init = false;
  StudyAnalysis analysis;
  std::vector<StudyWeights> weights;
  YAML::Node recipe{YAML::NodeType::Map};  // sections model, data, optim, schedule, aug, train
  std::vector<Override> recipe_overrides;

  // `study.depths=[...]`, `study.seeds=[...]`, `study.at_init=BOOL` and
  // `study.analysis.KEY=...` overrides go to the study; any other to the
  // recipe. Every key is checked, each family's against the recipe's, so a
  // misspelt one fails here, before any training.
  static StudyConfig load(const std::filesystem::path& file, const std::vector<Override>& overrides);
  // The recipe with one family's overrides, model.depth and train.seed.
  TrainConfig member_config(const StudyFamily& family, int64_t depth, int64_t seed = 0) const;
  // Every member in order: families, then depths, then seeds.
  std::vector<StudyMember> members() const;
};

struct StudyRunOptions {
  // Only these members (e.g. "ViT_d32", "ViT_d32_s1"): trained and analysed, no report.
  // Empty: every member, then the report.
  std::vector<std::string> members;
  // Members run at once, each in its own process: `vitlab <member_command>
  // --member NAME`, its output appended to members/NAME/study.log. Small
  // models leave a GPU mostly idle; several at once fill it.
  int jobs = 1;
  std::vector<std::string> member_command;
};

// Runs (or continues) the study into out_dir; returns the path of REPORT.md
// (empty when `run.members` limits it to some members).
std::filesystem::path run_study(const StudyConfig& config, const std::filesystem::path& out_dir,
                                const StudyRunOptions& run = {});

}  // namespace vitlab
