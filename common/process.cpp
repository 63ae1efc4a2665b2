#include "common/process.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/error.h"

namespace vitlab {

pid_t spawn_self(const std::vector<std::string>& args, const std::vector<std::pair<std::string, std::string>>& env,
                 const std::filesystem::path& log) {
  std::vector<std::string> strings = {"vitlab"};
  strings.insert(strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : strings) argv.push_back(s.data());
  argv.push_back(nullptr);
  int log_fd = -1;
  if (!log.empty()) {
    log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) fail("cannot open the log {}: {}", log.string(), std::strerror(errno));
  }
  std::fflush(nullptr);  // what is buffered would be written twice, by both processes
  const pid_t pid = ::fork();
  if (pid < 0) {
    if (log_fd >= 0) ::close(log_fd);
    fail("fork failed: {}", std::strerror(errno));
  }
  if (pid == 0) {
    for (const auto& [name, value] : env) ::setenv(name.c_str(), value.c_str(), 1);
    if (log_fd >= 0 && (::dup2(log_fd, STDOUT_FILENO) < 0 || ::dup2(log_fd, STDERR_FILENO) < 0)) std::_Exit(127);
    ::execv("/proc/self/exe", argv.data());
    std::fprintf(stderr, "cannot run /proc/self/exe: %s\n", std::strerror(errno));
    std::_Exit(127);
  }
  if (log_fd >= 0) ::close(log_fd);
  return pid;
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return "stopped";
}

namespace {

std::atomic<int> stop_signal{0};

void on_stop_signal(int signal) { stop_signal.store(signal); }

}  // namespace

StopSignals::StopSignals() {
  stop_signal.store(0);
  struct sigaction action {};
  action.sa_handler = on_stop_signal;  // no SA_RESTART: waitpid returns EINTR
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGINT, &action, &old_int_);
  ::sigaction(SIGTERM, &action, &old_term_);
}

StopSignals::~StopSignals() {
  ::sigaction(SIGINT, &old_int_, nullptr);
  ::sigaction(SIGTERM, &old_term_, nullptr);
}

int StopSignals::received() { return stop_signal.load(); }

}  // namespace vitlab
