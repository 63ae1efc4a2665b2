#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <set>
#include <thread>

#include "common/runtime.h"
#include "io/torch_file.h"
#include "kernels/attention.h"
#include "kernels/head_mixing.h"
#include "models/registry.h"
#include "tests/helpers.h"

using namespace vitlab;
using vitlab::test::fixture;
using vitlab::test::max_abs_diff;

namespace {

YAML::Node yaml(const char* text) { return YAML::Load(text); }

// A small DeepViT with every feature on: CNN stem, re-attention in some
// blocks, transform_scale, scale_adjustment.
Model small_deepvit(const YAML::Node& extra = YAML::Node(YAML::NodeType::Map)) {
  YAML::Node o = yaml(
      "{img_size: 32, patch_size: 8, embed_dim: 48, depth: 3, num_heads: 4, num_classes: 5, "
      "apply_transform: [false, true, true]}");
  merge_into(o, extra);
  return create_model("deepvit_S", o);
}

// Two threads stand for two processes; the sum across them meets at a
// rendezvous, as the all-reduce of a process group does.
struct Rendezvous {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<torch::Tensor> slots;
  torch::Tensor total;
  int64_t generation = 0;
  void sum(std::vector<torch::Tensor>& t) {
    std::unique_lock<std::mutex> lock(mutex);
    const int64_t gen = generation;
    slots.push_back(t[0].clone());
    if (slots.size() == 2) {
      total = slots[0] + slots[1];
      slots.clear();
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
    t[0].copy_(total);
  }
};

// Runs step(rank) for ranks 0 and 1 on two threads whose BatchNorm
// statistics are summed across them.
void on_two_ranks(const std::function<void(int)>& step) {
  Rendezvous rendezvous;
  vitlab::set_batch_norm_sync([&](std::vector<torch::Tensor>& t) { rendezvous.sum(t); });
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) threads.emplace_back(step, r);
  for (auto& t : threads) t.join();
  vitlab::set_batch_norm_sync({});
}

}  // namespace

TEST_CASE("every preset has exactly the reference parameter count") {
  const std::map<std::string, int64_t> expected = {
      {"vit_tiny_patch16_224", 5717416},
      {"vit_small_patch16_224", 22050664},
      {"vit_base_patch16_224", 86567656},
      {"vit_large_patch16_224", 304326632},
      {"vit_huge_patch14_224", 632045800},
      {"vit_patch16_224_16b", 24423784},
      {"vit_patch16_224_24b", 36257128},
      {"vit_patch16_224_32b", 48090472},
      {"deepvit_patch16_224_re_attn_16b", 24426664},
      {"deepvit_patch16_224_re_attn_24b", 36261448},
      {"deepvit_patch16_224_re_attn_32b", 48096232},
      {"deepvit_S", 27312632},
      {"deepvit_L", 58883708},
      {"cait_xxs24_224", 11956264},
      {"cait_xxs36_224", 17299720},
      {"cait_s24_224", 46916200},
      {"cait_xs24_384", 26670088},
      {"cait_s36_384", 68366632},
      {"cait_m36_384", 271221352},
  };
  REQUIRE(presets().size() == expected.size() + 1);  // + transformer_base
  for (const auto& [name, count] : expected) {
    INFO(name);
    CHECK(spec_parameters(resolve_model(name)) == count);
    // Building (and initialising) ViT-L and ViT-H took most of this test's time, 23 s here and 38 s under ASan;
    // their modules (and CaiT-M's) are those of the other presets at another size, and the shape-only count
    // stands in.
    if (count < 100'000'000) CHECK(count_parameters(*create_model(name).module) == count);
  }
}

TEST_CASE("the shape-only parameter count matches the built model for variants") {
  const std::vector<std::pair<std::string, std::string>> variants = {
      {"vit_tiny_patch16_224", "{global_pool: avg, class_token: false, num_classes: 0}"},
      {"vit_tiny_patch16_224", "{qkv_bias: false, in_chans: 1, img_size: 32, patch_size: 4, mlp_ratio: 2.5}"},
      {"deepvit_S", "{img_size: 64, patch_size: 8, depth: 4, apply_transform: 'first:2', num_classes: 7}"},
      {"deepvit_patch16_224_re_attn_16b", "{depth: 2, use_cnn_embed: true, in_chans: 1}"},
      {"vit_tiny_patch16_224", "{init_values: 1.0e-5, depth: 3}"},
      {"vit_tiny_patch16_224", "{skip: false, mlp: false, depth: 3}"},
      {"vit_tiny_patch16_224", "{mlp: false, init_values: 0.1, depth: 2}"},
      {"deepvit_S", "{depth: 3, apply_transform: 'last:2', init_values: 1.0e-6}"},
      {"cait_xxs24_224", "{img_size: 64, depth: 2, depth_token_only: 3, mlp_ratio_token_only: 2, qkv_bias: false}"},
      {"cait_xxs24_224", "{depth: 1, num_classes: 0, in_chans: 1}"},
      {"transformer_base", "{}"},
      {"transformer_base",
       "{d_model: 64, nhead: 4, num_encoder_layers: 1, num_decoder_layers: 3, tie_weights: false, "
       "src_vocab_size: 11, tgt_vocab_size: 13}"},
  };
  for (const auto& [name, sets] : variants) {
    INFO(name << " " << sets);
    CHECK(spec_parameters(resolve_model(name, yaml(sets.c_str()))) ==
          count_parameters(*create_model(name, yaml(sets.c_str())).module));
  }
}

