#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/files.h"
#include "common/run_lock.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

namespace {

// A run of the tiny ViT on 256 Fashion-MNIST images (16 steps an epoch),
// with EMA, dropout and drop path: everything resume must restore.
struct TinyRun {
  TempDir dir;
  std::string args;
  explicit TinyRun(int epochs = 3) {
    write_fashion_mnist_slice(dir / "fm", 256);
    args = std::string(kTinyTrain) + " --set data.type=fashion_mnist --set data.root=" + (dir / "fm").string() +
           " --set train.ema=true --set model.drop_path_rate=0.1 --set model.drop_rate=0.1 --set train.epochs=" +
           std::to_string(epochs);
  }
  RunResult train(const std::string& name, const std::string& extra = "") {
    return run_cli("train" + args + extra + " --out " + (dir / name).string());
  }
  // The uninterrupted run every test compares with.
  const std::string& straight_model() {
    if (straight_.empty()) {
      REQUIRE(train("straight").status == 0);
      straight_ = read_file(dir / "straight" / "model.safetensors");
    }
    return straight_;
  }

 private:
  std::string straight_;
};

void flip_byte(const fs::path& path, size_t at) {
  std::string bytes = read_file(path);
  bytes[at % bytes.size()] ^= 0x40;
  std::ofstream(path, std::ios::binary) << bytes;
}

int64_t logged_steps(const fs::path& metrics) {
  std::ifstream in(metrics);
  int64_t n = 0;
  for (std::string line; std::getline(in, line);) n += !line.empty();
  return n;
}

// Waits (up to a minute) until the run writing into `out` has logged 20
// steps: past epoch 1's checkpoint, inside epoch 2.
void wait_inside_epoch_2(const fs::path& out) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (logged_steps(out / "metrics.jsonl") < 20 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
}

}  // namespace

TEST_CASE("a damaged checkpoint is named, resume falls back to the one before, and ends bitwise the same") {
  TinyRun run;
  const std::string straight = run.straight_model();
  REQUIRE(run.train("split", " --stop-after 2").status == 0);
  const fs::path split = run.dir / "split";
  REQUIRE(fs::exists(split / "checkpoint-last-prev" / "state.json"));  // epoch 1, kept until the next save
  const nlohmann::json state = nlohmann::json::parse(read_file(split / "checkpoint-last" / "state.json"));
  CHECK(state["files"].contains("model.safetensors"));
  CHECK(state["files"].contains("optimizer.pt"));
  CHECK(state.contains("libtorch"));
  CHECK(state["config"].get<std::string>().find("embed_dim: 32") != std::string::npos);

  flip_byte(split / "checkpoint-last" / "model.safetensors", 5000);
  RunResult r = run.train("split", " --resume");
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("model.safetensors: damaged") && Catch::Contains("CRC-32") &&
                           Catch::Contains("checkpoint-last-prev instead"));
  CHECK(read_file(split / "model.safetensors") == straight);

  // Both damaged: a clear error, nothing overwritten.
  flip_byte(split / "checkpoint-last" / "optimizer.pt", 300);
  flip_byte(split / "checkpoint-last-prev" / "rng.safetensors", 100);
  RunResult both = run.train("split", " --resume");
  CHECK(both.status == 1);
  CHECK_THAT(both.output, Catch::Contains("rng.safetensors: damaged"));
  CHECK(read_file(split / "model.safetensors") == straight);
}

TEST_CASE("a crash while the checkpoint was being replaced loses only that epoch") {
  TinyRun run;
  const std::string straight = run.straight_model();
  REQUIRE(run.train("split", " --stop-after 2").status == 0);
  const fs::path split = run.dir / "split";
  // As left by a kill between the two renames of a save: the new checkpoint
  // half-written under its temporary name, the last one moved aside.
  fs::rename(split / "checkpoint-last", split / "checkpoint-last.tmp");
  flip_byte(split / "checkpoint-last.tmp" / "state.json", 10);
  RunResult r = run.train("split", " --resume");
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Catch::Contains("checkpoint-last-prev instead"));
  CHECK(read_file(split / "model.safetensors") == straight);
}

