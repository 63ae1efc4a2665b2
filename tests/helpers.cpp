#include "tests/helpers.h"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "common/files.h"
#include "data/datasets.h"

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

RunResult run_cli(const std::string& args) { return run_shell(std::string(VITLAB_BIN) + " " + args); }

RunResult run_shell(const std::string& command) {
  const std::string cmd = "{ " + command + "; } 2>&1";
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

pid_t start_cli(const std::string& args, const fs::path& log) {
  const std::string cmd = "exec " + std::string(VITLAB_BIN) + " " + args + " >" + log.string() + " 2>&1";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

int wait_cli(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

const char* const kTinyTrain =
    " --set model.name=vit_tiny_patch16_224 --set model.img_size=28 --set model.patch_size=7 --set model.in_chans=1"
    " --set model.embed_dim=32 --set model.depth=2 --set model.num_heads=2 --set 'aug.mean=[0.5]' --set 'aug.std=[0.5]'"
    " --set 'aug.auto_augment=\"\"' --set aug.mixup=0.2 --set aug.cutmix=0 --set aug.reprob=0.25 --set "
    "train.batch_size=16"
    " --set schedule.warmup_epochs=1 --set data.workers=2 --threads 1";

void write_fashion_mnist_slice(const fs::path& dir, int64_t n) {
  const ImageSet train = load_fashion_mnist(kFashionMnistDir, "train");
  auto idx = [](const torch::Tensor& t) {
    std::string out = {0, 0, 8, static_cast<char>(t.dim())};
    for (auto d : t.sizes())
      for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((d >> s) & 0xff));
    torch::Tensor c = t.to(torch::kUInt8).contiguous();
    return out + std::string(static_cast<const char*>(c.data_ptr()), c.numel());
  };
  for (const char* split : {"train", "t10k"}) {
    write_file_atomic(dir / (std::string(split) + "-images-idx3-ubyte"), idx(train.images.narrow(0, 0, n).squeeze(-1)));
    write_file_atomic(dir / (std::string(split) + "-labels-idx1-ubyte"), idx(train.labels.narrow(0, 0, n)));
  }
}

std::string fixture_sets(const nlohmann::json& config) {
  std::string out;
  for (auto it = config.begin(); it != config.end(); ++it) {
    if (it.key() == "layer_norm_eps") continue;  // vitlab's ViTs use timm's 1e-6, checked by the parity test
    out += " --set 'model." + it.key() + "=" + it.value().dump() + "'";
  }
  return out;
}

void exit_if_under_ctest(const std::string& reason) {
  const char* code = std::getenv("VITLAB_TEST_SKIP_CODE");
  if (code == nullptr) return;
  std::fprintf(stderr, "skipped: %s\n", reason.c_str());
  std::exit(std::atoi(code));
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace vitlab::test
