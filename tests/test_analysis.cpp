// Attention-collapse analysis: the similarity measures against the fixtures
// and hand-built cases, streaming, `analyze` end to end, and the figures.
#include <fmt/ranges.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <opencv2/imgcodecs.hpp>
#include <sstream>

#include "analysis/analyze.h"
#include "analysis/map_packing.h"
#include "analysis/similarity.h"
#include "common/device.h"
#include "common/files.h"
#include "common/runtime.h"
#include "eval/evaluate.h"
#include "io/state_dict.h"
#include "io/torch_file.h"
#include "kernels/attention.h"
#include "kernels/cosine.h"
#include "plot/figures.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

const char* kFixtures[] = {"vit_timm_small", "deepvit_official_small", "deepvit_official_S_style"};

Model fixture_model(const std::string& name) {
  YAML::Node node = YAML::Load(manifest()[name]["config"].dump());
  node.remove("layer_norm_eps");
  Model m = create_model(name.rfind("deepvit", 0) == 0 ? "deepvit_S" : "vit_base_patch16_224", node);
  load_weights(m, fixture(name + ".safetensors"));
  m.module->eval();
  return m;
}

SimilarityResult similarity_of(const torch::Tensor& attn, const torch::Tensor& features = {},
                               SimilarityOptions options = {}) {
  SimilarityAccumulator acc(attn.size(0), attn.size(2), attn.size(3), options);
  acc.add(attn, features);
  return acc.result();
}

// Row-stochastic random maps [L, B, H, T, T] and features [L, B, T, D].
std::pair<torch::Tensor, torch::Tensor> random_maps(int64_t L, int64_t B, int64_t H, int64_t T, int64_t D) {
  torch::manual_seed(7);
  return {torch::randn({L, B, H, T, T}).mul(2).softmax(-1), torch::randn({L, B, T, D})};
}

cv::Mat decode(const fs::path& path) {
  const std::string bytes = read_file(path);
  return cv::imdecode(cv::Mat(1, static_cast<int>(bytes.size()), CV_8U, const_cast<char*>(bytes.data())),
                      cv::IMREAD_UNCHANGED);
}

// Maps [..., T, T] packed by column blocks, [..., blocks, T, 8], as the attention kernel captures them.
torch::Tensor pack(const torch::Tensor& rows) {
  const int64_t T = rows.size(-1), maps = rows.numel() / (T * T);
  std::vector<int64_t> shape = rows.sizes().vec();
  shape.resize(shape.size() - 2);
  shape.insert(shape.end(), {packed_blocks(T), T, kPackedWidth});
  const torch::Tensor in = rows.contiguous();
  torch::Tensor out = torch::empty(shape);
  for (int64_t m = 0; m < maps; ++m)
    pack_map_columns(in.data_ptr<float>() + m * T * T, T, out.data_ptr<float>() + m * out.numel() / maps);
  return out;
}

void check_same(const SimilarityResult& a, const SimilarityResult& b, double tol) {
  CHECK(a.images == b.images);
  CHECK(max_abs_diff(a.M, b.M) <= tol);
  CHECK(max_abs_diff(a.S, b.S) <= tol);
  CHECK(max_abs_diff(a.ratio, b.ratio) <= tol);
  CHECK(max_abs_diff(a.inter_head, b.inter_head) <= tol);
  CHECK(max_abs_diff(a.feature_similarity, b.feature_similarity) <= tol);
  CHECK(max_abs_diff(a.row_square_norm, b.row_square_norm) <= tol);
  CHECK(a.similar_blocks == b.similar_blocks);
}

}  // namespace

TEST_CASE("similarity reproduces every fixture's similarity.pt from its attention maps") {
  for (const char* name : kFixtures) {
    INFO(name);
    torch::Tensor attn = read_torch_tensor(fixture(std::string(name) + ".attn.pt"));
    torch::Tensor ref = read_torch_tensor(fixture(std::string(name) + ".similarity.pt"));
    SimilarityResult r = similarity_of(attn);
    REQUIRE(r.M.sizes() == ref.sizes());
    CHECK(r.M.scalar_type() == torch::kFloat);
    const double diff = max_abs_diff(r.M, ref);
    CHECK(diff <= manifest()[name]["tolerance"]["similarity_max_abs"].get<double>());
    // The summaries are M's means.
    CHECK(max_abs_diff(r.S, ref.to(torch::kDouble).mean({2, 3})) <= 1e-5);
    CHECK(r.images == attn.size(1));
  }
}