TEST_CASE("LayerScale in ViT and DeepViT: timm's ls1.gamma and ls2.gamma, initialised to init_values") {
  // timm: vit_small_patch16_224(init_values=1e-5) has 22,059,880 parameters, 2 x 384 more per block.
  const ModelSpec spec = resolve_model("vit_small_patch16_224", yaml("{init_values: 1.0e-5}"));
  CHECK(spec_parameters(spec) == 22059880);
  Model m = build_model(spec);
  CHECK(count_parameters(*m.module) == 22059880);
  CHECK(spec.config["init_values"].get<double>() == 1e-5);
  CHECK(resolve_model("vit_small_patch16_224").config["init_values"].is_null());  // off by default, as timm's None
  CHECK(resolve_model("vit_small_patch16_224", yaml("{init_values: null}")).config["init_values"].is_null());
  StateDict s = module_state(*m.module);
  for (const char* key : {"blocks.0.ls1.gamma", "blocks.11.ls2.gamma"}) {
    INFO(key);
    REQUIRE(s.count(key));
    CHECK(torch::equal(s.at(key), torch::full({384}, 1e-5)));
  }
  CHECK(s.size() == 4 + 2 + 12 * 14 + 2);
  StateDict d = module_state(*small_deepvit(yaml("{init_values: 0.5}")).module);
  CHECK(d.count("blocks.2.ls1.gamma"));
  CHECK(d.count("blocks.2.ls2.gamma"));
  // A block's branch is multiplied by gamma: a zero gamma makes the block the identity.
  torch::manual_seed(11);
  Model one = create_model("vit_tiny_patch16_224", yaml("{img_size: 32, patch_size: 8, depth: 1, init_values: 1}"));
  one.module->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor tokens = torch::randn({2, 17, 192});
  Block& block = one.vision->blocks[0];
  const torch::Tensor plain = block(tokens);
  block->gamma_1.fill_(0.0);
  block->gamma_2.fill_(0.0);
  CHECK(torch::equal(block(tokens), tokens));
  block->gamma_1.fill_(2.0);
  block->gamma_2.fill_(2.0);
  CHECK_FALSE(torch::allclose(block(tokens), plain));
}

TEST_CASE("state_dict keys are the reference implementations' names") {
  StateDict vit = module_state(*create_model("vit_tiny_patch16_224").module);
  for (const char* key : {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.weight",
                          "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                          "blocks.0.norm1.weight", "blocks.0.norm2.bias", "norm.weight", "head.weight"})
    CHECK(vit.count(key));
  CHECK(vit.size() == 4 + 2 + 12 * 12 + 2);
  StateDict avg = module_state(*create_model("vit_tiny_patch16_224", yaml("{global_pool: avg}")).module);
  CHECK(avg.count("fc_norm.weight"));
  CHECK_FALSE(avg.count("norm.weight"));
  StateDict dvit = module_state(*small_deepvit().module);
  for (const char* key : {"patch_embed.conv1.weight", "patch_embed.bn1.running_var", "patch_embed.conv2.weight",
                          "patch_embed.bn2.num_batches_tracked", "patch_embed.proj.weight",
                          "blocks.1.attn.reatten_matrix.weight", "blocks.2.attn.var_norm.running_mean"})
    CHECK(dvit.count(key));
  CHECK_FALSE(dvit.count("blocks.0.attn.reatten_matrix.weight"));
  CHECK(dvit.at("blocks.1.attn.reatten_matrix.weight").sizes() == torch::IntArrayRef({4, 4, 1, 1}));
}

TEST_CASE("model keys: the new ones are checked, and a misspelt one is named with its closest key") {
  const std::vector<std::pair<std::string, std::string>> misspelt = {
      {"{init_value: 1.0e-5}", "did you mean 'model.init_values'"},
      {"{skp: false}", "did you mean 'model.skip'"},
      {"{mpl: false}", "did you mean 'model.mlp'"},
  };
  for (const auto& [sets, expected] : misspelt) {
    INFO(sets);
    CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", yaml(sets.c_str())),
                      Catch::Contains("unknown key 'model.") && Catch::Contains(expected));
    CHECK_THROWS_WITH(resolve_model("deepvit_S", yaml(sets.c_str())), Catch::Contains(expected));
  }
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", yaml("{init_values: 0}")),
                    Catch::Contains("model.init_values must be a finite nonzero number"));
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", yaml("{init_values: small}")),
                    Catch::Contains("model.init_values: expected a number, null (no LayerScale) or cait (CaiT's depth "
                                    "rule), got 'small'"));
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", yaml("{skip: maybe}")),
                    Catch::Contains("model.skip: expected true or false"));
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", yaml("{skip: false, drop_path_rate: 0.1}")),
                    Catch::Contains("model.drop_path_rate must be 0 with model.skip: false"));
}

