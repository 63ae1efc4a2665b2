#include "common/files.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>

#include "common/error.h"

namespace vitlab {

std::string read_file(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail("{}: no such file", path.string());
  if (fs::is_directory(path, ec)) fail("{}: is a directory, expected a file", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open for reading ({})", path.string(), std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail("{}: read error", path.string());
  return bytes;
}

namespace {

void write_all_and_sync(const fs::path& path, std::string_view bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("{}: cannot create ({})", path.string(), std::strerror(errno));
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(path.c_str());
      fail("{}: write failed ({})", path.string(), std::strerror(err));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    int err = errno;
    ::unlink(path.c_str());
    fail("{}: write failed ({})", path.string(), std::strerror(err));
  }
}

std::string random_suffix() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  return fmt::format("{:012x}", rng() & 0xffffffffffffULL);
}

}  // namespace

StagedOutputs::~StagedOutputs() {
  for (const auto& s : staged_) {
    std::error_code ec;
    fs::remove(s.temp, ec);
  }
}

void StagedOutputs::add(const fs::path& path, std::string_view bytes) {
  fs::path dir = path.parent_path();
  std::error_code ec;
  if (!dir.empty() && !fs::exists(dir, ec)) {
    fs::create_directories(dir, ec);
    if (ec) fail("{}: cannot create directory ({})", dir.string(), ec.message());
  }
  if (fs::is_directory(path, ec)) fail("{}: is a directory, expected a file path", path.string());
  fs::path temp = path;
  temp += ".tmp." + random_suffix();
  write_all_and_sync(temp, bytes);
  staged_.push_back({path, temp});
}

void StagedOutputs::commit() {
  std::vector<fs::path> dirs;
  for (const auto& s : staged_) {
    std::error_code ec;
    fs::rename(s.temp, s.target, ec);
    if (ec) fail("{}: cannot move into place ({})", s.target.string(), ec.message());
    dirs.push_back(s.target.parent_path());
  }
  staged_.clear();
  std::sort(dirs.begin(), dirs.end());
  dirs.erase(std::unique(dirs.begin(), dirs.end()), dirs.end());
  for (const auto& dir : dirs) sync_directory(dir);
}

void sync_directory(const fs::path& dir) {
  const fs::path d = dir.empty() ? fs::path(".") : dir;
  const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open directory to sync it ({})", d.string(), std::strerror(errno));
  const int rc = ::fsync(fd), err = errno;
  ::close(fd);
  if (rc != 0) fail("{}: cannot sync directory ({})", d.string(), std::strerror(err));
}

uint32_t crc32_of(std::string_view bytes) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  for (size_t at = 0; at < bytes.size();) {  // zlib takes 32-bit lengths
    const uInt n = static_cast<uInt>(std::min<size_t>(bytes.size() - at, 1u << 30));
    crc = ::crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + at), n);
    at += n;
  }
  return static_cast<uint32_t>(crc);
}

void write_file_atomic(const fs::path& path, std::string_view bytes) {
  StagedOutputs out;
  out.add(path, bytes);
  out.commit();
}

}  // namespace vitlab