TEST_CASE("similarity of hand-built maps has the known answers") {
  // L=3, B=2, H=2, T=4. Blocks 0 and 1 are the same map, with the same
  // columns in both heads; block 2's columns live on rows 0 and 1 only,
  // where blocks 0 and 1 are zero, and its two heads on different rows.
  torch::manual_seed(3);
  const int64_t B = 2, H = 2, T = 4;
  torch::Tensor base = torch::zeros({B, 1, T, T});
  base.narrow(2, 2, 2).copy_(torch::rand({B, 1, 2, T}).add(0.1));
  base = base.expand({B, H, T, T}).contiguous();
  torch::Tensor other = torch::zeros({B, H, T, T});
  other.select(1, 0).select(1, 0).copy_(torch::rand({B, T}).add(0.1));
  other.select(1, 1).select(1, 1).copy_(torch::rand({B, T}).add(0.1));
  torch::Tensor attn = torch::stack({base, base, other});
  torch::Tensor features = torch::randn({1, B, T, 8}).expand({3, B, T, 8}).clone();
  features[2].neg_();

  SimilarityOptions o;
  o.tau = 0.95;
  SimilarityResult r = similarity_of(attn, features, o);
  auto S = [&](int p, int q) { return r.S[p][q].item<double>(); };
  CHECK(S(0, 1) == Approx(1.0).margin(1e-6));
  CHECK(S(1, 0) == Approx(1.0).margin(1e-6));
  CHECK(S(0, 2) == Approx(0.0).margin(1e-6));
  CHECK(S(1, 2) == Approx(0.0).margin(1e-6));
  for (int p = 0; p < 3; ++p) CHECK(S(p, p) == Approx(1.0).margin(1e-6));
  CHECK(r.adjacent.size(0) == 2);
  CHECK(r.adjacent[0].item<double>() == Approx(1.0).margin(1e-6));
  CHECK(r.adjacent[1].item<double>() == Approx(0.0).margin(1e-6));
  CHECK(r.ratio[0][1].item<double>() == 1.0);
  CHECK(r.ratio[0][2].item<double>() == 0.0);
  CHECK(r.similar_blocks == 1);
  CHECK(r.similar_blocks_ratio == Approx(1.0 / 3));
  // Identical heads in blocks 0 and 1, orthogonal heads in block 2.
  CHECK(r.inter_head_mean[0].item<double>() == Approx(1.0).margin(1e-6));
  CHECK(r.inter_head_mean[2].item<double>() == Approx(0.0).margin(1e-6));
  CHECK(r.inter_head[2][0][0].item<double>() == Approx(1.0).margin(1e-6));
  // Features: the same in blocks 0 and 1, negated in block 2.
  CHECK(r.feature_similarity[0][1].item<double>() == Approx(1.0).margin(1e-6));
  CHECK(r.feature_similarity[0][2].item<double>() == Approx(-1.0).margin(1e-6));

  const nlohmann::json j = r.to_json();
  CHECK(j["similar_blocks"] == 1);
  CHECK(j["parameters"]["tau"] == 0.95);
  CHECK(j["cross_layer"].size() == 3);
  CHECK(j["inter_head"][2].size() == 2);

  // An all-zero column has cosine 0 with everything, itself included.
  torch::Tensor zero = attn.clone();
  zero[1].zero_();
  SimilarityResult z = similarity_of(zero);
  CHECK(z.S[1][1].item<double>() == 0.0);
  CHECK(z.S[0][1].item<double>() == 0.0);
  CHECK(z.S[0][0].item<double>() == Approx(1.0).margin(1e-6));
}

TEST_CASE("similarity with center compares the maps' deviations from uniform attention") {
  auto [attn, features] = random_maps(3, 4, 2, 9, 4);
  SimilarityOptions o;
  o.center = true;
  // The definition in float64: rows minus their mean (1/T for these softmax
  // maps), cosines of the columns (over the rows, dim 3) per image, then the
  // mean over the images.
  torch::Tensor c = attn.to(torch::kDouble);
  c = c - c.mean(4, true);
  c = c / at::linalg_vector_norm(c, 2, torch::IntArrayRef{3}, true);
  const torch::Tensor expected = torch::einsum("pbhit,qbhit->pqht", {c, c}) / attn.size(1);
  const SimilarityResult kernel = similarity_of(attn, {}, o);  // float32, T >= 8: the CPU kernel
  const SimilarityResult products = similarity_of(attn.to(torch::kDouble), {}, o);
  CHECK(max_abs_diff(kernel.M, expected) < 1e-5);
  CHECK(max_abs_diff(products.M, expected) < 1e-5);
  CHECK(max_abs_diff(kernel.inter_head, products.inter_head) < 1e-5);
  CHECK(kernel.to_json()["parameters"]["center"] == true);
  CHECK(similarity_of(attn).to_json()["parameters"]["center"] == false);

  // A constant added to every row leaves the centred map as it was; a
  // uniform map has nothing left (cosine 0), though its raw cosine is high.
  torch::Tensor shifted = attn.clone();
  shifted[1] = attn[0] + torch::rand({4, 2, 9, 1});
  shifted[2].fill_(1.0 / 9);
  const SimilarityResult centred = similarity_of(shifted, {}, o), raw = similarity_of(shifted);
  CHECK(centred.S[0][1].item<double>() == Approx(1.0).margin(1e-5));
  CHECK(raw.S[0][1].item<double>() < 0.99);
  CHECK(centred.S[0][2].item<double>() == 0.0);
  CHECK(raw.S[0][2].item<double>() > 0.5);
  // Every query attending alike (all rows one distribution, the same in
  // both blocks) still counts as similar: centring the columns would not.
  torch::Tensor shared = attn.select(3, 0).unsqueeze(3).expand({3, 4, 2, 9, 9}).contiguous();
  CHECK(similarity_of(shared, {}, o).S[0][1].item<double>() < 1.0 - 1e-3);  // blocks 0, 1 differ
  shared[1] = shared[0];
  CHECK(similarity_of(shared, {}, o).S[0][1].item<double>() == Approx(1.0).margin(1e-5));
}

TEST_CASE("row_square_norm: 1/T for uniform maps, 1 for one token per row, and its definition") {
  const int64_t T = 9;
  torch::Tensor maps = torch::full({2, 3, 2, T, T}, 1.0 / T);
  maps[1].zero_();
  maps[1].select(3, 4).fill_(1.0);                      // every row attends to token 4
  for (auto dtype : {torch::kFloat, torch::kDouble}) {  // the CPU kernel and the product path
    const SimilarityResult r = similarity_of(maps.to(dtype));
    CHECK(max_abs_diff(r.row_square_norm[0], torch::full({2}, 1.0 / T)) < 1e-6);
    CHECK(max_abs_diff(r.row_square_norm[1], torch::ones({2})) < 1e-6);
  }
  auto [attn, features] = random_maps(3, 4, 2, 11, 4);
  const torch::Tensor expected = attn.to(torch::kDouble).square().sum(4).mean({1, 3});  // [L, H]
  CHECK(max_abs_diff(similarity_of(attn).row_square_norm, expected) < 1e-6);
  CHECK(max_abs_diff(similarity_of(attn.to(torch::kDouble)).row_square_norm, expected) < 1e-6);
  const nlohmann::json j = similarity_of(attn).to_json();
  CHECK(j["row_square_norm"].size() == 3);
  CHECK(j["row_square_norm_mean"][0].get<double>() == Approx(expected[0].mean().item<double>()).epsilon(1e-6));
}