TEST_CASE("positive control: pure attention (skip: false, mlp: false) collapses the tokens to rank one") {
  // Dong et al. 2021: without skips and MLPs, self-attention drives the
  // token matrix X to 1 x̄ᵀ doubly exponentially in depth. At initialisation
  // 12 such blocks leave a rank-collapse residual ‖X - 1 x̄ᵀ‖_F / ‖X‖_F under
  // a tenth of a ViT's of the same depth.
  const auto residuals = [](const std::string& sets) {  // per block, mean over images
    torch::manual_seed(12);
    Model m = create_model("vit_tiny_patch16_224", yaml(sets.c_str()));
    m.module->eval();
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> outputs;
    m.vision->forward_features(torch::randn({4, 3, 32, 32}), nullptr, &outputs);
    std::vector<double> r;
    for (const auto& output : outputs) {
      const torch::Tensor x = output.to(torch::kDouble);  // [B, T, D]
      r.push_back(((x - x.mean(1, true)).norm(2, {1, 2}) / x.norm(2, {1, 2})).mean().item<double>());
    }
    return r;
  };
  const std::string common = "{img_size: 32, patch_size: 4, embed_dim: 32, num_heads: 2, depth: 12, num_classes: 10";
  const std::vector<double> vit = residuals(common + "}"), pure = residuals(common + ", skip: false, mlp: false}");
  INFO("ViT " << fmt::format("{}", fmt::join(vit, ", ")) << "; pure attention "
              << fmt::format("{}", fmt::join(pure, ", ")));
  REQUIRE(pure.size() == 12);
  CHECK(vit.back() > 0.1);
  CHECK(pure.front() > pure.back());  // collapsing block by block, not at once by construction
  CHECK(pure.back() < vit.back() / 10);
  StateDict keys = module_state(*create_model("vit_tiny_patch16_224", yaml("{depth: 1, mlp: false}")).module);
  CHECK(keys.count("blocks.0.norm1.weight"));
  CHECK_FALSE(keys.count("blocks.0.norm2.weight"));
  CHECK_FALSE(keys.count("blocks.0.mlp.fc1.weight"));
}

TEST_CASE("timm initialisation") {
  torch::manual_seed(0);
  Model m = create_model("vit_small_patch16_224");
  StateDict s = module_state(*m.module);
  const double std_qkv = s.at("blocks.0.attn.qkv.weight").std().item<double>();
  CHECK(std_qkv == Approx(0.02).epsilon(0.02));
  CHECK(s.at("blocks.0.attn.qkv.bias").abs().max().item<double>() == 0.0);
  CHECK(s.at("pos_embed").std().item<double>() == Approx(0.02).epsilon(0.05));
  CHECK(s.at("cls_token").abs().max().item<double>() < 1e-5);  // normal(std 1e-6)
  CHECK(s.at("blocks.0.attn.qkv.weight").abs().max().item<double>() <= 2.0);
}

TEST_CASE("gradient reaches every parameter, Θ and BatchNorm included") {
  torch::manual_seed(1);
  for (Model m : {small_deepvit(), create_model("vit_tiny_patch16_224", yaml("{img_size: 32, patch_size: 8, depth: 2, "
                                                                             "global_pool: avg, num_classes: 3}"))}) {
    INFO(m.name);
    m.module->train();
    torch::Tensor x = torch::randn({4, 3, 32, 32});
    m.vision->forward(x).pow(2).sum().backward();
    for (const auto& p : m.module->named_parameters()) {
      INFO(p.key());
      REQUIRE(p.value().grad().defined());
      // BatchNorm removes any per-head offset before it, so the gradient
      // of Θ's bias is zero in exact arithmetic (rounding noise unfused).
      if (p.key().find("reatten_matrix.bias") != std::string::npos) continue;
      CHECK(p.value().grad().abs().sum().item<double>() > 0.0);
    }
  }
}

TEST_CASE("re-attention in evaluation, folded into one mixing, equals Θ then BatchNorm then the scale") {
  torch::manual_seed(4);
  AttentionOptions o;
  o.dim = 48;
  o.num_heads = 6;
  const double reatten_scale = 0.7;
  ReAttention attention(o, reatten_scale);
  {
    torch::NoGradGuard no_grad;  // statistics and affine parameters far from their initial 0/1
    attention->var_norm->running_mean.uniform_(-0.05, 0.05);
    attention->var_norm->running_var.uniform_(1e-3, 2e-2);
    attention->var_norm->weight.uniform_(0.5, 1.5);
    attention->var_norm->bias.uniform_(-0.2, 0.2);
  }
  attention->eval();
  torch::Tensor a = torch::softmax(3 * torch::randn({3, 6, 11, 11}), -1);
  torch::Tensor reference = attention->var_norm(attention->reatten_matrix(a)) * reatten_scale;
  torch::Tensor folded = attention->re_attend(a);
  CHECK(folded.sizes() == reference.sizes());
  CHECK(max_abs_diff(folded, reference) < 1e-5 * reference.abs().max().item<double>());
  // Applied to v: without gradients, the maps are never stored; with
  // them, autograd goes through the stored maps.
  const torch::Tensor v = torch::randn({3, 6, 11, 8}), expected = reference.matmul(v);
  {
    torch::NoGradGuard no_grad;
    CHECK(max_abs_diff(attention->re_attend(a, v), expected) < 1e-5 * expected.abs().max().item<double>());
  }
  torch::Tensor vg = v.clone().requires_grad_();
  torch::Tensor applied = attention->re_attend(a, vg);
  CHECK(max_abs_diff(applied, expected) < 1e-5 * expected.abs().max().item<double>());
  applied.sum().backward();  // d/dv of Σ y v: each row m of v gets the column sum of y
  CHECK(max_abs_diff(vg.grad(), reference.sum(2).unsqueeze(-1).expand_as(v)) < 1e-4);
  attention->train();  // training keeps the batch statistics: not folded
  CHECK(max_abs_diff(attention->re_attend(a), reference) > 1e-2);
}

