#include "analysis/analyze.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>

#include "analysis/map_packing.h"
#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "kernels/cosine.h"
#include "plot/figures.h"

namespace vitlab {

std::string maps_label(const std::string& maps, bool center) {
  if (maps == "softmax") return center ? "centred softmax maps" : "softmax maps";
  return center ? "centred maps" : "";
}

double colour_floor(const torch::Tensor& values) {
  return std::min(0.0, std::floor(values.min().item<double>() * 10.0 + 1e-6) / 10.0);
}

void check_maps(const std::string& maps, const std::string& key) {
  if (maps != "applied" && maps != "softmax")
    fail("{} must be 'applied' (the map that multiplies V) or 'softmax' (before re-attention), got '{}'", key, maps);
}

void AnalyzeOptions::validate() const {
  similarity.validate();
  if (batch_size < 1) fail("analysis batch size must be >= 1, got {}", batch_size);
  if (limit < 0) fail("analysis limit must be >= 0 images (0: all), got {}", limit);
  if (visualize < 0) fail("analysis visualize must be >= 0 images, got {}", visualize);
  rollout.validate();
  check_maps(maps, "analysis maps");
  MeasureOptions m;
  m.measures = measures;
  m.cka_batch = cka_batch;
  m.validate();
  if (mean.size() != std.size())
    fail("analysis mean has {} values and std {}: give one per channel for both (or neither)", mean.size(), std.size());
  for (double s : std)
    if (!(s > 0)) fail("analysis std must be > 0 per channel, got {}", fmt::join(std, ", "));
}

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// CUDA work is asynchronous: time it only once it has finished.
void sync(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// What the overlays need of one image, kept on the CPU.
struct Visual {
  torch::Tensor image;      // [C, H, W] as the model saw it (normalised)
  torch::Tensor cls_heads;  // [H, P]: last block, class-token row (or mean over rows) over the patch tokens
  torch::Tensor rollout;    // [P]: the same row of the attention rollout
};

// Patch-token maps of the first `count` images of a batch.
std::vector<Visual> make_visuals(const torch::Tensor& images, const std::vector<torch::Tensor>& maps, int64_t count,
                                 int64_t prefix, const RolloutOptions& rollout_options) {
  std::vector<Visual> out;
  if (count <= 0) return out;
  // The rollout takes each block's fused heads (as one head), fused before
  // the maps are unpacked from the analysis's layout: 1/H of them to copy.
  std::vector<torch::Tensor> fused;
  for (const auto& m : maps)
    fused.push_back(unpack_maps(fuse_heads(m.narrow(0, 0, count).to(torch::kFloat), rollout_options.head_fusion)));
  torch::Tensor rollout = attention_rollout(fused, rollout_options);                    // [n, T, T]
  torch::Tensor last = unpack_maps(maps.back().narrow(0, 0, count)).to(torch::kFloat);  // [n, H, T, T]
  const int64_t T = last.size(-1);
  // With a class token its row; without one, the mean over all output tokens.
  torch::Tensor heads = prefix > 0 ? last.select(2, 0) : last.mean(2);       // [n, H, T]
  torch::Tensor roll = prefix > 0 ? rollout.select(1, 0) : rollout.mean(1);  // [n, T]
  heads = heads.narrow(-1, prefix, T - prefix).cpu();
  roll = roll.narrow(-1, prefix, T - prefix).cpu();
  for (int64_t i = 0; i < count; ++i) out.push_back({images[i].to(torch::kCPU, torch::kFloat), heads[i], roll[i]});
  return out;
}

torch::Tensor denormalize(const torch::Tensor& image, const std::vector<double>& mean, const std::vector<double>& std) {
  const int64_t C = image.size(0);
  if (!mean.empty() && (static_cast<int64_t>(mean.size()) == C || mean.size() == 1)) {
    torch::Tensor m = torch::tensor(mean, torch::kDouble).to(torch::kFloat).view({-1, 1, 1});
    torch::Tensor s = torch::tensor(std, torch::kDouble).to(torch::kFloat).view({-1, 1, 1});
    return (image * s + m).clamp(0, 1);
  }
  // Unknown normalisation: stretch to [0, 1].
  const double lo = image.min().item<double>(), hi = image.max().item<double>();
  return hi > lo ? (image - lo) / (hi - lo) : torch::zeros_like(image);
}

std::string matrix_csv(const torch::Tensor& m, const std::string& corner) {
  torch::Tensor d = m.to(torch::kDouble).contiguous();
  std::string out = corner;
  for (int64_t j = 0; j < d.size(1); ++j) out += fmt::format(",{}", j);
  out += "\n";
  for (int64_t i = 0; i < d.size(0); ++i) {
    out += std::to_string(i);
    for (int64_t j = 0; j < d.size(1); ++j) out += fmt::format(",{:.8g}", d[i][j].item<double>());
    out += "\n";
  }
  return out;
}

// 3 to 6 panels a row: the fewest empty slots, then the layout closest to
// a little wider than square.
int overlay_columns(int panels) {
  int best = 3;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int c = 3; c <= 6; ++c) {
    const int empty = (panels + c - 1) / c * c - panels;
    const double cost = empty * 10.0 + std::abs(c - 1.3 * std::sqrt(static_cast<double>(panels)));
    if (cost < best_cost) {
      best = c;
      best_cost = cost;
    }
  }
  return best;
}

std::string rounded(double v) { return fmt::format("{:.2f}", v); }

// One batch's maps and block outputs into the measures, but the maps the
// sink handed them as it streamed them: the softmax maps, kept apart for
// re-attention blocks when the analysed maps are the applied ones.
void add_measures(MeasureAccumulator& measures, const PackedMaps& sink, const std::vector<torch::Tensor>& maps,
                  const std::vector<torch::Tensor>& softmax_maps, const std::vector<torch::Tensor>& outputs) {
  if (measures.needs_maps())
    for (size_t l = 0; l < maps.size(); ++l) {
      if (sink.measured(l)) continue;
      const bool apart = l < softmax_maps.size() && softmax_maps[l].defined();
      measures.add_maps(static_cast<int64_t>(l), apart ? softmax_maps[l] : unpack_maps(maps[l]));
    }
  if (measures.needs_features()) measures.add_features(outputs);
}

// Each measure as a tensor for torch.load and as a CSV: per block, with a
// column per head for the attention measures; CKA as a matrix.
template <typename Add>
void write_measures(const MeasureResult& m, const Add& add) {
  for (const auto& [stem, t] : {std::pair{"entropy", m.entropy},
                                {"attention_distance", m.distance},
                                {"token_uniformity", m.uniformity},
                                {"rank_residual", m.residual},
                                {"effective_rank", m.effective_rank},
                                {"cka", m.cka}}) {
    if (!t.defined()) continue;
    add(std::string(stem) + ".pt", serialize_torch(t));
    if (std::string(stem) == "cka") {
      add("cka.csv", matrix_csv(t, "p\\q"));
      continue;
    }
    std::string csv = "block";
    if (t.dim() == 2)
      for (int64_t h = 0; h < t.size(1); ++h) csv += fmt::format(",head{}", h);
    else
      csv += std::string(",") + stem;
    csv += "\n";
    for (int64_t l = 0; l < t.size(0); ++l) {
      const torch::Tensor row = t[l].reshape({-1});
      csv += std::to_string(l);
      for (int64_t i = 0; i < row.numel(); ++i) csv += fmt::format(",{:.8g}", row[i].item<double>());
      csv += "\n";
    }
    add(std::string(stem) + ".csv", csv);
  }
}

// Each image's values, for bootstrap intervals over images
// (analysis/bootstrap.h): adjacent_similarity [N, L-1] and the block-output
// measures [N, L] that were computed.
std::string per_image_safetensors(const SimilarityResult& s, const MeasureResult& m) {
  StateDict values = {{"adjacent_similarity", s.image_adjacent}};
  for (const auto& [key, t] : {std::pair{"token_uniformity", m.image_uniformity},
                               {"rank_residual", m.image_residual},
                               {"effective_rank", m.image_effective_rank}})
    if (t.defined()) values[key] = t.contiguous();
  return serialize_safetensors(values, {{"images", std::to_string(s.images)}});
}

// A per-block curve of v [L] (or, for [L, H], the mean over heads).
LineSeries block_curve(const std::string& label, const torch::Tensor& v) {
  const torch::Tensor y = v.dim() == 2 ? v.mean(1) : v;
  LineSeries s;
  s.label = label;
  for (int64_t l = 0; l < y.size(0); ++l) {
    s.x.push_back(static_cast<double>(l));
    s.y.push_back(y[l].item<double>());
  }
  return s;
}

// A block × block matrix [L, L] as a PNG heatmap: rows block p, columns
// block q, colours from vmin to 1.
std::string block_pair_png(const torch::Tensor& matrix, const std::string& title, const std::string& subtitle,
                           double vmin) {
  HeatmapOptions h;
  h.title = title;
  h.subtitle = subtitle;
  h.x_label = "block q";
  h.y_label = "block p";
  h.vmin = vmin;
  h.vmax = 1.0;
  return heatmap_png(matrix, h);
}

// The "N images" of figure titles.
std::string images_text(int64_t n) { return fmt::format("{} image{}", n, n == 1 ? "" : "s"); }

// The measures' figures: the CKA heatmap, entropy and distance per block
// (the mean and every head, as the ViT paper's Fig. 7 plots distances), and
// the block outputs' uniformity, residual and effective rank.
template <typename Add>
void draw_measures(const MeasureResult& m, const std::string& name, const Add& add) {
  const std::string images = images_text(m.images);
  if (m.cka.defined())
    add("cka.png", block_pair_png(m.cka, fmt::format("{}: linear CKA of block outputs ({})", name, images),
                                  "minibatch CKA with the unbiased HSIC (Nguyen, Raghu & Kornblith 2021)",
                                  std::min(0.0, m.cka.min().item<double>())));
  for (const auto& [file, t, what, unit] :
       {std::tuple{"entropy.png", m.entropy, "attention entropy", "nats"},
        {"attention_distance.png", m.distance, "mean attention distance", "pixels"}}) {
    if (!t.defined()) continue;
    // Every head a point per block (the ViT paper's Fig. 7), their mean a line.
    LineSeries heads;
    heads.label = "one head";
    heads.connect = false;
    for (int64_t h = 0; h < t.size(1); ++h) {
      const LineSeries head = block_curve("", t.select(1, h));
      heads.x.insert(heads.x.end(), head.x.begin(), head.x.end());
      heads.y.insert(heads.y.end(), head.y.begin(), head.y.end());
    }
    LinePlotOptions p;
    p.title = fmt::format("{}: {} per block ({})", name, what, images);
    p.subtitle = "each head a point, and the mean over heads";
    p.x_label = "block";
    p.y_label = fmt::format("{} ({})", what, unit);
    add(file, line_plot_png({heads, block_curve("mean over heads", t)}, p));
  }
  std::vector<LineSeries> tokens;
  if (m.uniformity.defined()) tokens.push_back(block_curve("token uniformity", m.uniformity));
  if (m.residual.defined()) tokens.push_back(block_curve("rank-collapse residual", m.residual));
  if (!tokens.empty()) {
    LinePlotOptions p;
    p.title = fmt::format("{}: block outputs' token geometry ({})", name, images);
    p.subtitle = "uniformity 1 and residual 0: every token the same";
    p.x_label = "block";
    p.y_label = "value";
    p.ymin = 0.0;
    add("token_geometry.png", line_plot_png(tokens, p));
  }
  if (m.effective_rank.defined()) {
    LinePlotOptions p;
    p.title = fmt::format("{}: effective rank of block outputs ({})", name, images);
    p.x_label = "block";
    p.y_label = "effective rank";
    p.ymin = 0.0;
    add("effective_rank.png", line_plot_png({block_curve("effective rank", m.effective_rank)}, p));
  }
}

// Loader input only: how many unreadable files it skipped.
using SkippedFiles = std::function<int64_t()>;

// Everything the passes over the images accumulate.
struct Passes {
  SimilarityAccumulator similarity;
  MeasureAccumulator measures;
  std::vector<Visual> visuals;
  double forward_seconds = 0.0, analysis_seconds = 0.0;
};

// The forward passes (eval mode, no gradients), each batch's maps and block
// outputs into the accumulators; the caller's mode back afterwards, errors
// included.
void run_passes(VisionTransformerImpl& vit, const std::function<std::optional<torch::Tensor>()>& next_batch,
                const AnalyzeOptions& o, Passes& p) {
  struct PassMode {
    VisionTransformerImpl& m;
    bool was_training;
    ~PassMode() { m.train(was_training); }
  } pass_mode{vit, vit.is_training()};
  vit.eval();
  const int64_t prefix = vit.num_prefix_tokens();
  const bool softmax = o.maps == "softmax";
  PackedMaps sink(softmax ? AttentionMapSink::Map::softmax : AttentionMapSink::Map::applied, &p.measures);
  torch::NoGradGuard no_grad;
  int64_t seen = 0;
  while (o.limit == 0 || seen < o.limit) {
    std::optional<torch::Tensor> batch = next_batch();
    if (!batch) break;
    torch::Tensor x = *batch;
    if (o.limit > 0 && x.size(0) > o.limit - seen) x = x.narrow(0, 0, o.limit - seen);
    if (x.size(0) == 0) continue;

    auto t0 = Clock::now();
    std::vector<torch::Tensor> outputs;
    {
      Autocast autocast(o.device, o.amp);
      vit.forward_features(x.to(o.device, torch::kFloat), &sink,
                           o.features || p.measures.needs_features() ? &outputs : nullptr);
    }
    const std::vector<torch::Tensor> maps = sink.take(), softmax_maps = sink.take_softmax();
    sync(o.device);
    p.forward_seconds += seconds_since(t0);

    t0 = Clock::now();
    p.similarity.add(maps, o.features ? outputs : std::vector<torch::Tensor>{});
    add_measures(p.measures, sink, maps, softmax_maps, outputs);
    p.measures.end_batch(x.size(0));
    const int64_t want = std::min<int64_t>(o.visualize - static_cast<int64_t>(p.visuals.size()), x.size(0));
    for (auto& v : make_visuals(x, maps, want, prefix, o.rollout)) p.visuals.push_back(std::move(v));
    sync(o.device);
    p.analysis_seconds += seconds_since(t0);
    seen += x.size(0);
  }
}

// similarity.pt and the similarity's CSV tables.
template <typename Add>
void write_similarity(const SimilarityResult& r, const Add& add) {
  const int64_t L = r.layers;
  add("similarity.pt", serialize_torch(r.M));
  add("cross_layer.csv", matrix_csv(r.S, "p\\q"));
  add("cross_layer_ratio.csv", matrix_csv(r.ratio, "p\\q"));
  {
    std::string csv = "k,similarity,ratio\n";  // S[k-1, k] and R[k-1, k]
    for (int64_t k = 1; k < L; ++k)
      csv += fmt::format("{},{:.8g},{:.8g}\n", k, r.S[k - 1][k].item<double>(), r.ratio[k - 1][k].item<double>());
    add("adjacent.csv", csv);
  }
  {
    std::string csv = "block,mean_off_diagonal\n";
    for (int64_t l = 0; l < L; ++l) csv += fmt::format("{},{:.8g}\n", l, r.inter_head_mean[l].item<double>());
    add("inter_head_mean.csv", csv);
  }
  if (r.feature_similarity.defined()) add("feature_similarity.csv", matrix_csv(r.feature_similarity, "p\\q"));
  {
    std::string csv = "block,mean";
    for (int64_t h = 0; h < r.heads; ++h) csv += fmt::format(",head{}", h);
    csv += "\n";
    for (int64_t l = 0; l < L; ++l) {
      csv += fmt::format("{},{:.8g}", l, r.row_square_norm[l].mean().item<double>());
      for (int64_t h = 0; h < r.heads; ++h) csv += fmt::format(",{:.8g}", r.row_square_norm[l][h].item<double>());
      csv += "\n";
    }
    add("row_square_norm.csv", csv);
  }
}

// The similarity's figures; maps_text says which maps of how many images.
template <typename Add>
void draw_similarity(const SimilarityResult& r, const std::string& name, const std::string& maps_text,
                     const AnalyzeOptions& o, const Add& add) {
  const int64_t L = r.layers, H = r.heads;
  const std::string images = images_text(r.images);
  // Figures. Cosines of attention maps lie in [0, 1] for softmax maps; the
  // colour range starts lower only when re-attention makes them negative.
  const double smin = colour_floor(r.S);
  add("cross_layer.png",
      block_pair_png(r.S, fmt::format("{}: cross-layer attention similarity ({})", name, maps_text),
                     r.options.center
                         ? "S[p,q]: cosine of attention-map columns, rows centred, mean over heads and tokens"
                         : "S[p,q]: cosine of attention-map columns, mean over heads and tokens",
                     smin));
  {
    HeatmapGridOptions g;
    g.title = fmt::format("{}: cross-layer attention similarity per head ({})", name, maps_text);
    g.subtitle = "mean over tokens of M[p,q,h,t]";
    g.x_label = "block q";
    g.y_label = "block p";
    for (int64_t h = 0; h < H; ++h) g.panel_titles.push_back(fmt::format("head {}", h));
    torch::Tensor per_head = r.M.to(torch::kDouble).mean(3).permute({2, 0, 1});  // [H, L, L]
    g.vmin = colour_floor(per_head);
    g.vmax = 1.0;
    g.columns = static_cast<int>(std::min<int64_t>(H, 4));
    add("cross_layer_heads.png", heatmap_grid_png(per_head, g));
  }
  {
    LineSeries s{"S[k-1, k]", {}, {}}, ratio{fmt::format("share of cosines >= {}", rounded(o.similarity.tau)), {}, {}};
    for (int64_t k = 1; k < L; ++k) {
      s.x.push_back(static_cast<double>(k));
      s.y.push_back(r.S[k - 1][k].item<double>());
      ratio.x.push_back(static_cast<double>(k));
      ratio.y.push_back(r.ratio[k - 1][k].item<double>());
    }
    LinePlotOptions p;
    p.title = fmt::format("{}: adjacent-block attention similarity ({})", name, maps_text);
    p.subtitle = fmt::format("similar blocks (S[k-1, k] >= {}): {} of {}", rounded(o.similarity.similar_threshold),
                             r.similar_blocks, L);
    p.x_label = "block k";
    p.y_label = "similarity with block k-1";
    p.ymax = 1.0;
    if (smin >= 0) p.ymin = 0.0;
    p.threshold = o.similarity.similar_threshold;
    p.threshold_label = fmt::format("threshold {}", rounded(o.similarity.similar_threshold));
    add("adjacent.png", line_plot_png({s, ratio}, p));
  }
  {
    HeatmapGridOptions g;
    g.title = fmt::format("{}: inter-head attention similarity ({})", name, maps_text);
    g.subtitle = fmt::format("cosine of the same column in heads g and h; off-diagonal mean {}",
                             H > 1 ? rounded(r.inter_head_mean.mean().item<double>()) : std::string("n/a"));
    g.x_label = "head h";
    g.y_label = "head g";
    for (int64_t l = 0; l < L; ++l)
      g.panel_titles.push_back(H > 1
                                   ? fmt::format("block {} (mean {})", l, rounded(r.inter_head_mean[l].item<double>()))
                                   : fmt::format("block {}", l));
    g.vmin = colour_floor(r.inter_head);
    g.vmax = 1.0;
    g.panel = static_cast<int>(std::clamp<int64_t>(44 * H, 150, 200));  // room for the values of a few heads
    g.columns = static_cast<int>(std::min<int64_t>(L, 6));
    add("inter_head.png", heatmap_grid_png(r.inter_head, g));
  }
  if (r.feature_similarity.defined())
    add("feature_similarity.png",
        block_pair_png(r.feature_similarity, fmt::format("{}: block-output similarity ({})", name, images),
                       "cosine of a token's features after blocks p and q, mean over tokens",
                       colour_floor(r.feature_similarity)));
}

// "rollout", with its options where they are not the defaults.
std::string rollout_label(const RolloutOptions& r) {
  std::string options = r.head_fusion == "mean" ? "" : r.head_fusion;
  if (r.discard_ratio > 0) options += fmt::format("{}discard {:g}", options.empty() ? "" : ", ", r.discard_ratio);
  return options.empty() ? "rollout" : fmt::format("rollout ({})", options);
}

// The attention overlays of the first images.
template <typename Add>
void draw_overlays(const std::vector<Visual>& visuals, const std::string& name, const VisionTransformerImpl& vit,
                   const AnalyzeOptions& o, const Add& add) {
  const ViTOptions& vo = vit.vit_options();
  const int64_t L = vo.depth, H = vo.num_heads, grid = vo.grid_size(), prefix = vit.num_prefix_tokens();
  const std::string row_name = prefix > 0 ? "class-token attention" : "mean attention of all tokens (no class token)";
  for (size_t i = 0; i < visuals.size(); ++i) {
    const Visual& v = visuals[i];
    const torch::Tensor image = denormalize(v.image, o.mean, o.std);
    std::vector<cv::Mat> panels;
    OverlayOptions ov;
    ov.title = "input";
    panels.push_back(overlay_image(image, {}, ov));
    for (int64_t h = 0; h < H; ++h) {
      ov.title = fmt::format("head {}", h);
      panels.push_back(overlay_image(image, v.cls_heads[h].reshape({grid, grid}), ov));
    }
    ov.title = "mean of heads";
    panels.push_back(overlay_image(image, v.cls_heads.mean(0).reshape({grid, grid}), ov));
    ov.title = rollout_label(o.rollout);
    panels.push_back(overlay_image(image, v.rollout.reshape({grid, grid}), ov));
    const int columns = overlay_columns(static_cast<int>(panels.size()));
    add(fmt::format("attention_image{}.png", i),
        encode_png(panel_grid_image(
            panels, columns, fmt::format("{}: image {}{}", name, i, o.maps == "softmax" ? " (softmax maps)" : ""),
            fmt::format("{}: heads of block {} (the last), their mean, and rollout", row_name, L - 1))));
  }
}

// What summary.json's similarity entries mean.
nlohmann::json definitions() {
  return {
      {"A",
       "per block, head and image: the T x T map that multiplies V (post-softmax; after Theta and BatchNorm for "
       "re-attention blocks), or with parameters.maps 'softmax' the softmax map before Theta and BatchNorm; rows are "
       "output tokens, columns input tokens"},
      {"M",
       "similarity.pt [L,L,H,T]: mean over images of cos(A^p[h,:,t], A^q[h,:,t]), columns of the maps; with "
       "parameters.center each row minus its mean first (1/T for a softmax map: the deviation from uniform "
       "attention)"},
      {"cross_layer", "S[p][q]: mean of M over heads and tokens"},
      {"adjacent", "S[k-1][k] for k = 1..L-1"},
      {"ratio", "share of (image, head, token) entries whose cosine is >= tau"},
      {"similar_blocks", "blocks k >= 1 with S[k-1][k] >= similar_threshold; its ratio is to the depth L"},
      {"inter_head", "[L][H][H]: cosine of the same column between heads g and h, mean over tokens and images"},
      {"feature_similarity", "[L][L]: cosine of the same token's block outputs, mean over tokens and images"},
      {"row_square_norm",
       "[L][H]: mean over images and rows of sum_t A[i,t]^2 (of the maps as analysed); for softmax maps 1/T is "
       "uniform attention, 1 one token per row, and 1/value the effective number of tokens attended"},
      {"indices", "blocks and heads are numbered from 0"}};
}

using AddFile = std::function<void(const std::string&, const std::string&)>;

// Writes an analysis's files into out, all made visible together: the
// similarity's and the measures' tensors, tables and figures, and
// summary.json; `extra` adds what only its caller has (overlays, the
// model's facts) to the files and the summary.
void write_report(AnalyzeReport& report, const std::string& name, const AnalyzeOptions& o, const fs::path& out,
                  const std::function<void(const AddFile&, nlohmann::json&)>& extra) {
  const auto t_out = Clock::now();
  const SimilarityResult& r = report.similarity;
  const std::string images = images_text(r.images);
  // What the attention figures' titles say they measured.
  const std::string label = maps_label(o.maps, r.options.center);
  const std::string maps_text = label.empty() ? images : label + ", " + images;

  StagedOutputs staged;
  const AddFile add = [&](const std::string& file, const std::string& bytes) {
    staged.add(out / file, bytes);
    report.files.push_back(file);
  };
  write_similarity(r, add);
  write_measures(report.measures, add);
  add("per_image.safetensors", per_image_safetensors(r, report.measures));
  draw_similarity(r, name, maps_text, o, add);
  draw_measures(report.measures, name, add);

  nlohmann::json j = r.to_json();
  j.update(report.measures.to_json());
  j["parameters"]["maps"] = o.maps;
  j["parameters"]["measures"] = o.measures;
  j["parameters"]["cka_batch"] = o.cka_batch;
  j["model"] = name;
  j["definitions"] = definitions();
  extra(add, j);
  report.output_seconds = seconds_since(t_out);
  j["timing"] = {
      {"device", o.device.str()},
      {"amp", o.amp == at::ScalarType::Undefined ? "off" : c10::toString(o.amp)},
      {"forward_seconds", report.forward_seconds},
      {"analysis_seconds", report.analysis_seconds},
      {"analysis_overhead", report.forward_seconds > 0 ? report.analysis_seconds / report.forward_seconds : 0.0},
      {"output_seconds", report.output_seconds}};
  report.files.push_back("summary.json");
  j["files"] = report.files;
  staged.add(out / "summary.json", j.dump(2) + "\n");
  staged.commit();
  report.summary = std::move(j);
}

AnalyzeReport run(Model& model, const std::function<std::optional<torch::Tensor>()>& next_batch, const fs::path& out,
                  const AnalyzeOptions& o, const SkippedFiles& skipped_files) {
  o.validate();
  if (!model.vision) fail("analyze runs vision models (vit, deepvit); '{}' is a {} model", model.name, model.family);
  VisionTransformerImpl& vit = *model.vision;
  const ViTOptions& vo = vit.vit_options();
  const int64_t L = vo.depth, H = vo.num_heads, prefix = vit.num_prefix_tokens();
  const int64_t T = vo.grid_size() * vo.grid_size() + prefix;
  const std::string name = o.model_name.empty() ? model.name : o.model_name;

  MeasureOptions mo;
  mo.measures = o.measures;
  mo.cka_batch = o.cka_batch;
  mo.prefix_tokens = prefix;
  mo.patch_size = vo.patch_size;
  Passes passes{SimilarityAccumulator(L, H, T, o.similarity, o.device), MeasureAccumulator(L, H, T, mo), {}};
  model.module->to(o.device);
  run_passes(vit, next_batch, o, passes);
  if (passes.similarity.images() == 0) fail("analyze: no images to analyse (empty input or data split)");

  AnalyzeReport report;
  report.forward_seconds = passes.forward_seconds;
  report.analysis_seconds = passes.analysis_seconds;
  report.similarity = passes.similarity.result();
  report.measures = passes.measures.result();
  write_report(report, name, o, out, [&](const AddFile& add, nlohmann::json& j) {
    draw_overlays(passes.visuals, name, vit, o, add);
    j["family"] = model.family;
    j["config"] = model.config;
    std::vector<int64_t> re_attention;
    for (int64_t l = 0; l < L; ++l)
      if (vit.blocks[l]->options.re_attention) re_attention.push_back(l);
    j["re_attention_blocks"] = re_attention;
    j["class_token"] = prefix > 0;
    j["visualized_images"] = passes.visuals.size();
    j["rollout"] = {{"head_fusion", o.rollout.head_fusion}, {"discard_ratio", o.rollout.discard_ratio}};
    if (skipped_files) j["skipped_files"] = skipped_files();
  });
  return report;
}

}  // namespace