TEST_CASE("similarity streamed in batches of 1, 3 and all at once gives the same result") {
  auto [attn, features] = random_maps(4, 7, 3, 10, 16);
  const SimilarityResult once = similarity_of(attn, features);
  // The feature similarity against its definition: per token, then the mean.
  const torch::Tensor direct =
      torch::cosine_similarity(features.to(torch::kDouble).unsqueeze(1), features.to(torch::kDouble).unsqueeze(0), 4)
          .mean({2, 3});
  CHECK(max_abs_diff(once.feature_similarity, direct) < 1e-6);
  for (int64_t batch : {1, 3, 7}) {
    for (int64_t chunk : {0, 2}) {
      INFO("batch " << batch << ", chunk " << chunk);
      SimilarityOptions o;
      o.chunk = chunk;
      SimilarityAccumulator acc(4, 3, 10, o);
      for (int64_t b = 0; b < 7; b += batch) {
        const int64_t n = std::min<int64_t>(batch, 7 - b);
        acc.add(attn.narrow(1, b, n), features.narrow(1, b, n));
      }
      check_same(acc.result(), once, 1e-6);
    }
  }
  // Per-block tensors, as forward_features collects them.
  SimilarityAccumulator acc(4, 3, 10);
  acc.add(attn.unbind(0), features.unbind(0));
  check_same(acc.result(), once, 1e-6);
}

TEST_CASE("similarity: the CPU kernel agrees with the batched-product path") {
  // float32 contiguous CPU maps with T >= 8 take the kernel; the same maps
  // in float64 take the bmm path. Shapes cover partial 3x3 tiles (L, H
  // not multiples of 3), L and H of 3 (one tile, no prefetching), column
  // blocks (T not a multiple of 8), signed maps (re-attention) and an
  // all-zero column.
  // float32 block outputs take the feature kernel, float64 ones the
  // product path; D covers vectors shorter than 8 and partial ones.
  for (auto [L, H, T, D] :
       std::vector<std::array<int64_t, 4>>{{1, 1, 8, 4}, {3, 5, 13, 13}, {7, 2, 20, 16}, {9, 3, 17, 21}}) {
    INFO("L " << L << ", H " << H << ", T " << T << ", D " << D);
    torch::manual_seed(11);
    torch::Tensor attn = torch::randn({L, 3, H, T, T});
    torch::Tensor softmaxed = attn.narrow(0, 0, (L + 1) / 2);
    softmaxed.copy_(softmaxed.softmax(-1));
    attn.select(1, 1).select(2, 0).select(2, T - 1).zero_();  // column T-1 of head 0, image 1, every block
    torch::Tensor features = torch::randn({L, 3, T, D});
    features[0][2][1].zero_();  // a zero token vector: cosine 0, as torch.nn.functional.normalize gives
    SimilarityOptions o;
    o.tau = 0.3;
    const SimilarityResult kernel = similarity_of(attn, features, o);
    const SimilarityResult reference = similarity_of(attn.to(torch::kDouble), features.to(torch::kDouble), o);
    check_same(kernel, reference, 2e-6);
    CHECK(kernel.ratio.sum().item<double>() > 0.0);
    // The kernels and the product path keep separate sums: one accumulator
    // taking a batch each way gives the same result.
    SimilarityAccumulator mixed(L, H, T, o);
    mixed.add(attn.narrow(1, 0, 1), features.narrow(1, 0, 1));
    mixed.add(attn.narrow(1, 1, 2).to(torch::kDouble), features.narrow(1, 1, 2).to(torch::kDouble));
    check_same(mixed.result(), reference, 2e-6);
  }
}

TEST_CASE("similarity: non-finite maps, bad shapes and options are clear errors") {
  auto [attn, features] = random_maps(2, 2, 2, 5, 4);
  SimilarityAccumulator acc(2, 2, 5);
  torch::Tensor nan = attn.clone();
  nan[1][0][1][2][3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(acc.add(nan), Catch::Contains("attention maps contain non-finite values") &&
                                      Catch::Contains("block 1") && Catch::Contains("weights overflow?"));
  torch::Tensor inf = attn.clone();
  inf[0][1][0][0][0] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(acc.add(inf), Catch::Contains("non-finite values") && Catch::Contains("block 0"));
  CHECK_THROWS_WITH(acc.add(attn.narrow(3, 0, 4)), Catch::Contains("expected [B, H, T, T]"));
  CHECK_THROWS_WITH(acc.add(attn.narrow(0, 0, 1)), Catch::Contains("got attention maps of 1 blocks, expected 2"));
  CHECK_THROWS_WITH(acc.result(), Catch::Contains("no images were analysed"));
  acc.add(attn);  // the failed batches left nothing behind
  CHECK(max_abs_diff(acc.result().M, similarity_of(attn).M) == 0.0);
  CHECK_THROWS_WITH(acc.add(attn, features), Catch::Contains("with every batch or with none"));
  torch::Tensor bad = features.clone();
  bad[1][0][2][1] = std::numeric_limits<float>::quiet_NaN();
  for (auto dtype : {torch::kFloat, torch::kDouble}) {  // the CPU kernel and the product path
    SimilarityAccumulator fresh(2, 2, 5);
    CHECK_THROWS_WITH(fresh.add(attn, bad.to(dtype)),
                      Catch::Contains("block outputs contain non-finite values (NaN or Inf) in block 1"));
    CHECK(fresh.images() == 0);
  }
  SimilarityOptions o;
  o.tau = 2.0;
  CHECK_THROWS_WITH(SimilarityAccumulator(2, 2, 5, o),
                    Catch::Contains("analysis.tau must be a cosine in [-1, 1], got 2"));
  o = {};
  o.chunk = -1;
  CHECK_THROWS_WITH(o.validate(), Catch::Contains("analysis.chunk must be >= 0"));
}

TEST_CASE("attention rollout of identity and uniform maps") {
  const int64_t T = 5;
  torch::Tensor eye = torch::eye(T).expand({2, 3, T, T});
  CHECK(max_abs_diff(attention_rollout({eye, eye, eye}), torch::eye(T).expand({2, T, T})) < 1e-6);
  torch::Tensor uniform = torch::full({1, 2, T, T}, 1.0 / T);
  torch::Tensor r = attention_rollout({uniform, uniform});
  CHECK(max_abs_diff(r.sum(-1), torch::ones({1, T})) < 1e-6);
  // (U + I)/2 twice: the diagonal keeps 1/4 + 3/(4T).
  CHECK(r[0][0][0].item<double>() == Approx(0.25 + 0.75 / T));
}

// The rollout written from its definition, one image, the loops explicit.
torch::Tensor rollout_ref(const std::vector<torch::Tensor>& attn, const std::string& fusion, double discard) {
  const int64_t T = attn[0].size(-1);
  torch::Tensor result = torch::eye(T, torch::kDouble);
  for (const auto& a : attn) {
    torch::Tensor heads = a[0].to(torch::kDouble), m = torch::zeros({T, T}, torch::kDouble);
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j < T; ++j) {
        const torch::Tensor v = heads.select(1, i).select(1, j);
        m[i][j] = fusion == "max" ? v.max() : fusion == "min" ? v.min() : v.mean();
      }
    m.clamp_min_(0.0);
    const auto count = static_cast<int64_t>(static_cast<double>(T * T) * discard);
    const torch::Tensor order = m.flatten().argsort();
    for (int64_t k = 0; k < count; ++k)
      if (order[k].item<int64_t>() != 0) m.view(-1)[order[k]] = 0.0;
    m += torch::eye(T, torch::kDouble);
    result = (m / m.sum(1, true)).mm(result);
  }
  return result;
}

