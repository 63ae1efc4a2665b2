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

// The formats of the ImageFolder extensions, told by their first bytes. Any
// other file is refused before OpenCV sees it: its other decoders (PxM, PFM,
// HDR, Sun raster, JPEG 2000, EXR) are more of it to attack, and none is a
// format an ImageFolder holds.
bool known_format(std::string_view b) {
  auto starts = [&](std::string_view s) { return b.substr(0, s.size()) == s; };
  using namespace std::string_view_literals;
  return starts("\xff\xd8\xff"sv) || starts("\x89PNG\r\n\x1a\n"sv) || starts("BM"sv) ||
         (starts("RIFF"sv) && b.substr(8, 4) == "WEBP"sv) || starts("II*\0"sv) || starts("MM\0*"sv);
}

// A decoder sizes the image from its header and allocates all of it before
// it reads any pixel data, so a file of a few hundred bytes can claim
// gigabytes (OpenCV's own limit is 2^30 pixels). While decode_image runs on a
// thread, every cv::Mat it makes there goes through this allocator, which
// refuses one over max_pixels (the transforms' time grows with the pixels)
// or over kMaxDecodedBytes (16-bit and 4-channel images): one check that
// holds for every format and every decoder, where parsing each header would
// have to agree with each library's parser. Other threads and other code
// pass straight through.
constexpr double kMaxDecodedBytes = double(1 << 28);  // 256 MiB
thread_local int64_t t_max_pixels = 0;                // 0: not inside decode_image

struct ImageTooLarge {
  int rows, cols, channels;
  double bytes;
};

class DecodeAllocator : public cv::MatAllocator {
 public:
  explicit DecodeAllocator(cv::MatAllocator* base) : base_(base) {}
  cv::UMatData* allocate(int dims, const int* sizes, int type, void* data, size_t* step, cv::AccessFlag flags,
                         cv::UMatUsageFlags usage) const override {
    if (t_max_pixels > 0 && !data) {
      double pixels = 1;
      for (int i = 0; i < dims; ++i) pixels *= sizes[i];
      const double bytes = pixels * CV_ELEM_SIZE(type);
      if (pixels > static_cast<double>(t_max_pixels) || bytes > kMaxDecodedBytes)
        throw ImageTooLarge{dims > 0 ? sizes[0] : 1, dims > 1 ? sizes[1] : 1, CV_MAT_CN(type), bytes};
    }
    return base_->allocate(dims, sizes, type, data, step, flags, usage);
  }
  bool allocate(cv::UMatData* u, cv::AccessFlag access, cv::UMatUsageFlags usage) const override {
    return base_->allocate(u, access, usage);
  }
  void deallocate(cv::UMatData* u) const override { base_->deallocate(u); }

 private:
  cv::MatAllocator* base_;
};

// Installed when the program starts, before any thread makes a cv::Mat.
const bool decode_allocator_installed = [] {
  static DecodeAllocator allocator(cv::Mat::getDefaultAllocator());
  cv::Mat::setDefaultAllocator(&allocator);
  return true;
}();

struct DecodingScope {
  explicit DecodingScope(int64_t max_pixels) { t_max_pixels = max_pixels; }
  ~DecodingScope() { t_max_pixels = 0; }
};

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
  jpeg_calc_output_dimensions(&info);
  // Before jpeg_start_decompress, which allocates a progressive image's
  // coefficients: DecodeAllocator refuses an oversized image first.
  try {
    out.create(static_cast<int>(info.output_height), static_cast<int>(info.output_width), CV_8UC3);
  } catch (...) {
    jpeg_destroy_decompress(&info);
    throw;
  }
  jpeg_start_decompress(&info);
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

namespace {

cv::Mat decode_known_format(const fs::path& path, const std::string& bytes, int in_chans) {
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

}  // namespace

cv::Mat decode_image(const fs::path& path, int in_chans, int64_t max_pixels) {
  const std::string bytes = read_file(path);
  if (bytes.empty()) fail("{}: empty file", path.string());
  if (!known_format(bytes)) fail("{}: not a JPEG, PNG, BMP, WebP or TIFF file", path.string());
  if (in_chans != 1 && in_chans != 3)
    fail("{}: images decode to 1 or 3 channels, model.in_chans is {}", path.string(), in_chans);
  if (max_pixels < 1) fail("{}: the pixel limit must be >= 1, got {}", path.string(), max_pixels);
  DecodingScope scope(max_pixels);
  try {
    return decode_known_format(path, bytes, in_chans);
  } catch (const ImageTooLarge& e) {
    fail(
        "{}: decoding needs a {} x {} image of {} channel(s), {:.0f} MiB; images over {} pixels or {:.0f} MiB are "
        "refused",
        path.string(), e.cols, e.rows, e.channels, e.bytes / (1 << 20), max_pixels, kMaxDecodedBytes / (1 << 20));
  }
}

}  // namespace vitlab