TEST_CASE("attention capture: one map per block, rows sum to one for ViT, same logits with and without") {
  torch::manual_seed(2);
  Model m = create_model("vit_tiny_patch16_224", yaml("{img_size: 32, patch_size: 8, depth: 3, num_classes: 10}"));
  m.module->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor x = torch::randn({2, 3, 32, 32});
  auto [logits, attn] = m.vision->forward_with_attention(x);
  CHECK(attn.sizes() == torch::IntArrayRef({3, 2, 3, 17, 17}));
  CHECK(torch::allclose(attn.sum(-1), torch::ones({3, 2, 3, 17}), 1e-5, 1e-5));
  CHECK(torch::allclose(logits, m.vision->forward(x), 1e-5, 1e-5));

  Model d = small_deepvit();
  d.module->eval();
  auto [dl, dattn] = d.vision->forward_with_attention(x);
  CHECK(dattn.sizes() == torch::IntArrayRef({3, 2, 4, 17, 17}));
  CHECK(torch::allclose(dattn[0].sum(-1), torch::ones({2, 4, 17}), 1e-5, 1e-5));        // plain block
  CHECK_FALSE(torch::allclose(dattn[1].sum(-1), torch::ones({2, 4, 17}), 1e-3, 1e-3));  // re-attention mixes heads
  CHECK(torch::allclose(dl, d.vision->forward(x), 1e-5, 1e-5));
}

TEST_CASE("bad inputs to a model are clear errors") {
  Model m = small_deepvit();
  m.module->eval();
  CHECK_THROWS_WITH(m.vision->forward(torch::randn({3, 32, 32})),
                    Catch::Contains("expected an image batch [B, C, H, W]"));
  CHECK_THROWS_WITH(m.vision->forward(torch::randn({1, 1, 32, 32})),
                    Catch::Contains("input has 1 channels, the model expects 3"));
  CHECK_THROWS_WITH(m.vision->forward(torch::randn({1, 3, 48, 48})), Catch::Contains("the model expects 32x32"));
}

TEST_CASE("pos_embed is resampled like timm when loading at another image size") {
  StateDict source = read_weights(fixture("vit_timm_small.safetensors"));
  for (int64_t grid : {6, 2}) {
    INFO("grid " << grid);
    Model m =
        create_model("vit_tiny_patch16_224", YAML::Load(fmt::format("{{img_size: {}, patch_size: 8, embed_dim: 64, "
                                                                    "depth: 3, num_heads: 4, num_classes: 10}}",
                                                                    grid * 8)));
    vitlab::load_weights(m, fixture("vit_timm_small.safetensors"));
    torch::Tensor expected = read_torch_tensor(fixture(fmt::format("vit_timm_small.pos_embed_grid{}.pt", grid)));
    CHECK(vitlab::test::max_abs_diff(m.vision->pos_embed, expected) < 1e-5);
    CHECK(
        torch::equal(m.vision->pos_embed.select(1, 0), source.at("pos_embed").select(1, 0)));  // class token untouched
    m.module->eval();
    torch::NoGradGuard no_grad;
    CHECK(m.vision->forward(torch::randn({1, 3, grid * 8, grid * 8})).sizes() == torch::IntArrayRef({1, 10}));
  }
}

TEST_CASE("BatchNorm2d matches torch.nn.BatchNorm2d, and its synchronised form matches it within one process") {
  torch::manual_seed(3);
  vitlab::BatchNorm2d ours(5);
  torch::nn::BatchNorm2d ref(5);
  {
    torch::NoGradGuard no_grad;
    ours->weight.uniform_(0.5, 1.5);
    ours->bias.uniform_(-0.5, 0.5);
    ref->weight.copy_(ours->weight);
    ref->bias.copy_(ours->bias);
  }
  std::vector<std::string> ours_names, ref_names;
  for (const auto& item : ours->named_parameters()) ours_names.push_back(item.key());
  for (const auto& item : ours->named_buffers()) ours_names.push_back(item.key());
  for (const auto& item : ref->named_parameters()) ref_names.push_back(item.key());
  for (const auto& item : ref->named_buffers()) ref_names.push_back(item.key());
  CHECK(ours_names == ref_names);  // the state dict keys torch.nn.BatchNorm2d has

  const torch::Tensor x = torch::randn({4, 5, 3, 6}) * 2 + 1, dy = torch::randn({4, 5, 3, 6});
  for (const bool sync : {false, true}) {
    INFO((sync ? "synchronised (sum across one process: the identity)" : "per process"));
    if (sync) vitlab::set_batch_norm_sync([](std::vector<torch::Tensor>&) {});
    for (int step = 0; step < 2; ++step) {
      torch::Tensor xa = x.clone().requires_grad_(), xb = x.clone().requires_grad_();
      torch::Tensor ya = ours(xa), yb = ref(xb);
      CHECK(max_abs_diff(ya, yb) < 1e-5);
      ya.backward(dy);
      yb.backward(dy);
      CHECK(max_abs_diff(xa.grad(), xb.grad()) < 1e-5);
      CHECK(max_abs_diff(ours->weight.grad(), ref->weight.grad()) < 1e-4);
      CHECK(max_abs_diff(ours->bias.grad(), ref->bias.grad()) < 1e-4);
      CHECK(max_abs_diff(ours->running_mean, ref->running_mean) < 1e-6);
      CHECK(max_abs_diff(ours->running_var, ref->running_var) < 1e-5);
    }
    vitlab::set_batch_norm_sync({});
    ours->eval();
    ref->eval();
    CHECK(max_abs_diff(ours(x), ref(x)) < 1e-5);
    ours->train();
    ref->train();
  }
  CHECK(ours->num_batches_tracked.item<int64_t>() == ref->num_batches_tracked.item<int64_t>());
}

