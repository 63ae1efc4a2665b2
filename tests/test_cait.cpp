// CaiT (models/cait.h): timm's names, strict loading, the maps it hands
// to sinks, training and the analysis. Parity with timm's outputs is in
// test_parity.cpp.
#include <catch2/catch.hpp>

#include "analysis/analyze.h"
#include "common/files.h"
#include "io/torch_file.h"
#include "models/registry.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

YAML::Node yaml(const char* text) { return YAML::Load(text); }

// The fixture's model (timm's Cait at reduced size), its weights loaded.
Model fixture_cait() {
  YAML::Node config = YAML::Load(manifest()["cait_timm_small"]["config"].dump());
  config.remove("layer_norm_eps");
  Model m = create_model("cait_xxs24_224", config);
  load_weights(m, fixture("cait_timm_small.safetensors"));
  m.module->eval();
  return m;
}

// Keeps what a block hands over, in order: "softmax" or "applied" and the maps.
class RecordingSink : public AttentionMapSink {
 public:
  void put(const torch::Tensor& maps) override { got.emplace_back("applied", maps); }
  bool wants_softmax() const override { return true; }
  void put_softmax(const torch::Tensor& maps) override { got.emplace_back("softmax", maps); }
  std::vector<std::pair<std::string, torch::Tensor>> got;
};

}  // namespace

TEST_CASE("CaiT: state_dict keys are timm's", "[cait]") {
  StateDict s = module_state(*fixture_cait().module);
  for (const char* key : {"cls_token",
                          "pos_embed",
                          "patch_embed.proj.weight",
                          "blocks.0.norm1.weight",
                          "blocks.0.attn.qkv.weight",
                          "blocks.0.attn.proj_l.weight",
                          "blocks.0.attn.proj_l.bias",
                          "blocks.0.attn.proj_w.weight",
                          "blocks.2.attn.proj.bias",
                          "blocks.2.gamma_1",
                          "blocks.2.gamma_2",
                          "blocks.2.norm2.bias",
                          "blocks.2.mlp.fc2.weight",
                          "blocks_token_only.0.norm1.weight",
                          "blocks_token_only.1.attn.q.weight",
                          "blocks_token_only.1.attn.k.bias",
                          "blocks_token_only.1.attn.v.weight",
                          "blocks_token_only.1.attn.proj.weight",
                          "blocks_token_only.1.gamma_1",
                          "blocks_token_only.1.gamma_2",
                          "blocks_token_only.1.mlp.fc1.bias",
                          "norm.weight",
                          "head.bias"})
    CHECK(s.count(key));
  // Exactly the fixture's keys: timm's Cait has no others.
  const StateDict timm = read_weights(fixture("cait_timm_small.safetensors"));
  std::vector<std::string> ours, theirs;
  for (const auto& kv : s) ours.push_back(kv.first);
  for (const auto& kv : timm) theirs.push_back(kv.first);
  CHECK(ours == theirs);
  CHECK(s.at("pos_embed").sizes() == torch::IntArrayRef({1, 16, 48}));  // patch tokens only
  CHECK(s.at("blocks.0.attn.proj_l.weight").sizes() == torch::IntArrayRef({4, 4}));
  // Initialised to init_values, as timm.
  StateDict fresh = module_state(*create_model("cait_xxs24_224", yaml("{depth: 1, depth_token_only: 1}")).module);
  CHECK(torch::equal(fresh.at("blocks.0.gamma_1"), torch::full({192}, 1e-5)));
  CHECK(torch::equal(fresh.at("blocks_token_only.0.gamma_2"), torch::full({192}, 1e-5)));
  CHECK(fresh.at("blocks_token_only.0.attn.q.weight").std().item<double>() == Approx(0.02).epsilon(0.05));
  CHECK(fresh.at("blocks_token_only.0.attn.q.bias").abs().max().item<double>() == 0.0);
}

TEST_CASE("CaiT loads timm's weights strictly: a missing gamma_1 is an error naming it", "[cait]") {
  TempDir dir;
  StateDict state = read_weights(fixture("cait_timm_small.safetensors"));
  state.erase("blocks.1.gamma_1");
  write_weights(dir / "w.safetensors", state);
  Model m = fixture_cait();
  CHECK_THROWS_WITH(load_weights(m, dir / "w.safetensors"), Catch::Contains("weights do not match the model") &&
                                                                Catch::Contains("missing keys (1): blocks.1.gamma_1"));
  // A ViT's LayerScale weights are not a CaiT's.
  CHECK_THROWS_WITH(load_weights(m, fixture("vit_timm_layerscale.safetensors")),
                    Catch::Contains("blocks.0.gamma_1") && Catch::Contains("blocks.0.ls1.gamma"));
}

