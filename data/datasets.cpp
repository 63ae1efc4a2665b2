#include "data/datasets.h"

#include <fmt/ranges.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "common/error.h"
#include "common/files.h"

namespace vitlab {

namespace {

// Whole file, decompressed when gzip'd (zlib reads plain files as they are).
std::string read_maybe_gzip(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail("{}: no such file", path.string());
  std::unique_ptr<gzFile_s, int (*)(gzFile)> f(gzopen(path.c_str(), "rb"), gzclose);
  if (!f) fail("{}: cannot open", path.string());
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f.get(), buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  if (n < 0) {
    int err = 0;
    const char* msg = gzerror(f.get(), &err);
    fail("{}: corrupt or truncated ({})", path.string(), msg ? msg : "read error");
  }
  return out;
}

uint32_t big_endian_u32(const unsigned char* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

struct IdxType {
  unsigned char code;
  torch::Dtype dtype;
};
const IdxType kIdxTypes[] = {{0x08, torch::kUInt8}, {0x09, torch::kInt8},    {0x0B, torch::kInt16},
                             {0x0C, torch::kInt32}, {0x0D, torch::kFloat32}, {0x0E, torch::kFloat64}};

}  // namespace

torch::Tensor read_idx(const std::filesystem::path& path) {
  const std::string bytes = read_maybe_gzip(path);
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 4 || p[0] != 0 || p[1] != 0) fail("{}: not an IDX file (bad magic number)", path.string());
  const IdxType* type = nullptr;
  for (const auto& t : kIdxTypes)
    if (t.code == p[2]) type = &t;
  if (!type) fail("{}: unknown IDX data type 0x{:02x}", path.string(), p[2]);
  const int ndim = p[3];
  if (ndim < 1 || bytes.size() < 4 + 4 * size_t(ndim)) fail("{}: truncated IDX header", path.string());
  std::vector<int64_t> shape;
  uint64_t numel = 1;
  const uint64_t elem = c10::elementSize(type->dtype);
  const uint64_t available = (bytes.size() - 4 - 4 * ndim) / elem;
  for (int i = 0; i < ndim; ++i) {
    const uint32_t d = big_endian_u32(p + 4 + 4 * i);
    numel *= d;
    if (numel > available)
      fail("{}: header declares more data than the file holds ({} bytes of data)", path.string(), available * elem);
    shape.push_back(d);
  }
  if (numel != available)
    fail("{}: {} trailing bytes after the declared data", path.string(), (available - numel) * elem);
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(type->dtype));
  if (numel == 0) return t;  // a zero dimension: no data, and data_ptr() may be null
  std::memcpy(t.data_ptr(), p + 4 + 4 * ndim, numel * elem);
  // IDX stores multi-byte values big-endian.
  if (elem > 1) {
    auto* raw = static_cast<unsigned char*>(t.data_ptr());
    for (uint64_t i = 0; i < numel; ++i) std::reverse(raw + i * elem, raw + (i + 1) * elem);
  }
  return t;
}

ImageSet load_fashion_mnist(const std::filesystem::path& root, const std::string& split) {
  if (split != "train" && split != "test") fail("fashion_mnist: split must be 'train' or 'test', got '{}'", split);
  const std::string prefix = split == "train" ? "train" : "t10k";
  auto find = [&](const std::string& stem) {
    for (const char* ext : {".gz", ""})
      if (std::filesystem::exists(root / (stem + ext))) return root / (stem + ext);
    fail("fashion_mnist: {} not found in {} (Debian: apt-get install dataset-fashion-mnist)", stem, root.string());
  };
  ImageSet set;
  set.images = read_idx(find(prefix + "-images-idx3-ubyte"));
  set.labels = read_idx(find(prefix + "-labels-idx1-ubyte")).to(torch::kInt64);
  if (set.images.dim() != 3 || set.images.scalar_type() != torch::kUInt8)
    fail("fashion_mnist: {} images must be uint8 [N, H, W], got {}", split, set.images.sizes().vec());
  if (set.labels.dim() != 1 || set.labels.size(0) != set.images.size(0))
    fail("fashion_mnist: {} has {} images but {} labels", split, set.images.size(0), set.labels.numel());
  if (set.labels.numel() && (set.labels.min().item<int64_t>() < 0 || set.labels.max().item<int64_t>() > 9))
    fail("fashion_mnist: {} labels must be 0..9", split);
  set.images = set.images.unsqueeze(-1);
  set.classes = {"T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle_boot"};
  return set;
}

ImageSet load_cifar10(const std::filesystem::path& root, const std::string& split) {
  if (split != "train" && split != "test") fail("cifar10: split must be 'train' or 'test', got '{}'", split);
  std::vector<std::string> files;
  if (split == "train")
    for (int i = 1; i <= 5; ++i) files.push_back(fmt::format("data_batch_{}.bin", i));
  else
    files.push_back("test_batch.bin");
  constexpr int64_t kRecord = 1 + 3 * 32 * 32;
  std::vector<torch::Tensor> images, labels;
  for (const auto& name : files) {
    const std::filesystem::path path = root / name;
    const std::string bytes = read_file(path);
    if (bytes.empty() || bytes.size() % kRecord != 0)
      fail("{}: {} bytes is not a whole number of {}-byte CIFAR-10 records", path.string(), bytes.size(), kRecord);
    const int64_t n = static_cast<int64_t>(bytes.size()) / kRecord;
    torch::Tensor raw = torch::from_blob(const_cast<char*>(bytes.data()), {n, kRecord}, torch::kUInt8).clone();
    torch::Tensor label = raw.select(1, 0).to(torch::kInt64);
    if (label.max().item<int64_t>() > 9) fail("{}: labels must be 0..9 (is it the CIFAR-100 format?)", path.string());
    labels.push_back(label);
    images.push_back(raw.narrow(1, 1, kRecord - 1).reshape({n, 3, 32, 32}).permute({0, 2, 3, 1}).contiguous());
  }
  return {torch::cat(images),
          torch::cat(labels),
          {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}};
}

}  // namespace vitlab