TEST_CASE("attention rollout: head fusion and discard ratio as their definition") {
  torch::manual_seed(3);
  const int64_t T = 7;
  std::vector<torch::Tensor> attn;
  for (int l = 0; l < 3; ++l) attn.push_back(torch::softmax(torch::randn({2, 4, T, T}) * 2, -1));
  for (const char* fusion : {"mean", "max", "min"})
    for (double discard : {0.0, 0.5, 0.9}) {
      INFO(fusion << ", discard " << discard);
      RolloutOptions o;
      o.head_fusion = fusion;
      o.discard_ratio = discard;
      const torch::Tensor r = attention_rollout(attn, o);
      CHECK(max_abs_diff(r[0].to(torch::kDouble), rollout_ref(attn, fusion, discard)) < 1e-5);
      CHECK(max_abs_diff(r.sum(-1), torch::ones({2, T})) < 1e-5);
    }
  // Fusing before the rollout (as the overlays do on packed maps) changes nothing.
  RolloutOptions o;
  o.head_fusion = "max";
  std::vector<torch::Tensor> fused;
  for (const auto& a : attn) fused.push_back(fuse_heads(a, "max"));
  CHECK(max_abs_diff(attention_rollout(fused, o), attention_rollout(attn, o)) < 1e-6);
  o.head_fusion = "median";
  CHECK_THROWS_WITH(attention_rollout(attn, o), Catch::Contains("head fusion must be mean, max or min, got 'median'"));
  o = {};
  o.discard_ratio = 1.0;
  CHECK_THROWS_WITH(attention_rollout(attn, o), Catch::Contains("discard ratio must be in [0, 1), got 1"));
}

TEST_CASE("forward_features returns each block's output for ViT and DeepViT") {
  for (const char* name : kFixtures) {
    INFO(name);
    Model m = fixture_model(name);
    torch::Tensor x = read_torch_tensor(fixture(std::string(name) + ".input.pt"));
    torch::NoGradGuard no_grad;
    AttentionMaps sink;
    std::vector<torch::Tensor> outputs;
    torch::Tensor features = m.vision->forward_features(x, &sink, &outputs);
    const std::vector<torch::Tensor>& maps = sink.blocks;
    const int64_t L = m.config["depth"], D = m.config["embed_dim"];
    REQUIRE(static_cast<int64_t>(outputs.size()) == L);
    REQUIRE(static_cast<int64_t>(maps.size()) == L);
    for (const auto& o : outputs) CHECK(o.sizes() == torch::IntArrayRef({x.size(0), maps[0].size(2), D}));
    // The last block's output is what the final norm sees.
    CHECK(max_abs_diff(m.vision->norm(outputs.back()), features) < 1e-6);
    CHECK(max_abs_diff(m.vision->forward_head(features), read_torch_tensor(fixture(std::string(name) + ".logits.pt"))) <
          1e-4);
    CHECK(max_abs_diff(torch::stack(maps), read_torch_tensor(fixture(std::string(name) + ".attn.pt"))) < 1e-5);
  }
}

TEST_CASE("packed maps: captured from the kernels' inference path, analysed as the row-major ones") {
  // Packing and unpacking, with T a multiple of 8 and not (the last block overlaps).
  for (int64_t T : {8, 13}) {
    torch::Tensor rows = torch::randn({2, 3, T, T});
    torch::Tensor packed = pack(rows);
    CHECK(is_packed_maps(packed));
    CHECK_FALSE(is_packed_maps(rows));
    CHECK(torch::equal(unpack_maps(packed), rows));
    CHECK(torch::equal(unpack_maps(rows), rows));
  }
  for (const char* name : kFixtures) {
    INFO(name);
    Model m = fixture_model(name);
    torch::Tensor x = read_torch_tensor(fixture(std::string(name) + ".input.pt"));
    torch::NoGradGuard no_grad;
    // Without a capture, ViT's inference takes at::scaled_dot_product_attention
    // on LibTorch 2.x, attention_inference (the maps never stored) on 1.x.
    CHECK(max_abs_diff(m.vision->forward(x), read_torch_tensor(fixture(std::string(name) + ".logits.pt"))) < 1e-4);
    AttentionMaps row_sink;
    std::vector<torch::Tensor> outputs, unpacked;
    const torch::Tensor features = m.vision->forward_features(x, &row_sink, &outputs);
    const std::vector<torch::Tensor>& rows = row_sink.blocks;
    // Keeping the maps or not computes the same: bitwise for ViT on 1.x (the
    // same arithmetic, the map in cache or in memory); DeepViT's kept maps
    // are mixed by another routine, and on 2.x ViT takes SDPA without them.
    const double same = std::string(name).rfind("deepvit", 0) == 0 || TORCH_VERSION_MAJOR >= 2 ? 1e-6 : 0.0;
    CHECK(max_abs_diff(m.vision->forward_features(x), features) <= same);
    PackedMaps packed_sink;
    CHECK(max_abs_diff(m.vision->forward_features(x, &packed_sink), features) < 1e-6);
    const std::vector<torch::Tensor> packed = packed_sink.take();
    REQUIRE(packed.size() == rows.size());
    for (size_t l = 0; l < rows.size(); ++l) {
      REQUIRE(is_packed_maps(packed[l]));
      unpacked.push_back(unpack_maps(packed[l]));
      CHECK(max_abs_diff(unpacked[l], rows[l]) < 1e-6);
    }
    const int64_t L = rows.size(), H = rows[0].size(1), T = rows[0].size(2);
    for (bool center : {false, true}) {  // centring unpacks them first
      SimilarityOptions o;
      o.center = center;
      SimilarityAccumulator from_rows(L, H, T, o), from_packed(L, H, T, o);
      from_rows.add(unpacked, outputs);
      from_packed.add(packed, outputs);
      check_same(from_packed.result(), from_rows.result(), 0.0);
    }
    SimilarityAccumulator acc(L, H, T);
    acc.add(packed);
    CHECK(max_abs_diff(acc.result().M, read_torch_tensor(fixture(std::string(name) + ".similarity.pt"))) <=
          manifest()[name]["tolerance"]["similarity_max_abs"].get<double>());
    // DeepViT's softmax maps are not the ones the kernel keeps in cache: they stay [B, H, T, T].
    PackedMaps softmax(AttentionMapSink::Map::softmax);
    m.vision->forward_features(x, &softmax);
    CHECK(softmax.take().front().dim() == (m.vision->blocks.front()->options.re_attention ? 4 : 5));
  }
}

