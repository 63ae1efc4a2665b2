#pragma once
// In-memory image datasets read from their distribution formats: the IDX
// files of (Fashion-)MNIST, gzip'd or not, and the CIFAR-10 binary batches.
#include <torch/torch.h>

#include <filesystem>
#include <string>
#include <vector>

namespace vitlab {

// Images as uint8 [N, H, W, C] (C = 1 for grey) with int64 labels [N].
struct ImageSet {
  torch::Tensor images;
  torch::Tensor labels;
  std::vector<std::string> classes;
  int64_t size() const { return labels.size(0); }
};

// An IDX array (magic 0x0000TTNN, big-endian dims, then data), read through
// zlib so .gz and plain files both work. Declared sizes are checked against
// the data before anything is allocated.
torch::Tensor read_idx(const std::filesystem::path& path);

// Debian's dataset-fashion-mnist installs the four files here.
inline const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// split: "train" (60,000 images) or "test" (10,000).
ImageSet load_fashion_mnist(const std::filesystem::path& root, const std::string& split);

// CIFAR-10 binary version: data_batch_{1..5}.bin for "train", test_batch.bin
// for "test"; records of 1 label byte + 3072 bytes of R, G, B planes.
ImageSet load_cifar10(const std::filesystem::path& root, const std::string& split);

}  // namespace vitlab
