#include <catch2/catch.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "common/error.h"
#include "common/files.h"
#include "data/datasets.h"
#include "data/export.h"
#include "data/image_folder.h"
#include "tests/helpers.h"

using namespace vitlab;
using vitlab::test::TempDir;

namespace {

std::string idx_bytes(unsigned char type, std::vector<uint32_t> dims, const std::string& data) {
  std::string out = {0, 0, static_cast<char>(type), static_cast<char>(dims.size())};
  for (uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((d >> s) & 0xff));
  return out + data;
}

}  // namespace

TEST_CASE("IDX arrays: uint8 and big-endian int32, plain and gzip'd") {
  TempDir dir;
  write_file_atomic(dir / "a.idx", idx_bytes(0x08, {2, 3}, std::string("\x01\x02\x03\x04\x05\x06", 6)));
  torch::Tensor a = read_idx(dir / "a.idx");
  CHECK(a.sizes() == torch::IntArrayRef({2, 3}));
  CHECK(a.scalar_type() == torch::kUInt8);
  CHECK(a[1][2].item<int>() == 6);
  write_file_atomic(dir / "b.idx", idx_bytes(0x0C, {2}, std::string("\x00\x00\x01\x00\xff\xff\xff\xfe", 8)));
  torch::Tensor b = read_idx(dir / "b.idx");
  CHECK(b[0].item<int32_t>() == 256);
  CHECK(b[1].item<int32_t>() == -2);
  REQUIRE(std::system(("gzip -k " + (dir / "a.idx").string()).c_str()) == 0);
  CHECK(torch::equal(read_idx(dir / "a.idx.gz"), a));
}

TEST_CASE("hostile IDX files are clear errors") {
  TempDir dir;
  auto check = [&](const std::string& bytes, const std::string& message) {
    write_file_atomic(dir / "x.idx", bytes);
    CHECK_THROWS_WITH(read_idx(dir / "x.idx"), Catch::Contains("x.idx") && Catch::Contains(message));
  };
  check("", "bad magic");
  check(std::string("\x01\x00\x08\x01", 4), "bad magic");
  check(idx_bytes(0x07, {1}, "a"), "unknown IDX data type 0x07");
  check(std::string("\x00\x00\x08\x03\x00\x00", 6), "truncated IDX header");
  check(idx_bytes(0x08, {4000000000u, 4000000000u}, "abc"), "declares more data than the file holds");
  check(idx_bytes(0x08, {2}, "abcd"), "2 trailing bytes");
  write_file_atomic(dir / "t.gz", std::string("\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x63\x60", 12));
  CHECK_THROWS_AS(read_idx(dir / "t.gz"), vitlab::Error);
  CHECK_THROWS_WITH(read_idx(dir / "none.idx"), Catch::Contains("no such file"));
}

TEST_CASE("Fashion-MNIST from Debian's dataset-fashion-mnist") {
  ImageSet test = load_fashion_mnist(kFashionMnistDir, "test");
  CHECK(test.images.sizes() == torch::IntArrayRef({10000, 28, 28, 1}));
  CHECK(test.labels.sizes() == torch::IntArrayRef({10000}));
  CHECK(torch::equal(torch::bincount(test.labels), torch::full({10}, 1000, torch::kInt64)));  // balanced classes
  CHECK(test.classes.at(9) == "Ankle_boot");
  CHECK(test.images.to(torch::kFloat).mean().item<double>() == Approx(72.9).margin(1.0));  // the known pixel mean
  CHECK_THROWS_WITH(load_fashion_mnist("/nonexistent", "train"), Catch::Contains("dataset-fashion-mnist"));
  CHECK_THROWS_WITH(load_fashion_mnist(kFashionMnistDir, "val"), Catch::Contains("'train' or 'test'"));
}

TEST_CASE("CIFAR-10 binary batches") {
  TempDir dir;
  std::string record(1 + 3072, '\0');
  record[0] = 7;
  record[1] = 10;              // R at (0, 0)
  record[1 + 1024] = 20;       // G at (0, 0)
  record[1 + 2048 + 33] = 30;  // B at (1, 1)
  write_file_atomic(dir / "test_batch.bin", record + record);
  ImageSet set = load_cifar10(dir.path(), "test");
  CHECK(set.images.sizes() == torch::IntArrayRef({2, 32, 32, 3}));
  CHECK(set.labels[1].item<int64_t>() == 7);
  CHECK(set.images[0][0][0][0].item<int>() == 10);
  CHECK(set.images[0][0][0][1].item<int>() == 20);
  CHECK(set.images[0][1][1][2].item<int>() == 30);
  write_file_atomic(dir / "test_batch.bin", record.substr(0, 100));
  CHECK_THROWS_WITH(load_cifar10(dir.path(), "test"), Catch::Contains("not a whole number"));
  CHECK_THROWS_WITH(load_cifar10(dir.path(), "train"), Catch::Contains("data_batch_1.bin: no such file"));
}

