#include "train/distributed.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <regex>
#include <sstream>

#include "common/error.h"
#include "common/process.h"

#ifdef VITLAB_WITH_GLOO
#include <torch/csrc/autograd/utils/lambda_post_hook.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef VITLAB_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace vitlab {

namespace {

// LibTorch's messages carry a C++ backtrace after the first line.
std::string first_line(const char* text) {
  const std::string s = text;
  return s.substr(0, s.find('\n'));
}

int int_variable(const std::function<const char*(const char*)>& get, const char* name, int fallback, int min, int max) {
  const char* text = get(name);
  if (!text) return fallback;
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || errno != 0 || value < min || value > max)
    fail("environment variable {}={:?} must be an integer in [{}, {}]", name, text, min, max);
  return static_cast<int>(value);
}

constexpr size_t kMaxHosts = 1 << 20;  // a bound on what a typo such as [0-999999999] expands to

// A bracket's numbers: "01-04,07" -> 01 02 03 04 07, each as wide as the
// start of its range.
std::vector<std::string> expand_bracket(const std::string& group, const std::function<void(const char*)>& bad) {
  auto number = [](const std::string& s) {
    return !s.empty() && s.size() <= 9 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  std::vector<std::string> out;
  std::stringstream items(group);
  for (std::string item; std::getline(items, item, ',');) {
    const size_t dash = item.find('-');
    const std::string lo = item.substr(0, dash), hi = dash == std::string::npos ? lo : item.substr(dash + 1);
    if (!number(lo) || !number(hi)) bad("a bracket holds numbers and ranges such as [01-04,07]");
    const long first = std::stol(lo), last = std::stol(hi);
    if (last < first) bad("a range runs downwards");
    if (static_cast<size_t>(last - first) + out.size() >= kMaxHosts) bad("more than 2^20 hosts");
    for (long n = first; n <= last; ++n) out.push_back(fmt::format("{:0{}}", n, lo.size()));
  }
  if (out.empty() || group.back() == ',') bad("an empty bracket or range");
  return out;
}

// One name of the list, its brackets multiplied out left to right.
std::vector<std::string> expand_name(const std::string& name, const std::function<void(const char*)>& bad) {
  if (name.empty()) bad("an empty host name");
  std::vector<std::string> hosts{""};
  size_t at = 0;
  while (at < name.size()) {
    const size_t open = name.find('[', at), close = name.find(']', at);
    if (close < open) bad("']' without '['");
    const std::string text = name.substr(at, open - at);
    for (auto& h : hosts) h += text;
    if (open == std::string::npos) break;
    if (close == std::string::npos) bad("'[' without ']'");
    const std::string group = name.substr(open + 1, close - open - 1);
    if (group.find('[') != std::string::npos) bad("'[' inside a bracket");
    const std::vector<std::string> numbers = expand_bracket(group, bad);
    if (hosts.size() * numbers.size() > kMaxHosts) bad("more than 2^20 hosts");
    std::vector<std::string> product;
    for (const auto& h : hosts)
      for (const auto& n : numbers) product.push_back(h + n);
    hosts = std::move(product);
    at = close + 1;
  }
  return hosts;
}

}  // namespace

std::vector<std::string> expand_hostlist(const std::string& list, const std::string& variable) {
  const std::function<void(const char*)> bad = [&](const char* why) {
    fail("environment variable {}={:?} is not a SLURM host list such as gpu[01-04,07],cpu3: {}", variable, list, why);
  };
  // Commas inside brackets separate numbers, outside them names.
  std::vector<std::string> hosts;
  size_t start = 0;
  bool in_bracket = false;
  for (size_t i = 0; i <= list.size(); ++i) {
    if (i == list.size() || (list[i] == ',' && !in_bracket)) {
      for (auto& h : expand_name(list.substr(start, i - start), bad)) hosts.push_back(std::move(h));
      start = i + 1;
    } else if (list[i] == '[' || list[i] == ']') {
      in_bracket = list[i] == '[';
    }
  }
  return hosts;
}

