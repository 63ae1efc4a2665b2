#include "models/registry.h"

#include <unordered_set>

#include "common/error.h"

namespace vitlab {

const std::vector<Preset>& presets() {
  // clang-format off
  static const std::vector<Preset> table = {
      {"vit_tiny_patch16_224", "vit", "{patch_size: 16, embed_dim: 192, depth: 12, num_heads: 3}", "ViT-Ti/16 (timm)"},
      {"vit_small_patch16_224", "vit", "{patch_size: 16, embed_dim: 384, depth: 12, num_heads: 6}", "ViT-S/16 (timm)"},
      {"vit_base_patch16_224", "vit", "{patch_size: 16, embed_dim: 768, depth: 12, num_heads: 12}", "ViT-B/16 (timm)"},
      {"vit_large_patch16_224", "vit", "{patch_size: 16, embed_dim: 1024, depth: 24, num_heads: 16}", "ViT-L/16 (timm)"},
      {"vit_huge_patch14_224", "vit", "{patch_size: 14, embed_dim: 1280, depth: 32, num_heads: 16}", "ViT-H/14 (timm)"},
      {"vit_patch16_224_16b", "vit", "{embed_dim: 384, depth: 16, num_heads: 12, mlp_ratio: 3}", "DeepViT paper's plain ViT baseline, 16 blocks"},
      {"vit_patch16_224_24b", "vit", "{embed_dim: 384, depth: 24, num_heads: 12, mlp_ratio: 3}", "DeepViT paper's plain ViT baseline, 24 blocks"},
      {"vit_patch16_224_32b", "vit", "{embed_dim: 384, depth: 32, num_heads: 12, mlp_ratio: 3}", "DeepViT paper's plain ViT baseline, 32 blocks"},
      {"deepvit_patch16_224_re_attn_16b", "deepvit", "{embed_dim: 384, depth: 16, num_heads: 12, apply_transform: all}", "DeepViT-16B, re-attention in every block"},
      {"deepvit_patch16_224_re_attn_24b", "deepvit", "{embed_dim: 384, depth: 24, num_heads: 12, apply_transform: all}", "DeepViT-24B, re-attention in every block"},
      {"deepvit_patch16_224_re_attn_32b", "deepvit", "{embed_dim: 384, depth: 32, num_heads: 12, apply_transform: all}", "DeepViT-32B, re-attention in every block"},
      {"deepvit_S", "deepvit", "{embed_dim: 396, depth: 16, num_heads: 12, apply_transform: 'last:5', transform_scale: true, use_cnn_embed: true, scale_adjustment: 0.5}",
       "DeepViT-S: CNN stem, re-attention in the last 5 blocks"},
      {"deepvit_L", "deepvit", "{embed_dim: 420, depth: 32, num_heads: 12, apply_transform: 'last:12', use_cnn_embed: true, scale_adjustment: 0.5}",
       "DeepViT-L: CNN stem, re-attention in the last 12 blocks"},
      {"cait_xxs24_224", "cait", "{embed_dim: 192, depth: 24, num_heads: 4, init_values: 1.0e-5}", "CaiT-XXS-24 (timm)"},
      {"cait_xxs36_224", "cait", "{embed_dim: 192, depth: 36, num_heads: 4, init_values: 1.0e-5}", "CaiT-XXS-36 (timm)"},
      {"cait_s24_224", "cait", "{embed_dim: 384, depth: 24, num_heads: 8, init_values: 1.0e-5}", "CaiT-S-24 (timm)"},
      {"cait_xs24_384", "cait", "{img_size: 384, embed_dim: 288, depth: 24, num_heads: 6, init_values: 1.0e-5}", "CaiT-XS-24 at 384 (timm)"},
      {"cait_s36_384", "cait", "{img_size: 384, embed_dim: 384, depth: 36, num_heads: 8, init_values: 1.0e-6}", "CaiT-S-36 at 384 (timm)"},
      {"cait_m36_384", "cait", "{img_size: 384, embed_dim: 768, depth: 36, num_heads: 16, init_values: 1.0e-6}", "CaiT-M-36 at 384 (timm)"},
      {"transformer_base", "transformer", "{}", "Vaswani et al. base: N=6, d_model 512, 8 heads, d_ff 2048, dropout 0.1"},
  };
  // clang-format on
  return table;
}

namespace {

const Preset& find_preset(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& p : presets()) {
    if (p.name == name) return p;
    names.push_back(p.name);
  }
  std::string near = closest_key(name, names);
  fail("unknown model '{}'{}; `vitlab models` lists them", name,
       near.empty() ? "" : fmt::format(" (did you mean '{}'?)", near));
}

// init_values may be `cait`, CaiT's depth-dependent LayerScale init
// (Touvron et al. 2021, Sec. 3): 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6
// beyond; the resolved number is what the config records.
void expand_init_values_rule(YAML::Node& cfg) {
  YAML::Node rule = cfg["init_values"];
  double number = 0;
  if (!rule || !rule.IsScalar() || YAML::convert<double>::decode(rule, number)) return;
  if (rule.Scalar() != "cait")
    fail("model.init_values: expected a number, null (no LayerScale) or cait (CaiT's depth rule), got '{}'",
         rule.Scalar());
  int64_t depth = 12;
  if (cfg["depth"]) read_value(cfg["depth"], depth, "model.depth");
  cfg["init_values"] = depth <= 18 ? 0.1 : depth <= 24 ? 1e-5 : 1e-6;
}

// apply_transform may be a rule instead of a list: all | none | first:K | last:K.
void expand_block_rule(YAML::Node& cfg) {
  YAML::Node rule = cfg["apply_transform"];
  if (!rule || !rule.IsScalar()) return;
  int64_t depth = 12;
  if (cfg["depth"]) read_value(cfg["depth"], depth, "model.depth");
  if (depth < 1) fail("model.depth must be >= 1, got {}", depth);
  const std::string text = rule.Scalar();
  const auto colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  int64_t k = depth;
  if (colon != std::string::npos) {
    try {
      size_t used = 0;
      k = std::stoll(text.substr(colon + 1), &used);
      if (used != text.size() - colon - 1) throw std::invalid_argument(text);
    } catch (const std::exception&) {
      k = -1;
    }
  }
  const bool ok = (kind == "all" || kind == "none") ? colon == std::string::npos
                                                    : (kind == "first" || kind == "last") && k >= 0 && k <= depth;
  if (!ok)
    fail(
        "model.apply_transform: expected a list of booleans (one per block) or all, none, first:K or last:K with "
        "0 <= K <= depth ({}), got '{}'",
        depth, text);
  YAML::Node list(YAML::NodeType::Sequence);
  for (int64_t i = 0; i < depth; ++i)
    list.push_back(kind == "all" || (kind == "first" && i < k) || (kind == "last" && i >= depth - k));
  cfg["apply_transform"] = list;
}

}  // namespace

