// The safetensors parser on arbitrary bytes, and serializing what it accepts.
#include "io/safetensors.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return vitlab::fuzz::run([&] {
    const auto state = vitlab::parse_safetensors({reinterpret_cast<const char*>(data), size}, "fuzz.safetensors");
    vitlab::serialize_safetensors(state);
  });
}
