#pragma once
// The timm/torchvision ImageFolder layout: ROOT/<split>/<class>/**/<image>,
// classes being the sorted folder names.
#include <cstdint>
#include <filesystem>
#include <opencv2/core.hpp>
#include <string>
#include <vector>

namespace vitlab {

struct ImageFolderSample {
  std::filesystem::path path;
  int64_t label;
};

struct ImageFolder {
  std::filesystem::path dir;
  std::vector<std::string> classes;
  std::vector<ImageFolderSample> samples;
  // Things a user should hear about: empty class folders, folders of classes
  // the training split does not have (their files are left out).
  std::vector<std::string> warnings;
};

// The split directory under root: `requested` when given, else the first of
// `candidates` that exists (e.g. val, validation, valid, eval).
std::filesystem::path find_split(const std::filesystem::path& root, const std::string& requested,
                                 const std::vector<std::string>& candidates);

// Finds the images of one split, recursively, by extension (jpg, jpeg, png,
// bmp, webp, tif, tiff; any case). With `classes` (the training split's), the
// labels follow that list. Directory symlinks are not followed (no loops).
ImageFolder scan_image_folder(const std::filesystem::path& split_dir,
                              const std::vector<std::string>* classes = nullptr);

// Images over this many pixels are refused by default (8192 x 8192): the
// decoded image and every transform's time grow with it.
constexpr int64_t kMaxImagePixels = int64_t{1} << 26;

// Decodes an image as 8-bit RGB (in_chans 3) or grey (in_chans 1): grey,
// alpha and 16-bit images are converted the same way every time. A file that
// does not decode, or whose decoded image would exceed max_pixels or 256 MiB,
// is an Error naming it.
cv::Mat decode_image(const std::filesystem::path& path, int in_chans, int64_t max_pixels = kMaxImagePixels);

// decode_image's fast path: a colour JPEG (8-bit YCbCr or RGB) decoded by
// libjpeg straight to RGB into out. False, leaving OpenCV to decode it, for
// anything else and on any libjpeg error or warning (damaged data).
bool decode_jpeg_rgb(const std::string& bytes, cv::Mat& out);

}  // namespace vitlab