namespace {

// The variables that give a rank its place, under torchrun (and vitlab
// launch) or under srun.
struct RankVariables {
  const char* rank;
  const char* world_size;
  const char* local_rank;
};
constexpr RankVariables kTorchrun{"RANK", "WORLD_SIZE", "LOCAL_RANK"};
constexpr RankVariables kSlurm{"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};

// srun's task variables count only without torchrun's: torchrun started by
// srun (one task per node) sets the ranks of its own workers.
bool started_by_srun(const std::function<const char*(const char*)>& get) {
  return !get("WORLD_SIZE") && get("SLURM_PROCID") && get("SLURM_NTASKS") && get("SLURM_LOCALID");
}

// SLURM_TASKS_PER_NODE's count for node `node`: "2(x3),1" is 2 tasks on
// each of nodes 0-2 and 1 on node 3.
int tasks_on_node(const std::string& text, int node) {
  static const std::regex item(R"((\d{1,6})(?:\(x(\d{1,6})\))?)");
  std::stringstream items(text);
  int first = 0;
  for (std::string one; std::getline(items, one, ',');) {
    std::smatch m;
    if (!std::regex_match(one, m, item))
      fail("environment variable SLURM_TASKS_PER_NODE={:?} must be counts such as 2(x3),1", text);
    first += m[2].matched ? std::stoi(m[2]) : 1;
    if (node < first) return std::stoi(m[1]);
  }
  fail("environment variable SLURM_TASKS_PER_NODE={:?} has no count for node SLURM_NODEID={}", text, node);
}

// Ranks on this machine, used to share its CPUs; the variable it came from
// goes to `source`. Under srun SLURM_NTASKS_PER_NODE (--ntasks-per-node) or
// this node's count in SLURM_TASKS_PER_NODE, at most the step's ranks (the
// job's count is inherited by a smaller step).
int local_world_size(const std::function<const char*(const char*)>& get, bool slurm, int world_size,
                     const char*& source) {
  if (!slurm) {
    source = "LOCAL_WORLD_SIZE";
    return int_variable(get, source, world_size, 1, world_size);
  }
  source = "SLURM_NTASKS_PER_NODE";
  int size = world_size;
  if (get(source)) {
    size = int_variable(get, source, world_size, 1, 1 << 20);
  } else if (get("SLURM_TASKS_PER_NODE")) {
    source = "SLURM_TASKS_PER_NODE";
    size = tasks_on_node(get(source), int_variable(get, "SLURM_NODEID", 0, 0, 1 << 20));
  }
  return std::min(size, world_size);
}

// Where rank 0's store listens when MASTER_ADDR is not set: the first host
// of the step's (else the job's) nodes, where srun places task 0.
std::string slurm_master_addr(const std::function<const char*(const char*)>& get) {
  for (const char* name : {"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"})
    if (const char* list = get(name)) return expand_hostlist(list, name).front();
  fail(
      "SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is: set MASTER_ADDR to rank 0's "
      "host");
}

// 29500 + SLURM_JOB_ID % 1000 when MASTER_PORT is not set: two jobs that
// share a node then rarely pick the same port, and it stays below Linux's
// ephemeral ports (32768 up) that outgoing connections take. The id's last
// three digits, whatever its size (federated job ids pass 2^31).
int slurm_master_port(const std::function<const char*(const char*)>& get) {
  const char* id = get("SLURM_JOB_ID");
  if (!id) return 29500;
  const std::string text = id;
  if (text.empty() || text.size() > 20 || text.find_first_not_of("0123456789") != std::string::npos)
    fail("environment variable SLURM_JOB_ID={:?} must be a job number", text);
  return 29500 + std::stoi(text.substr(text.size() - std::min<size_t>(3, text.size())));
}

}  // namespace

DistEnv parse_dist_env(const std::function<const char*(const char*)>& get) {
  DistEnv env;
  const bool slurm = started_by_srun(get);
  const RankVariables& v = slurm ? kSlurm : kTorchrun;
  env.world_size = int_variable(get, v.world_size, 1, 1, 1 << 20);
  if (!env.distributed()) return env;
  if (!get(v.rank))
    fail("environment variable {}={} is set but {} is not (start with torchrun, srun or vitlab launch)", v.world_size,
         env.world_size, v.rank);
  env.rank = int_variable(get, v.rank, 0, 0, env.world_size - 1);
  env.local_rank = int_variable(get, v.local_rank, 0, 0, env.world_size - 1);
  const char* local_source = nullptr;
  env.local_world_size = local_world_size(get, slurm, env.world_size, local_source);
  if (env.local_rank >= env.local_world_size)
    fail("environment variable {}={} must be below the {} ranks on this machine ({}={:?})", v.local_rank,
         env.local_rank, env.local_world_size, local_source, get(local_source));
  if (const char* addr = get("MASTER_ADDR")) {
    if (!*addr) fail("environment variable MASTER_ADDR is empty (expected a host name or address)");
    env.master_addr = addr;
  } else if (slurm) {
    env.master_addr = slurm_master_addr(get);
  }
  env.master_port = int_variable(get, "MASTER_PORT", slurm ? slurm_master_port(get) : env.master_port, 1, 65535);
  if (const char* agent = get("TORCHELASTIC_USE_AGENT_STORE")) {
    const std::string value = agent;
    if (value != "True" && value != "False" && value != "1" && value != "0")
      fail("environment variable TORCHELASTIC_USE_AGENT_STORE={:?} must be True or False", value);
    env.agent_store = value == "True" || value == "1";
  }
  env.restart_count = int_variable(get, "TORCHELASTIC_RESTART_COUNT", 0, 0, 1 << 20);
  return env;
}

DistEnv dist_env_from_environment() {
  return parse_dist_env([](const char* name) { return std::getenv(name); });
}

#ifdef VITLAB_WITH_GLOO

// The backends' common base: c10d::Backend since LibTorch 2.0.
#if TORCH_VERSION_MAJOR >= 2
using Backend = c10d::Backend;
#else
using Backend = c10d::ProcessGroup;
#endif

struct ProcessGroup::Impl {
  c10::intrusive_ptr<Backend> backend;  // holds the store
  std::vector<std::unique_ptr<Bucket>> buckets;
  // A shared_ptr up to LibTorch 2.x, an intrusive_ptr on later versions.
  using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::Tensor&>()));
  std::vector<NodePtr> accumulators;
  std::mutex mutex;  // autograd may run hooks on its device threads
  bool armed = false;
};