TEST_CASE("vitlab data export writes a readable ImageFolder, atomically") {
  TempDir dir;
  const auto out = dir / "fmnist";
  auto r = vitlab::test::run_cli("data export --dataset fashion_mnist --limit 30 --out " + out.string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  ImageSet test = load_fashion_mnist(kFashionMnistDir, "test");
  int files = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(out / "val"))
    if (e.is_regular_file()) ++files;
  CHECK(files == 30);
  const std::string first = (out / "val" / test.classes.at(test.labels[0].item<int64_t>()) / "00000.png").string();
  cv::Mat img = cv::imread(first, cv::IMREAD_UNCHANGED);
  REQUIRE(img.rows == 28);
  CHECK(torch::equal(torch::from_blob(img.data, {28, 28, 1}, torch::kUInt8), test.images[0]));
  CHECK(std::filesystem::is_directory(out / "train" / "Sandal"));
  auto again = vitlab::test::run_cli("data export --dataset fashion_mnist --limit 3 --out " + out.string());
  CHECK(again.status == 1);
  CHECK_THAT(again.output, Catch::Contains("already exists"));
  auto bad = vitlab::test::run_cli("data export --dataset cifar10 --root " + dir.path().string() + " --out " +
                                   (dir / "c").string());
  CHECK(bad.status == 1);
  CHECK_FALSE(std::filesystem::exists(dir / "c"));
  CHECK_FALSE(std::filesystem::exists(dir / "c.partial"));
}

TEST_CASE("ImageFolder: sorted classes, recursive, any-case extensions, val aliases, warnings") {
  TempDir dir;
  const auto root = dir.path();
  auto write = [](const std::filesystem::path& p, const cv::Mat& m) {
    std::filesystem::create_directories(p.parent_path());
    REQUIRE(cv::imwrite(p.string(), m));
  };
  cv::Mat rgb(8, 8, CV_8UC3, cv::Scalar(10, 20, 30));  // B, G, R
  write(root / "train" / "zebra" / "a.png", rgb);
  write(root / "train" / "zebra" / "deep" / "er" / "b.JPG", rgb);
  write(root / "train" / "ant" / "c.bmp", rgb);
  write_file_atomic(root / "train" / "ant" / "notes.txt", "not an image");
  std::filesystem::create_directories(root / "train" / "empty");
  write(root / "validation" / "ant" / "d.png", rgb);
  write(root / "validation" / "cat" / "e.png", rgb);

  ImageFolder train = scan_image_folder(find_split(root, "", {"train"}));
  CHECK(train.classes == std::vector<std::string>{"ant", "empty", "zebra"});
  REQUIRE(train.samples.size() == 3);
  CHECK(train.samples[0].label == 0);
  CHECK(train.samples[1].path.filename() == "a.png");  // sorted paths
  CHECK(train.samples[2].path.filename() == "b.JPG");  // found two folders down
  CHECK_THAT(train.warnings.at(0), Catch::Contains("empty") && Catch::Contains("no images"));

  const auto val_dir = find_split(root, "", {"val", "validation", "valid", "eval"});
  CHECK(val_dir.filename() == "validation");
  ImageFolder val = scan_image_folder(val_dir, &train.classes);
  REQUIRE(val.samples.size() == 1);
  CHECK(val.samples[0].label == 0);
  CHECK_THAT(val.warnings.at(0), Catch::Contains("class 'cat' is not a training class"));
  CHECK_THROWS_WITH(find_split(root, "test", {}), Catch::Contains("split folder 'test' not found"));
  CHECK_THROWS_WITH(find_split(root / "nope", "", {"val"}), Catch::Contains("not a directory"));
}

