#include "tests/helpers.h"

#include <array>
#include <cstdio>
#include <random>

#include "common/files.h"

namespace vitlab::test {

const nlohmann::json& manifest() {
  static const nlohmann::json m = nlohmann::json::parse(vitlab::read_file(fixture("manifest.json")));
  return m;
}

TempDir::TempDir() {
  std::random_device rd;
  path_ = fs::temp_directory_path() / ("vitlab-test-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

RunResult run_cli(const std::string& args) {
  const std::string cmd = std::string(VITLAB_BIN) + " " + args + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  RunResult r{-1, ""};
  if (!pipe) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  const int status = ::pclose(pipe);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string fixture_sets(const nlohmann::json& config) {
  std::string out;
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (it.key() == "layer_norm_eps") continue;  // vitlab's ViTs use timm's 1e-6, checked by the parity test
    out += " --set 'model." + it.key() + "=" + it.value().dump() + "'";
  }
  return out;
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace vitlab::test
