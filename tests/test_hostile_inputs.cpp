// Every loader against hostile inputs (truncated and bit-flipped files, empty
// files, huge declared sizes, directories where files are expected, symlink
// loops): each input either loads or fails with an exception; none may crash
// or hang the process.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <opencv2/imgcodecs.hpp>
#include <random>

#include "common/config.h"
#include "common/files.h"
#include "data/datasets.h"
#include "data/image_folder.h"
#include "data/transforms.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "tests/helpers.h"
#include "train/config.h"
#include "train/trainer.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

// Variants of a valid file: empty, cut short at several points, and with one
// byte changed at 40 places (a fixed seed).
std::vector<std::pair<std::string, std::string>> mutations(const std::string& valid) {
  std::vector<std::pair<std::string, std::string>> out = {{"empty", ""}};
  for (size_t cut : {size_t(1), size_t(7), size_t(8), size_t(9), valid.size() / 3, valid.size() / 2, valid.size() - 1})
    if (cut < valid.size()) out.emplace_back("cut at " + std::to_string(cut), valid.substr(0, cut));
  std::mt19937_64 rng(7);
  for (int i = 0; i < 40; ++i) {
    std::string bad = valid;
    // Half of the changes in the first 64 bytes, where the headers are.
    const size_t at = (i % 2 ? rng() % std::min<size_t>(64, bad.size()) : rng() % bad.size());
    bad[at] = static_cast<char>(bad[at] ^ (1 << (rng() % 8)) ^ (i % 3 == 0 ? 0xff : 0));
    out.emplace_back("byte " + std::to_string(at) + " changed", bad);
  }
  return out;
}

// Runs load on each variant written to path: it may succeed or throw, and
// with names_file an error must name the file (a config error may name the
// key instead).
template <typename Load>
int check_variants(const std::string& valid, const fs::path& path, Load load, bool names_file = true) {
  int errors = 0;
  for (const auto& [what, bytes] : mutations(valid)) {
    INFO(path.filename().string() << ": " << what);
    fs::remove_all(path);
    fs::create_directories(path.parent_path());
    write_file_atomic(path, bytes);
    try {
      load(path);
    } catch (const std::exception& e) {
      ++errors;
      if (names_file) CHECK_THAT(e.what(), Catch::Contains(path.filename().string()));
    }
  }
  return errors;
}

// What `vitlab train` does with a config before training: model keys are
// checked when the model is resolved.
void load_and_resolve(const fs::path& file, const std::vector<std::string>& sets) {
  std::vector<Override> overrides;
  for (const auto& s : sets) overrides.push_back(parse_override(s));
  resolve_train_model(TrainConfig::load(file, overrides), 10);
}

std::string idx_bytes(int64_t n) {
  std::string out = {0, 0, 8, 3};
  for (int64_t d : {n, int64_t(28), int64_t(28)})
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((d >> s) & 0xff));
  return out + std::string(n * 28 * 28, '\x40');
}

}  // namespace

TEST_CASE("hostile weights files: safetensors and torch.save files fail cleanly") {
  TempDir dir;
  const std::string st = serialize_safetensors(
      {{"a", torch::randn({3, 4})}, {"b", torch::arange(10)}, {"c", torch::ones({2}).to(torch::kHalf)}});
  CHECK(check_variants(st, dir / "w.safetensors", [](const fs::path& p) { read_weights(p); }) > 10);
  // A header length of 2^62, and a header that declares a huge tensor.
  std::string huge_header = st;
  huge_header.replace(0, 8, std::string("\0\0\0\0\0\0\0\x40", 8));
  std::string huge_shape = R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})";
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((huge_shape.size() >> (8 * i)) & 0xff);
  for (const std::string& bad : {huge_header, len + huge_shape + std::string(16, '\0')}) {
    write_file_atomic(dir / "h.safetensors", bad);
    CHECK_THROWS(read_weights(dir / "h.safetensors"));
  }
  const std::string pt = read_file(fixture("deepvit_official_S_style.pt"));
  CHECK(check_variants(pt, dir / "w.pt", [](const fs::path& p) { read_weights(p); }) > 10);
  // A directory where a file is expected.
  fs::create_directories(dir / "d.safetensors");
  CHECK_THROWS_WITH(read_weights(dir / "d.safetensors"), Catch::Contains("d.safetensors"));
}