ProcessGroup::ProcessGroup(const DistEnv& env, const torch::Device& device, std::chrono::milliseconds timeout)
    : env_(env), timeout_(timeout) {
  if (!env_.distributed()) return;
  impl_ = std::make_unique<Impl>();
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(env_.master_port);
    o.isServer = !env_.agent_store && env_.rank == 0;
    o.numWorkers = static_cast<size_t>(env_.world_size);
    o.waitWorkers = !env_.agent_store;
    o.timeout = timeout;
    o.multiTenant = !env_.agent_store;
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(env_.master_addr, o);
    // torchrun's agent store is shared with the agent: keys go under the
    // prefix torch.distributed uses for this restart.
    if (env_.agent_store)
      store = c10::make_intrusive<c10d::PrefixStore>(fmt::format("/worker/attempt_{}", env_.restart_count), store);
    store = c10::make_intrusive<c10d::PrefixStore>("default_pg", store);
#ifdef VITLAB_WITH_NCCL
    if (device.is_cuda()) {
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      impl_->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, env_.rank, env_.world_size, options);
      return;
    }
#endif
    (void)device;
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
    const bool loopback = env_.master_addr == "127.0.0.1" || env_.master_addr == "localhost";
    options->devices.push_back(interface  ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                               : loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                          : c10d::ProcessGroupGloo::createDefaultDevice());
    impl_->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, env_.rank, env_.world_size, options);
  } catch (const std::exception& e) {
    fail("rank {} of {}: could not join the process group at {}:{} within {} s: {}", env_.rank, env_.world_size,
         env_.master_addr, env_.master_port, timeout.count() / 1000.0, first_line(e.what()));
  }
}

