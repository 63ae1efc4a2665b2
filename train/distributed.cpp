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

}  // namespace

DistEnv parse_dist_env(const std::function<const char*(const char*)>& get) {
  DistEnv env;
  env.world_size = int_variable(get, "WORLD_SIZE", 1, 1, 1 << 20);
  if (!env.distributed()) return env;
  if (!get("RANK"))
    fail("environment variable WORLD_SIZE={} is set but RANK is not (start with torchrun or vitlab launch)",
         env.world_size);
  env.rank = int_variable(get, "RANK", 0, 0, env.world_size - 1);
  env.local_rank = int_variable(get, "LOCAL_RANK", 0, 0, env.world_size - 1);
  env.local_world_size = int_variable(get, "LOCAL_WORLD_SIZE", env.world_size, 1, env.world_size);
  if (env.local_rank >= env.local_world_size)
    fail("environment variable LOCAL_RANK={} must be below LOCAL_WORLD_SIZE={}", env.local_rank, env.local_world_size);
  if (const char* addr = get("MASTER_ADDR")) {
    if (!*addr) fail("environment variable MASTER_ADDR is empty (expected a host name or address)");
    env.master_addr = addr;
  }
  env.master_port = int_variable(get, "MASTER_PORT", env.master_port, 1, 65535);
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