TEST_CASE("synchronised BatchNorm2d over two simulated ranks equals BatchNorm over their joint batch") {
  torch::manual_seed(5);
  const torch::Tensor x = torch::randn({6, 3, 4, 5}) * 0.1 + 0.5, dy = torch::randn({6, 3, 4, 5});
  vitlab::BatchNorm2d rank[2] = {vitlab::BatchNorm2d(3), vitlab::BatchNorm2d(3)};
  torch::nn::BatchNorm2d ref(3);
  torch::Tensor y[2], dx[2];
  on_two_ranks([&](int r) {
    torch::Tensor xr = x.narrow(0, 3 * r, 3).clone().requires_grad_();
    y[r] = rank[r](xr);
    y[r].backward(dy.narrow(0, 3 * r, 3));
    dx[r] = xr.grad();
  });
  torch::Tensor xf = x.clone().requires_grad_();
  torch::Tensor yf = ref(xf);
  yf.backward(dy);
  CHECK(max_abs_diff(torch::cat({y[0], y[1]}), yf) < 1e-5);
  CHECK(max_abs_diff(torch::cat({dx[0], dx[1]}), xf.grad()) < 1e-4);
  CHECK(max_abs_diff(rank[0]->weight.grad() + rank[1]->weight.grad(), ref->weight.grad()) < 1e-4);
  CHECK(max_abs_diff(rank[0]->bias.grad() + rank[1]->bias.grad(), ref->bias.grad()) < 1e-4);
  for (int r = 0; r < 2; ++r) {
    CHECK(max_abs_diff(rank[r]->running_mean, ref->running_mean) < 1e-6);
    CHECK(max_abs_diff(rank[r]->running_var, ref->running_var) < 1e-6);
  }
  // Per-process statistics would not have matched.
  vitlab::BatchNorm2d alone(3);
  CHECK(max_abs_diff(alone(x.narrow(0, 0, 3)), yf.narrow(0, 0, 3)) > 1e-2);
}

namespace {

// An attention layer with re-attention whose Θ bias and BatchNorm are far
// from their initial values.
ReAttention re_attention_layer(int64_t heads, double scale) {
  AttentionOptions o;
  o.dim = 8 * heads;
  o.num_heads = heads;
  ReAttention attention(o, scale);
  torch::NoGradGuard no_grad;
  attention->reatten_matrix->bias.uniform_(-0.5, 0.5);
  attention->var_norm->weight.uniform_(0.5, 1.5);
  attention->var_norm->bias.uniform_(-0.2, 0.2);
  attention->var_norm->running_var.uniform_(0.5, 2.0);
  return attention;
}

// Θ, BatchNorm (with batch statistics) and the scale as LibTorch's modules
// compute them: what the fused training path must equal.
torch::Tensor re_attend_unfused(ReAttention& attention, const torch::Tensor& a) {
  return attention->var_norm(attention->reatten_matrix(a)) * attention->reatten_scale;
}

// Largest difference of a against b, relative to b's largest magnitude.
double relative_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return max_abs_diff(a.to(torch::kDouble), b.to(torch::kDouble)) / std::max(b.abs().max().item<double>(), 1e-30);
}

// Whether y's autograd graph has a node whose name contains `name`.
bool graph_has(const torch::Tensor& y, const std::string& name) {
  std::vector<torch::autograd::Node*> stack = {y.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (!node || !seen.insert(node).second) continue;
    if (node->name().find(name) != std::string::npos) return true;
    for (const auto& edge : node->next_edges()) stack.push_back(edge.function.get());
  }
  return false;
}

void copy_state(ReAttention& from, ReAttention& to) {
  torch::NoGradGuard no_grad;
  for (const auto& p : from->named_parameters()) to->named_parameters()[p.key()].copy_(p.value());
  for (const auto& b : from->named_buffers()) to->named_buffers()[b.key()].copy_(b.value());
}

}  // namespace

