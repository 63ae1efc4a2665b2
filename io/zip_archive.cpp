#include "io/zip_archive.h"

#include <zip.h>

#include "common/error.h"

namespace vitlab {

namespace {

std::string libzip_message(zip_error_t* error) {
  std::string message = zip_error_strerror(error);
  zip_error_fini(error);
  return message;
}

// Deflate cannot expand more than about 1032:1.
constexpr uint64_t kMaxDeflateRatio = 1032;

}  // namespace

ZipArchive::ZipArchive(std::string_view bytes) : bytes_(bytes), archive_(nullptr, zip_discard) {
  zip_error_t error;
  zip_error_init(&error);
  zip_source_t* source = zip_source_buffer_create(bytes.data(), bytes.size(), 0, &error);
  if (!source) fail("not a zip archive: {}", libzip_message(&error));
  // ZIP_CHECKCONS also checks every local header against the central directory.
  archive_.reset(zip_open_from_source(source, ZIP_RDONLY | ZIP_CHECKCONS, &error));
  if (!archive_) {
    zip_source_free(source);
    fail("not a valid zip archive: {}", libzip_message(&error));
  }
  if (zip_get_num_entries(archive_.get(), 0) <= 0) fail("the zip archive holds no records");
  const char* name = zip_get_name(archive_.get(), 0, ZIP_FL_ENC_RAW);
  const std::string first = name ? name : "";
  const size_t slash = first.find('/');
  if (slash == std::string::npos)
    fail("record '{}' is not in a folder, expected the layout torch.save writes (archive/data.pkl, ...)", first);
  folder_ = first.substr(0, slash + 1);
}

int64_t ZipArchive::locate(const std::string& name) const {
  return zip_name_locate(archive_.get(), (folder_ + name).c_str(), ZIP_FL_ENC_RAW);
}

bool ZipArchive::has(const std::string& name) const { return locate(name) >= 0; }

ZipArchive::Entry ZipArchive::entry(const std::string& name) const {
  const int64_t i = locate(name);
  if (i < 0) fail("record '{}{}' is missing from the archive", folder_, name);
  zip_stat_t stat;
  if (zip_stat_index(archive_.get(), i, ZIP_FL_ENC_RAW, &stat) != 0)
    fail("record '{}{}': {}", folder_, name, zip_strerror(archive_.get()));
  const bool stored = stat.comp_method == ZIP_CM_STORE;
  if (!stored && stat.comp_method != ZIP_CM_DEFLATE)
    fail("record '{}{}' uses zip compression method {}, expected stored or deflate (what torch.load reads)", folder_,
         name, stat.comp_method);
  if (stat.comp_size > bytes_.size() ||
      (stored ? stat.size != stat.comp_size : stat.size / kMaxDeflateRatio > stat.comp_size))
    fail("record '{}{}' claims {} bytes from {} compressed in an archive of {}: the zip header is corrupt", folder_,
         name, stat.size, stat.comp_size, bytes_.size());
  return {i, stat.size};
}

uint64_t ZipArchive::size(const std::string& name) const { return entry(name).size; }

void ZipArchive::read(const std::string& name, void* out) const { read(entry(name), name, out); }

void ZipArchive::read(const Entry& entry, const std::string& name, void* out) const {
  const uint64_t n = entry.size;
  zip_file_t* file = zip_fopen_index(archive_.get(), entry.index, 0);
  if (!file) fail("record '{}{}': {}", folder_, name, zip_strerror(archive_.get()));
  uint64_t done = 0;
  int64_t got = 0;
  while (done < n && (got = zip_fread(file, static_cast<char*>(out) + done, n - done)) > 0) done += got;
  // One more read must find the end: that is where libzip checks the CRC.
  char extra;
  if (got >= 0 && done == n) got = zip_fread(file, &extra, 1);
  std::string problem;
  if (got < 0)
    problem = zip_file_strerror(file);
  else if (done != n)
    problem = fmt::format("{} of its {} bytes present", done, n);
  else if (got > 0)
    problem = fmt::format("longer than the {} bytes its header states", n);
  zip_fclose(file);
  if (!problem.empty()) fail("record '{}{}' is corrupt: {}", folder_, name, problem);
}

std::string ZipArchive::read(const std::string& name) const {
  const Entry record = entry(name);
  std::string out(record.size, '\0');
  read(record, name, out.data());
  return out;
}

}  // namespace vitlab
