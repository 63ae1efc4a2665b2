// The torch.save reader (zip or legacy format, and their pickles) on arbitrary
// bytes: as any object, and as a state dict the way weights are loaded.
#include "io/torch_file.h"
#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  vitlab::fuzz::run([&] { vitlab::parse_torch_file(bytes, "fuzz.pt").describe(); });
  return vitlab::fuzz::run([&] { vitlab::parse_torch_state_dict(bytes, "fuzz.pt"); });
}