TEST_CASE("re-attention in training, fused on the CPU, equals Θ then BatchNorm then the scale, with gradients") {
  torch::manual_seed(6);
  // 7 heads: the kernels' 3 × 3 tiles and a last tile of one head; 50
  // tokens: 2500 positions per map, past a task boundary of both kernels
  // (1008 and 2048 columns), not a multiple of 8.
  const int64_t B = 3, H = 7, N = 50;
  struct Maps {
    const char* what;
    torch::Tensor a;
  };
  const Maps inputs[] = {
      {"peaked softmax maps", torch::softmax(3 * torch::randn({B, H, N, N}), -1)},
      {"near-uniform softmax maps (as at initialisation)", torch::softmax(0.01 * torch::randn({B, H, N, N}), -1)},
      {"maps that are not probabilities (after dropout)", torch::rand({B, H, N, N}) * 0.1},
  };
  // With v, the maps are applied to it without being stored (the path a
  // DeepViT block takes in training).
  const torch::Tensor v = torch::randn({B, H, N, 8});
  for (const bool with_v : {false, true})
    for (const Maps& in : inputs) {
      INFO(in.what << (with_v ? ", applied to v" : ""));
      // The reference runs in float64: in float32 the unfused path loses the
      // small spread of near-uniform maps to rounding in Θ a + b.
      ReAttention fused = re_attention_layer(H, 0.7), reference = re_attention_layer(H, 0.7);
      copy_state(fused, reference);
      reference->to(torch::kDouble);
      const torch::Tensor dy = torch::randn(with_v ? v.sizes() : in.a.sizes());
      for (int step = 0; step < 2; ++step) {
        torch::Tensor af = in.a.clone().requires_grad_(), ar = in.a.to(torch::kDouble).requires_grad_();
        torch::Tensor vf = v.clone().requires_grad_(), vr = v.to(torch::kDouble).requires_grad_();
        torch::Tensor yf = with_v ? fused->re_attend(af, vf) : fused->re_attend(af),
                      yr = re_attend_unfused(reference, ar);
        if (with_v) {
          yr = yr.matmul(vr);
          REQUIRE(yf.grad_fn()->next_edges().size() == 1);
          CHECK_THAT(yf.grad_fn()->next_edges()[0].function->name(), Catch::Contains("ReAttentionApplyFunction"));
        } else {
          CHECK_THAT(yf.grad_fn()->name(), Catch::Contains("ReAttentionFunction"));  // not the unfused fallback
        }
        CHECK(relative_diff(yf, yr) < 1e-5);
        yf.backward(dy);
        yr.backward(dy.to(torch::kDouble));
        CHECK(relative_diff(af.grad(), ar.grad()) < 1e-5);
        if (with_v) CHECK(relative_diff(vf.grad(), vr.grad()) < 1e-5);
        const auto f = fused->named_parameters(), r = reference->named_parameters();
        for (const char* name : {"reatten_matrix.weight", "var_norm.weight", "var_norm.bias"}) {
          INFO(name);
          CHECK(relative_diff(f[name].grad(), r[name].grad()) < 1e-5);
        }
        // Zero in exact arithmetic (BatchNorm removes per-head offsets).
        CHECK(f["reatten_matrix.bias"].grad().abs().max().item<double>() <
              1e-5 * r["reatten_matrix.weight"].grad().abs().max().item<double>());
        for (const char* name : {"var_norm.running_mean", "var_norm.running_var", "var_norm.num_batches_tracked"}) {
          INFO(name);
          CHECK(relative_diff(fused->named_buffers()[name], reference->named_buffers()[name]) < 1e-6);
        }
      }
    }
}

TEST_CASE("the head-mixing kernels equal their definitions for any head count and map size") {
  // Head counts around the 3 × 3 tiles (all three rows of a tile the same
  // head when H = 1); 5 tokens: 25 columns (one 24-column tile and one
  // left); 29: 841 (whole tiles, a vector and single columns); 50: 2500
  // (past both kernels' task boundaries).
  torch::manual_seed(9);
  for (const int64_t H : {1, 2, 4, 13})
    for (const int64_t N : {5, 29, 50}) {
      INFO(H << " heads, " << N << " tokens");
      const torch::Tensor x = torch::rand({2, H, N, N}), y = torch::randn({2, H, N, N});
      const torch::Tensor w1 = torch::randn({H, H}), w2 = torch::randn({H, H}), c = torch::randn({H});
      const auto mixed = [&](const torch::Tensor& w, const torch::Tensor& maps) {  // Σ_k w[g][k] maps[b][k]
        return torch::einsum("gk,bkij->bgij", {w.to(torch::kDouble), maps.to(torch::kDouble)});
      };
      const torch::Tensor offset = c.to(torch::kDouble).view({1, H, 1, 1});
      CHECK(relative_diff(mix_heads(w1, x, c), mixed(w1, x) + offset) < 1e-5);
      CHECK(relative_diff(mix_heads(w1, x, c, w2, y), mixed(w1, x) + mixed(w2, y) + offset) < 1e-5);
      // Σ over images and positions of (x_g - sx)(y_h - sy), and of x_g - sx.
      const auto gram = [&](const torch::Tensor& a, double sa, const torch::Tensor& b, double sb) {
        const torch::Tensor da = (a.to(torch::kDouble) - sa).transpose(0, 1).reshape({H, -1});
        const torch::Tensor db = (b.to(torch::kDouble) - sb).transpose(0, 1).reshape({H, -1});
        return std::make_pair(da.matmul(db.t()), da.sum(1));
      };
      const double shift = 1.0 / static_cast<double>(N);
      for (const bool same : {true, false}) {  // x with itself: the upper tiles, mirrored
        INFO((same ? "x with itself" : "x with y"));
        const torch::Tensor& other = same ? x : y;
        const double other_shift = same ? shift : 0.1;
        const auto [moments, sums] = head_gram(x, shift, other, other_shift);
        const auto [expected_moments, expected_sums] = gram(x, shift, other, other_shift);
        CHECK(moments.scalar_type() == torch::kDouble);
        CHECK(relative_diff(moments, expected_moments) < 1e-5);
        CHECK(relative_diff(sums, expected_sums) < 1e-5);
      }
    }
}

