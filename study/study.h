#pragma once
// `vitlab study`: DeepViT's depth-scaling experiment. Every member (a model
// family at a depth) is trained with one shared recipe, evaluated, and
// analysed on the same evaluation images; REPORT.md puts accuracy and
// attention collapse side by side. Reruns skip finished members and resume
// an interrupted one.
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/config.h"
#include "train/config.h"

namespace vitlab {

struct StudyFamily {
  std::string name;                           // as shown in the report, e.g. "DeepViT"
  std::string model;                          // preset
  YAML::Node overrides{YAML::NodeType::Map};  // model keys on top of the recipe's
};

// A member analysed from existing weights instead of trained.
struct StudyWeights {
  std::string family;
  int64_t depth = 0;
  std::string weights;
};

struct StudyAnalysis {
  int64_t images = 256;  // the first N evaluation images, the same for every member
  int64_t batch_size = 64;
  double tau = 0.9;
  double similar_threshold = 0.9;
  std::string maps = "applied";  // AnalyzeOptions::maps
  bool center = false;           // SimilarityOptions::center

  template <class F>
  void visit(F&& f) {
    f("images", images);
    f("batch_size", batch_size);
    f("tau", tau);
    f("similar_threshold", similar_threshold);
    f("maps", maps);
    f("center", center);
  }
};

struct StudyConfig {
  std::vector<StudyFamily> families;
  std::vector<int64_t> depths;
  StudyAnalysis analysis;
  std::vector<StudyWeights> weights;
  YAML::Node recipe{YAML::NodeType::Map};  // sections model, data, optim, schedule, aug, train
  std::vector<Override> recipe_overrides;

  // `study.depths=[...]` and `study.analysis.KEY=...` overrides go to the
  // study; any other to the recipe. Every key is checked.
  static StudyConfig load(const std::filesystem::path& file, const std::vector<Override>& overrides);
  // The recipe with model.name and model.depth of one member.
  TrainConfig member_config(const StudyFamily& family, int64_t depth) const;
};

struct StudyRunOptions {
  // Only these members (e.g. "ViT_d32"): trained and analysed, no report.
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