namespace {

void wait_for(const c10::intrusive_ptr<c10d::Work>& work, const char* what, std::chrono::milliseconds timeout,
              int rank) {
  try {
    work->wait(timeout);
  } catch (const std::exception& e) {
    fail("rank {}: {} failed: another rank died or stopped answering (timeout {} s, train.dist_timeout): {}", rank,
         what, timeout.count() / 1000.0, first_line(e.what()));
  }
}

}  // namespace

void ProcessGroup::broadcast(const std::vector<torch::Tensor>& tensors, const char* what) {
  if (!impl_ || tensors.empty()) return;
  // One message per dtype and device rather than one per tensor.
  torch::NoGradGuard no_grad;
  std::vector<bool> done(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (done[i]) continue;
    std::vector<torch::Tensor> same;
    for (size_t j = i; j < tensors.size(); ++j)
      if (!done[j] && tensors[j].scalar_type() == tensors[i].scalar_type() &&
          tensors[j].device() == tensors[i].device()) {
        same.push_back(tensors[j]);
        done[j] = true;
      }
    std::vector<torch::Tensor> flat;
    for (const auto& t : same) flat.push_back(t.reshape({-1}));
    std::vector<torch::Tensor> one{torch::cat(flat)};
    wait_for(impl_->backend->broadcast(one), what, timeout_, env_.rank);
    int64_t offset = 0;
    for (auto& t : same) {
      t.copy_(one[0].narrow(0, offset, t.numel()).view_as(t));
      offset += t.numel();
    }
  }
}

void ProcessGroup::sum(std::vector<torch::Tensor>& tensors, const char* what) {
  if (!impl_) return;
  for (auto& t : tensors) {
    std::vector<torch::Tensor> one{t};
    wait_for(impl_->backend->allreduce(one), what, timeout_, env_.rank);
  }
}

namespace {

constexpr int64_t kBucketBytes = int64_t{25} << 20;  // DDP's default bucket_cap_mb

}  // namespace

struct ProcessGroup::Bucket {
  std::vector<torch::Tensor> params;
  int64_t pending = 0;  // gradients not accumulated yet in this backward pass
  torch::Tensor flat;
  c10::intrusive_ptr<c10d::Work> work;
};

void ProcessGroup::attach_gradients(const std::vector<torch::Tensor>& params) {
  if (!impl_) return;
  int64_t bytes = kBucketBytes;
  for (auto it = params.rbegin(); it != params.rend(); ++it) {
    const torch::Tensor& p = *it;
    if (!p.requires_grad()) continue;
    const auto& last = impl_->buckets.empty() ? p : impl_->buckets.back()->params.front();
    if (bytes + static_cast<int64_t>(p.nbytes()) > kBucketBytes || last.scalar_type() != p.scalar_type() ||
        last.device() != p.device()) {
      impl_->buckets.push_back(std::make_unique<Bucket>());
      bytes = 0;
    }
    Bucket* bucket = impl_->buckets.back().get();
    bucket->params.push_back(p);
    bytes += static_cast<int64_t>(p.nbytes());
    // Runs once the gradient has been accumulated into p.grad(); the
    // accumulator is kept alive, or autograd would make a new one (without
    // the hook) for every backward pass.
    Impl::NodePtr accumulator = torch::autograd::impl::grad_accumulator(p);
    accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, bucket](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          std::lock_guard<std::mutex> lock(impl_->mutex);
          if (impl_->armed && --bucket->pending == 0) launch(*bucket);
          return outputs;
        }));
    impl_->accumulators.push_back(std::move(accumulator));
  }
}

