#include "io/tensorboard.h"

#include <array>
#include <chrono>
#include <cstring>

#include "common/error.h"
#include "common/files.h"

namespace vitlab {

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli polynomial
    table[i] = c;
  }
  return table;
}
constexpr auto kCrc32cTable = make_crc32c_table();

// Protobuf wire format: the few pieces an Event needs.
enum Wire : uint32_t { kVarint = 0, kFixed64 = 1, kBytes = 2, kFixed32 = 5 };

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, uint32_t field, Wire wire) { put_varint(out, (field << 3) | wire); }
template <class T>
void put_fixed(std::string& out, T v) {  // little-endian hosts (x86-64, AArch64)
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}
void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_key(out, field, kBytes);
  put_varint(out, bytes.size());
  out.append(bytes);
}

// tensorflow.Event: wall_time = 1 (double), step = 2 (int64),
// file_version = 3 (string), summary = 5 (Summary).
std::string event_header(double wall_time, int64_t step) {
  std::string e;
  put_key(e, 1, kFixed64);
  put_fixed(e, wall_time);
  put_key(e, 2, kVarint);
  put_varint(e, static_cast<uint64_t>(step));
  return e;
}

// Summary.value = 1 (Value); Value.tag = 1 (string), simple_value = 2 (float).
std::string scalar_event(const std::string& tag, float value, int64_t step, double wall_time) {
  std::string v;
  put_bytes(v, 1, tag);
  put_key(v, 2, kFixed32);
  put_fixed(v, value);
  std::string summary;
  put_bytes(summary, 1, v);
  std::string e = event_header(wall_time, step);
  put_bytes(e, 5, summary);
  return e;
}

std::string record(std::string_view data) {
  std::string r;
  put_fixed<uint64_t>(r, data.size());
  put_fixed<uint32_t>(r, masked_crc32c(r));
  r.append(data);
  put_fixed<uint32_t>(r, masked_crc32c(data));
  return r;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A bounds-checked reader over one protobuf message.
class Fields {
 public:
  explicit Fields(std::string_view bytes) : p_(bytes) {}
  bool next(uint32_t& field, uint32_t& wire) {
    if (p_.empty()) return false;
    const uint64_t key = varint();
    field = static_cast<uint32_t>(key >> 3);
    wire = static_cast<uint32_t>(key & 7);
    return true;
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_.empty()) fail("truncated varint");
      const auto b = static_cast<uint8_t>(p_.front());
      p_.remove_prefix(1);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("varint longer than 10 bytes");
  }
  std::string_view take(size_t n) {
    if (n > p_.size()) fail("field of {} bytes runs past its message ({} left)", n, p_.size());
    std::string_view s = p_.substr(0, n);
    p_.remove_prefix(n);
    return s;
  }
  template <class T>
  T fixed() {
    T v;
    std::memcpy(&v, take(sizeof(T)).data(), sizeof(T));
    return v;
  }
  std::string_view bytes() { return take(varint()); }
  void skip(uint32_t wire) {
    switch (wire) {
      case kVarint: varint(); break;
      case kFixed64: take(8); break;
      case kBytes: bytes(); break;
      case kFixed32: take(4); break;
      default: fail("unsupported wire type {}", wire);
    }
  }

 private:
  std::string_view p_;
};

// An event's step and wall time, and its scalar when it holds one.
struct Decoded {
  ScalarEvent event;
  bool has_scalar = false;
};

void decode_value(std::string_view bytes, Decoded& d) {
  Fields f(bytes);
  for (uint32_t field, wire; f.next(field, wire);) {
    if (field == 1 && wire == kBytes) {
      d.event.tag = std::string(f.bytes());
    } else if (field == 2 && wire == kFixed32) {
      d.event.value = f.fixed<float>();
      d.has_scalar = true;
    } else {
      f.skip(wire);
    }
  }
}

Decoded decode_event(std::string_view bytes) {
  Decoded d;
  Fields f(bytes);
  for (uint32_t field, wire; f.next(field, wire);) {
    if (field == 1 && wire == kFixed64) {
      d.event.wall_time = f.fixed<double>();
    } else if (field == 2 && wire == kVarint) {
      d.event.step = static_cast<int64_t>(f.varint());
    } else if (field == 5 && wire == kBytes) {
      Fields summary(f.bytes());
      for (uint32_t sf, sw; summary.next(sf, sw);) {
        if (sf == 1 && sw == kBytes)
          decode_value(summary.bytes(), d);
        else
          summary.skip(sw);
      }
    } else {
      f.skip(wire);
    }
  }
  return d;
}

// The data of each intact record, in order; stops at the first truncated or
// corrupt one.
std::vector<std::string_view> split_records(std::string_view file, bool& intact) {
  std::vector<std::string_view> out;
  intact = true;
  while (!file.empty()) {
    if (file.size() < 12) break;
    uint64_t len;
    uint32_t len_crc;
    std::memcpy(&len, file.data(), 8);
    std::memcpy(&len_crc, file.data() + 8, 4);
    if (len_crc != masked_crc32c(file.substr(0, 8)) || len > file.size() - 12 || file.size() - 12 - len < 4) break;
    const std::string_view data = file.substr(12, len);
    uint32_t data_crc;
    std::memcpy(&data_crc, file.data() + 12 + len, 4);
    if (data_crc != masked_crc32c(data)) break;
    out.push_back(data);
    file.remove_prefix(12 + len + 4);
  }
  intact = file.empty();
  return out;
}

}  // namespace

uint32_t crc32c_of(std::string_view bytes) {
  uint32_t c = 0xFFFFFFFFu;
  for (const char ch : bytes) c = kCrc32cTable[(c ^ static_cast<uint8_t>(ch)) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(std::string_view bytes) {
  const uint32_t c = crc32c_of(bytes);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

std::vector<ScalarEvent> read_scalar_events(const fs::path& file, bool* intact) {
  const std::string bytes = read_file(file);
  bool whole = true;
  std::vector<ScalarEvent> out;
  for (const std::string_view data : split_records(bytes, whole)) {
    Decoded d;
    try {
      d = decode_event(data);
    } catch (const std::exception& e) {
      fail("{}: malformed event ({})", file.string(), e.what());
    }
    if (d.has_scalar) out.push_back(std::move(d.event));
  }
  if (intact) *intact = whole;
  return out;
}

EventWriter::EventWriter(const fs::path& dir, int64_t keep_through_step) : path_(dir / kFileName) {
  std::string kept;
  if (keep_through_step >= 0 && fs::exists(path_)) {
    const std::string old = read_file(path_);
    bool intact = true;
    for (const std::string_view data : split_records(old, intact)) {
      bool keep = false;
      try {
        keep = decode_event(data).event.step <= keep_through_step;
      } catch (const std::exception&) {  // an unreadable event is dropped with what follows it
        break;
      }
      if (keep) kept += record(data);
    }
  }
  if (kept.empty()) {
    std::string version = event_header(now_seconds(), 0);
    put_bytes(version, 3, "brain.Event:2");
    kept = record(version);
  }
  write_file_atomic(path_, kept);
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) fail("{}: cannot open for appending", path_.string());
}

void EventWriter::scalar(const std::string& tag, double value, int64_t step) {
  write_record(scalar_event(tag, static_cast<float>(value), step, now_seconds()));
}

void EventWriter::write_record(std::string_view data) {
  const std::string r = record(data);
  out_.write(r.data(), static_cast<std::streamsize>(r.size()));
  if (!out_) fail("{}: write failed", path_.string());
}

void EventWriter::flush() {
  out_.flush();
  if (!out_) fail("{}: write failed", path_.string());
}

}  // namespace vitlab
