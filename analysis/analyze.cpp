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

#include "analysis/map_packing.h"
#include "common/device.h"
#include "common/error.h"
#include "common/files.h"
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
  check_maps(maps, "analysis maps");
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
                                 int64_t prefix) {
  std::vector<Visual> out;
  if (count <= 0) return out;
  // The rollout takes each block's head mean (as one head), averaged before
  // the maps are unpacked from the analysis's layout: 1/H of them to copy.
  std::vector<torch::Tensor> head_means;
  for (const auto& m : maps)
    head_means.push_back(unpack_maps(m.narrow(0, 0, count).to(torch::kFloat).mean(1, /*keepdim=*/true)));
  torch::Tensor rollout = attention_rollout(head_means);                                // [n, T, T]
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

// Loader input only: how many unreadable files it skipped.
using SkippedFiles = std::function<int64_t()>;

AnalyzeReport run(Model& model, const std::function<std::optional<torch::Tensor>()>& next_batch, const fs::path& out,
                  const AnalyzeOptions& o, const SkippedFiles& skipped_files) {
  o.validate();
  if (!model.vision) fail("analyze runs vision models (vit, deepvit); '{}' is a {} model", model.name, model.family);
  VisionTransformerImpl& vit = *model.vision;
  const ViTOptions& vo = vit.vit_options();
  const int64_t L = vo.depth, H = vo.num_heads, prefix = vit.num_prefix_tokens();
  const int64_t grid = vo.grid_size(), T = grid * grid + prefix;
  const std::string name = o.model_name.empty() ? model.name : o.model_name;

  SimilarityAccumulator acc(L, H, T, o.similarity, o.device);
  std::vector<Visual> visuals;
  AnalyzeReport report;

  model.module->to(o.device);
  {
    // Eval mode for the passes, the caller's mode back afterwards, errors
    // included.
    struct PassMode {
      VisionTransformerImpl& m;
      bool was_training;
      ~PassMode() { m.train(was_training); }
    } pass_mode{vit, vit.is_training()};
    vit.eval();
    PackedMaps sink(o.maps == "softmax" ? AttentionMapSink::Map::softmax : AttentionMapSink::Map::applied);
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
        vit.forward_features(x.to(o.device, torch::kFloat), &sink, o.features ? &outputs : nullptr);
      }
      const std::vector<torch::Tensor> maps = sink.take();
      sync(o.device);
      report.forward_seconds += seconds_since(t0);

      t0 = Clock::now();
      acc.add(maps, outputs);
      const int64_t want = std::min<int64_t>(o.visualize - static_cast<int64_t>(visuals.size()), x.size(0));
      for (auto& v : make_visuals(x, maps, want, prefix)) visuals.push_back(std::move(v));
      sync(o.device);
      report.analysis_seconds += seconds_since(t0);
      seen += x.size(0);
    }
  }
  if (acc.images() == 0) fail("analyze: no images to analyse (empty input or data split)");

  const auto t_out = Clock::now();
  SimilarityResult r = acc.result();
  report.similarity = r;
  const int64_t N = r.images;
  const std::string images_text = fmt::format("{} image{}", N, N == 1 ? "" : "s");
  // What the attention figures' titles say they measured.
  const std::string label = maps_label(o.maps, r.options.center);
  const std::string maps_text = label.empty() ? images_text : label + ", " + images_text;

  StagedOutputs staged;
  auto add = [&](const std::string& file, const std::string& bytes) {
    staged.add(out / file, bytes);
    report.files.push_back(file);
  };

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

  // Figures. Cosines of attention maps lie in [0, 1] for softmax maps; the
  // colour range starts lower only when re-attention makes them negative.
  const double smin = colour_floor(r.S);
  {
    HeatmapOptions h;
    h.title = fmt::format("{}: cross-layer attention similarity ({})", name, maps_text);
    h.subtitle = r.options.center ? "S[p,q]: cosine of attention-map columns, rows centred, mean over heads and tokens"
                                  : "S[p,q]: cosine of attention-map columns, mean over heads and tokens";
    h.x_label = "block q";
    h.y_label = "block p";
    h.vmin = smin;
    h.vmax = 1.0;
    add("cross_layer.png", heatmap_png(r.S, h));
  }
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
  if (r.feature_similarity.defined()) {
    HeatmapOptions h;
    h.title = fmt::format("{}: block-output similarity ({})", name, images_text);
    h.subtitle = "cosine of a token's features after blocks p and q, mean over tokens";
    h.x_label = "block q";
    h.y_label = "block p";
    h.vmin = colour_floor(r.feature_similarity);
    h.vmax = 1.0;
    add("feature_similarity.png", heatmap_png(r.feature_similarity, h));
  }
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
    ov.title = "rollout";
    panels.push_back(overlay_image(image, v.rollout.reshape({grid, grid}), ov));
    const int columns = overlay_columns(static_cast<int>(panels.size()));
    add(fmt::format("attention_image{}.png", i),
        encode_png(panel_grid_image(
            panels, columns, fmt::format("{}: image {}{}", name, i, o.maps == "softmax" ? " (softmax maps)" : ""),
            fmt::format("{}: heads of block {} (the last), their mean, and rollout", row_name, L - 1))));
  }

  nlohmann::json j = r.to_json();
  j["parameters"]["maps"] = o.maps;
  j["model"] = name;
  j["family"] = model.family;
  j["config"] = model.config;
  std::vector<int64_t> re_attention;
  for (int64_t l = 0; l < L; ++l)
    if (vit.blocks[l]->options.re_attention) re_attention.push_back(l);
  j["re_attention_blocks"] = re_attention;
  j["class_token"] = prefix > 0;
  j["definitions"] = {
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
  j["visualized_images"] = visuals.size();
  if (skipped_files) j["skipped_files"] = skipped_files();
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

}  // namespace vitlab