TEST_CASE("CaiT's keys: presets' defaults as timm's, misspelt and meaningless keys named", "[cait]") {
  const nlohmann::json c = resolve_model("cait_s36_384").config;
  CHECK(c["init_values"].get<double>() == 1e-6);
  CHECK(c["depth_token_only"] == 2);
  CHECK(c["img_size"] == 384);
  CHECK_FALSE(c.contains("class_token"));
  CHECK_THROWS_WITH(resolve_model("cait_xxs24_224", yaml("{depth_tokn_only: 1}")),
                    Catch::Contains("unknown key 'model.depth_tokn_only'") &&
                        Catch::Contains("did you mean 'model.depth_token_only'"));
  for (const char* key : {"class_token: false", "global_pool: avg", "skip: false", "mlp: false"}) {
    INFO(key);
    CHECK_THROWS_WITH(resolve_model("cait_xxs24_224", yaml((std::string("{") + key + "}").c_str())),
                      Catch::Contains("unknown key 'model."));
  }
  CHECK_THROWS_WITH(
      resolve_model("cait_xxs24_224", yaml("{init_values: null}")),
      Catch::Contains("model.init_values must be a finite nonzero number for CaiT") && Catch::Contains("got null"));
  CHECK_THROWS_WITH(resolve_model("cait_xxs24_224", yaml("{depth_token_only: 0}")),
                    Catch::Contains("model.depth_token_only must be >= 1") && Catch::Contains("got 0"));
}

TEST_CASE("CaiT hands its sinks the softmax maps between proj_l and proj_w and the maps that multiply V", "[cait]") {
  Model m = fixture_cait();
  auto& cait = dynamic_cast<CaitImpl&>(*m.vision);
  const torch::Tensor x = read_torch_tensor(fixture("cait_timm_small.input.pt"));
  const torch::Tensor applied_ref = read_torch_tensor(fixture("cait_timm_small.attn.pt"));
  torch::NoGradGuard no_grad;
  AttentionMaps softmax(AttentionMapSink::Map::softmax);
  const torch::Tensor logits = m.vision->forward_head(m.vision->forward_features(x, &softmax));
  REQUIRE(softmax.blocks.size() == 3);
  RecordingSink both;
  CHECK(max_abs_diff(m.vision->forward_head(m.vision->forward_features(x, &both)), logits) < 1e-6);
  REQUIRE(both.got.size() == 6);  // per block: softmax, then the applied maps
  for (int64_t l = 0; l < 3; ++l) {
    INFO("block " << l);
    const auto& [first, a] = both.got[2 * l];
    const auto& [second, w] = both.got[2 * l + 1];
    CHECK(first == "softmax");
    CHECK(second == "applied");
    CHECK(torch::equal(a, softmax.blocks[l]));
    CHECK(a.sizes() == torch::IntArrayRef({2, 4, 16, 16}));
    CHECK(max_abs_diff(a.sum(-1), torch::ones({2, 4, 16})) < 1e-5);
    CHECK(max_abs_diff(w, applied_ref[l]) < 1e-5);
    // The applied maps are the softmax maps mixed across heads by proj_w.
    const auto& proj_w = cait.blocks[l]->attn->as<TalkingHeadAttentionImpl>()->proj_w;
    const torch::Tensor mixed = torch::einsum("gk,bkij->bgij", {proj_w->weight, a}) + proj_w->bias.view({1, 4, 1, 1});
    CHECK(max_abs_diff(w, mixed) < 1e-5);
  }
  // Class attention only to its own sink.
  AttentionMaps self, cls;
  cait.forward_features(x, &self, nullptr, &cls);
  CHECK(self.blocks.size() == 3);
  REQUIRE(cls.blocks.size() == 2);
  CHECK(cls.blocks[1].sizes() == torch::IntArrayRef({2, 4, 1, 17}));
}

