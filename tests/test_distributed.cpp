#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <thread>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "common/error.h"
#include "common/files.h"
#include "data/loader.h"
#include "io/safetensors.h"
#include "tests/helpers.h"
#include "train/distributed.h"

using namespace vitlab;
using namespace vitlab::test;

extern char** environ;

namespace {

using Vars = std::map<std::string, std::string>;

DistEnv parse(const Vars& vars) {
  return parse_dist_env([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

// A tiny recipe with augmentation and dropout off, so that data parallelism
// is the only difference between runs.
void write_config(const fs::path& file, const std::string& data,
                  const std::string& model =
                      "{name: vit_tiny_patch16_224, img_size: 28, patch_size: 7, in_chans: 1, "
                      "embed_dim: 32, depth: 2, num_heads: 2}") {
  std::ofstream(file) << "model: " << model << "\n"
                      << "data: " << data << "\n"
                      << "optim: {lr: 1.0e-3, clip_grad: 1.0}\n"
                         "schedule: {warmup_epochs: 0.5}\n"
                         "aug: {scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip: 0.0, auto_augment: '', color_jitter: 0.0, "
                         "reprob: 0.0, mixup: 0.0, cutmix: 0.0, smoothing: 0.0, crop_pct: 1.0}\n"
                         "train: {epochs: 2, batch_size: 16, threads: 1, log_interval: 1}\n";
}

// dir/cfg.yaml: the tiny recipe on an ImageFolder of 64 + 64 Fashion-MNIST
// images in dir/data; dir/deepvit.yaml the same with a DeepViT.
void write_image_folder_config(const TempDir& dir) {
  REQUIRE(
      run_cli(fmt::format("data export --dataset fashion_mnist --out {} --limit 64", (dir / "data").string())).status ==
      0);
  const std::string data = fmt::format("{{type: imagefolder, root: {}, workers: 1}}", (dir / "data").string());
  write_config(dir / "cfg.yaml", data);
  write_config(dir / "deepvit.yaml", data,
               "{name: deepvit_patch16_224_re_attn_16b, img_size: 28, patch_size: 7, in_chans: 1, embed_dim: 32, "
               "depth: 2, num_heads: 4, apply_transform: all}");
}

// The largest difference between two runs' model.safetensors, buffers included.
double weights_diff(const fs::path& a_run, const fs::path& b_run) {
  const StateDict a = read_weights(a_run / "model.safetensors"), b = read_weights(b_run / "model.safetensors");
  REQUIRE(a.size() == b.size());
  double diff = 0.0;
  for (const auto& [k, v] : a) diff = std::max(diff, max_abs_diff(v, b.at(k)));
  return diff;
}

// torchrun's variables for rank `rank` of a 2-process group on this machine.
Vars torchrun_vars(int rank, int port) {
  return {{"RANK", std::to_string(rank)},
          {"LOCAL_RANK", std::to_string(rank)},
          {"WORLD_SIZE", "2"},
          {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)}};
}

// Starts `vitlab ARGS` as one rank, output to `log`, with `vars` and no other
// rendezvous variable: none of the test's own environment (a CI job under
// srun or torchrun) leaks in.
pid_t start_rank(const Vars& vars, const std::vector<std::string>& args, const fs::path& log) {
  static const std::set<std::string> torchrun = {"RANK",       "LOCAL_RANK",  "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                 "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"};
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e, name = entry.substr(0, entry.find('='));
    if (torchrun.count(name) == 0 && name.rfind("SLURM_", 0) != 0) env.push_back(entry);
  }
  for (const auto& [k, v] : vars) env.push_back(k + "=" + v);
  // Everything the child needs is made before fork: it only opens, dups and execs.
  std::vector<char*> argv{const_cast<char*>(VITLAB_BIN)}, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  for (auto& e : env) envp.push_back(e.data());
  argv.push_back(nullptr);
  envp.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execve(VITLAB_BIN, argv.data(), envp.data());
    std::_Exit(127);
  }
  return pid;
}

// The exit status of pid, or -1 if it is still running after `seconds`.
int wait_exit(pid_t pid, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// wait_exit, and a rank still running then is killed (and reaped).
int wait_or_kill(pid_t pid, double seconds) {
  const int status = wait_exit(pid, seconds);
  if (status < 0) {
    ::kill(pid, SIGKILL);
    wait_exit(pid, 10);
  }
  return status;
}

// A metrics.csv's rows, without its header.
std::vector<std::vector<double>> csv_rows(const fs::path& csv) {
  std::vector<std::vector<double>> out;
  std::ifstream in(csv);
  std::string line;
  std::getline(in, line);
  while (std::getline(in, line)) {
    std::vector<double> row;
    std::stringstream fields(line);
    for (std::string f; std::getline(fields, f, ',');) row.push_back(std::stod(f));
    out.push_back(row);
  }
  return out;
}

int64_t line_count(const fs::path& file) {
  std::ifstream in(file);
  int64_t n = 0;
  for (std::string line; std::getline(in, line);) ++n;
  return n;
}

// The data-parallel run `two` (2 epochs) took the path of the one-process
// run `one` at its doubled batch: the same final weights, the same epoch
// metrics (the train loss is every rank's, evaluation covers the whole
// split), and one per-step log line per optimizer step (only rank 0 wrote).
void check_same_trajectory(const fs::path& one, const fs::path& two) {
  CHECK(weights_diff(one, two) <= 1e-5);
  const auto r1 = csv_rows(one / "metrics.csv"), r2 = csv_rows(two / "metrics.csv");
  REQUIRE(r1.size() == 2);
  REQUIRE(r2.size() == 2);
  for (size_t e = 0; e < 2; ++e)
    for (size_t c = 0; c < r1[e].size(); ++c) CHECK(r2[e][c] == Approx(r1[e][c]).margin(2e-6));
  CHECK(line_count(two / "metrics.jsonl") == line_count(one / "metrics.jsonl"));
}

// dir's tiny recipe trained by one process into dir/one, and by 2 ranks at
// half the batch into dir/two, rank r started with the variables vars(r):
// the same trajectory.
void check_two_ranks_match_one(const TempDir& dir, const std::function<Vars(int)>& vars) {
  write_image_folder_config(dir);
  const std::string cfg = (dir / "cfg.yaml").string();
  RunResult one = run_cli(fmt::format("train --config {} --out {}", cfg, (dir / "one").string()));
  INFO(one.output);
  REQUIRE(one.status == 0);
  const std::vector<std::string> args = {
      "train", "--config", cfg, "--set", "train.batch_size=8", "--out", (dir / "two").string()};
  const pid_t r0 = start_rank(vars(0), args, dir / "r0.log");
  const pid_t r1 = start_rank(vars(1), args, dir / "r1.log");
  const int s0 = wait_or_kill(r0, 60), s1 = wait_or_kill(r1, 60);
  const std::string log0 = read_file(dir / "r0.log");
  INFO(log0 + read_file(dir / "r1.log"));
  REQUIRE(s0 == 0);
  REQUIRE(s1 == 0);
  CHECK_THAT(log0, Catch::Contains("2 processes"));
  check_same_trajectory(dir / "one", dir / "two");
}

bool wait_for_file(const fs::path& file, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    if (fs::exists(file) && fs::file_size(file) > 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace

TEST_CASE("torchrun environment: parsed, and bad values are errors naming the variable") {
  DistEnv single = parse({});
  CHECK_FALSE(single.distributed());
  CHECK(single.rank == 0);

  DistEnv e = parse({{"WORLD_SIZE", "4"},
                     {"RANK", "3"},
                     {"LOCAL_RANK", "1"},
                     {"LOCAL_WORLD_SIZE", "2"},
                     {"MASTER_ADDR", "node0"},
                     {"MASTER_PORT", "29400"},
                     {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                     {"TORCHELASTIC_RESTART_COUNT", "2"}});
  CHECK(e.distributed());
  CHECK(e.world_size == 4);
  CHECK(e.rank == 3);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world_size == 2);
  CHECK(e.master_addr == "node0");
  CHECK(e.master_port == 29400);
  CHECK(e.agent_store);
  CHECK(e.restart_count == 2);
  CHECK(parse({{"WORLD_SIZE", "2"}, {"RANK", "1"}}).local_world_size == 2);  // torchrun always sets it; launch too

  const std::map<std::string, std::string> ok = {{"WORLD_SIZE", "2"}, {"RANK", "0"}};
  auto with = [&](const std::string& k, const std::string& v) {
    auto m = ok;
    m[k] = v;
    return m;
  };
  CHECK_THROWS_WITH(parse(with("WORLD_SIZE", "two")), Catch::Contains("WORLD_SIZE") && Catch::Contains("integer"));
  CHECK_THROWS_WITH(parse(with("WORLD_SIZE", "0")), Catch::Contains("WORLD_SIZE"));
  CHECK_THROWS_WITH(parse(with("RANK", "2")), Catch::Contains("RANK=\"2\"") && Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(parse(with("RANK", "-1")), Catch::Contains("RANK"));
  CHECK_THROWS_WITH(parse(with("MASTER_PORT", "70000")), Catch::Contains("MASTER_PORT"));
  CHECK_THROWS_WITH(parse(with("MASTER_PORT", "29500x")), Catch::Contains("MASTER_PORT"));
  CHECK_THROWS_WITH(parse(with("MASTER_ADDR", "")), Catch::Contains("MASTER_ADDR is empty"));
  CHECK_THROWS_WITH(parse(with("TORCHELASTIC_USE_AGENT_STORE", "maybe")),
                    Catch::Contains("TORCHELASTIC_USE_AGENT_STORE"));
  CHECK_THROWS_WITH(parse({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "1"}}),
                    Catch::Contains("LOCAL_RANK=1 must be below") && Catch::Contains("LOCAL_WORLD_SIZE=\"1\""));
  CHECK_THROWS_WITH(parse({{"WORLD_SIZE", "2"}}), Catch::Contains("RANK is not"));
}

TEST_CASE("srun's task variables: parsed without torchrun's, which win when both are set") {
  const Vars slurm = {{"SLURM_PROCID", "5"},
                      {"SLURM_NTASKS", "8"},
                      {"SLURM_LOCALID", "1"},
                      {"SLURM_NTASKS_PER_NODE", "4"},
                      {"SLURM_JOB_NODELIST", "gpu[07-08]"},
                      {"SLURM_JOB_ID", "123456"}};
  auto with = [&](const Vars& changes) {
    Vars m = slurm;
    for (const auto& [k, v] : changes) m[k] = v;
    return m;
  };
  const DistEnv e = parse(slurm);
  CHECK(e.rank == 5);
  CHECK(e.world_size == 8);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world_size == 4);
  CHECK(e.master_addr == "gpu07");
  CHECK(e.master_port == 29500 + 456);
  CHECK(parse(with({{"SLURM_STEP_NODELIST", "cpu[3-4]"}})).master_addr == "cpu3");  // the step's nodes first
  const DistEnv set = parse(with({{"MASTER_ADDR", "node9"}, {"MASTER_PORT", "1234"}}));
  CHECK(set.master_addr == "node9");
  CHECK(set.master_port == 1234);
  Vars no_job = slurm;
  no_job.erase("SLURM_JOB_ID");
  CHECK(parse(no_job).master_port == 29500);
  CHECK(parse(with({{"SLURM_JOB_ID", "4294967295"}})).master_port == 29500 + 295);
  CHECK(parse(with({{"SLURM_JOB_ID", "7"}})).master_port == 29507);
  // Without --ntasks-per-node: this node's count in SLURM_TASKS_PER_NODE.
  Vars counts = with({{"SLURM_TASKS_PER_NODE", "3(x2),2"}, {"SLURM_NODEID", "2"}});
  counts.erase("SLURM_NTASKS_PER_NODE");
  CHECK(parse(counts).local_world_size == 2);
  counts["SLURM_NODEID"] = "1";
  CHECK(parse(counts).local_world_size == 3);
  CHECK(parse(with({{"SLURM_NTASKS_PER_NODE", "16"}})).local_world_size == 8);  // the job's, over a smaller step
  CHECK_FALSE(parse(with({{"SLURM_NTASKS", "1"}, {"SLURM_PROCID", "0"}})).distributed());
  // torchrun under srun (one task per node): torchrun's variables decide.
  const DistEnv torchrun = parse(with({{"WORLD_SIZE", "2"}, {"RANK", "1"}}));
  CHECK(torchrun.rank == 1);
  CHECK(torchrun.world_size == 2);
  CHECK(torchrun.local_rank == 0);
  CHECK(torchrun.master_addr == "127.0.0.1");
  CHECK(torchrun.master_port == 29500);

  CHECK_THROWS_WITH(parse(with({{"SLURM_PROCID", "8"}})), Catch::Contains("SLURM_PROCID=\"8\""));
  CHECK_THROWS_WITH(parse(with({{"SLURM_LOCALID", "4"}})),
                    Catch::Contains("SLURM_LOCALID=4 must be below") && Catch::Contains("SLURM_NTASKS_PER_NODE"));
  CHECK_THROWS_WITH(parse(with({{"SLURM_JOB_ID", "12x"}})), Catch::Contains("SLURM_JOB_ID=\"12x\""));
  CHECK_THROWS_WITH(parse(with({{"SLURM_JOB_NODELIST", "gpu[07-"}})),
                    Catch::Contains("SLURM_JOB_NODELIST=\"gpu[07-\""));
  Vars no_nodes = slurm;
  no_nodes.erase("SLURM_JOB_NODELIST");
  CHECK_THROWS_WITH(parse(no_nodes), Catch::Contains("set MASTER_ADDR"));
  counts["SLURM_TASKS_PER_NODE"] = "3(x2";
  CHECK_THROWS_WITH(parse(counts), Catch::Contains("SLURM_TASKS_PER_NODE=\"3(x2\""));
  counts["SLURM_TASKS_PER_NODE"] = "3";
  CHECK_THROWS_WITH(parse(counts), Catch::Contains("no count for node SLURM_NODEID=1"));
}

TEST_CASE("SLURM host lists expand as scontrol show hostnames does") {
  using Hosts = std::vector<std::string>;
  CHECK(expand_hostlist("cpu3", "L") == Hosts{"cpu3"});
  CHECK(expand_hostlist("gpu[01-04,07],cpu3", "L") == Hosts{"gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"});
  CHECK(expand_hostlist("n[8-10]", "L") == Hosts{"n8", "n9", "n10"});
  CHECK(expand_hostlist("n[098-101]", "L") == Hosts{"n098", "n099", "n100", "n101"});
  CHECK(expand_hostlist("r[1-2]-n[01-02]", "L") == Hosts{"r1-n01", "r1-n02", "r2-n01", "r2-n02"});
  CHECK(expand_hostlist("a,b[1,3]c,10.0.0.1,d[5]", "L") == Hosts{"a", "b1c", "b3c", "10.0.0.1", "d5"});
  for (const std::string bad : {"", "gpu[01-04", "gpu01]", "gpu[]", "gpu[04-01]", "gpu[a-b]", "gpu[1,]", "gpu[1-2-3]",
                                "a,,b", "a,", "gpu[[1]]", "n[0-99999999]", "n[0-999]m[0-9999]"})
    CHECK_THROWS_WITH(expand_hostlist(bad, "SLURM_JOB_NODELIST"),
                      Catch::Contains("SLURM_JOB_NODELIST=\"" + bad + "\" is not a SLURM host list"));
}

TEST_CASE("data loader shards like DistributedSampler") {
  ImageSet set;
  set.images = torch::arange(11, torch::kUInt8).view({11, 1, 1, 1});
  set.labels = torch::arange(11);
  set.classes = {"a"};
  auto source = std::make_shared<MemorySource>(set);
  TransformOptions tf;
  tf.img_size = 1;
  tf.in_chans = 1;
  tf.scale = {1.0, 1.0};
  tf.ratio = {1.0, 1.0};
  tf.hflip = 0.0;
  tf.crop_pct = 1.0;
  tf.mean = {0.0};
  tf.std = {1.0};
  auto labels_of = [&](bool train, int rank, int world) {
    LoaderOptions o;
    o.train = train;
    o.drop_last = false;
    o.batch_size = 4;
    o.rank = rank;
    o.world_size = world;
    DataLoader loader(source, tf, o);
    loader.begin_epoch(3);
    std::vector<int64_t> out;
    while (auto b = loader.next())
      for (int64_t i = 0; i < b->labels.size(0); ++i) out.push_back(b->labels[i].item<int64_t>());
    CHECK(static_cast<int64_t>(out.size()) == loader.shard_size());
    return out;
  };
  // Training: the one-process order, padded by wrapping to 12, dealt out.
  const std::vector<int64_t> all = labels_of(true, 0, 1);
  const std::vector<int64_t> r0 = labels_of(true, 0, 2), r1 = labels_of(true, 1, 2);
  REQUIRE(r0.size() == 6);
  REQUIRE(r1.size() == 6);
  for (size_t i = 0; i < 6; ++i) {
    CHECK(r0[i] == all[2 * i]);
    CHECK(r1[i] == all[(2 * i + 1) % 11]);
  }
  // Evaluation: no padding, the shards partition the split.
  const std::vector<int64_t> e0 = labels_of(false, 0, 3), e1 = labels_of(false, 1, 3), e2 = labels_of(false, 2, 3);
  CHECK(e0 == std::vector<int64_t>{0, 3, 6, 9});
  CHECK(e1 == std::vector<int64_t>{1, 4, 7, 10});
  CHECK(e2 == std::vector<int64_t>{2, 5, 8});
}

TEST_CASE("2 ranks with Gloo on loopback end with the weights of 1 process at the doubled batch") {
  TempDir dir;
  write_image_folder_config(dir);
  RunResult one =
      run_cli(fmt::format("train --config {} --out {}", (dir / "cfg.yaml").string(), (dir / "one").string()));
  INFO(one.output);
  REQUIRE(one.status == 0);
  RunResult two = run_cli(fmt::format("launch --nproc 2 -- train --config {} --set train.batch_size=8 --out {}",
                                      (dir / "cfg.yaml").string(), (dir / "two").string()));
  INFO(two.output);
  REQUIRE(two.status == 0);
  CHECK_THAT(two.output, Catch::Contains("2 processes"));
  check_same_trajectory(dir / "one", dir / "two");
  // A distributed run stopped after an epoch and resumed ends where the
  // uninterrupted one did.
  const std::string resumed = fmt::format("launch --nproc 2 -- train --config {} --set train.batch_size=8 --out {}",
                                          (dir / "cfg.yaml").string(), (dir / "resumed").string());
  REQUIRE(run_cli(resumed + " --stop-after 1").status == 0);
  RunResult rest = run_cli(resumed + " --resume");
  INFO(rest.output);
  REQUIRE(rest.status == 0);
  CHECK_THAT(rest.output, Catch::Contains("resuming"));
  CHECK(weights_diff(dir / "two", dir / "resumed") == 0.0);
  CHECK(line_count(dir / "two" / "metrics.jsonl") == 8);  // 64 images / 16 per step, 2 epochs
  const auto summary = nlohmann::json::parse(read_file(dir / "two" / "summary.json"));
  CHECK(summary["processes"] == 2);
}

TEST_CASE("2 ranks started with srun's variables on loopback train like 1 process at the doubled batch") {
  TempDir dir;
  // MASTER_ADDR from the node list, MASTER_PORT from the job id.
  check_two_ranks_match_one(dir, [](int rank) -> Vars {
    return {{"SLURM_PROCID", std::to_string(rank)},
            {"SLURM_LOCALID", std::to_string(rank)},
            {"SLURM_NTASKS", "2"},
            {"SLURM_TASKS_PER_NODE", "2"},
            {"SLURM_JOB_NODELIST", "127.0.0.1"},
            {"SLURM_JOB_ID", std::to_string(::getpid())}};
  });
}

TEST_CASE("2 single-rank nodes on loopback train like 1 process at the doubled batch") {
  // torchrun --nnodes 2 --nproc-per-node 1: LOCAL_RANK 0 on both nodes.
  TempDir dir;
  const int port = 29002 + static_cast<int>(::getpid() % 1000);
  check_two_ranks_match_one(dir, [port](int rank) {
    Vars vars = torchrun_vars(rank, port);
    vars["LOCAL_RANK"] = "0";
    vars["LOCAL_WORLD_SIZE"] = "1";
    vars["GROUP_RANK"] = std::to_string(rank);
    return vars;
  });
}

TEST_CASE("synchronised BatchNorm: 2 DeepViT ranks train like 1 process at the doubled batch") {
  // SGD: AdamW would turn the numerically-zero gradients of biases right
  // before a BatchNorm (re-attention's Θ) into lr-sized steps of noise.
  TempDir dir;
  write_image_folder_config(dir);
  const std::string cfg = (dir / "deepvit.yaml").string(), sgd = "--set optim.opt=sgd --set optim.lr=0.05";
  RunResult one = run_cli(fmt::format("train --config {} {} --out {}", cfg, sgd, (dir / "one").string()));
  INFO(one.output);
  REQUIRE(one.status == 0);
  RunResult sync = run_cli(
      fmt::format("launch --nproc 2 -- train --config {} {} --set train.batch_size=8 --set train.sync_bn=true --out {}",
                  cfg, sgd, (dir / "sync").string()));
  INFO(sync.output);
  REQUIRE(sync.status == 0);
  CHECK(weights_diff(dir / "one", dir / "sync") <= 5e-5);
}

TEST_CASE("ranks rendezvous through torchrun's agent store when TORCHELASTIC_USE_AGENT_STORE is set") {
  TempDir dir;
  write_image_folder_config(dir);
  // The agent: a TCPStore server that the ranks join as clients, under the
  // key prefix of restart 1.
  c10d::TCPStoreOptions o;
  o.port = 0;
  o.isServer = true;
  o.waitWorkers = false;
  c10d::TCPStore agent("127.0.0.1", o);
  ::setenv("TORCHELASTIC_USE_AGENT_STORE", "True", 1);
  ::setenv("TORCHELASTIC_RESTART_COUNT", "1", 1);
  const std::vector<std::string> args = {"train",          "--config", (dir / "cfg.yaml").string(), "--set",
                                         "train.epochs=1", "--out",    (dir / "run").string()};
  const pid_t r0 = start_rank(torchrun_vars(0, agent.getPort()), args, dir / "r0.log");
  const pid_t r1 = start_rank(torchrun_vars(1, agent.getPort()), args, dir / "r1.log");
  ::unsetenv("TORCHELASTIC_USE_AGENT_STORE");
  ::unsetenv("TORCHELASTIC_RESTART_COUNT");
  const int s0 = wait_or_kill(r0, 60), s1 = wait_or_kill(r1, 60);
  INFO(read_file(dir / "r0.log") + read_file(dir / "r1.log"));
  CHECK(s0 == 0);
  CHECK(s1 == 0);
  CHECK(fs::exists(dir / "run" / "model.safetensors"));
  CHECK(agent.getNumKeys() > 0);  // the ranks rendezvoused through the agent
}

TEST_CASE("a rank that dies or hangs makes the other exit with a clear error within train.dist_timeout") {
  TempDir dir;
  write_config(dir / "cfg.yaml", "{type: fashion_mnist, workers: 1, train_limit: 20000}");
  for (const bool hang : {false, true}) {
    INFO((hang ? "rank 1 stopped (SIGSTOP)" : "rank 1 killed (SIGKILL)"));
    const fs::path out = dir / (hang ? "hang" : "dead");
    const std::vector<std::string> args = {"train",
                                           "--config",
                                           (dir / "cfg.yaml").string(),
                                           "--set",
                                           "train.batch_size=4",
                                           "--set",
                                           "train.dist_timeout=3",
                                           "--out",
                                           out.string()};
    const int port = 29000 + static_cast<int>(::getpid() % 1000) + (hang ? 1 : 0);
    const pid_t r0 = start_rank(torchrun_vars(0, port), args, dir / (hang ? "hang0.log" : "dead0.log"));
    const pid_t r1 = start_rank(torchrun_vars(1, port), args, dir / (hang ? "hang1.log" : "dead1.log"));
    // Both are training once rank 0 has logged a step.
    const bool started = wait_for_file(out / "metrics.jsonl", 60);
    ::kill(r1, hang ? SIGSTOP : SIGKILL);
    const auto t0 = std::chrono::steady_clock::now();
    const int status = wait_exit(r0, 30);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (status < 0) ::kill(r0, SIGKILL);
    ::kill(r1, SIGKILL);
    wait_exit(r1, 10);
    wait_exit(r0, 10);
    const std::string log = read_file(dir / (hang ? "hang0.log" : "dead0.log"));
    INFO(log);
    REQUIRE(started);
    CHECK(status > 0);
    CHECK(seconds < 3 + 10);
    CHECK_THAT(log, Catch::Contains("another rank died or stopped answering"));
  }
}

TEST_CASE("vitlab launch: bad arguments are clear errors") {
  CHECK_THAT(run_cli("launch --nproc 0 -- models").output, Catch::Contains("--nproc"));
  CHECK(run_cli("launch --nproc 2").status != 0);
  RunResult r = run_cli("launch --nproc 2 -- no-such-command");
  CHECK(r.status != 0);
  CHECK_THAT(r.output, Catch::Contains("rank") && Catch::Contains("exited with status"));
}
