#pragma once
// Shared by the tests: fixture paths, the manifest, temporary directories and
// running the CLI.
#include <sys/types.h>
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

// Runs a shell command line; run_cli runs `vitlab ARGS` through it.
RunResult run_shell(const std::string& command);
RunResult run_cli(const std::string& args);

// Starts `vitlab ARGS` in the background with its output going to log, for
// tests that signal it; wait_cli waits for it. The exit status, or 128 +
// the signal that killed it.
pid_t start_cli(const std::string& args, const fs::path& log);
int wait_cli(pid_t pid);

// `vitlab train` options for a tiny ViT on 28x28 grey images with light,
// fast augmentation (Mixup and random erasing on, one thread).
extern const char* const kTinyTrain;

// The first n images of Fashion-MNIST's training set written as both splits
// of an IDX directory, for short training runs (--set data.root=DIR).
void write_fashion_mnist_slice(const fs::path& dir, int64_t n);

// The `--set model.KEY=VALUE` arguments that rebuild a fixture's model.
std::string fixture_sets(const nlohmann::json& config);

// Ends a test that cannot run here, saying why. Under CTest (which sets
// VITLAB_TEST_SKIP_CODE) the test process exits with that code, which CTest
// reports as skipped, not passed; run by hand, the reason is printed and
// the test returns.
#define VITLAB_SKIP(reason)                      \
  do {                                           \
    ::vitlab::test::exit_if_under_ctest(reason); \
    WARN("skipped: " << (reason));               \
    return;                                      \
  } while (0)
void exit_if_under_ctest(const std::string& reason);

// Max |a - b|.
double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace vitlab::test
