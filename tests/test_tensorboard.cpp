#include <catch2/catch.hpp>
#include <fstream>

#include "common/files.h"
#include "io/tensorboard.h"
#include "tests/helpers.h"

using namespace vitlab;
using namespace vitlab::test;

TEST_CASE("CRC-32C and its TFRecord mask match the published check values") {
  CHECK(crc32c_of("123456789") == 0xE3069283u);  // the standard check value (RFC 3720)
  CHECK(crc32c_of("") == 0u);
  // As TensorBoard 2.21 computes them (tensorflow_stub's crc32c and
  // masked_crc32c), for a string and for a record's length field.
  CHECK(crc32c_of("foo") == 0xCFC4AE1Du);
  CHECK(masked_crc32c("foo") == 0xFEBE8A61u);
  CHECK(masked_crc32c(std::string("\x05\0\0\0\0\0\0\0", 8)) == 0x3E04B2EAu);
}

TEST_CASE("event files: scalars round-trip, a torn tail is dropped, resume keeps steps up to the checkpoint") {
  TempDir dir;
  {
    EventWriter w(dir.path(), -1);
    for (int64_t step = 1; step <= 6; ++step) w.scalar("train/loss", 1.0 / step, step);
    w.scalar("eval/top1", 87.5, 6);
    w.flush();
  }
  const fs::path file = dir.path() / EventWriter::kFileName;
  bool intact = false;
  auto events = read_scalar_events(file, &intact);
  CHECK(intact);
  REQUIRE(events.size() == 7);
  CHECK(events[2].tag == "train/loss");
  CHECK(events[2].step == 3);
  CHECK(events[2].value == static_cast<float>(1.0 / 3));
  CHECK(events[6].tag == "eval/top1");
  CHECK(events[6].value == 87.5f);
  CHECK(events[0].wall_time > 1.6e9);

  // A run killed mid-write leaves half a record: it is not read.
  std::string bytes = read_file(file);
  write_file_atomic(file, bytes.substr(0, bytes.size() - 5));
  events = read_scalar_events(file, &intact);
  CHECK_FALSE(intact);
  CHECK(events.size() == 6);

  // Resuming from a checkpoint at step 4 drops the later steps (and the torn
  // tail); what is written next follows step 4.
  {
    EventWriter w(dir.path(), 4);
    w.scalar("train/loss", 0.2, 5);
  }
  events = read_scalar_events(file, &intact);
  CHECK(intact);
  REQUIRE(events.size() == 5);
  CHECK(events[3].step == 4);
  CHECK(events[4].step == 5);
  CHECK(events[4].value == 0.2f);

  // A flipped bit in a record's data fails its CRC: reading stops there.
  bytes = read_file(file);
  bytes[bytes.size() / 2] ^= 0x10;
  write_file_atomic(file, bytes);
  events = read_scalar_events(file, &intact);
  CHECK_FALSE(intact);
  CHECK(events.size() < 5);
}
