#pragma once
// Data-parallel training on LibTorch's own c10d engine: a Gloo process group
// (CPU tensors, and CUDA ones through host copies) or NCCL on CUDA builds
// that have it, with the rendezvous torchrun sets up (RANK, WORLD_SIZE,
// LOCAL_RANK, MASTER_ADDR, MASTER_PORT, and its agent's store when
// TORCHELASTIC_USE_AGENT_STORE is set) or, without torchrun's variables, the
// one srun's task variables give. `vitlab launch` starts the same processes
// on one machine without Python.
#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace vitlab {

struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;  // ranks on this machine
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool agent_store = false;  // torchrun's agent hosts the store; every rank is a client
  int restart_count = 0;     // TORCHELASTIC_RESTART_COUNT: the agent store's key prefix
  bool distributed() const { return world_size > 1; }
};

// The torchrun environment, read through `get` (nullptr: unset). Without
// WORLD_SIZE but with SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, srun's:
// rank, world size and local rank from those, the ranks on this node from
// SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE, MASTER_ADDR (when unset)
// the first host of SLURM_STEP_NODELIST or SLURM_JOB_NODELIST, MASTER_PORT
// (when unset) 29500 + SLURM_JOB_ID % 1000. With neither a single process.
// Bad values are errors naming the variable.
DistEnv parse_dist_env(const std::function<const char*(const char*)>& get);
DistEnv dist_env_from_environment();

// SLURM's compressed host list expanded: "gpu[01-04,07],cpu3" is gpu01
// gpu02 gpu03 gpu04 gpu07 cpu3. A number keeps the width of its range's
// start (zero padding); the brackets of one name multiply out, the first
// slowest ("r[1-2]n[1-2]": r1n1 r1n2 r2n1 r2n2). Bad syntax is an error
// naming `variable` and the list.
std::vector<std::string> expand_hostlist(const std::string& list, const std::string& variable);

// One process's membership of the group. With world size 1 every
// collective is a no-op. A peer that dies or stops answering makes the
// collective fail within `timeout` with an error saying so.
class ProcessGroup {
 public:
  ProcessGroup(const DistEnv& env, const torch::Device& device, std::chrono::milliseconds timeout);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return env_.rank; }
  int size() const { return env_.world_size; }
  bool main() const { return env_.rank == 0; }

  // In place, from rank 0.
  void broadcast(const std::vector<torch::Tensor>& tensors, const char* what);
  // In place: the sum over ranks.
  void sum(std::vector<torch::Tensor>& tensors, const char* what);
  // Gradient averaging as DDP's reducer does it: `params` are put in
  // buckets of about 25 MB (in reverse order, as backward produces them);
  // during a backward pass started after prepare_gradients(true), a bucket's
  // all-reduce starts as soon as all its gradients are accumulated, while
  // the rest of the backward pass runs. finish_gradients() then waits and
  // leaves every gradient averaged over ranks. prepare_gradients(false):
  // a micro-batch that only accumulates.
  void attach_gradients(const std::vector<torch::Tensor>& params);
  void prepare_gradients(bool sync);
  void finish_gradients();

 private:
  struct Impl;
  struct Bucket;
  void launch(Bucket& bucket);  // its all-reduce, asynchronously
  DistEnv env_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Impl> impl_;
};

// `vitlab launch`: runs this executable nproc times with `args`, each with
// the torchrun environment of one rank on this machine (MASTER_PORT free
// when port is 0). When one exits with an error the others are stopped.
// Returns the exit status to use: 0 when every rank succeeded.
int launch_local(int nproc, int port, const std::vector<std::string>& args);

}  // namespace vitlab