void ProcessGroup::launch(Bucket& bucket) {
  std::vector<torch::Tensor> grads;
  for (auto& p : bucket.params) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);  // unused this step: every rank sends a value
    grads.push_back(p.grad().reshape({-1}));
  }
  bucket.flat = torch::cat(grads);
  std::vector<torch::Tensor> one{bucket.flat};
  bucket.work = impl_->backend->allreduce(one);
}

void ProcessGroup::prepare_gradients(bool sync) {
  if (!impl_) return;
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->armed = sync;
  for (auto& b : impl_->buckets) {
    b->pending = static_cast<int64_t>(b->params.size());
    b->work.reset();
  }
}

void ProcessGroup::finish_gradients() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->armed = false;
    for (auto& b : impl_->buckets)
      if (!b->work) launch(*b);  // parameters that got no gradient this time
  }
  torch::NoGradGuard no_grad;
  for (auto& b : impl_->buckets) {
    wait_for(b->work, "the gradient all-reduce", timeout_, env_.rank);
    b->flat.div_(env_.world_size);
    int64_t offset = 0;
    for (auto& p : b->params) {
      p.mutable_grad().copy_(b->flat.narrow(0, offset, p.numel()).view_as(p));
      offset += p.numel();
    }
    b->work.reset();
  }
}

#else  // no c10d: one process only

struct ProcessGroup::Impl {};

ProcessGroup::ProcessGroup(const DistEnv& env, const torch::Device&, std::chrono::milliseconds timeout)
    : env_(env), timeout_(timeout) {
  if (env_.distributed())
    fail("WORLD_SIZE={}: this build of vitlab has no distributed support (LibTorch's Gloo headers were not found)",
         env_.world_size);
}

void ProcessGroup::broadcast(const std::vector<torch::Tensor>&, const char*) {}
void ProcessGroup::sum(std::vector<torch::Tensor>&, const char*) {}
struct ProcessGroup::Bucket {};
void ProcessGroup::attach_gradients(const std::vector<torch::Tensor>&) {}
void ProcessGroup::prepare_gradients(bool) {}
void ProcessGroup::finish_gradients() {}

#endif

ProcessGroup::~ProcessGroup() = default;

namespace {

// A port that was free a moment ago (torchrun picks its own the same way).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) fail("launch: cannot open a socket: {}", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  if (!ok) fail("launch: cannot find a free port: {}", std::strerror(errno));
  return ntohs(addr.sin_port);
}

}  // namespace

int launch_local(int nproc, int port, const std::vector<std::string>& args) {
  if (nproc < 1) fail("launch: --nproc must be >= 1, got {}", nproc);
  if (port < 0 || port > 65535) fail("launch: --master-port must be in [0, 65535], got {}", port);
  if (args.empty()) fail("launch: no command to run (vitlab launch --nproc N -- train --config ...)");
  if (port == 0) port = free_port();
  ::unsetenv("TORCHELASTIC_USE_AGENT_STORE");  // the ranks rendezvous through MASTER_ADDR/PORT
  std::vector<pid_t> pids;
  for (int rank = 0; rank < nproc; ++rank)
    pids.push_back(spawn_self(args, {{"RANK", std::to_string(rank)},
                                     {"LOCAL_RANK", std::to_string(rank)},
                                     {"WORLD_SIZE", std::to_string(nproc)},
                                     {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
                                     {"MASTER_ADDR", "127.0.0.1"},
                                     {"MASTER_PORT", std::to_string(port)}}));
  int result = 0, running = nproc;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    --running;
    const auto it = std::find(pids.begin(), pids.end(), pid);
    if (it == pids.end()) continue;
    const int rank = static_cast<int>(it - pids.begin());
    *it = -1;
    if (status == 0 || result != 0) continue;
    result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    fmt::print(stderr, "launch: rank {} {}; stopping the other ranks\n", rank, describe_status(status));
    for (pid_t other : pids)
      if (other > 0) ::kill(other, SIGTERM);
  }
  return result;
}

}  // namespace vitlab
