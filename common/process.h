#pragma once
// Child processes of vitlab itself (`vitlab launch`, `vitlab study --jobs`)
// and the SIGINT/SIGTERM handling that stops long runs cleanly.
#include <sys/types.h>

#include <csignal>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

namespace vitlab {

// Runs this program (/proc/self/exe) with `args` (argv[1...]) in a child
// process, with `env` set on top of ours and, when `log` is given, stdout
// and stderr appended to that file. Returns the child's pid.
pid_t spawn_self(const std::vector<std::string>& args, const std::vector<std::pair<std::string, std::string>>& env = {},
                 const std::filesystem::path& log = {});

// "exited with status 1", "was killed by signal 9 (Killed)".
std::string describe_status(int status);

// While one is alive, SIGINT and SIGTERM are recorded instead of ending the
// process (and interrupt blocking calls such as waitpid with EINTR); the
// previous handlers come back after.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The signal received since construction, 0 if none.
  static int received();

 private:
  struct sigaction old_int_ {
  }, old_term_{};
};

}  // namespace vitlab
