#pragma once
// Shared by the libFuzzer targets: the input as a file for the loaders that
// take paths, and the rule that an error the library documents (vitlab::Error,
// c10::Error, any std::exception) is a correct answer to a bad input. Only
// crashes, sanitizer reports, hangs, leaks and the memory limit are findings.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace vitlab::fuzz {

// A directory of this process's own under the temp dir (fuzzers may run side
// by side), made once.
inline const std::filesystem::path& work_dir() {
  static const std::filesystem::path dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("vitlab-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

// Writes bytes to work_dir()/name and returns its path.
inline std::filesystem::path write_input(const std::string& name, std::string_view bytes) {
  const auto path = work_dir() / name;
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// Runs f; an exception is the library rejecting the input, which is fine.
template <typename F>
int run(F&& f) {
  try {
    f();
  } catch (const std::exception&) {
  }
  return 0;
}

}  // namespace vitlab::fuzz
