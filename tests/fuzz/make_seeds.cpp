// Writes the generated part of the seed corpus (tests/fuzz/corpus): small
// valid files of each format, made by vitlab's own writers and OpenCV's
// encoders, so the fuzzers start from inputs that load.
//   build-asan/bin/fuzz_make_seeds tests/fuzz/corpus
#include <zlib.h>

#include <opencv2/imgcodecs.hpp>

#include "common/error.h"
#include "common/files.h"
#include "io/safetensors.h"
#include "io/torch_file.h"

using namespace vitlab;
namespace fs = std::filesystem;

namespace {

// Big-endian IDX: magic 0x0000 08 <ndim>, the dims, then bytes 0, 1, 2, ...
std::string idx(const std::vector<int32_t>& dims) {
  std::string out = {0, 0, 8, static_cast<char>(dims.size())};
  int64_t n = 1;
  for (int32_t d : dims) {
    n *= d;
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((d >> s) & 0xff));
  }
  for (int64_t i = 0; i < n; ++i) out.push_back(static_cast<char>(i * 7));
  return out;
}

std::string gzip(const std::string& bytes) {
  z_stream z{};
  deflateInit2(&z, 9, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);  // + 16: a gzip wrapper
  std::string out(deflateBound(&z, bytes.size()) + 32, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  z.avail_in = static_cast<uInt>(bytes.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

// The fuzz_image input: a mode byte (see fuzz_image.cpp), then the file.
std::string image(char mode, const std::string& ext, const cv::Mat& m) {
  std::vector<uchar> encoded;
  cv::imencode(ext, m, encoded);
  return mode + std::string(encoded.begin(), encoded.end());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) fail("usage: fuzz_make_seeds CORPUS_DIR");
  const fs::path root = argv[1];
  auto put = [&](const std::string& target, const std::string& name, const std::string& bytes) {
    fs::create_directories(root / target);
    write_file_atomic(root / target / name, bytes);
  };
  torch::manual_seed(0);
  const StateDict small = {{"w", torch::randn({2, 3})},
                           {"b", torch::arange(4)},
                           {"h", torch::ones({3}).to(torch::kHalf)},
                           {"m", torch::tensor({true, false})}};
  put("fuzz_safetensors", "small.safetensors", serialize_safetensors(small, {{"format", "pt"}}));
  put("fuzz_torch_file", "small.pt", serialize_torch_state_dict(small));

  put("fuzz_idx", "images-idx3-ubyte", idx({2, 4, 4}));
  put("fuzz_idx", "images-idx3-ubyte.gz", gzip(idx({2, 4, 4})));
  put("fuzz_idx", "labels-idx1-ubyte", idx({5}));

  std::string record(3073, '\0');
  for (size_t i = 0; i < record.size(); ++i) record[i] = static_cast<char>(i * 13);
  record[0] = 3;
  put("fuzz_cifar10", "two_records.bin", record + record);

  cv::Mat rgb(12, 16, CV_8UC3), grey(12, 16, CV_8UC1), rgba(12, 16, CV_8UC4), deep(12, 16, CV_16UC3);
  cv::theRNG().state = 1;
  for (cv::Mat* m : {&rgb, &grey, &rgba}) cv::randu(*m, 0, 255);
  cv::randu(deep, 0, 65535);
  put("fuzz_image", "rgb.png", image(0, ".png", rgb));
  put("fuzz_image", "grey_randaugment.png", image(3, ".png", grey));
  put("fuzz_image", "rgba.png", image(2, ".png", rgba));
  put("fuzz_image", "16bit_grey.png", image(1, ".png", deep));
  put("fuzz_image", "rgb_randaugment.jpg", image(2, ".jpg", rgb));
  put("fuzz_image", "grey.jpg", image(1, ".jpg", grey));
  put("fuzz_image", "rgb.bmp", image(0, ".bmp", rgb));
  put("fuzz_image", "rgba_randaugment.webp", image(2, ".webp", rgba));
  put("fuzz_image", "16bit_rgb.tiff", image(1, ".tiff", deep));
  return 0;
}
