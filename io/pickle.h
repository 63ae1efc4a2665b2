#pragma once
// Reading the files Python's torch.save writes, in the zip format (PyTorch
// 1.6 and later) and the legacy one (before 1.6, or with
// _use_new_zipfile_serialization=False). Their pickles are run through a
// small pickle machine that knows what state dicts and training checkpoints
// hold (OrderedDict, tensors, parameters, numbers, strings, containers), and
// tensors are rebuilt over the storages' bytes. Classes it does not know
// (argparse.Namespace, numpy scalars, ...) become opaque objects, so the rest
// of the file still loads.
//
// Not torch::pickle_load (LibTorch 1.13 and 2.15): it unpickles every
// collections.OrderedDict as None, so any module's state_dict() fails
// ("Expected GenericDict but got None"); it rejects argparse.Namespace and
// numpy scalars (timm's and DeiT's checkpoints hold both); and it trusts a
// tensor record's size (a 16-byte record for 2^24 floats loads, and reading
// it faults). 1.13's also lacks SETITEM/APPEND, which optimizer states use.
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace vitlab {

struct PickleObject;

// One unpickled value. Lists, tuples, sets, dicts and objects are shared, as
// in Python: a value the pickle reuses is the same container everywhere.
class PickleValue {
 public:
  enum class Kind { None, Bool, Int, Float, String, Bytes, List, Tuple, Set, Dict, Tensor, Storage, Global, Object };
  using Items = std::vector<PickleValue>;
  using Entries = std::vector<std::pair<PickleValue, PickleValue>>;

  PickleValue() = default;  // None
  static PickleValue boolean(bool value);
  static PickleValue integer(int64_t value);
  static PickleValue real(double value);
  static PickleValue string(std::string value);
  static PickleValue bytes(std::string value);
  static PickleValue list(Items items = {});
  static PickleValue tuple(Items items = {});
  static PickleValue set(Items items = {});
  static PickleValue dict(Entries entries = {});
  static PickleValue tensor(torch::Tensor value);
  // A typed storage, as a 1-D tensor over all of its elements.
  static PickleValue storage(torch::Tensor elements);
  // A class or function named by the pickle ("torch.float16").
  static PickleValue global(std::string name);
  static PickleValue object(std::string type, PickleValue args);

  Kind kind() const { return kind_; }
  bool is(Kind kind) const { return kind_ == kind; }
  // For messages: "a dict", "an int", "None", "an argparse.Namespace object".
  std::string describe() const;

  // Each accessor throws vitlab::Error on a value of another kind.
  bool to_bool() const;
  int64_t to_int() const;
  double to_double() const;
  const std::string& to_string() const;    // String, Bytes, or the name of a Global
  const Items& items() const;              // List, Tuple, Set
  const Entries& entries() const;          // Dict, in file order
  const torch::Tensor& to_tensor() const;  // Tensor, Storage
  const PickleObject& to_object() const;

  // The dict entry under a string key, or nullptr. Of repeated keys the last
  // wins, as in Python.
  const PickleValue* find(std::string_view key) const;

 private:
  friend class Unpickler;
  Items& mutable_items() const;
  Entries& mutable_entries() const;
  PickleObject& mutable_object() const;

  Kind kind_ = Kind::None;
  std::variant<std::monostate, bool, int64_t, double, std::string, std::shared_ptr<Items>, std::shared_ptr<Entries>,
               torch::Tensor, std::shared_ptr<PickleObject>>
      data_;
};

// An instance of a class the reader does not model: its qualified name, the
// arguments it was created with and the state BUILD gave it (argparse.Namespace
// keeps its fields there as a dict).
struct PickleObject {
  std::string type;
  PickleValue args;
  PickleValue state;
};

// The object a torch.save zip archive holds, tensors on the CPU. Anything the
// reader does not support or finds malformed is a vitlab::Error that names
// `source` and what is wrong.
PickleValue load_torch_archive(std::string_view bytes, const std::string& source);

// Whether the bytes start as a pickle does (the PROTO opcode of protocol 2
// or later), as legacy torch.save files do.
bool starts_with_pickle(std::string_view bytes);

// The object a legacy torch.save file holds, tensors on the CPU. The file is
// a sequence of pickles (torch/serialization.py, _legacy_save): the magic
// number, the protocol version, the writer's system info, the object, the
// list of storage keys; then each storage's element count (8 bytes,
// little-endian) and its bytes, in the order of that list. Every count and
// length is checked against the file's size before anything is allocated
// for it; what is malformed is a vitlab::Error that names `source`.
PickleValue load_torch_legacy(std::string_view bytes, const std::string& source);

}  // namespace vitlab