ModelSpec resolve_model(const std::string& name, const YAML::Node& overrides) {
  const Preset& preset = find_preset(name);
  YAML::Node cfg = YAML::Load(preset.config);
  merge_into(cfg, overrides);
  if (preset.family != "transformer") expand_init_values_rule(cfg);
  ModelSpec spec{name, preset.family, {}, ViTOptions{}};
  auto resolve = [&](auto options) {
    read_options(options, cfg, "model");
    options.validate();
    spec.config = options_to_json(options);
    spec.options = options;
  };
  if (preset.family == "vit") {
    resolve(ViTOptions{});
  } else if (preset.family == "deepvit") {
    expand_block_rule(cfg);
    resolve(DeepViTOptions{});
  } else if (preset.family == "cait") {
    resolve(CaitOptions{});
  } else {
    resolve(TransformerOptions{});
  }
  return spec;
}

ModelSpec resolve_model(const std::string& name, const std::vector<Override>& overrides) {
  return resolve_model(name, section_overrides(overrides, "model", {"model"}));
}

namespace {

// A pre-norm block: its norms, attention (qkv as one Linear or three), MLP
// and LayerScale gammas.
int64_t block_parameters(int64_t D, int64_t hidden, bool qkv_bias, bool mlp, bool layer_scale) {
  const int64_t branches = mlp ? 2 : 1;
  return branches * (layer_scale ? 3 * D : 2 * D) + (3 * D * D + (qkv_bias ? 3 * D : 0)) + (D * D + D) +
         (mlp ? (D * hidden + hidden) + (hidden * D + D) : 0);
}

int64_t vit_parameters(const ViTOptions& o, const DeepViTOptions* deep, const CaitOptions* cait) {
  const int64_t D = o.embed_dim, C = o.in_chans, P = o.patch_size, H = o.num_heads;
  const int64_t patches = o.grid_size() * o.grid_size();
  const int64_t tokens = patches + (o.class_token && !cait ? 1 : 0);
  int64_t stem = D * C * P * P + D;
  if (deep && deep->use_cnn_embed) stem = 64 * C * 49 + 2 * 64 + 64 * 64 * 9 + 2 * 64 + D * 64 * (P / 2) * (P / 2) + D;
  int64_t block =
      block_parameters(D, static_cast<int64_t>(D * o.mlp_ratio), o.qkv_bias, o.mlp, o.init_values.has_value());
  if (cait) block += 2 * (H * H + H);  // talking heads: proj_l, proj_w
  int64_t n = stem + (o.class_token ? D : 0) + tokens * D + o.depth * block + 2 * D +
              (o.num_classes > 0 ? (D + 1) * o.num_classes : 0);
  if (deep)
    for (bool re : deep->apply_transform) n += re ? H * H + H + 2 * H : 0;
  if (cait)
    n += cait->depth_token_only *
         block_parameters(D, static_cast<int64_t>(D * cait->mlp_ratio_token_only), o.qkv_bias, true, true);
  return n;
}

int64_t transformer_parameters(const TransformerOptions& o) {
  const int64_t E = o.d_model, F = o.dim_feedforward;
  const int64_t attn = 3 * E * E + 3 * E + E * E + E, ff = E * F + F + F * E + E;
  int64_t n = o.num_encoder_layers * (attn + ff + 4 * E) + o.num_decoder_layers * (2 * attn + ff + 6 * E) + 4 * E;
  n += (o.src_vocab_size + o.tgt_vocab_size) * E + o.tgt_vocab_size + (o.tie_weights ? 0 : E * o.tgt_vocab_size);
  return n;
}

}  // namespace