TEST_CASE("hostile configs: damaged YAML and --set values fail cleanly") {
  TempDir dir;
  const std::string valid =
      read_file(fs::path(VITLAB_FIXTURES).parent_path().parent_path() / "configs" / "fashion_mnist_vit.yaml");
  check_variants(
      valid, dir / "c.yaml", [](const fs::path& p) { load_and_resolve(p, {}); }, false);
  const std::string deep = std::string(20000, '[') + std::string(20000, ']');
  for (const std::string& bad :
       {std::string("model: ["), std::string("train: {epochs: 1e999}"), std::string("model:\n  depth: -1"),
        std::string("\t\x01\xff"), deep, std::string("data: {type: imagefolder, root: [1, 2]}")}) {
    INFO(bad.substr(0, 40));
    write_file_atomic(dir / "bad.yaml", bad);
    CHECK_THROWS(load_and_resolve(dir / "bad.yaml", {}));
  }
  for (const char* bad : {"model.depth=[[[", "=", "model.=3", "train.epochs=99999999999999999999", "a.b.c.d=1"}) {
    INFO(bad);
    CHECK_THROWS(load_and_resolve({}, {bad}));
  }
}

TEST_CASE("hostile datasets: IDX and CIFAR-10 files fail cleanly") {
  TempDir dir;
  check_variants(idx_bytes(4), dir / "x-idx3-ubyte", [](const fs::path& p) { read_idx(p); });
  // Declared dimensions far beyond the file.
  std::string huge = {0, 0, 8, 3, '\x7f', '\xff', '\xff', '\xff', '\x7f', '\xff', '\xff', '\xff', 0, 0, 0, 28};
  write_file_atomic(dir / "huge-idx3-ubyte", huge);
  CHECK_THROWS_WITH(read_idx(dir / "huge-idx3-ubyte"), Catch::Contains("huge-idx3-ubyte"));
  // A zero dimension (found by fuzz_idx: a copy of 0 bytes from a null pointer).
  write_file_atomic(dir / "empty-idx3-ubyte", std::string({0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28}));
  CHECK(read_idx(dir / "empty-idx3-ubyte").sizes() == torch::IntArrayRef({0, 28, 28}));

  std::string record(3073, '\x20');
  record[0] = 3;
  const std::string batch = record + record;
  check_variants(batch, dir / "cifar" / "test_batch.bin",
                 [&](const fs::path&) { load_cifar10(dir / "cifar", "test"); });
}