TEST_CASE("a re-attention block in training gives the same output and gradients with its maps kept or not") {
  // Three paths: the re-attended maps kept (as the analysis asks), the
  // softmax maps kept (the re-attended ones applied without being stored),
  // and nothing kept (one function from q, k, v, storing neither the
  // re-attended maps nor the softmax's gradient).
  torch::manual_seed(8);
  ReAttention kept = re_attention_layer(6, 1.0), softmax_kept = re_attention_layer(6, 1.0),
              none_kept = re_attention_layer(6, 1.0);
  copy_state(kept, softmax_kept);
  copy_state(kept, none_kept);
  const torch::Tensor x = torch::randn({3, 20, 48}), dy = torch::randn({3, 20, 48});
  torch::Tensor x1 = x.clone().requires_grad_();
  AttentionMaps maps;
  const torch::Tensor y1 = kept->forward(x1, &maps);
  CHECK(graph_has(y1, "ReAttentionFunction"));
  y1.backward(dy);
  REQUIRE(maps.blocks.size() == 1);
  CHECK(maps.blocks[0].sizes() == torch::IntArrayRef({3, 6, 20, 20}));
  for (ReAttention* other : {&softmax_kept, &none_kept}) {
    const bool softmax = other == &softmax_kept;
    INFO((softmax ? "softmax maps kept" : "nothing kept"));
    torch::Tensor x2 = x.clone().requires_grad_();
    AttentionMaps softmax_maps(AttentionMapSink::Map::softmax);
    const torch::Tensor y2 = (*other)->forward(x2, softmax ? &softmax_maps : nullptr);
    CHECK(graph_has(y2, softmax ? "ReAttentionApplyFunction" : "FusedReAttentionFunction"));
    y2.backward(dy);
    CHECK(relative_diff(y2, y1) < 1e-5);
    CHECK(relative_diff(x2.grad(), x1.grad()) < 1e-5);
    for (const auto& p : kept->named_parameters()) {
      INFO(p.key());
      if (p.key() == "reatten_matrix.bias") continue;  // zero in exact arithmetic: rounding noise
      CHECK(relative_diff((*other)->named_parameters()[p.key()].grad(), p.value().grad()) < 1e-5);
    }
    CHECK(relative_diff((*other)->var_norm->running_var, kept->var_norm->running_var) < 1e-6);
    CHECK((*other)->var_norm->num_batches_tracked.item<int64_t>() == 1);
    if (softmax) {
      REQUIRE(softmax_maps.blocks.size() == 1);
      CHECK(max_abs_diff(softmax_maps.blocks[0].sum(-1), torch::ones({3, 6, 20})) < 1e-5);
    }
  }
}

TEST_CASE("fused re-attention over two simulated ranks equals it over their joint batch") {
  torch::manual_seed(7);
  const int64_t B = 4, H = 5, N = 9;
  const torch::Tensor a = torch::softmax(2 * torch::randn({B, H, N, N}), -1), dy = torch::randn({B, H, N, N});
  ReAttention rank[2] = {re_attention_layer(H, 1.0), re_attention_layer(H, 1.0)},
              reference = re_attention_layer(H, 1.0);
  for (ReAttention& r : rank) copy_state(reference, r);
  torch::Tensor y[2], da[2];
  on_two_ranks([&](int r) {
    torch::Tensor ar = a.narrow(0, 2 * r, 2).clone().requires_grad_();
    y[r] = rank[r]->re_attend(ar);
    y[r].backward(dy.narrow(0, 2 * r, 2));
    da[r] = ar.grad();
  });
  for (const torch::Tensor& yr : y) CHECK_THAT(yr.grad_fn()->name(), Catch::Contains("ReAttentionFunction"));
  torch::Tensor af = a.clone().requires_grad_();
  torch::Tensor yf = re_attend_unfused(reference, af);
  yf.backward(dy);
  CHECK(relative_diff(torch::cat({y[0], y[1]}), yf) < 1e-5);
  CHECK(relative_diff(torch::cat({da[0], da[1]}), af.grad()) < 1e-4);
  const auto ref = reference->named_parameters();
  for (const char* name : {"reatten_matrix.weight", "var_norm.weight", "var_norm.bias"}) {
    INFO(name);
    CHECK(relative_diff(rank[0]->named_parameters()[name].grad() + rank[1]->named_parameters()[name].grad(),
                        ref[name].grad()) < 1e-4);
  }
  for (int r = 0; r < 2; ++r)
    CHECK(relative_diff(rank[r]->var_norm->running_var, reference->var_norm->running_var) < 1e-5);
}

TEST_CASE("a re-attention block in one function over two simulated ranks equals it over their joint batch") {
  torch::manual_seed(9);
  const torch::Tensor x = torch::randn({4, 9, 40}), dy = torch::randn({4, 9, 40});
  ReAttention rank[2] = {re_attention_layer(5, 1.0), re_attention_layer(5, 1.0)}, joint = re_attention_layer(5, 1.0);
  for (ReAttention& r : rank) copy_state(joint, r);
  torch::Tensor y[2], dx[2];
  on_two_ranks([&](int r) {
    torch::Tensor xr = x.narrow(0, 2 * r, 2).clone().requires_grad_();
    y[r] = rank[r]->forward(xr);
    y[r].backward(dy.narrow(0, 2 * r, 2));
    dx[r] = xr.grad();
  });
  for (const torch::Tensor& yr : y) CHECK(graph_has(yr, "FusedReAttentionFunction"));
  torch::Tensor xf = x.clone().requires_grad_();
  const torch::Tensor yf = joint->forward(xf);
  yf.backward(dy);
  CHECK(relative_diff(torch::cat({y[0], y[1]}), yf) < 1e-5);
  CHECK(relative_diff(torch::cat({dx[0], dx[1]}), xf.grad()) < 1e-4);
  for (const auto& p : joint->named_parameters()) {
    INFO(p.key());
    if (p.key() == "reatten_matrix.bias") continue;  // zero in exact arithmetic: rounding noise
    CHECK(relative_diff(rank[0]->named_parameters()[p.key()].grad() + rank[1]->named_parameters()[p.key()].grad(),
                        p.value().grad()) < 1e-4);
  }
  for (int r = 0; r < 2; ++r) CHECK(relative_diff(rank[r]->var_norm->running_var, joint->var_norm->running_var) < 1e-5);
}

