// The CIFAR-10 binary batch reader on arbitrary bytes (as test_batch.bin).
#include "data/datasets.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  vitlab::fuzz::write_input("test_batch.bin", {reinterpret_cast<const char*>(data), size});
  return vitlab::fuzz::run([&] { vitlab::load_cifar10(vitlab::fuzz::work_dir(), "test"); });
}
