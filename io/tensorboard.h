#pragma once
// Scalar summaries in TensorBoard's event-file format, for `train.tensorboard`.
//
// Written by hand rather than through a library: TensorBoard's writer is
// Python (tensorboardX, torch.utils.tensorboard) or TensorFlow, Debian 12
// ships no CRC-32C library, and generating protobuf code for the three
// messages used (Event, Summary, Summary.Value) would add protoc and
// TensorFlow's .proto files to the build for about 30 lines of encoding.
//
// The format: a sequence of records, each
//   uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
// (little-endian), whose data is a serialised tensorflow.Event. The first
// event names the file version ("brain.Event:2"); each scalar is an Event
// with wall_time, step and a Summary of one Value {tag, simple_value}.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace vitlab {

// CRC-32C (Castagnoli) of bytes, and the masked form TFRecord stores.
uint32_t crc32c_of(std::string_view bytes);
uint32_t masked_crc32c(std::string_view bytes);

// One decoded scalar event.
struct ScalarEvent {
  std::string tag;
  float value = 0;
  int64_t step = 0;
  double wall_time = 0;
};

// The scalar events of an event file written by EventWriter, in order. A
// truncated or corrupt record ends the read (a run killed mid-write); `intact`
// tells whether the whole file was read.
std::vector<ScalarEvent> read_scalar_events(const std::filesystem::path& file, bool* intact = nullptr);

class EventWriter {
 public:
  // The file name TensorBoard finds in a run directory ("tfevents" in it).
  static constexpr const char* kFileName = "events.out.tfevents.vitlab";

  // Opens dir/kFileName. keep_through_step < 0 starts a new file; otherwise
  // (a resumed run) the records of the existing file with step <= it are kept
  // and the rest dropped, so that resuming appends without duplicates; the
  // kept file replaces the old one atomically.
  EventWriter(const std::filesystem::path& dir, int64_t keep_through_step);

  void scalar(const std::string& tag, double value, int64_t step);
  // Pushes written records to the file (TensorBoard reads them as they come).
  void flush();

 private:
  void write_record(std::string_view data);
  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace vitlab
