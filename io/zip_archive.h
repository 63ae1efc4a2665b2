#pragma once
// The zip container of torch.save files, read from memory with libzip.
// PyTorch's own reader allocates whatever size a record's header claims
// before it reads a byte (gigabytes, for a corrupt header); this one checks
// the claim against the bytes that could hold it first.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

struct zip;

namespace vitlab {

class ZipArchive {
 public:
  // Records are named relative to the folder that holds the first one
  // ("archive/" or the saved file's stem), as in PyTorch's reader.
  explicit ZipArchive(std::string_view bytes);

  bool has(const std::string& name) const;
  // The record's uncompressed size; an Error when it is missing or its
  // header claims more than its compressed bytes can hold.
  uint64_t size(const std::string& name) const;
  // Reads the whole record (size(name) bytes) into out, checking its CRC.
  void read(const std::string& name, void* out) const;
  std::string read(const std::string& name) const;

 private:
  struct Entry {
    int64_t index;
    uint64_t size;
  };
  int64_t locate(const std::string& name) const;  // -1 when missing
  // The record's index and its checked size, as size() describes.
  Entry entry(const std::string& name) const;
  void read(const Entry& entry, const std::string& name, void* out) const;

  std::string_view bytes_;
  std::unique_ptr<zip, void (*)(zip*)> archive_;
  std::string folder_;  // with its trailing '/'
};

}  // namespace vitlab
