// The IDX reader (Fashion-MNIST's format, plain or gzip'd) on arbitrary bytes.
#include "data/datasets.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto file = vitlab::fuzz::write_input("fuzz-idx3-ubyte", {reinterpret_cast<const char*>(data), size});
  return vitlab::fuzz::run([&] { vitlab::read_idx(file); });
}