int64_t spec_parameters(const ModelSpec& spec) {
  if (auto* o = std::get_if<ViTOptions>(&spec.options)) return vit_parameters(*o, nullptr, nullptr);
  if (auto* o = std::get_if<DeepViTOptions>(&spec.options)) return vit_parameters(*o, o, nullptr);
  if (auto* o = std::get_if<CaitOptions>(&spec.options)) return vit_parameters(*o, nullptr, o);
  return transformer_parameters(std::get<TransformerOptions>(spec.options));
}

Model build_model(const ModelSpec& spec) {
  Model m{spec.name, spec.family, spec.config, nullptr, nullptr, nullptr};
  if (auto* o = std::get_if<ViTOptions>(&spec.options)) m.vision = VisionTransformer(*o).ptr();
  if (auto* o = std::get_if<DeepViTOptions>(&spec.options)) m.vision = DeepViT(*o).ptr();
  if (auto* o = std::get_if<CaitOptions>(&spec.options)) m.vision = Cait(*o).ptr();
  if (auto* o = std::get_if<TransformerOptions>(&spec.options)) m.seq2seq = Seq2SeqTransformer(*o).ptr();
  m.module = m.vision ? std::static_pointer_cast<torch::nn::Module>(m.vision)
                      : std::static_pointer_cast<torch::nn::Module>(m.seq2seq);
  return m;
}

Model create_model(const std::string& name, const YAML::Node& overrides) {
  return build_model(resolve_model(name, overrides));
}

Model create_model(const std::string& name, const std::vector<Override>& overrides) {
  return build_model(resolve_model(name, overrides));
}

int64_t count_parameters(const torch::nn::Module& module) {
  std::unordered_set<const void*> seen;
  int64_t n = 0;
  for (const auto& p : module.parameters())
    if (seen.insert(p.unsafeGetTensorImpl()).second) n += p.numel();
  return n;
}

LoadReport load_weights(Model& model, const std::filesystem::path& path, bool strict) {
  StateDict state = read_weights(path);
  if (model.vision) model.vision->adapt_state(state);
  return load_state(*model.module, state, strict, path.string());
}

}  // namespace vitlab
