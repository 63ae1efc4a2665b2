#pragma once
// Shared by the tests: fixture paths, the manifest, temporary directories and
// running the CLI.
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace vitlab::test {

namespace fs = std::filesystem;

inline fs::path fixture(const std::string& name) { return fs::path(VITLAB_FIXTURES) / name; }

const nlohmann::json& manifest();

// A fresh directory under the system temp dir, removed at scope exit.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

struct RunResult {
  int status;
  std::string output;  // stdout and stderr together
};

// Runs `vitlab ARGS` through the shell.
RunResult run_cli(const std::string& args);

// The `--set model.KEY=VALUE` arguments that rebuild a fixture's model.
std::string fixture_sets(const nlohmann::json& config);

// Max |a - b|.
double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace vitlab::test
