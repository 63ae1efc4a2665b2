#include "common/run_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <sstream>
#include <string>

#include "common/error.h"

namespace vitlab {

namespace fs = std::filesystem;

namespace {

// "pid 123 on host gpu01" from the lock file's "123 gpu01".
std::string describe_holder(int fd) {
  char text[HOST_NAME_MAX + 32] = {};
  const ssize_t n = ::pread(fd, text, sizeof text - 1, 0);
  std::istringstream in(std::string(text, n > 0 ? static_cast<size_t>(n) : 0));
  long pid = 0;
  std::string host;
  if (!(in >> pid >> host)) return "another process (it has not written its pid yet)";
  return fmt::format("pid {} on host {}", pid, host);
}

void write_holder(int fd, const fs::path& file) {
  char host[HOST_NAME_MAX + 1] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::strcpy(host, "?");
  const std::string text = fmt::format("{} {}\n", ::getpid(), host);
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size()))
    fail("{}: cannot write the lock holder's pid ({})", file.string(), std::strerror(errno));
}

}  // namespace

RunLock::RunLock(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the run directory ({})", dir.string(), ec.message());
  const fs::path file = dir / ".lock";
  // Not truncated on open: the holder's pid stays readable to the next comer.
  // Close-on-exec: a child started by exec does not keep the lock alive.
  fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) fail("{}: cannot open the run directory's lock ({})", file.string(), std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    const std::string holder = describe_holder(fd_);
    ::close(fd_);
    if (err == EWOULDBLOCK)
      fail(
          "{}: the run directory is in use by {} (lock {}); wait for that run to end or stop it, or choose another "
          "--out",
          dir.string(), holder, file.string());
    fail("{}: cannot lock ({})", file.string(), std::strerror(err));
  }
  try {
    write_holder(fd_, file);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

RunLock::~RunLock() { ::close(fd_); }

}  // namespace vitlab