// Θ + BatchNorm + scale in training on [B, 12, 197, 197] maps, fused and as
// LibTorch's modules, alone and applied to v, forward and backward, best of
// 5 (docs/BENCHMARKS.md),
// on all logical CPUs unless VITLAB_BENCH_THREADS says otherwise:
//   VITLAB_BENCH_BATCH=16 build/bin/vitlab_tests "re-attention training benchmark"
TEST_CASE("re-attention training benchmark", "[.]") {
  const char* batch_env = std::getenv("VITLAB_BENCH_BATCH");
  if (!batch_env) return;
  const int64_t B = std::stoll(batch_env), H = 12, N = 197;
  configure_allocator();  // as vitlab runs: freed maps are reused, not faulted in again
  const int threads = torch::get_num_threads();
  const char* threads_env = std::getenv("VITLAB_BENCH_THREADS");
  torch::set_num_threads(threads_env ? std::stoi(threads_env) : static_cast<int>(std::thread::hardware_concurrency()));
  torch::manual_seed(0);
  const torch::Tensor a = torch::softmax(torch::randn({B, H, N, N}), -1), dy = torch::randn({B, H, N, N});
  ReAttention layer = re_attention_layer(H, 1.0);
  auto best_ms = [](const std::function<void()>& fn) {
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      fn();
      best =
          std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
  };
  // The maps alone, then applied to v as a block does (d = 64): without
  // re-attention (ViT's cost), with the re-attended maps kept for the
  // product's backward, and with them never stored.
  const torch::Tensor v = torch::randn({B, H, N, 64}), dout = torch::randn({B, H, N, 64});
  const std::pair<const char*, std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>> variants[] = {
      {"fused", [&](const torch::Tensor& x, const torch::Tensor&) { return layer->re_attend(x); }},
      {"unfused", [&](const torch::Tensor& x, const torch::Tensor&) { return re_attend_unfused(layer, x); }},
      {"no re-attention, applied to v",
       [&](const torch::Tensor& x, const torch::Tensor& vx) { return attention_apply(x, vx); }},
      {"fused, then applied to v",
       [&](const torch::Tensor& x, const torch::Tensor& vx) { return attention_apply(layer->re_attend(x), vx); }},
      {"fused and applied to v, maps not stored",
       [&](const torch::Tensor& x, const torch::Tensor& vx) { return layer->re_attend(x, vx); }},
  };
  for (const auto& variant : variants) {
    // Plain names, not a structured binding: clang (C++17) cannot capture those.
    const char* name = variant.first;
    const auto& run = variant.second;
    // Results dropped at once, as in a training step: a kept result makes
    // the next one land on fresh pages.
    torch::Tensor x = a.clone().requires_grad_(), vx = v.clone().requires_grad_();
    const double forward = best_ms([&] { run(x, vx); });
    const double both = best_ms([&] {
      x.mutable_grad() = torch::Tensor();
      vx.mutable_grad() = torch::Tensor();
      torch::Tensor y = run(x, vx);
      y.backward(y.size(-1) == N ? dy : dout);
    });
    std::printf("%s, batch %lld, %d threads: forward %.1f ms, forward + backward %.1f ms\n", name,
                static_cast<long long>(B), torch::get_num_threads(), forward, both);
  }
  // A whole block's attention (qkv to proj, DeepViT-16B's width), on the
  // three paths a block can take in training (which maps are kept decides).
  AttentionOptions o;
  o.dim = 384;
  o.num_heads = H;
  ReAttention block(o, 1.0);
  const torch::Tensor x = torch::randn({B, N, o.dim}), dx = torch::randn({B, N, o.dim});
  for (const char* kept : {"re-attended maps", "softmax maps", "nothing"}) {
    torch::Tensor xg = x.clone().requires_grad_();
    const double both = best_ms([&] {
      AttentionMaps maps(std::string(kept) == "softmax maps" ? AttentionMapSink::Map::softmax
                                                             : AttentionMapSink::Map::applied);
      block->zero_grad();
      block->forward(xg, std::string(kept) == "nothing" ? nullptr : &maps).backward(dx);
    });
    std::printf("a block's attention with %s kept, forward + backward %.1f ms\n", kept, both);
  }
  Attention plain(o);
  torch::Tensor xg = x.clone().requires_grad_();
  std::printf("the same without re-attention (ViT), forward + backward %.1f ms\n", best_ms([&] {
                plain->zero_grad();
                plain->forward(xg).backward(dx);
              }));
  std::printf("head_gram %.1f ms, mix_heads %.1f ms, mix_heads of two %.1f ms\n",
              best_ms([&] { head_gram(a, 1.0 / N, a, 1.0 / N); }),
              best_ms([&] { mix_heads(torch::eye(H), a, torch::zeros({H})); }),
              best_ms([&] { mix_heads(torch::eye(H), a, torch::zeros({H}), torch::eye(H), dy); }));
  torch::set_num_threads(threads);
}