TEST_CASE("analyze writes every output for a fixture model") {
  Model m = fixture_model("vit_timm_small");
  torch::Tensor x = read_torch_tensor(fixture("vit_timm_small.input.pt"));
  torch::Tensor images = torch::cat({x, x.flip(3), x.flip(2)});  // 6 images
  TempDir dir;
  AnalyzeOptions o;
  o.batch_size = 4;
  o.visualize = 3;
  o.mean = {0.5, 0.5, 0.5};
  o.std = {0.25, 0.25, 0.25};
  AnalyzeReport report = analyze(m, images, o, dir / "out");

  const std::vector<std::string> expected = {
      "similarity.pt", "cross_layer.csv", "cross_layer_ratio.csv", "adjacent.csv", "inter_head_mean.csv",
      "feature_similarity.csv", "cross_layer.png", "cross_layer_heads.png", "adjacent.png", "inter_head.png",
      "feature_similarity.png", "attention_image0.png", "attention_image1.png", "attention_image2.png", "summary.json",
      "row_square_norm.csv",
      // The collapse measures (analysis/measures.h): tensor, CSV and figures.
      "entropy.pt", "entropy.csv", "attention_distance.pt", "attention_distance.csv", "token_uniformity.pt",
      "token_uniformity.csv", "rank_residual.pt", "rank_residual.csv", "effective_rank.pt", "effective_rank.csv",
      "cka.pt", "cka.csv", "cka.png", "entropy.png", "attention_distance.png", "token_geometry.png",
      "effective_rank.png",
      // Each image's values, for bootstrap intervals over images.
      "per_image.safetensors"};
  CHECK(report.files.size() == expected.size());
  for (const auto& f : expected) {
    INFO(f);
    CHECK(std::find(report.files.begin(), report.files.end(), f) != report.files.end());
    REQUIRE(fs::exists(dir / "out" / f));
    if (fs::path(f).extension() == ".png") {
      cv::Mat png = decode(dir / "out" / f);
      REQUIRE(!png.empty());
      CHECK(png.channels() == 3);
      CHECK(png.cols >= 300);
      CHECK(png.rows >= 200);
      CHECK(png.cols <= 2400);
      CHECK(png.rows <= 2000);
    }
  }
  for (const auto& entry : fs::directory_iterator(dir / "out"))  // nothing staged is left behind
    CHECK(entry.path().filename().string().find(".tmp.") == std::string::npos);
  // Attention overlays: input, 4 heads, their mean and the rollout at 160 px, four to a row.
  cv::Mat overlay = decode(dir / "out" / "attention_image0.png");
  CHECK(overlay.cols >= 4 * 160);
  CHECK(overlay.rows >= 2 * 160);

  torch::Tensor M = read_torch_tensor(dir / "out" / "similarity.pt");
  CHECK(M.sizes() == torch::IntArrayRef({3, 3, 4, 17}));
  CHECK(M.scalar_type() == torch::kFloat);
  CHECK(max_abs_diff(M, report.similarity.M) == 0.0);

  const auto summary = nlohmann::json::parse(read_file(dir / "out" / "summary.json"));
  CHECK(summary["images"] == 6);
  // The measures as tensors and in summary.json, of the maps and block
  // outputs the model gives.
  {
    torch::NoGradGuard no_grad;
    AttentionMaps maps;
    std::vector<torch::Tensor> outputs;
    m.vision->forward_features(images, &maps, &outputs);
    MeasureOptions mo;
    mo.prefix_tokens = 1;
    mo.patch_size = m.config["patch_size"];
    MeasureAccumulator expect(3, 4, 17, mo);
    for (int64_t l = 0; l < 3; ++l) expect.add_maps(l, maps.blocks[l]);
    expect.add_features(outputs);
    expect.end_batch(6);
    const MeasureResult e = expect.result();
    CHECK(max_abs_diff(read_torch_tensor(dir / "out" / "entropy.pt"), e.entropy) < 1e-6);
    CHECK(max_abs_diff(read_torch_tensor(dir / "out" / "attention_distance.pt"), e.distance) < 1e-4);
    CHECK(max_abs_diff(read_torch_tensor(dir / "out" / "cka.pt"), e.cka) < 1e-6);
    CHECK(max_abs_diff(read_torch_tensor(dir / "out" / "effective_rank.pt"), e.effective_rank) < 1e-6);
    CHECK(summary["token_uniformity"].size() == 3);
    CHECK(summary["attention_entropy"][2][3].get<double>() == Approx(e.entropy[2][3].item<double>()).epsilon(1e-9));
    CHECK(summary["rank_residual"][1].get<double>() == Approx(e.residual[1].item<double>()).epsilon(1e-9));
  }
  CHECK(summary["model"] == "vit_base_patch16_224");
  CHECK(summary["class_token"] == true);
  CHECK(summary["re_attention_blocks"].empty());
  CHECK(summary["parameters"]["tau"] == 0.9);
  CHECK(summary["cross_layer"].size() == 3);
  CHECK(summary["adjacent"].size() == 2);
  CHECK(summary["inter_head"].size() == 3);
  CHECK(summary["feature_similarity"].size() == 3);
  CHECK(summary["timing"]["forward_seconds"].get<double>() > 0.0);
  CHECK(summary["timing"].contains("analysis_seconds"));
  CHECK(read_file(dir / "out" / "adjacent.csv").rfind("k,similarity,ratio\n1,", 0) == 0);

  // The fixture's own two images through the model: its similarity.pt again.
  o.limit = 2;
  o.visualize = 0;
  o.features = false;
  AnalyzeReport two = analyze(m, images, o, dir / "two");
  CHECK(two.similarity.images == 2);
  CHECK(max_abs_diff(two.similarity.M, read_torch_tensor(fixture("vit_timm_small.similarity.pt"))) <= 1e-5);
  CHECK(!fs::exists(dir / "two" / "feature_similarity.csv"));
  CHECK(!fs::exists(dir / "two" / "attention_image0.png"));
}

