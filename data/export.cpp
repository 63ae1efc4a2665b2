#include "data/export.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "common/error.h"

namespace vitlab {

namespace fs = std::filesystem;

namespace {

void write_split(const ImageSet& set, const fs::path& dir, int64_t limit) {
  for (const auto& c : set.classes) fs::create_directories(dir / c);
  const int64_t n = limit > 0 ? std::min(limit, set.size()) : set.size();
  for (int64_t i = 0; i < n; ++i) {
    torch::Tensor img = set.images[i].contiguous();
    const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1)), c = static_cast<int>(img.size(2));
    cv::Mat mat(h, w, CV_8UC(c), img.data_ptr<uint8_t>());
    cv::Mat bgr;
    if (c == 3) cv::cvtColor(mat, bgr, cv::COLOR_RGB2BGR);  // OpenCV writes BGR
    const fs::path file = dir / set.classes.at(set.labels[i].item<int64_t>()) / fmt::format("{:05d}.png", i);
    if (!cv::imwrite(file.string(), c == 3 ? bgr : mat)) fail("{}: cannot write image", file.string());
  }
}

}  // namespace

void export_image_folder(const ImageSet& train, const ImageSet& val, const fs::path& out, int64_t limit) {
  std::error_code ec;
  if (fs::exists(out, ec)) fail("{}: already exists; choose a new --out directory", out.string());
  fs::path partial = out;
  partial += ".partial";
  fs::remove_all(partial, ec);
  try {
    write_split(train, partial / "train", limit);
    write_split(val, partial / "val", limit);
  } catch (...) {
    fs::remove_all(partial, ec);
    throw;
  }
  fs::rename(partial, out, ec);
  if (ec) fail("{}: cannot move the export into place ({})", out.string(), ec.message());
}

}  // namespace vitlab
