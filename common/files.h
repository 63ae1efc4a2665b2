#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace vitlab {

namespace fs = std::filesystem;

// Whole file as bytes; an error names the path when it is missing, a
// directory or unreadable.
std::string read_file(const fs::path& path);

// Outputs of one command, made visible together or not at all: each file is
// written and fsync'ed under a temporary name beside its target, and only
// commit() renames them into place. Destroyed uncommitted (an error on the
// way), it removes the temporaries, so no half-written output is left.
class StagedOutputs {
 public:
  StagedOutputs() = default;
  StagedOutputs(const StagedOutputs&) = delete;
  StagedOutputs& operator=(const StagedOutputs&) = delete;
  ~StagedOutputs();

  void add(const fs::path& path, std::string_view bytes);
  void commit();

 private:
  struct Staged {
    fs::path target;
    fs::path temp;
  };
  std::vector<Staged> staged_;
};

// write + fsync + rename, for a single output.
void write_file_atomic(const fs::path& path, std::string_view bytes);

// fsync of a directory: makes the renames and creations inside it durable.
void sync_directory(const fs::path& dir);

// CRC-32 (zlib's, as in gzip and zip) of bytes.
uint32_t crc32_of(std::string_view bytes);

}  // namespace vitlab