TEST_CASE("hostile images: damaged PNG and JPEG, empty files and directories decode or fail cleanly") {
  TempDir dir;
  cv::Mat image(40, 56, CV_8UC3);
  cv::randu(image, 0, 255);
  TransformOptions tf;
  tf.img_size = 32;
  std::mt19937_64 rng(1);
  auto decode_and_transform = [&](const fs::path& p) {
    const cv::Mat m = decode_image(p, 3);
    CHECK(eval_transform(m, tf).sizes() == torch::IntArrayRef({3, 32, 32}));
    CHECK(train_transform(m, tf, rng).sizes() == torch::IntArrayRef({3, 32, 32}));
  };
  for (const char* ext : {".png", ".jpg"}) {
    std::vector<uchar> encoded;
    REQUIRE(cv::imencode(ext, image, encoded));
    check_variants(std::string(encoded.begin(), encoded.end()), dir / (std::string("i") + ext), decode_and_transform);
  }
  // Headers that declare 32768 x 32768 pixels over a few hundred bytes: a
  // decoder would allocate 1-3 GB before reading the data (and libjpeg fill
  // it all in). The JPEG's SOF also hides behind bytes that libjpeg skips
  // (a stuffed FF 00), as the fuzzer's did; the WebP's is a VP8X canvas; the
  // TIFF's an IFD with only the tags libtiff needs.
  std::vector<uchar> png, jpeg;
  REQUIRE(cv::imencode(".png", image, png));
  REQUIRE(cv::imencode(".jpg", image, jpeg));
  // IHDR's width, height, bit depth and colour type, with its CRC.
  auto set_ihdr = [&](const std::string& fields) {
    std::string b(png.begin(), png.end());
    b.replace(16, fields.size(), fields);
    const uint32_t crc = crc32_of(std::string_view(b).substr(12, 17));
    for (int i = 0; i < 4; ++i) b[29 + i] = static_cast<char>(crc >> (24 - 8 * i));
    return b;
  };
  const std::string huge_png = set_ihdr(std::string("\0\0\x80\0\0\0\x80\0", 8));
  std::string huge_jpeg(jpeg.begin(), jpeg.end());
  huge_jpeg.resize(huge_jpeg.find("\xff\xda") + 40);  // cut inside the scan
  const size_t sof = huge_jpeg.find("\xff\xc0");
  REQUIRE(sof != std::string::npos);
  huge_jpeg.replace(sof + 5, 4, std::string("\x80\0\x80\0", 4));  // SOF0 height, width
  std::string hidden_jpeg = huge_jpeg;
  hidden_jpeg.insert(huge_jpeg.find("\xff\xdb"), std::string("\x01\xff\x00\x43", 4));
  std::string huge_webp("RIFF\x1e\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0\xff\x7f\0\xff\x7f\0", 30);
  huge_webp.resize(40, '\0');
  auto le = [](uint32_t v, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) s += static_cast<char>(v >> (8 * i) & 0xff);
    return s;
  };
  std::string huge_tiff = std::string("II*\0", 4) + le(8, 4) + le(8, 2);
  for (auto [tag, type, value] : {std::tuple{256, 4, 32768u},
                                  {257, 4, 32768u},
                                  {258, 3, 8u},
                                  {259, 3, 1u},
                                  {262, 3, 1u},
                                  {273, 4, 8u},
                                  {278, 4, 32768u},
                                  {279, 4, 1u << 30}})
    huge_tiff += le(tag, 2) + le(type, 2) + le(1, 4) + le(value, 4);
  huge_tiff += le(0, 4);
  for (const auto& [name, bytes] :
       {std::pair{"huge.png", huge_png}, std::pair{"huge.jpg", huge_jpeg}, std::pair{"hidden.jpg", hidden_jpeg},
        std::pair{"huge.webp", huge_webp}, std::pair{"huge.tiff", huge_tiff}}) {
    write_file_atomic(dir / name, bytes);
    // Debian's OpenCV reads WebP and TIFF; a build without them cannot decode these at all.
    const bool optional = std::string_view(name) == "huge.webp" || std::string_view(name) == "huge.tiff";
    if (optional && !cv::haveImageReader((dir / name).string())) continue;
    INFO(name);
    CHECK_THROWS_WITH(decode_image(dir / name, 3),
                      Catch::Contains(name) && Catch::Contains("32768 x 32768") && Catch::Contains("are refused"));
  }
  // A 16-bit RGBA PNG of 8192 x 8192 (2^26 pixels): 512 MiB decoded.
  write_file_atomic(dir / "deep.png", set_ihdr(std::string("\0\0\x20\0\0\0\x20\0\x10\x06", 10)));
  CHECK_THROWS_WITH(decode_image(dir / "deep.png", 1), Catch::Contains("8192 x 8192 image of 4 channel(s), 512 MiB"));
  // The pixel limit: the 56 x 40 image decodes at 2240 pixels, not at 2239.
  write_file_atomic(dir / "small.png", std::string(png.begin(), png.end()));
  CHECK(decode_image(dir / "small.png", 3, 56 * 40).size() == cv::Size(56, 40));
  CHECK_THROWS_WITH(decode_image(dir / "small.png", 3, 56 * 40 - 1),
                    Catch::Contains("56 x 40 image") && Catch::Contains("over 2239 pixels"));
  // Formats outside the ImageFolder extensions (a PGM) are refused by name.
  write_file_atomic(dir / "grey.png", "P5\n2 2\n255\n\x01\x02\x03\x04");
  CHECK_THROWS_WITH(decode_image(dir / "grey.png", 1),
                    Catch::Contains("grey.png") && Catch::Contains("not a JPEG, PNG, BMP, WebP or TIFF file"));

  fs::create_directories(dir / "folder.png");
  CHECK_THROWS_WITH(decode_image(dir / "folder.png", 3), Catch::Contains("folder.png"));

  // An ImageFolder with a symlink loop, a dangling link and an empty image:
  // the scan ends, and finds the one good image.
  const fs::path a = dir / "root" / "train" / "a";
  fs::create_directories(a);
  REQUIRE(cv::imwrite((a / "good.png").string(), image));
  fs::create_directory_symlink(a, a / "loop");
  fs::create_symlink(dir / "missing.png", a / "dangling.png");
  write_file_atomic(a / "empty.png", "");
  const ImageFolder folder = scan_image_folder(dir / "root" / "train");
  CHECK(folder.classes == std::vector<std::string>{"a"});
  CHECK(folder.samples.size() >= 1);
}