AnalyzeReport analyze(Model& model, const torch::Tensor& images, const AnalyzeOptions& options, const fs::path& out) {
  if (!images.defined() || images.dim() != 4)
    fail("analyze: expected images [N, C, H, W], got shape {}",
         images.defined() ? images.sizes().vec() : std::vector<int64_t>{});
  if (!images.is_floating_point())
    fail("analyze: expected float images (normalised as for the model), got {}", c10::toString(images.scalar_type()));
  if (model.vision) {
    const ViTOptions& vo = model.vision->vit_options();
    if (images.size(1) != vo.in_chans || images.size(2) != vo.img_size || images.size(3) != vo.img_size)
      fail("analyze: images have shape {}, the model expects [N, {}, {}, {}] (model.in_chans, model.img_size)",
           images.sizes().vec(), vo.in_chans, vo.img_size, vo.img_size);
  }
  int64_t next = 0;
  const int64_t batch = options.batch_size;
  return run(
      model,
      [&]() -> std::optional<torch::Tensor> {
        if (next >= images.size(0)) return std::nullopt;
        torch::Tensor x = images.narrow(0, next, std::min(batch, images.size(0) - next));
        next += x.size(0);
        return x;
      },
      out, options, nullptr);
}

AnalyzeReport analyze(Model& model, DataLoader& loader, const AnalyzeOptions& options, const fs::path& out) {
  loader.begin_epoch(0);
  return run(
      model,
      [&]() -> std::optional<torch::Tensor> {
        auto b = loader.next();
        if (!b) return std::nullopt;
        return b->images;
      },
      out, options, [&] { return loader.skipped(); });
}

