#include "data/image_folder.h"

#include <fmt/ranges.h>
#include <jpeglib.h>

#include <algorithm>
#include <csetjmp>
#include <cstdlib>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <string_view>

#include "common/error.h"
#include "common/files.h"

namespace vitlab {

namespace fs = std::filesystem;

fs::path find_split(const fs::path& root, const std::string& requested, const std::vector<std::string>& candidates) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) fail("{}: data root is not a directory", root.string());
  if (!requested.empty()) {
    if (!fs::is_directory(root / requested, ec)) fail("{}: split folder '{}' not found", root.string(), requested);
    return root / requested;
  }
  for (const auto& c : candidates)
    if (fs::is_directory(root / c, ec)) return root / c;
  fail("{}: none of the split folders {} exists", root.string(), candidates);
}

namespace {

bool is_image(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* e : {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
    if (ext == e) return true;
  return false;
}

// Width x height as a PNG, JPEG or BMP header declares it, or 0 when none is
// found (other formats, or a damaged header that the decoder rejects).
uint64_t declared_pixels(std::string_view b) {
  auto byte = [&](size_t i) -> uint64_t { return i < b.size() ? static_cast<uint8_t>(b[i]) : 0; };
  auto be16 = [&](size_t i) { return byte(i) << 8 | byte(i + 1); };
  auto be32 = [&](size_t i) { return be16(i) << 16 | be16(i + 2); };
  auto le32 = [&](size_t i) { return byte(i) | byte(i + 1) << 8 | byte(i + 2) << 16 | byte(i + 3) << 24; };
  if (b.size() >= 24 && b.substr(0, 8) == "\x89PNG\r\n\x1a\n" && b.substr(12, 4) == "IHDR") return be32(16) * be32(20);
  if (b.substr(0, 2) == "BM") {
    const auto height = static_cast<int32_t>(le32(22));  // negative: rows stored top-down
    return le32(18) * static_cast<uint64_t>(std::abs(static_cast<int64_t>(height)));
  }
  if (b.substr(0, 2) != "\xff\xd8") return 0;
  // JPEG: segments up to the frame header (SOF0..SOF15 but DHT, JPG, DAC);
  // like libjpeg, skip bytes that are not a marker.
  for (size_t i = 2; i + 8 < b.size();) {
    if (byte(i) != 0xff || byte(i + 1) == 0xff) {
      ++i;
      continue;
    }
    const uint64_t marker = byte(i + 1);
    if (marker >= 0xc0 && marker <= 0xcf && marker != 0xc4 && marker != 0xc8 && marker != 0xcc)
      return be16(i + 5) * be16(i + 7);
    i += 2 + be16(i + 2);
  }
  return 0;
}

// libjpeg's error manager, made to return instead of exit(), and to note
// warnings (corrupt or truncated data that libjpeg would patch over).
struct JpegErrors {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  bool warned;
};

}  // namespace

// OpenCV's decoder asks libjpeg for RGB, swaps it to BGR in a byte loop and
// decode_image swapped it back: this does neither (docs/BENCHMARKS.md). The
// pixels are libjpeg's either way.
bool decode_jpeg_rgb(const std::string& bytes, cv::Mat& out) {
  if (bytes.size() < 4 || bytes.compare(0, 2, "\xff\xd8") != 0) return false;
  // Only plain-data locals from here: longjmp skips destructors.
  jpeg_decompress_struct info;
  JpegErrors errors;
  info.err = jpeg_std_error(&errors.mgr);
  errors.mgr.error_exit = [](j_common_ptr c) { std::longjmp(reinterpret_cast<JpegErrors*>(c->err)->jump, 1); };
  errors.mgr.emit_message = [](j_common_ptr c, int level) {
    if (level < 0) reinterpret_cast<JpegErrors*>(c->err)->warned = true;
  };
  errors.warned = false;
  if (setjmp(errors.jump)) {
    jpeg_destroy_decompress(&info);
    return false;
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&info, TRUE);
  if (info.num_components != 3 || (info.jpeg_color_space != JCS_YCbCr && info.jpeg_color_space != JCS_RGB)) {
    jpeg_destroy_decompress(&info);
    return false;
  }
  info.out_color_space = JCS_RGB;
  jpeg_start_decompress(&info);
  out.create(static_cast<int>(info.output_height), static_cast<int>(info.output_width), CV_8UC3);
  while (info.output_scanline < info.output_height && !errors.warned) {
    JSAMPROW row = out.ptr<uchar>(static_cast<int>(info.output_scanline));
    jpeg_read_scanlines(&info, &row, 1);
  }
  if (!errors.warned) jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  return !errors.warned;
}

ImageFolder scan_image_folder(const fs::path& split_dir, const std::vector<std::string>* classes) {
  ImageFolder folder;
  folder.dir = split_dir;
  std::error_code ec;
  std::vector<std::string> found;
  for (const auto& e : fs::directory_iterator(split_dir, ec))
    if (e.is_directory(ec)) found.push_back(e.path().filename().string());
  if (ec) fail("{}: cannot list ({})", split_dir.string(), ec.message());
  std::sort(found.begin(), found.end());
  folder.classes = classes ? *classes : found;
  if (folder.classes.empty()) fail("{}: no class folders", split_dir.string());

  for (const auto& name : found) {
    auto it = std::find(folder.classes.begin(), folder.classes.end(), name);
    if (it == folder.classes.end()) {
      folder.warnings.push_back(fmt::format("{}: class '{}' is not a training class; its files are left out",
                                            (split_dir / name).string(), name));
      continue;
    }
    const int64_t label = it - folder.classes.begin();
    std::vector<fs::path> files;
    for (fs::recursive_directory_iterator walk(split_dir / name, ec), end; !ec && walk != end; walk.increment(ec))
      if (walk->is_regular_file(ec) && is_image(walk->path())) files.push_back(walk->path());
    if (ec)
      folder.warnings.push_back(fmt::format("{}: not fully listed ({})", (split_dir / name).string(), ec.message()));
    if (files.empty())
      folder.warnings.push_back(fmt::format("{}: class folder has no images", (split_dir / name).string()));
    std::sort(files.begin(), files.end());
    for (auto& f : files) folder.samples.push_back({std::move(f), label});
  }
  return folder;
}

cv::Mat decode_image(const fs::path& path, int in_chans) {
  const std::string bytes = read_file(path);
  if (bytes.empty()) fail("{}: empty file", path.string());
  // OpenCV allocates the whole image (up to 2^30 pixels) before it reads the
  // data: a few hundred bytes could claim gigabytes.
  constexpr uint64_t kMaxPixels = uint64_t(1) << 26;
  if (const uint64_t pixels = declared_pixels(bytes); pixels > kMaxPixels)
    fail("{}: the header declares {} pixels; images over {} (8192 x 8192) are refused", path.string(), pixels,
         kMaxPixels);
  if (in_chans != 1 && in_chans != 3)
    fail("{}: images decode to 1 or 3 channels, model.in_chans is {}", path.string(), in_chans);
  cv::Mat img;
  if (in_chans == 3 && decode_jpeg_rgb(bytes, img)) return img;
  try {
    img = cv::imdecode(cv::Mat(1, static_cast<int>(bytes.size()), CV_8U, const_cast<char*>(bytes.data())),
                       cv::IMREAD_UNCHANGED);
  } catch (const cv::Exception& e) {
    fail("{}: cannot decode image ({})", path.string(), e.what());
  }
  if (img.empty()) fail("{}: not a decodable image", path.string());
  if (img.depth() == CV_16U)
    img.convertTo(img, CV_8U, 1.0 / 257.0);
  else if (img.depth() != CV_8U)
    img.convertTo(img, CV_8U);
  if (img.channels() == 2) cv::extractChannel(img, img, 0);  // grey + alpha: keep the grey
  cv::Mat out;
  const int c = img.channels();
  if (in_chans == 1) {
    if (c == 1)
      out = img;
    else
      cv::cvtColor(img, out, c == 4 ? cv::COLOR_BGRA2GRAY : cv::COLOR_BGR2GRAY);
  } else {
    if (c == 1)
      cv::cvtColor(img, out, cv::COLOR_GRAY2RGB);
    else
      cv::cvtColor(img, out, c == 4 ? cv::COLOR_BGRA2RGB : cv::COLOR_BGR2RGB);
  }
  return out;
}

}  // namespace vitlab