TEST_CASE("talking heads: the fused inference path, streaming its maps, equals the explicit one", "[cait]") {
  torch::manual_seed(22);
  AttentionOptions o;
  o.dim = 40;
  o.num_heads = 5;
  TalkingHeadAttention attention(o);
  {
    torch::NoGradGuard no_grad;  // head mixings far from the identity, with offsets
    for (auto* l : {&attention->proj_l, &attention->proj_w}) {
      (*l)->weight.normal_(0.0, 0.5);
      (*l)->bias.uniform_(-0.1, 0.1);
    }
    attention->qkv->weight.normal_(0.0, 0.3);
  }
  attention->eval();
  const torch::Tensor x = torch::randn({3, 20, 40});
  AttentionMaps stored;
  const torch::Tensor reference = attention->forward(x, &stored);  // with gradients: explicit, maps as a tensor
  REQUIRE(reference.requires_grad());
  // Without gradients, on the kernel: the maps streamed one (image, head) at a time.
  struct Streamed : AttentionMapSink {
    void put(const torch::Tensor&) override { FAIL("a streaming sink is handed each map, not a tensor"); }
    bool streams(int64_t) const override { return true; }
    void begin(int64_t B, int64_t H, int64_t N) override { maps = torch::zeros({B, H, N, N}); }
    void write(int64_t b, int64_t h, const float* map) override {
      std::copy(map, map + maps.size(2) * maps.size(3), maps[b][h].data_ptr<float>());
    }
    torch::Tensor maps;
  } streamed;
  torch::NoGradGuard no_grad;
  const double scale = reference.abs().max().item<double>();
  CHECK(max_abs_diff(attention->forward(x), reference) < 1e-5 * scale);
  CHECK(max_abs_diff(attention->forward(x, &streamed), reference) < 1e-5 * scale);
  REQUIRE(streamed.maps.defined());
  CHECK(max_abs_diff(streamed.maps, stored.blocks.at(0)) < 1e-5);
}

TEST_CASE("CaiT trains: the gradient reaches every parameter", "[cait]") {
  torch::manual_seed(21);
  Model m = create_model("cait_xxs24_224", yaml("{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
                                                "num_classes: 3, init_values: 0.1}"));
  m.module->train();
  m.vision->forward(torch::randn({4, 3, 32, 32})).pow(2).sum().backward();
  for (const auto& p : m.module->named_parameters()) {
    INFO(p.key());
    REQUIRE(p.value().grad().defined());
    CHECK(p.value().grad().abs().sum().item<double>() > 0.0);
  }
}

TEST_CASE("CaiT through vitlab train and vitlab analyze", "[cait]") {
  TempDir dir;
  write_fashion_mnist_slice(dir / "fm", 64);
  const std::string run = (dir / "run").string();
  RunResult train =
      run_cli("train" + std::string(kTinyTrain) +
              " --set model.name=cait_xxs24_224 --set model.depth_token_only=1 --set data.type=fashion_mnist"
              " --set data.root=" +
              (dir / "fm").string() + " --set train.epochs=1 --out " + run);
  INFO(train.output);
  REQUIRE(train.status == 0);
  const StateDict trained = read_weights(dir / "run" / "model.safetensors");
  CHECK(trained.count("blocks.1.attn.proj_w.weight"));
  CHECK(trained.count("blocks_token_only.0.gamma_1"));
  // The run's config (init_values and all) rebuilds the model for the analysis.
  RunResult analyze = run_cli("analyze --checkpoint " + run + " --data fashion_mnist --limit 16 --threads 1 --out " +
                              (dir / "analysis").string());
  INFO(analyze.output);
  REQUIRE(analyze.status == 0);
  const auto summary = nlohmann::json::parse(read_file(dir / "analysis" / "summary.json"));
  CHECK(summary["layers"] == 2);   // the self-attention blocks
  CHECK(summary["tokens"] == 16);  // 4 x 4 patches, no prefix token
  CHECK(summary["class_token"] == false);
  CHECK(summary["family"] == "cait");
}

TEST_CASE("vitlab analyze of CaiT: the similarity of timm's maps, entropy on the softmax maps", "[cait]") {
  TempDir dir;
  Model m = fixture_cait();
  const torch::Tensor x = read_torch_tensor(fixture("cait_timm_small.input.pt"));
  AnalyzeOptions o;
  o.visualize = 1;
  o.measures = {"entropy", "residual"};
  const AnalyzeReport report = analyze(m, x, o, dir / "out");
  const torch::Tensor expected = read_torch_tensor(fixture("cait_timm_small.similarity.pt"));
  REQUIRE(report.similarity.M.sizes() == expected.sizes());  // [3, 3, 4, 16]
  CHECK(max_abs_diff(report.similarity.M, expected) <=
        manifest()["cait_timm_small"]["tolerance"]["similarity_max_abs"].get<double>());
  // Entropy of the rows of the softmax maps (between proj_l and proj_w),
  // not of the mixed maps, which are not probabilities.
  AttentionMaps softmax(AttentionMapSink::Map::softmax);
  {
    torch::NoGradGuard no_grad;
    m.vision->forward_features(x, &softmax);
  }
  const torch::Tensor a = torch::stack(softmax.blocks).to(torch::kDouble);  // [L, B, H, N, N]
  const torch::Tensor entropy = -(a * a.clamp_min(1e-300).log()).sum(-1).mean({1, 3});
  REQUIRE(report.measures.entropy.defined());
  CHECK(max_abs_diff(report.measures.entropy.to(torch::kDouble), entropy) < 1e-5);
  CHECK(report.summary["class_token"] == false);
}