TEST_CASE("analyze: a DeepViT, a model without class token, and clear errors") {
  TempDir dir;
  {
    Model m = fixture_model("deepvit_official_S_style");
    torch::Tensor x = read_torch_tensor(fixture("deepvit_official_S_style.input.pt"));
    AnalyzeOptions o;
    o.visualize = 1;
    AnalyzeReport r = analyze(m, x, o, dir / "deepvit");
    CHECK(r.summary["re_attention_blocks"] == nlohmann::json({3, 4}));
    CHECK(r.summary["parameters"]["maps"] == "applied");
    CHECK(max_abs_diff(r.similarity.M, read_torch_tensor(fixture("deepvit_official_S_style.similarity.pt"))) <= 1e-5);

    // The softmax maps before re-attention: row-stochastic, the same output,
    // and the applied maps in the blocks without re-attention (0-2).
    AttentionMaps softmax_sink(AttentionMapSink::Map::softmax), applied_sink;
    torch::Tensor with_softmax, with_applied;
    {
      torch::NoGradGuard no_grad;
      with_applied = m.vision->forward_features(x, &applied_sink);
      with_softmax = m.vision->forward_features(x, &softmax_sink);
    }
    const std::vector<torch::Tensor>&softmax_maps = softmax_sink.blocks, &applied_maps = applied_sink.blocks;
    // (Not bit for bit: without the applied maps asked for, re-attention
    // mixes and applies them in one kernel, which rounds differently.)
    CHECK(max_abs_diff(with_softmax, with_applied) < 1e-5 * with_applied.abs().max().item<double>());
    for (int l = 0; l < 5; ++l) {
      INFO("block " << l);
      CHECK(max_abs_diff(softmax_maps[l].sum(-1), torch::ones_like(softmax_maps[l].sum(-1))) < 1e-5);
      CHECK(softmax_maps[l].min().item<float>() >= 0.0f);
      CHECK((max_abs_diff(softmax_maps[l], applied_maps[l]) == 0.0) == (l < 3));
    }
    o.maps = "softmax";
    AnalyzeReport s = analyze(m, x, o, dir / "deepvit_softmax");
    CHECK(s.summary["parameters"]["maps"] == "softmax");
    // The attention measures take the softmax maps whichever maps are analysed.
    CHECK(max_abs_diff(s.measures.entropy, r.measures.entropy) < 1e-9);
    CHECK(max_abs_diff(s.measures.distance, r.measures.distance) < 1e-9);
    CHECK(max_abs_diff(s.similarity.M, similarity_of(torch::stack(softmax_maps)).M) <= 1e-6);
    CHECK(max_abs_diff(s.similarity.M.narrow(0, 0, 3).narrow(1, 0, 3),
                       r.similarity.M.narrow(0, 0, 3).narrow(1, 0, 3)) <= 1e-6);
    CHECK(max_abs_diff(s.similarity.M[3][4], r.similarity.M[3][4]) > 0.01);
    o.maps = "post";
    CHECK_THROWS_WITH(analyze(m, x, o, dir / "bad"),
                      Catch::Contains("analysis maps must be 'applied'") && Catch::Contains("got 'post'"));
  }
  {
    Model m = create_model("vit_tiny_patch16_224", YAML::Load("{img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, "
                                                              "num_heads: 2, class_token: false, global_pool: avg}"));
    torch::manual_seed(0);
    AnalyzeOptions o;
    o.visualize = 1;
    AnalyzeReport r = analyze(m, torch::randn({3, 3, 32, 32}), o, dir / "avg");
    CHECK(r.summary["class_token"] == false);
    CHECK(r.similarity.M.sizes() == torch::IntArrayRef({2, 2, 2, 16}));
    CHECK(fs::exists(dir / "avg" / "attention_image0.png"));
  }
  Model m = fixture_model("vit_timm_small");
  AnalyzeOptions o;
  CHECK_THROWS_WITH(analyze(m, torch::zeros({2, 3, 16, 16}), o, dir / "bad"),
                    Catch::Contains("the model expects [N, 3, 32, 32]"));
  CHECK_THROWS_WITH(analyze(m, torch::zeros({0, 3, 32, 32}), o, dir / "bad"), Catch::Contains("no images"));
  torch::Tensor nan = torch::full({1, 3, 32, 32}, std::numeric_limits<float>::quiet_NaN());
  m.module->train();  // analyze runs in eval mode and gives the caller's mode back, also after an error
  CHECK_THROWS_WITH(analyze(m, nan, o, dir / "bad"), Catch::Contains("non-finite"));
  CHECK(m.module->is_training());
  CHECK(!fs::exists(dir / "bad"));
  o.batch_size = 0;
  CHECK_THROWS_WITH(analyze(m, torch::zeros({1, 3, 32, 32}), o, dir / "bad"),
                    Catch::Contains("batch size must be >= 1"));
}

