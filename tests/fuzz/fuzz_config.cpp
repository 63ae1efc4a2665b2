// A training config file plus --set overrides, as `vitlab train --config F
// --set ...` reads them: the input is the YAML file, then optionally a line
// "%%" and one override per line.
#include <sstream>

#include "tests/fuzz/fuzz_common.h"
#include "train/config.h"
#include "train/trainer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A leading newline, so that a first line "%%" (no YAML) is found too.
  const std::string input = "\n" + std::string(reinterpret_cast<const char*>(data), size);
  const size_t split = input.find("\n%%\n");
  const auto file = vitlab::fuzz::write_input("config.yaml", input.substr(0, split));
  return vitlab::fuzz::run([&] {
    std::vector<vitlab::Override> overrides;
    if (split != std::string::npos) {
      std::istringstream lines(input.substr(split + 4));
      for (std::string line; std::getline(lines, line);) overrides.push_back(vitlab::parse_override(line));
    }
    const auto config = vitlab::TrainConfig::load(file, overrides);
    vitlab::resolve_train_model(config, 10);
    config.to_yaml();
  });
}
