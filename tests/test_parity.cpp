// Parity with the reference implementations: every fixture in
// tests/fixtures (made by timm's ViT and CaiT, the official DeepViT code and
// torch.nn.Transformer) is reproduced from both of its weight files.
#include <catch2/catch.hpp>

#include "io/torch_file.h"
#include "models/registry.h"
#include "tests/helpers.h"

using namespace vitlab;
using vitlab::test::fixture;
using vitlab::test::manifest;
using vitlab::test::max_abs_diff;

namespace {

// The manifest's config as model overrides; eps is fixed in vitlab's ViTs.
YAML::Node overrides_from(const nlohmann::json& config) {
  YAML::Node node = YAML::Load(config.dump());
  node.remove("layer_norm_eps");
  return node;
}

// max |a - b| relative to max |b|.
double relative_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return max_abs_diff(a, b) / b.abs().max().item<double>();
}

}  // namespace

TEST_CASE("ViT (LayerScale included) and DeepViT fixtures: logits and attention maps match PyTorch") {
  int checked = 0;
  for (auto it = manifest().begin(); it != manifest().end(); ++it) {
    const std::string name = it.key();
    if (name.front() == '_' || name.rfind("transformer", 0) == 0 || name.rfind("cait", 0) == 0) continue;
    const auto& entry = it.value();
    REQUIRE(entry["config"]["layer_norm_eps"].get<double>() == 1e-6);
    const std::string preset = name.rfind("deepvit", 0) == 0 ? "deepvit_S" : "vit_base_patch16_224";
    Model m = create_model(preset, overrides_from(entry["config"]));
    CHECK(count_parameters(*m.module) == entry["parameters"].get<int64_t>());
    m.module->eval();
    torch::Tensor x = read_torch_tensor(fixture(name + ".input.pt"));
    torch::Tensor logits_ref = read_torch_tensor(fixture(name + ".logits.pt"));
    torch::Tensor attn_ref = read_torch_tensor(fixture(name + ".attn.pt"));
    for (const char* ext : {".pt", ".safetensors"}) {
      INFO(name << ext);
      // Scramble first so that a load that silently skips a tensor fails.
      for (auto& p : m.module->parameters()) p.data().normal_();
      LoadReport report = load_weights(m, fixture(name + ext));
      CHECK(report.clean());
      torch::NoGradGuard no_grad;
      auto [logits, attn] = m.vision->forward_with_attention(x);
      CHECK(max_abs_diff(logits, logits_ref) <= entry["tolerance"]["logits_max_abs"].get<double>());
      CHECK(relative_diff(logits, logits_ref) <= 1e-4);
      REQUIRE(attn.sizes() == attn_ref.sizes());
      CHECK(max_abs_diff(attn, attn_ref) <= entry["tolerance"]["attn_max_abs"].get<double>());
      CHECK(max_abs_diff(m.vision->forward(x), logits_ref) <= entry["tolerance"]["logits_max_abs"].get<double>());
      ++checked;
    }
  }
  CHECK(checked == 8);
}

TEST_CASE("CaiT fixture: logits, self-attention and class-attention maps match timm") {
  const auto& entry = manifest()["cait_timm_small"];
  REQUIRE(entry["config"]["layer_norm_eps"].get<double>() == 1e-6);
  Model m = create_model("cait_xxs24_224", overrides_from(entry["config"]));
  CHECK(m.family == "cait");
  CHECK(count_parameters(*m.module) == entry["parameters"].get<int64_t>());
  auto& cait = dynamic_cast<CaitImpl&>(*m.vision);
  m.module->eval();
  const torch::Tensor x = read_torch_tensor(fixture("cait_timm_small.input.pt"));
  const torch::Tensor logits_ref = read_torch_tensor(fixture("cait_timm_small.logits.pt"));
  const torch::Tensor attn_ref = read_torch_tensor(fixture("cait_timm_small.attn.pt"));
  const torch::Tensor class_ref = read_torch_tensor(fixture("cait_timm_small.class_attn.pt"));
  const double logits_tol = entry["tolerance"]["logits_max_abs"].get<double>();
  const double attn_tol = entry["tolerance"]["attn_max_abs"].get<double>();
  for (const char* ext : {".pt", ".safetensors"}) {
    INFO("cait_timm_small" << ext);
    for (auto& p : m.module->parameters()) p.data().normal_();
    CHECK(load_weights(m, fixture(std::string("cait_timm_small") + ext)).clean());
    {
      torch::NoGradGuard no_grad;
      auto [logits, attn, class_attn] = cait.forward_with_class_attention(x);
      CHECK(max_abs_diff(logits, logits_ref) <= logits_tol);
      CHECK(relative_diff(logits, logits_ref) <= 1e-4);
      REQUIRE(attn.sizes() == attn_ref.sizes());  // [3, 2, 4, 16, 16]: patch tokens only
      CHECK(max_abs_diff(attn, attn_ref) <= attn_tol);
      REQUIRE(class_attn.sizes() == class_ref.sizes());  // [2, 2, 4, 1, 17]
      CHECK(max_abs_diff(class_attn, class_ref) <= attn_tol);
      // The maps ViT's interface returns are the self-attention ones; without
      // any, talking heads run on the fused inference kernel.
      CHECK(max_abs_diff(m.vision->forward_with_attention(x).second, attn_ref) <= attn_tol);
      CHECK(relative_diff(m.vision->forward(x), logits_ref) <= 1e-4);
    }
    // With gradients: LibTorch's ops, the maps stored.
    CHECK(relative_diff(m.vision->forward(x).detach(), logits_ref) <= 1e-4);
  }
}

TEST_CASE("torch.nn.Transformer fixture: the encoder-decoder stack matches PyTorch") {
  const auto& entry = manifest()["transformer_torch_small"];
  const auto& c = entry["config"];
  REQUIRE(c["norm_first"] == false);
  REQUIRE(c["batch_first"] == false);
  TransformerOptions o;
  o.d_model = c["d_model"];
  o.nhead = c["nhead"];
  o.num_encoder_layers = c["num_encoder_layers"];
  o.num_decoder_layers = c["num_decoder_layers"];
  o.dim_feedforward = c["dim_feedforward"];
  o.dropout = c["dropout"];
  o.activation = c["activation"];
  o.layer_norm_eps = c["layer_norm_eps"];
  Transformer t(o);
  CHECK(count_parameters(*t) == entry["parameters"].get<int64_t>());
  t->eval();
  torch::Tensor src = read_torch_tensor(fixture("transformer_torch_small.src.pt"));
  torch::Tensor tgt = read_torch_tensor(fixture("transformer_torch_small.tgt.pt"));
  torch::Tensor ref = read_torch_tensor(fixture("transformer_torch_small.output.pt"));
  for (const char* ext : {".pt", ".safetensors"}) {
    INFO(ext);
    for (auto& p : t->parameters()) p.data().normal_();
    CHECK(load_state(*t, read_weights(fixture(std::string("transformer_torch_small") + ext))).clean());
    torch::NoGradGuard no_grad;
    torch::Tensor out = t->forward(src, tgt, {}, causal_mask(tgt.size(0)));
    CHECK(max_abs_diff(out, ref) <= entry["tolerance"]["output_max_abs"].get<double>());
    // The same causal mask given as booleans.
    torch::Tensor bool_mask = torch::ones({tgt.size(0), tgt.size(0)}, torch::kBool).triu(1);
    CHECK(max_abs_diff(t->forward(src, tgt, {}, bool_mask), ref) <= entry["tolerance"]["output_max_abs"].get<double>());
  }
}