TEST_CASE("analyze --maps-file: another tool's maps give the numbers of analysing the model") {
  Model m = fixture_model("vit_timm_small");
  const torch::Tensor x = read_torch_tensor(fixture("vit_timm_small.input.pt"));
  const torch::Tensor images = torch::cat({x, x.flip(3), x.flip(2)});  // 6 images
  TempDir dir;
  AnalyzeOptions o;
  o.batch_size = 6;
  o.visualize = 0;
  const AnalyzeReport direct = analyze(m, images, o, dir / "direct");
  // The maps and block outputs as a PyTorch user would dump them, in two
  // files of 4 and 2 images (.pt and .safetensors).
  MapsFiles files;
  {
    torch::NoGradGuard no_grad;
    AttentionMaps maps;
    std::vector<torch::Tensor> outputs;
    m.vision->eval();
    m.vision->forward_features(images, &maps, &outputs);
    const torch::Tensor all_maps = torch::stack(maps.blocks), all_outputs = torch::stack(outputs);
    write_file_atomic(dir / "maps0.pt", serialize_torch(all_maps.narrow(1, 0, 4)));
    write_file_atomic(dir / "features0.pt", serialize_torch(all_outputs.narrow(1, 0, 4)));
    write_weights(dir / "maps1.safetensors", {{"maps", all_maps.narrow(1, 4, 2).contiguous()}});
    write_weights(dir / "features1.safetensors", {{"features", all_outputs.narrow(1, 4, 2).contiguous()}});
  }
  files.maps = {dir / "maps0.pt", dir / "maps1.safetensors"};
  files.features = {dir / "features0.pt", dir / "features1.safetensors"};
  files.prefix_tokens = 1;
  files.patch_size = m.config["patch_size"];
  const AnalyzeReport saved = analyze_maps(files, o, dir / "saved");
  check_same(saved.similarity, direct.similarity, 1e-5);
  CHECK(max_abs_diff(saved.measures.entropy, direct.measures.entropy) < 1e-6);
  CHECK(max_abs_diff(saved.measures.distance, direct.measures.distance) < 1e-4);
  CHECK(max_abs_diff(saved.measures.cka, direct.measures.cka) < 1e-6);
  CHECK(max_abs_diff(saved.measures.effective_rank, direct.measures.effective_rank) < 1e-5);
  for (const char* f : {"similarity.pt", "cka.pt", "entropy.pt", "cross_layer.png", "cka.png", "summary.json"})
    CHECK(fs::exists(dir / "saved" / f));
  const auto summary = nlohmann::json::parse(read_file(dir / "saved" / "summary.json"));
  CHECK(summary["source"]["prefix_tokens"] == 1);

  // Without block outputs: the measures of the maps only.
  files.features.clear();
  const AnalyzeReport maps_only = analyze_maps(files, o, dir / "maps_only");
  CHECK(maps_only.measures.entropy.defined());
  CHECK_FALSE(maps_only.measures.cka.defined());

  // The command line takes the same files.
  const RunResult cli = run_cli("analyze --maps-file " + (dir / "maps0.pt").string() + " --maps-file " +
                                (dir / "maps1.safetensors").string() + " --prefix-tokens 1 --patch-size 8 --out " +
                                (dir / "cli").string());
  INFO(cli.output);
  CHECK(cli.status == 0);
  CHECK_THAT(cli.output, Catch::Contains("analysed 6 images: 3 blocks, 4 heads, 17 tokens"));

  // Clear errors naming the file and what was expected.
  write_file_atomic(dir / "flat.pt", serialize_torch(torch::rand({3, 6, 4, 17})));
  write_file_atomic(dir / "nan.pt", serialize_torch(torch::full({3, 2, 4, 17, 17}, NAN)));
  files.maps = {dir / "flat.pt"};
  CHECK_THROWS_WITH(analyze_maps(files, o, dir / "bad"),
                    Catch::Contains("flat.pt: attention maps must be floating-point [L, B, H, T, T]"));
  files.maps = {dir / "nan.pt"};
  CHECK_THROWS_WITH(analyze_maps(files, o, dir / "bad"), Catch::Contains("nan.pt: attention maps contain non-finite"));
  files.maps = {dir / "maps0.pt"};
  files.prefix_tokens = 0;
  CHECK_THROWS_WITH(
      analyze_maps(files, o, dir / "bad"),
      Catch::Contains("maps0.pt: 17 tokens with --prefix-tokens 0 leave 17 patch tokens, not a square grid"));
  files.prefix_tokens = 1;
  files.features = {dir / "maps0.pt"};
  CHECK_THROWS_WITH(analyze_maps(files, o, dir / "bad"), Catch::Contains("maps0.pt: block outputs must be"));
  CHECK_FALSE(fs::exists(dir / "bad"));
}

