#pragma once
// `vitlab analyze`: runs a vision model over images, measures attention
// collapse (analysis/similarity.h) and writes the numbers and figures. What
// each output means is in docs/ANALYSIS.md.
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "analysis/measures.h"
#include "analysis/similarity.h"
#include "data/loader.h"
#include "models/registry.h"

namespace vitlab {

struct AnalyzeOptions {
  SimilarityOptions similarity;
  int64_t batch_size = 32;                         // images per forward pass for a tensor input (a loader has its own)
  int64_t limit = 0;                               // analyse at most this many images (the first ones); 0: all
  torch::Device device = torch::kCPU;              // the model is moved here; the analysis runs here too
  at::ScalarType amp = at::ScalarType::Undefined;  // autocast dtype of the forward passes; Undefined: fp32
  int64_t visualize = 4;                           // the first images get attention overlays
  RolloutOptions rollout;                          // the overlays' attention rollout
  bool features = true;                            // also the cross-layer similarity of block outputs
  // Which map A is: "applied", the one that multiplies V (after Θ and
  // BatchNorm in re-attention blocks), or "softmax", the softmax map before
  // them (the same in blocks without re-attention).
  std::string maps = "applied";
  // The measures of analysis/measures.h to compute (their prefix tokens and
  // patch size come from the model), and CKA's minibatch size.
  std::vector<std::string> measures = measure_names();
  int64_t cka_batch = 64;
  // The normalisation the inputs went through (TransformOptions::mean/std),
  // undone for the overlays; empty: each image is stretched to [0, 1].
  std::vector<double> mean, std;
  std::string model_name;  // names the model in figure titles and summary.json; empty: Model::name

  void validate() const;  // errors name the option and the expectation
};

// Throws unless maps is "applied" or "softmax"; key names the setting.
void check_maps(const std::string& maps, const std::string& key);
// What figure titles call the measured maps: "" (the default, applied and
// not centred), "softmax maps", "centred maps" or "centred softmax maps".
std::string maps_label(const std::string& maps, bool center);
// The lower end of a similarity colour bar: 0, or below it a round tenth
// (cosines of re-attention or centred maps can be negative), so the colour
// bar ends on a tick.
double colour_floor(const torch::Tensor& values);

struct AnalyzeReport {
  SimilarityResult similarity;
  MeasureResult measures;
  double forward_seconds = 0.0;    // forward passes with attention capture (what the analysis consumes)
  double analysis_seconds = 0.0;   // accumulating similarities and the overlay maps
  double output_seconds = 0.0;     // drawing figures, writing files
  nlohmann::json summary;          // what summary.json holds
  std::vector<std::string> files;  // names written in the output directory
};

// Runs the model (a ViT or DeepViT, built and loaded, e.g. create_model +
// load_weights) in eval mode without gradients over `images` [N, C, H, W]
// (float, normalised as the model expects) and writes into `out`:
// similarity.pt, summary.json, CSVs and PNGs, all made visible together.
AnalyzeReport analyze(Model& model, const torch::Tensor& images, const AnalyzeOptions& options,
                      const std::filesystem::path& out);
// The same over a loader's batches (eval transforms, in order); labels are unused.
AnalyzeReport analyze(Model& model, DataLoader& loader, const AnalyzeOptions& options,
                      const std::filesystem::path& out);

// Attention maps some other tool computed (timm, DINOv2, CLIP, one's own
// model): each maps file holds [L, B, H, T, T] (torch.save or a
// .safetensors holding one tensor), several files being consecutive
// batches; each features file, when given (as many), the block outputs
// [L, B, T, D] of the same images.
struct MapsFiles {
  std::vector<std::filesystem::path> maps, features;
  int64_t prefix_tokens = 1;  // class/distillation/register tokens before the T - prefix = g² patch tokens
  int64_t patch_size = 16;    // pixels per patch side
  std::string name = "maps";  // names the model in figure titles and summary.json
};
// Every analysis its inputs allow (the block-output measures need features
// files), with analyze()'s outputs but the overlays; options.maps says what
// the maps are (recorded). Errors name the file and what was expected.
AnalyzeReport analyze_maps(const MapsFiles& files, const AnalyzeOptions& options, const std::filesystem::path& out);

}  // namespace vitlab