namespace {

// A file's one tensor: torch.save of a tensor, or a .safetensors holding one.
torch::Tensor read_one_tensor(const fs::path& path) {
  if (path.extension() != ".safetensors") return read_torch_tensor(path);
  const StateDict tensors = read_weights(path);
  if (tensors.size() != 1) fail("{}: holds {} tensors, expected one", path.string(), tensors.size());
  return tensors.begin()->second;
}

// Maps [L, B, H, T, T] of T = prefix + g² tokens, finite, of the first
// file's L, H and T when `like` is defined.
torch::Tensor read_maps(const fs::path& path, int64_t prefix, const torch::Tensor& like) {
  const torch::Tensor maps = read_one_tensor(path);
  const std::string file = path.string();
  if (maps.dim() != 5 || maps.size(3) != maps.size(4) || !maps.is_floating_point())
    fail("{}: attention maps must be floating-point [L, B, H, T, T], got {} {}", file,
         c10::toString(maps.scalar_type()), maps.sizes().vec());
  const int64_t T = maps.size(3), patches = T - prefix;
  const auto g = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(std::max<int64_t>(patches, 0)))));
  if (patches < 1 || g * g != patches)
    fail("{}: {} tokens with --prefix-tokens {} leave {} patch tokens, not a square grid", file, T, prefix, patches);
  if (like.defined() && (maps.size(0) != like.size(0) || maps.size(2) != like.size(2) || T != like.size(3)))
    fail("{}: maps of {} blocks, {} heads and {} tokens; the first file has {}, {} and {}", file, maps.size(0),
         maps.size(2), T, like.size(0), like.size(2), like.size(3));
  if (!torch::isfinite(maps).all().item<bool>())
    fail("{}: attention maps contain non-finite values (NaN or Inf)", file);
  return maps;
}