TEST_CASE("figures: heatmaps, grids, line plots and overlays decode at sensible sizes") {
  auto size_of = [](const std::string& png) {
    cv::Mat m =
        cv::imdecode(cv::Mat(1, static_cast<int>(png.size()), CV_8U, const_cast<char*>(png.data())), cv::IMREAD_COLOR);
    REQUIRE(!m.empty());
    return m.size();
  };
  HeatmapOptions h;
  h.title = "a title";
  h.x_label = "block q";
  h.y_label = "block p";
  h.cell = 40;
  const cv::Size small = size_of(heatmap_png(torch::rand({3, 3}), h));
  const cv::Size big = size_of(heatmap_png(torch::rand({10, 10}), h));
  CHECK(big.width - small.width >= 7 * 40 - 8);  // the colour bar's labels may differ in width
  CHECK(big.height - small.height == 7 * 40);
  h.row_labels = {"a", "b"};
  CHECK_THROWS_WITH(heatmap_png(torch::rand({3, 3}), h), Catch::Contains("2 tick labels for 3 rows"));
  CHECK_THROWS_WITH(heatmap_png(torch::rand({3}), {}), Catch::Contains("expected a non-empty matrix [R, C]"));
  // NaN cells and a flat matrix draw.
  CHECK(size_of(heatmap_png(torch::full({2, 2}, std::nan("")), {})).width > 0);
  CHECK(size_of(heatmap_png(torch::ones({2, 2}), {})).width > 0);

  HeatmapGridOptions g;
  g.panel_titles = {"one", "two", "three"};
  g.columns = 3;
  CHECK(size_of(heatmap_grid_png(torch::rand({3, 4, 4}), g)).width >= 3 * 180);

  LinePlotOptions p;
  p.title = "curve";
  p.threshold = 0.9;
  p.threshold_label = "threshold";
  CHECK(size_of(line_plot_png({{"a", {1, 2, 3}, {0.5, 0.7, 0.95}}, {"b", {1, 2}, {0.1, 0.2}}}, p)) ==
        cv::Size(p.width, p.height));
  CHECK_THROWS_WITH(line_plot_png({{"a", {1, 2}, {1}}}, p), Catch::Contains("2 x values and 1 y values"));
  // A diverged run's curves: one point at 2.4e27 (ticks must still advance), one series all NaN.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK(size_of(line_plot_png({{"lr", {1}, {2.4e27}}, {"loss", {1}, {nan}}}, LinePlotOptions{})).height > 0);
  CHECK(size_of(line_plot_png({{"y", {1, 2}, {1e27, 1e27 + 1e12}}}, LinePlotOptions{})).height > 0);
  // Error bars: drawn with caps, inside the axes (the range makes room for them); one per value or none.
  LineSeries with_err{"mean", {1, 2, 4}, {0.5, 0.6, 0.7}};
  with_err.err = {0.05, 0.0, 0.2};
  LinePlotOptions bars;
  bars.width = 400;
  bars.height = 300;
  bars.ymin = 0.0;  // the same axes with bars and without: only the bars differ
  bars.ymax = 1.0;
  const cv::Mat plain = line_plot_image({{"mean", {1, 2, 4}, {0.5, 0.6, 0.7}}}, bars);
  const cv::Mat barred = line_plot_image({with_err}, bars);
  CHECK(barred.size() == plain.size());
  CHECK(cv::norm(barred, plain, cv::NORM_L1) > 0);
  with_err.err = {0.0, 0.0, 0.0};
  CHECK(cv::norm(line_plot_image({with_err}, bars), plain, cv::NORM_L1) == 0);
  with_err.err = {0.1};
  CHECK_THROWS_WITH(line_plot_png({with_err}, bars), Catch::Contains("1 error bars for 3 y values"));

  OverlayOptions ov;
  ov.title = "head 0";
  CHECK(size_of(overlay_png(torch::rand({3, 32, 32}), torch::rand({4, 4}), ov)).width >= 160);
  CHECK(size_of(overlay_png(torch::rand({1, 28, 28}), {}, ov)).height >= 160);
}

// Not part of the suite (hidden tag): writes figures to look at, e.g.
//   VITLAB_PREVIEW_DIR=runs/analysis-preview build/bin/vitlab_tests "analysis figures preview"
TEST_CASE("analysis figures preview", "[.]") {
  const char* dir = std::getenv("VITLAB_PREVIEW_DIR");
  if (!dir) return;
  const fs::path out(dir);
  {
    Model m = fixture_model("vit_timm_small");
    torch::Tensor x = read_torch_tensor(fixture("vit_timm_small.input.pt"));
    AnalyzeOptions o;
    o.visualize = 1;
    analyze(m, torch::cat({x, x.flip(3)}), o, out / "vit_timm_small");
  }
  {
    Model m = fixture_model("deepvit_official_S_style");
    torch::Tensor x = read_torch_tensor(fixture("deepvit_official_S_style.input.pt"));
    AnalyzeOptions o;
    o.visualize = 1;
    analyze(m, x, o, out / "deepvit_official_S_style");
  }
  {
    // A deeper random model at a realistic figure size: 12 blocks, 6 heads, 8x8 patches.
    torch::manual_seed(0);
    Model m =
        create_model("deepvit_patch16_224_re_attn_16b",
                     YAML::Load("{img_size: 32, patch_size: 4, depth: 12, embed_dim: 48, num_heads: 6, in_chans: 1, "
                                "apply_transform: 'last:4'}"));
    AnalyzeOptions o;
    o.visualize = 1;
    o.mean = {0.5};
    o.std = {0.5};
    analyze(m, torch::rand({4, 1, 32, 32}).sub(0.5).div(0.5), o, out / "random_deepvit_12");
  }
  {
    // The paper's depth and head count (tiny otherwise): tick labels thin out.
    torch::manual_seed(0);
    Model m = create_model("vit_patch16_224_32b", YAML::Load("{img_size: 32, patch_size: 8, embed_dim: 48}"));
    AnalyzeOptions o;
    o.visualize = 1;
    analyze(m, torch::randn({2, 3, 32, 32}), o, out / "random_vit_32");
  }
  {
    EvalResult r;
    r.images = 1000;
    r.confusion = torch::randint(0, 5, {10, 10}, torch::kLong) + torch::eye(10, torch::kLong) * 80;
    for (int c = 0; c < 10; ++c) r.per_class.push_back(80.0);
    const std::vector<std::string> classes = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                              "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
    write_eval_outputs(r, classes, out / "confusion", "vit on fashion_mnist (1000 images): top-1 80.00%");
  }
}

// Not part of the suite (hidden tag): the CPU similarity kernel alone, on
// softmax maps of the 32-block, 12-head, T = 197 shape, the fastest of
// VITLAB_BENCH_REPS batches of 4 images (the minimum resists a shared
// machine's noise):
//   VITLAB_BENCH_REPS=8 OMP_NUM_THREADS=1 build/bin/vitlab_tests "similarity kernel benchmark"
TEST_CASE("similarity kernel benchmark", "[.]") {
  const char* reps_env = std::getenv("VITLAB_BENCH_REPS");
  if (!reps_env) return;
  const int64_t L = 32, B = 4, H = 12, T = 197, reps = std::stoll(reps_env);
  const torch::Tensor attn = random_maps(L, B, H, T, 1).first;
  const std::vector<torch::Tensor> packed = pack(attn).unbind(0);
  for (bool is_packed : {false, true}) {  // [B, H, T, T] maps, and packed as analyze captures them
    SimilarityAccumulator acc(L, H, T);
    double best = std::numeric_limits<double>::infinity();
    for (int64_t r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      is_packed ? acc.add(packed) : acc.add(attn);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("similarity kernel, %s maps, %lld images, %d threads: %.2f ms per image (fastest batch)\n",
                is_packed ? "packed" : "row-major", static_cast<long long>(B), torch::get_num_threads(),
                1e3 * best / B);
  }
}
