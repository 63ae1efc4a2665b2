// A ViT shrunk to the size of the test fixture, loaded with timm's weights
// and checked against timm's logits; usage: vitlab_example FIXTURES_DIR.
#include <iostream>

#include "io/torch_file.h"
#include "models/registry.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " FIXTURES_DIR\n";
    return 2;
  }
  const std::filesystem::path fixtures = argv[1];
  // timm's ViT-S layout at the fixture's size.
  const YAML::Node overrides =
      YAML::Load("{img_size: 32, patch_size: 8, embed_dim: 64, depth: 3, num_heads: 4, num_classes: 10}");
  auto model = vitlab::create_model("vit_small_patch16_224", overrides);
  vitlab::load_weights(model, fixtures / "vit_timm_small.safetensors");
  model.module->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor images = vitlab::read_torch_tensor(fixtures / "vit_timm_small.input.pt");
  auto [logits, attn] = model.vision->forward_with_attention(images);  // attn: [3, 2, 4, 17, 17]

  const torch::Tensor expected = vitlab::read_torch_tensor(fixtures / "vit_timm_small.logits.pt");
  const double error = (logits - expected).abs().max().item<double>() / expected.abs().max().item<double>();
  std::cout << "logits " << logits.sizes() << ", attention " << attn.sizes() << ", max relative error " << error
            << " (at most 1e-4)\n";
  return error <= 1e-4 ? 0 : 1;
}
