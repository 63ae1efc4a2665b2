#pragma once
// One writer per run directory: an advisory lock (flock) on DIR/.lock, a
// file that names its holder's pid and host. The kernel drops the lock when
// the holder's process ends, however it ends, so a killed run can be
// resumed at once; the file itself stays.
#include <filesystem>

namespace vitlab {

class RunLock {
 public:
  // Creates dir when missing and locks it. Held elsewhere (another process,
  // or another RunLock of this one): an error naming dir and the holder.
  explicit RunLock(const std::filesystem::path& dir);
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace vitlab