TEST_CASE("SIGTERM stops training at a step with a checkpoint there, and resume ends bitwise the same") {
  TinyRun run;
  const std::string straight = run.straight_model();
  const fs::path out = run.dir / "stopped";
  const pid_t pid = start_cli("train" + run.args + " --out " + out.string(), run.dir / "log");
  wait_inside_epoch_2(out);  // and stop it there
  ::kill(pid, SIGTERM);
  const int status = wait_cli(pid);
  const std::string log = read_file(run.dir / "log");
  INFO(log);
  REQUIRE(status == 128 + SIGTERM);
  CHECK_THAT(log, Catch::Contains("stopped by SIGTERM at step") && Catch::Contains("continue with --resume"));
  const nlohmann::json state = nlohmann::json::parse(read_file(out / "checkpoint-last" / "state.json"));
  CHECK(state["batch"].get<int64_t>() > 0);  // inside an epoch
  CHECK(state["step"].get<int64_t>() >= 20);
  CHECK_FALSE(fs::exists(out / "model.safetensors"));

  RunResult r = run_cli("train" + run.args + " --resume --out " + out.string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK(read_file(out / "model.safetensors") == straight);
  CHECK(read_file(out / "metrics.csv") == read_file(run.dir / "straight" / "metrics.csv"));
  CHECK(logged_steps(out / "metrics.jsonl") == 48);  // one line per step, none twice
}

TEST_CASE("SIGKILL at several points, resumed each time, ends bitwise where an uninterrupted run does") {
  TinyRun run(8);
  const auto start = std::chrono::steady_clock::now();
  const std::string straight = run.straight_model();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const fs::path out = run.dir / "killed";
  // Kill points spread over start-up, steps, evaluation and checkpoint
  // writes: fractions of an uninterrupted run's time after each (re)start.
  int kills = 0;
  for (double fraction : {0.1, 0.3, 0.45, 0.6, 0.75, 0.9}) {
    // --resume once the run has its config.yaml: a kill before that left nothing.
    const std::string resume = fs::exists(out / "config.yaml") ? " --resume" : "";
    const pid_t pid =
        start_cli("train" + run.args + resume + " --out " + out.string(), run.dir / ("log" + std::to_string(kills)));
    std::this_thread::sleep_for(std::chrono::duration<double>(fraction * seconds));
    ::kill(pid, SIGKILL);
    const int status = wait_cli(pid);
    if (status == 0) break;  // finished before the kill
    REQUIRE(status == 128 + SIGKILL);
    ++kills;
  }
  CHECK(kills >= 3);
  RunResult r = run_cli("train" + run.args + " --resume --out " + out.string());
  INFO(r.output);
  REQUIRE(r.status == 0);
  CHECK(read_file(out / "model.safetensors") == straight);
  CHECK(read_file(out / "metrics.csv") == read_file(run.dir / "straight" / "metrics.csv"));
}

TEST_CASE("a full disk while checkpointing is a clear error and the previous checkpoint stays whole") {
  TinyRun run;
  const std::string straight = run.straight_model();
  REQUIRE(run.train("full", " --stop-after 2").status == 0);
  const fs::path full = run.dir / "full";
  const std::string before = read_file(full / "checkpoint-last" / "state.json");
  const std::string weights = read_file(full / "model.safetensors");  // written at --stop-after
  // Files may grow to 32 KiB only (RLIMIT_FSIZE, in sh's 512-byte blocks;
  // SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk):
  // the model file of the next checkpoint (110 KB) does not fit.
  RunResult r = run_shell("trap '' XFSZ; ulimit -f 64; exec " + std::string(VITLAB_BIN) + " train" + run.args +
                          " --resume --out " + full.string());
  INFO(r.output);
  CHECK(r.status == 1);
  CHECK_THAT(r.output, Catch::Contains("checkpoint-last.tmp/model.safetensors") && Catch::Contains("File too large"));
  CHECK(read_file(full / "checkpoint-last" / "state.json") == before);
  CHECK(read_file(full / "model.safetensors") == weights);
  RunResult resumed = run.train("full", " --resume");
  INFO(resumed.output);
  REQUIRE(resumed.status == 0);
  CHECK_THAT(resumed.output, !Catch::Contains("warning"));  // checkpoint-last itself was whole
  CHECK(read_file(full / "model.safetensors") == straight);
}

// Root ignores permission bits, but not an immutable directory (chattr +i on
// ext4, where CI runs). Where neither stops this process, the test says so.
TEST_CASE("a read-only run directory is a clear error and its checkpoint stays whole") {
  TinyRun run;
  REQUIRE(run.train("ro", " --stop-after 2").status == 0);
  const fs::path ro = run.dir / "ro";
  const std::string before = read_file(ro / "checkpoint-last" / "state.json");
  const std::string weights = read_file(ro / "model.safetensors");
  struct Writable {  // restored whatever the checks do, so that TempDir can delete it
    std::string dir;
    ~Writable() { run_shell("chattr -i '" + dir + "' 2>/dev/null; chmod 755 '" + dir + "'"); }
  } restore{ro.string()};
  const std::string probe =
      "touch '" + (ro / "probe").string() + "' 2>/dev/null && rm '" + (ro / "probe").string() + "'";
  run_shell("chmod 555 '" + ro.string() + "'; " + probe + " && chattr +i '" + ro.string() + "'");
  if (run_shell(probe).status == 0)
    VITLAB_SKIP("no way to make a directory read-only for this process here (not root on ext4?)");
  RunResult r = run.train("ro", " --resume");
  INFO(r.output);
  CHECK(r.status == 1);
  CHECK_THAT(r.output, Catch::Contains("error: " + ro.string()) &&
                           (Catch::Contains("Permission denied") || Catch::Contains("Operation not permitted")));
  CHECK(read_file(ro / "checkpoint-last" / "state.json") == before);
  CHECK(read_file(ro / "model.safetensors") == weights);
}

TEST_CASE("resuming a directory that holds no run is a clear error") {
  TempDir dir;
  RunResult r = run_cli("train" + std::string(kTinyTrain) + " --set data.type=fashion_mnist --resume --out " +
                        (dir / "typo").string());
  CHECK(r.status == 1);
  CHECK_THAT(r.output, Catch::Contains("nothing to resume"));
}

TEST_CASE("a run directory's lock admits one holder and names it to the next") {
  TempDir dir;
  const fs::path run = dir / "run";
  {
    const RunLock held(run);
    // flock: a second open of the lock file conflicts even in the same process.
    CHECK_THROWS_WITH(RunLock{run}, Catch::StartsWith(run.string() + ": the run directory is in use by pid " +
                                                      std::to_string(::getpid()) + " on host"));
  }
  const RunLock again(run);  // released with its holder
  CHECK_THAT(read_file(run / ".lock"), Catch::StartsWith(std::to_string(::getpid()) + " "));
}

TEST_CASE("a second vitlab train on a run directory in use stops at start, and a SIGKILLed run resumes at once") {
  TinyRun run;
  const fs::path out = run.dir / "run";
  const pid_t first = start_cli("train" + run.args + " --out " + out.string(), run.dir / "first.log");
  wait_inside_epoch_2(out);  // then stopped there, holding the lock
  ::kill(first, SIGSTOP);
  const int64_t steps = logged_steps(out / "metrics.jsonl");
  RunResult second = run.train("run");
  INFO(second.output);
  CHECK(second.status == 1);
  CHECK_THAT(second.output, Catch::Contains("error: " + out.string() + ": the run directory is in use by pid " +
                                            std::to_string(first)));
  CHECK(logged_steps(out / "metrics.jsonl") == steps);  // it wrote nothing

  ::kill(first, SIGKILL);
  REQUIRE(wait_cli(first) == 128 + SIGKILL);
  RunResult resumed = run.train("run", " --resume");
  INFO(read_file(run.dir / "first.log") + resumed.output);
  REQUIRE(steps >= 20);
  CHECK(resumed.status == 0);
  CHECK_THAT(resumed.output, Catch::Contains("resuming"));
}