TEST_CASE("decode_image: grey, alpha and 16-bit convert consistently, broken files are errors") {
  TempDir dir;
  cv::imwrite((dir / "rgb.png").string(), cv::Mat(4, 4, CV_8UC3, cv::Scalar(10, 20, 30)));
  cv::imwrite((dir / "grey.png").string(), cv::Mat(4, 4, CV_8UC1, cv::Scalar(100)));
  cv::imwrite((dir / "rgba.png").string(), cv::Mat(4, 4, CV_8UC4, cv::Scalar(10, 20, 30, 0)));
  cv::imwrite((dir / "deep.png").string(), cv::Mat(4, 4, CV_16UC1, cv::Scalar(257 * 100)));
  cv::Mat rgb = decode_image(dir / "rgb.png", 3);
  CHECK(rgb.type() == CV_8UC3);
  CHECK(rgb.at<cv::Vec3b>(0, 0) == cv::Vec3b(30, 20, 10));  // RGB order
  CHECK(decode_image(dir / "rgba.png", 3).at<cv::Vec3b>(1, 1) == cv::Vec3b(30, 20, 10));
  CHECK(decode_image(dir / "grey.png", 3).at<cv::Vec3b>(2, 2) == cv::Vec3b(100, 100, 100));
  CHECK(decode_image(dir / "deep.png", 1).at<uint8_t>(3, 3) == 100);
  CHECK(decode_image(dir / "deep.png", 3).type() == CV_8UC3);
  CHECK(decode_image(dir / "rgb.png", 1).type() == CV_8UC1);

  // Colour JPEGs are decoded by libjpeg straight to RGB: the same pixels as
  // OpenCV's decoder; grey and damaged ones go through OpenCV as before.
  cv::Mat photo(48, 40, CV_8UC3);
  cv::randu(photo, 0, 256);
  cv::GaussianBlur(photo, photo, cv::Size(5, 5), 1.5);
  cv::imwrite((dir / "photo.jpg").string(), photo, {cv::IMWRITE_JPEG_QUALITY, 90});
  cv::imwrite((dir / "grey.jpg").string(), cv::Mat(8, 8, CV_8UC1, cv::Scalar(77)));
  cv::Mat expected;
  cv::cvtColor(cv::imread((dir / "photo.jpg").string(), cv::IMREAD_UNCHANGED), expected, cv::COLOR_BGR2RGB);
  const std::string jpeg = read_file(dir / "photo.jpg");
  cv::Mat fast;
  REQUIRE(decode_jpeg_rgb(jpeg, fast));  // the fast path takes it
  REQUIRE(fast.size() == expected.size());
  CHECK(cv::norm(fast, expected, cv::NORM_INF) == 0);
  CHECK(cv::norm(decode_image(dir / "photo.jpg", 3), expected, cv::NORM_INF) == 0);
  CHECK_FALSE(decode_jpeg_rgb(read_file(dir / "grey.jpg"), fast));
  CHECK(decode_image(dir / "grey.jpg", 3).at<cv::Vec3b>(4, 4)[0] == Approx(77).margin(2));
  write_file_atomic(dir / "cut.jpg", jpeg.substr(0, jpeg.size() * 2 / 3));
  CHECK_FALSE(decode_jpeg_rgb(read_file(dir / "cut.jpg"), fast));  // damaged: OpenCV decides
  const std::string cut = read_file(dir / "cut.jpg");
  cv::Mat cut_expected = cv::imdecode(cv::Mat(1, static_cast<int>(cut.size()), CV_8U, const_cast<char*>(cut.data())),
                                      cv::IMREAD_UNCHANGED);
  if (cut_expected.empty()) {
    CHECK_THROWS_WITH(decode_image(dir / "cut.jpg", 3), Catch::Contains("cut.jpg"));
  } else {
    cv::cvtColor(cut_expected, cut_expected, cv::COLOR_BGR2RGB);
    CHECK(cv::norm(decode_image(dir / "cut.jpg", 3), cut_expected, cv::NORM_INF) == 0);
  }

  const std::string png = read_file(dir / "rgb.png");
  write_file_atomic(dir / "zero.png", "");
  write_file_atomic(dir / "truncated.png", png.substr(0, png.size() / 2));
  write_file_atomic(dir / "text.jpg", "this is not a jpeg");
  CHECK_THROWS_WITH(decode_image(dir / "zero.png", 3), Catch::Contains("zero.png: empty file"));
  CHECK_THROWS_WITH(decode_image(dir / "truncated.png", 3), Catch::Contains("truncated.png"));
  CHECK_THROWS_WITH(decode_image(dir / "text.jpg", 3), Catch::Contains("text.jpg: not a JPEG, PNG, BMP, WebP or TIFF file"));
  CHECK_THROWS_WITH(decode_image(dir / "rgb.png", 4), Catch::Contains("model.in_chans is 4"));
}