// Block outputs [L, B, T, D] of the images of `maps`.
torch::Tensor read_features(const fs::path& path, const torch::Tensor& maps) {
  const torch::Tensor f = read_one_tensor(path);
  if (f.dim() != 4 || f.size(0) != maps.size(0) || f.size(1) != maps.size(1) || f.size(2) != maps.size(3) ||
      !f.is_floating_point())
    fail("{}: block outputs must be floating-point [L, B, T, D] = [{}, {}, {}, D] as its maps file, got {} {}",
         path.string(), maps.size(0), maps.size(1), maps.size(3), c10::toString(f.scalar_type()), f.sizes().vec());
  if (!torch::isfinite(f).all().item<bool>())
    fail("{}: block outputs contain non-finite values (NaN or Inf)", path.string());
  return f;
}

}  // namespace

AnalyzeReport analyze_maps(const MapsFiles& files, const AnalyzeOptions& options, const fs::path& out) {
  options.validate();
  if (files.maps.empty()) fail("analyze: no maps file given");
  if (!files.features.empty() && files.features.size() != files.maps.size())
    fail("analyze: {} features files for {} maps files: give one per maps file, in the same order",
         files.features.size(), files.maps.size());
  AnalyzeOptions o = options;
  MeasureOptions mo;
  mo.measures.clear();
  for (const auto& m : o.measures)  // the block-output measures need features
    if (!files.features.empty() || m == "entropy" || m == "distance") mo.measures.push_back(m);
  mo.cka_batch = o.cka_batch;
  mo.prefix_tokens = files.prefix_tokens;
  mo.patch_size = files.patch_size;
  o.measures = mo.measures;

  const auto t0 = Clock::now();
  torch::Tensor first;
  std::optional<SimilarityAccumulator> similarity;
  std::optional<MeasureAccumulator> measures;
  for (size_t i = 0; i < files.maps.size(); ++i) {
    const torch::Tensor maps = read_maps(files.maps[i], files.prefix_tokens, first).to(o.device, torch::kFloat);
    const torch::Tensor features =
        files.features.empty() ? torch::Tensor() : read_features(files.features[i], maps).to(o.device, torch::kFloat);
    if (!first.defined()) {
      first = maps;
      similarity.emplace(maps.size(0), maps.size(2), maps.size(3), o.similarity, o.device);
      measures.emplace(maps.size(0), maps.size(2), maps.size(3), mo);
    }
    similarity->add(maps, features);
    for (int64_t l = 0; l < maps.size(0) && measures->needs_maps(); ++l) measures->add_maps(l, maps[l]);
    if (features.defined() && measures->needs_features()) measures->add_features(features.unbind(0));
    measures->end_batch(maps.size(1));
  }
  AnalyzeReport report;
  report.analysis_seconds = seconds_since(t0);
  report.similarity = similarity->result();
  report.measures = measures->result();
  write_report(report, files.name, o, out, [&](const AddFile&, nlohmann::json& j) {
    std::vector<std::string> maps, features;
    for (const auto& f : files.maps) maps.push_back(f.string());
    for (const auto& f : files.features) features.push_back(f.string());
    j["source"] = {{"maps_files", maps},
                   {"features_files", features},
                   {"prefix_tokens", files.prefix_tokens},
                   {"patch_size", files.patch_size}};
    j["class_token"] = files.prefix_tokens > 0;
  });
  return report;
}

}  // namespace vitlab
