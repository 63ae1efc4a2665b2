// Image decoding as the ImageFolder loader does it, then the eval and train
// transforms. The first byte picks grey or RGB and RandAugment or colour
// jitter with random erasing; the rest is the image file.
#include <random>

#include "data/image_folder.h"
#include "data/transforms.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  const auto file = vitlab::fuzz::write_input("image", {reinterpret_cast<const char*>(data + 1), size - 1});
  return vitlab::fuzz::run([&] {
    vitlab::TransformOptions options;
    options.img_size = 32;
    options.in_chans = mode & 1 ? 1 : 3;
    if (options.in_chans == 1) options.mean = options.std = {0.5};
    if (mode & 2)
      options.auto_augment = "rand-m9-mstd0.5-inc1";
    else
      options.color_jitter = 0.4;
    options.reprob = 0.25;
    // Under ASan an image of the default limit, 8192 x 8192, takes about 10 s
    // through the transforms: a lower limit keeps every input quick.
    const cv::Mat image = vitlab::decode_image(file, static_cast<int>(options.in_chans), int64_t{1} << 20);
    vitlab::eval_transform(image, options);
    std::mt19937_64 rng(mode);
    vitlab::train_transform(image, options, rng);
  });
}
