#pragma once
#include <filesystem>

#include "data/datasets.h"

namespace vitlab {

// Writes an ImageFolder tree, OUT/train/<class>/<index>.png and
// OUT/val/<class>/<index>.png, with at most `limit` images per split
// (0: all). The tree is built under a temporary name and renamed into place
// when complete; an existing OUT is an error.
void export_image_folder(const ImageSet& train, const ImageSet& val, const std::filesystem::path& out,
                         int64_t limit = 0);

}  // namespace vitlab
