#include "io/pickle.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "common/error.h"
#include "io/zip_archive.h"

namespace vitlab {

namespace {

using Kind = PickleValue::Kind;
using Items = PickleValue::Items;
using Entries = PickleValue::Entries;

// Destroying a deeply nested value one stack frame per level would overflow
// the stack on a hostile pickle (a million nested lists fit in 2 MB of
// data.pkl): a dying container hands its children to a single loop instead.
thread_local Items* pending = nullptr;

void release(Items&& children) {
  if (pending) {
    for (auto& child : children) pending->push_back(std::move(child));
    return;
  }
  Items queue(std::move(children));
  pending = &queue;
  while (!queue.empty()) {
    PickleValue last = std::move(queue.back());
    queue.pop_back();
  }
  pending = nullptr;
}

struct ReleaseItems {
  void operator()(Items* items) const {
    release(std::move(*items));
    delete items;
  }
};

struct ReleaseEntries {
  void operator()(Entries* entries) const {
    Items children;
    children.reserve(2 * entries->size());
    for (auto& [key, value] : *entries) {
      children.push_back(std::move(key));
      children.push_back(std::move(value));
    }
    release(std::move(children));
    delete entries;
  }
};

struct ReleaseObject {
  void operator()(PickleObject* object) const {
    Items children;
    children.push_back(std::move(object->args));
    children.push_back(std::move(object->state));
    release(std::move(children));
    delete object;
  }
};

[[noreturn]] void wrong_kind(const PickleValue& value, const char* expected) {
  fail("pickle value is {}, expected {}", value.describe(), expected);
}

// The classes whose persistent ids name a storage, and the dtype of its elements.
std::optional<torch::ScalarType> storage_dtype(const std::string& type) {
  static const std::map<std::string, torch::ScalarType> types = {
      {"torch.FloatStorage", torch::kFloat32},
      {"torch.DoubleStorage", torch::kFloat64},
      {"torch.HalfStorage", torch::kFloat16},
      {"torch.BFloat16Storage", torch::kBFloat16},
      {"torch.LongStorage", torch::kInt64},
      {"torch.IntStorage", torch::kInt32},
      {"torch.ShortStorage", torch::kInt16},
      {"torch.CharStorage", torch::kInt8},
      {"torch.ByteStorage", torch::kUInt8},
      {"torch.BoolStorage", torch::kBool},
      {"torch.ComplexFloatStorage", torch::kComplexFloat},
      {"torch.ComplexDoubleStorage", torch::kComplexDouble},
      {"torch.UntypedStorage", torch::kUInt8},
      {"torch.storage.UntypedStorage", torch::kUInt8},
  };
  auto it = types.find(type);
  if (it == types.end()) return std::nullopt;
  return it->second;
}

// dtypes pickle as globals named like Python's torch.float32.
std::optional<torch::ScalarType> dtype_named(const std::string& name) {
  static const std::map<std::string, torch::ScalarType> dtypes = {
      {"torch.float32", torch::kFloat32},
      {"torch.float64", torch::kFloat64},
      {"torch.float16", torch::kFloat16},
      {"torch.bfloat16", torch::kBFloat16},
      {"torch.int64", torch::kInt64},
      {"torch.int32", torch::kInt32},
      {"torch.int16", torch::kInt16},
      {"torch.int8", torch::kInt8},
      {"torch.uint8", torch::kUInt8},
      {"torch.bool", torch::kBool},
      {"torch.complex64", torch::kComplexFloat},
      {"torch.complex128", torch::kComplexDouble},
  };
  auto it = dtypes.find(name);
  if (it == dtypes.end()) return std::nullopt;
  return it->second;
}

// The opcodes the reader runs, by their names in Python's pickle module (Lib/pickle.py).
namespace op {
enum : uint8_t {
  MARK = '(',
  STOP = '.',
  POP = '0',
  POP_MARK = '1',
  BINBYTES = 'B',
  SHORT_BINBYTES = 'C',
  BINFLOAT = 'G',
  BININT = 'J',
  BININT1 = 'K',
  BININT2 = 'M',
  NONE = 'N',
  BINPERSID = 'Q',
  REDUCE = 'R',
  BINSTRING = 'T',
  SHORT_BINSTRING = 'U',
  BINUNICODE = 'X',
  EMPTY_LIST = ']',
  APPEND = 'a',
  BUILD = 'b',
  GLOBAL = 'c',
  DICT = 'd',
  APPENDS = 'e',
  BINGET = 'h',
  LONG_BINGET = 'j',
  LIST = 'l',
  BINPUT = 'q',
  LONG_BINPUT = 'r',
  SETITEM = 's',
  TUPLE = 't',
  SETITEMS = 'u',
  EMPTY_DICT = '}',
  EMPTY_TUPLE = ')',
  PROTO = 0x80,
  NEWOBJ = 0x81,
  TUPLE1 = 0x85,
  TUPLE2 = 0x86,
  TUPLE3 = 0x87,
  NEWTRUE = 0x88,
  NEWFALSE = 0x89,
  LONG1 = 0x8a,
  SHORT_BINUNICODE = 0x8c,
  BINUNICODE8 = 0x8d,
  BINBYTES8 = 0x8e,
  EMPTY_SET = 0x8f,
  ADDITEMS = 0x90,
  FROZENSET = 0x91,
  NEWOBJ_EX = 0x92,
  STACK_GLOBAL = 0x93,
  MEMOIZE = 0x94,
  FRAME = 0x95
};
}  // namespace op

}  // namespace

PickleValue PickleValue::boolean(bool value) {
  PickleValue v;
  v.kind_ = Kind::Bool;
  v.data_ = value;
  return v;
}

PickleValue PickleValue::integer(int64_t value) {
  PickleValue v;
  v.kind_ = Kind::Int;
  v.data_ = value;
  return v;
}

PickleValue PickleValue::real(double value) {
  PickleValue v;
  v.kind_ = Kind::Float;
  v.data_ = value;
  return v;
}

PickleValue PickleValue::string(std::string value) {
  PickleValue v;
  v.kind_ = Kind::String;
  v.data_ = std::move(value);
  return v;
}

PickleValue PickleValue::bytes(std::string value) {
  PickleValue v = string(std::move(value));
  v.kind_ = Kind::Bytes;
  return v;
}

PickleValue PickleValue::global(std::string name) {
  PickleValue v = string(std::move(name));
  v.kind_ = Kind::Global;
  return v;
}

PickleValue PickleValue::list(Items items) {
  PickleValue v;
  v.kind_ = Kind::List;
  v.data_ = std::shared_ptr<Items>(new Items(std::move(items)), ReleaseItems());
  return v;
}

PickleValue PickleValue::tuple(Items items) {
  PickleValue v = list(std::move(items));
  v.kind_ = Kind::Tuple;
  return v;
}

PickleValue PickleValue::set(Items items) {
  PickleValue v = list(std::move(items));
  v.kind_ = Kind::Set;
  return v;
}

PickleValue PickleValue::dict(Entries entries) {
  PickleValue v;
  v.kind_ = Kind::Dict;
  v.data_ = std::shared_ptr<Entries>(new Entries(std::move(entries)), ReleaseEntries());
  return v;
}

PickleValue PickleValue::tensor(torch::Tensor value) {
  PickleValue v;
  v.kind_ = Kind::Tensor;
  v.data_ = std::move(value);
  return v;
}

PickleValue PickleValue::storage(torch::Tensor elements) {
  PickleValue v = tensor(std::move(elements));
  v.kind_ = Kind::Storage;
  return v;
}

PickleValue PickleValue::object(std::string type, PickleValue args) {
  PickleValue v;
  v.kind_ = Kind::Object;
  v.data_ =
      std::shared_ptr<PickleObject>(new PickleObject{std::move(type), std::move(args), PickleValue()}, ReleaseObject());
  return v;
}

std::string PickleValue::describe() const {
  switch (kind_) {
    case Kind::None:
      return "None";
    case Kind::Bool:
      return "a bool";
    case Kind::Int:
      return "an int";
    case Kind::Float:
      return "a float";
    case Kind::String:
      return "a str";
    case Kind::Bytes:
      return "a bytes object";
    case Kind::List:
      return "a list";
    case Kind::Tuple:
      return "a tuple";
    case Kind::Set:
      return "a set";
    case Kind::Dict:
      return "a dict";
    case Kind::Tensor:
      return "a Tensor";
    case Kind::Storage:
      return "a storage";
    case Kind::Global:
      return "a reference to " + to_string();
    case Kind::Object: {
      const std::string& type = to_object().type;
      const bool vowel = !type.empty() && std::strchr("aeiouAEIOU", type[0]) != nullptr;
      return fmt::format("{} {} object", vowel ? "an" : "a", type);
    }
  }
  return "a value";
}

bool PickleValue::to_bool() const {
  if (!is(Kind::Bool)) wrong_kind(*this, "a bool");
  return std::get<bool>(data_);
}

int64_t PickleValue::to_int() const {
  if (!is(Kind::Int)) wrong_kind(*this, "an int");
  return std::get<int64_t>(data_);
}

double PickleValue::to_double() const {
  if (!is(Kind::Float)) wrong_kind(*this, "a float");
  return std::get<double>(data_);
}

const std::string& PickleValue::to_string() const {
  if (!is(Kind::String) && !is(Kind::Bytes) && !is(Kind::Global)) wrong_kind(*this, "a str, bytes or reference");
  return std::get<std::string>(data_);
}

const PickleValue::Items& PickleValue::items() const {
  if (!is(Kind::List) && !is(Kind::Tuple) && !is(Kind::Set)) wrong_kind(*this, "a list, tuple or set");
  return mutable_items();
}

const PickleValue::Entries& PickleValue::entries() const {
  if (!is(Kind::Dict)) wrong_kind(*this, "a dict");
  return mutable_entries();
}

const torch::Tensor& PickleValue::to_tensor() const {
  if (!is(Kind::Tensor) && !is(Kind::Storage)) wrong_kind(*this, "a Tensor");
  return std::get<torch::Tensor>(data_);
}

const PickleObject& PickleValue::to_object() const {
  if (!is(Kind::Object)) wrong_kind(*this, "an object");
  return mutable_object();
}

const PickleValue* PickleValue::find(std::string_view key) const {
  const Entries& all = entries();
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    if (it->first.is(Kind::String) && it->first.to_string() == key) return &it->second;
  return nullptr;
}

PickleValue::Items& PickleValue::mutable_items() const { return *std::get<std::shared_ptr<Items>>(data_); }

PickleValue::Entries& PickleValue::mutable_entries() const { return *std::get<std::shared_ptr<Entries>>(data_); }

PickleObject& PickleValue::mutable_object() const { return *std::get<std::shared_ptr<PickleObject>>(data_); }

namespace {

// The container a value shares (list, tuple, set, dict, object), or nullptr.
const void* container(const PickleValue& v) {
  switch (v.kind()) {
    case Kind::List:
    case Kind::Tuple:
    case Kind::Set:
      return &v.items();
    case Kind::Dict:
      return &v.entries();
    case Kind::Object:
      return &v.to_object();
    default:
      return nullptr;
  }
}

// The values a container holds.
std::vector<const PickleValue*> children(const PickleValue& v) {
  std::vector<const PickleValue*> out;
  if (v.is(Kind::Dict)) {
    for (const auto& [key, value] : v.entries()) out.insert(out.end(), {&key, &value});
  } else if (v.is(Kind::Object)) {
    out = {&v.to_object().args, &v.to_object().state};
  } else if (container(v)) {
    for (const auto& item : v.items()) out.push_back(&item);
  }
  return out;
}

// Whether a container reachable from root holds itself, directly or through
// others: a depth-first walk, without recursion, that finds a container
// again while its own children are still being walked.
bool has_cycle(const PickleValue& root) {
  std::unordered_map<const void*, bool> done;                                // false while on the walk's path
  std::vector<std::pair<const PickleValue*, bool>> walk = {{&root, false}};  // (value, leaving it)
  while (!walk.empty()) {
    const auto [v, leaving] = walk.back();
    walk.pop_back();
    const void* c = container(*v);
    if (!c) continue;
    if (leaving) {
      done[c] = true;
      continue;
    }
    const auto [it, first] = done.emplace(c, false);
    if (!first) {
      if (!it->second) return true;
      continue;
    }
    walk.emplace_back(v, true);
    for (const PickleValue* child : children(*v)) walk.emplace_back(child, false);
  }
  return false;
}

}  // namespace

// Where the storages that persistent ids name get their elements: a zip
// archive's data/<key> records, or the bytes after a legacy file's pickles.
class StorageSource {
 public:
  virtual ~StorageSource() = default;
  // A 1-D tensor of the storage's `numel` elements of `dtype`; an Error when
  // the file cannot hold them.
  virtual torch::Tensor elements(const std::string& key, torch::ScalarType dtype, uint64_t numel) = 0;
};

// The pickle machine: a stack, a stack of marks, a memo. Pops never reach
// below the innermost mark, as in CPython, so every malformed sequence is a
// stack underflow rather than a read out of bounds.
class Unpickler {
 public:
  // Runs the pickle that starts at `start` in `data`; errors name it as
  // "<where> byte N". Without storages, a persistent id is an error.
  Unpickler(std::string_view data, size_t start, std::string where, StorageSource* storages)
      : data_(data), where_(std::move(where)), storages_(storages), pos_(start) {}

  // The pickled object; anything wrong is an Error.
  PickleValue run();
  // Where the pickle's STOP left off.
  size_t end() const { return pos_; }

 private:
  PickleValue execute();
  static void empty_containers(Items roots);
  template <typename... Args>
  [[noreturn]] void error(fmt::format_string<Args...> format, Args&&... args) const {
    fail("{} byte {}: {}", where_, op_pos_, fmt::format(format, std::forward<Args>(args)...));
  }

  std::string_view take(size_t n);
  // The file is little-endian, and so is the host (x86, ARM).
  template <typename T>
  T read() {
    T value;
    std::memcpy(&value, take(sizeof(T)).data(), sizeof(T));
    return value;
  }
  std::string read_line();
  int64_t read_long(size_t n);
  double read_binfloat();

  size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(PickleValue value) { stack_.push_back(std::move(value)); }
  PickleValue pop();
  PickleValue& top();
  Items pop_mark();
  void set_items(Items&& flat, const char* opcode);
  void append_items(Items&& items, const char* opcode);

  static std::string global_name(std::string module, const std::string& name);
  PickleValue call(const PickleValue& callable, const PickleValue& args, const char* opcode);
  PickleValue persistent_load(const PickleValue& pid);
  PickleValue storage_view(const PickleValue& root, const PickleValue& metadata);
  PickleValue rebuild_tensor(const std::string& function, const Items& args, bool with_dtype);
  std::vector<int64_t> int_list(const PickleValue& value, const char* what) const;

  std::string_view data_;
  const std::string where_;
  StorageSource* const storages_;
  size_t pos_;
  size_t op_pos_ = 0;
  std::vector<PickleValue> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleValue> memo_;
  std::map<std::string, PickleValue> loaded_;  // storages by key: the tensors that view one share it
};

std::string_view Unpickler::take(size_t n) {
  if (n > data_.size() - pos_) error("truncated: needs {} more bytes, {} left", n, data_.size() - pos_);
  std::string_view out = data_.substr(pos_, n);
  pos_ += n;
  return out;
}

std::string Unpickler::read_line() {
  const size_t end = data_.find('\n', pos_);
  if (end == std::string_view::npos) error("truncated: GLOBAL name without a newline");
  std::string line(data_.substr(pos_, end - pos_));
  pos_ = end + 1;
  return line;
}

int64_t Unpickler::read_long(size_t n) {
  // Little-endian two's complement; longer encodings must only sign-extend.
  const std::string_view bytes = take(n);
  uint64_t value = 0;
  for (size_t i = 0; i < std::min<size_t>(n, 8); ++i) value |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  if (n > 0 && n < 8 && (uint8_t(bytes[n - 1]) & 0x80)) value |= ~uint64_t(0) << (8 * n);
  const uint8_t fill = (value >> 63) ? 0xff : 0;
  for (size_t i = 8; i < n; ++i)
    if (uint8_t(bytes[i]) != fill) error("integer of {} bytes does not fit in 64 bits", n);
  return static_cast<int64_t>(value);
}

double Unpickler::read_binfloat() {
  uint64_t bits = 0;
  for (char c : take(8)) bits = (bits << 8) | uint8_t(c);  // big-endian
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

PickleValue Unpickler::pop() {
  if (stack_.size() <= fence()) error("stack underflow");
  PickleValue value = std::move(stack_.back());
  stack_.pop_back();
  return value;
}

PickleValue& Unpickler::top() {
  if (stack_.size() <= fence()) error("stack underflow");
  return stack_.back();
}

Items Unpickler::pop_mark() {
  if (marks_.empty()) error("no MARK to pop to");
  Items items(std::make_move_iterator(stack_.begin() + marks_.back()), std::make_move_iterator(stack_.end()));
  stack_.resize(marks_.back());
  marks_.pop_back();
  return items;
}

void Unpickler::set_items(Items&& flat, const char* opcode) {
  if (flat.size() % 2) error("{} with an odd number of keys and values ({})", opcode, flat.size());
  PickleValue& target = top();
  // An object of a class we do not model keeps no items.
  if (target.is(Kind::Object)) return;
  if (!target.is(Kind::Dict)) error("{} on {}, expected a dict", opcode, target.describe());
  Entries& entries = target.mutable_entries();
  for (size_t i = 0; i < flat.size(); i += 2) entries.emplace_back(std::move(flat[i]), std::move(flat[i + 1]));
}

void Unpickler::append_items(Items&& items, const char* opcode) {
  PickleValue& target = top();
  if (target.is(Kind::Object)) return;
  if (!target.is(Kind::List)) error("{} on {}, expected a list", opcode, target.describe());
  Items& list = target.mutable_items();
  for (auto& item : items) list.push_back(std::move(item));
}

std::string Unpickler::global_name(std::string module, const std::string& name) {
  // Protocol 2 pickles written by Python 3 name Python 2's modules.
  if (module == "__builtin__") module = "builtins";
  if (module == "copy_reg") module = "copyreg";
  return module + "." + name;
}

PickleValue Unpickler::call(const PickleValue& callable, const PickleValue& args, const char* opcode) {
  if (!callable.is(Kind::Global)) error("{} calls {}, expected a class or function", opcode, callable.describe());
  if (!args.is(Kind::Tuple)) error("{} arguments are {}, expected a tuple", opcode, args.describe());
  const std::string& name = callable.to_string();
  const Items& a = args.items();
  if (name == "torch._utils._rebuild_tensor_v2") return rebuild_tensor(name, a, false);
  if (name == "torch._utils._rebuild_tensor_v3") return rebuild_tensor(name, a, true);
  if (name == "torch._utils._rebuild_parameter" || name == "torch._utils._rebuild_parameter_with_state") {
    if (a.empty() || !a[0].is(Kind::Tensor)) error("{} needs a tensor as its first argument", name);
    return a[0];  // requires_grad and hooks do not matter for the values
  }
  // LibTorch's own pickler wraps containers in these to carry their static type.
  if (name == "torch.jit._pickle.restore_type_tag" || name.rfind("torch.jit._pickle.build_", 0) == 0) {
    if (a.empty()) error("{} without arguments", name);
    return a[0];
  }
  if (name == "collections.OrderedDict") {
    if (!a.empty()) error("{} with arguments, expected none (the items follow in SETITEMS)", name);
    return PickleValue::dict();
  }
  if (name == "collections.defaultdict") {
    if (a.size() > 1) error("{} with {} arguments, expected at most the default factory", name, a.size());
    return PickleValue::dict();
  }
  if (name == "builtins.set" || name == "builtins.frozenset") {
    if (a.empty()) return PickleValue::set();
    if (a.size() == 1 && (a[0].is(Kind::List) || a[0].is(Kind::Tuple) || a[0].is(Kind::Set)))
      return PickleValue::set(a[0].items());
    error("{} of {} arguments, expected one list", name, a.size());
  }
  return PickleValue::object(name, args);
}

// ('storage', type, key, location, numel), and in the legacy format a sixth
// item: None, or (view key, offset, numel) for a view of the storage, as
// PyTorch before 0.4 saved storage slices.
PickleValue Unpickler::persistent_load(const PickleValue& pid) {
  const size_t n = pid.is(Kind::Tuple) ? pid.items().size() : 0;
  if ((n != 5 && n != 6) || !pid.items()[0].is(Kind::String) || pid.items()[0].to_string() != "storage")
    error("persistent id is {}, expected ('storage', type, key, location, size[, view])", pid.describe());
  if (!storages_) error("a storage in a pickle that holds no tensors");
  const Items& id = pid.items();
  if (!id[1].is(Kind::Global))
    error("storage type is {}, expected a class such as torch.FloatStorage", id[1].describe());
  if (!id[2].is(Kind::String)) error("storage key is {}, expected a str", id[2].describe());
  if (!id[4].is(Kind::Int) || id[4].to_int() < 0)
    error("storage size is {}, expected a non-negative int", id[4].describe());
  const std::string& key = id[2].to_string();
  auto it = loaded_.find(key);
  if (it == loaded_.end()) {
    const std::optional<torch::ScalarType> dtype = storage_dtype(id[1].to_string());
    if (!dtype) error("unsupported storage type {}", id[1].to_string());
    // The location ('cpu', 'cuda:0', ...) is ignored: everything loads to the CPU.
    torch::Tensor elements;
    try {
      elements = storages_->elements(key, *dtype, static_cast<uint64_t>(id[4].to_int()));
    } catch (const Error& e) {
      error("{}", e.what());
    }
    it = loaded_.emplace(key, PickleValue::storage(elements)).first;
  }
  if (n == 6 && !id[5].is(Kind::None)) return storage_view(it->second, id[5]);
  return it->second;
}

// A view's own storage over its root's memory, which it keeps alive: the
// tensors built over it are checked against the view's size, as in PyTorch.
PickleValue Unpickler::storage_view(const PickleValue& root, const PickleValue& metadata) {
  const size_t n = metadata.is(Kind::Tuple) ? metadata.items().size() : 0;
  if (n != 3 || !metadata.items()[0].is(Kind::String) || !metadata.items()[1].is(Kind::Int) ||
      !metadata.items()[2].is(Kind::Int))
    error("storage view is {}, expected None or (key, offset, size)", metadata.describe());
  const Items& view = metadata.items();
  const std::string& key = view[0].to_string();
  if (auto it = loaded_.find(key); it != loaded_.end()) return it->second;
  const torch::Tensor& elements = root.to_tensor();
  const int64_t offset = view[1].to_int(), numel = view[2].to_int();
  if (offset < 0 || numel < 0 || offset > elements.numel() - numel)
    error("storage view '{}' of {} elements at offset {} does not fit its storage of {} {} elements", key, numel,
          offset, elements.numel(), c10::toString(elements.scalar_type()));
  char* begin = static_cast<char*>(elements.data_ptr()) + offset * elements.element_size();
  torch::Tensor shared = torch::from_blob(
      begin, {numel}, [keep = elements](void*) mutable { keep.reset(); }, elements.options());
  return loaded_.emplace(key, PickleValue::storage(shared)).first->second;
}

std::vector<int64_t> Unpickler::int_list(const PickleValue& value, const char* what) const {
  if (!value.is(Kind::Tuple) && !value.is(Kind::List))
    error("{} is {}, expected a tuple of ints", what, value.describe());
  std::vector<int64_t> out;
  for (const PickleValue& item : value.items()) {
    if (!item.is(Kind::Int)) error("{} holds {}, expected ints", what, item.describe());
    out.push_back(item.to_int());
  }
  return out;
}

// _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]), and _v3 with the dtype
// after the hooks. The view must lie inside its storage: ATen would otherwise grow or overrun it.
PickleValue Unpickler::rebuild_tensor(const std::string& function, const Items& args, bool with_dtype) {
  const size_t count = with_dtype ? 7 : 6;
  if (args.size() != count && args.size() != count + 1)
    error("{} takes {} or {} arguments, got {}", function, count, count + 1, args.size());
  if (!args[0].is(Kind::Storage)) error("{} of {}, expected a storage", function, args[0].describe());
  if (!args[1].is(Kind::Int)) error("{} storage offset is {}, expected an int", function, args[1].describe());
  const torch::Tensor& elements = args[0].to_tensor();
  torch::ScalarType dtype = elements.scalar_type();
  if (with_dtype) {
    const std::optional<torch::ScalarType> named =
        args[6].is(Kind::Global) ? dtype_named(args[6].to_string()) : std::nullopt;
    if (!named) error("{} dtype is {}, expected a dtype such as torch.float32", function, args[6].describe());
    dtype = *named;
  }
  const std::vector<int64_t> size = int_list(args[2], "tensor size");
  const std::vector<int64_t> stride = int_list(args[3], "tensor stride");
  const int64_t offset = args[1].to_int();
  if (size.size() != stride.size())
    error("tensor size [{}] and stride [{}] differ in length", fmt::join(size, ", "), fmt::join(stride, ", "));

  auto negative = [](int64_t v) { return v < 0; };
  if (offset < 0 || std::any_of(size.begin(), size.end(), negative) ||
      std::any_of(stride.begin(), stride.end(), negative))
    error("tensor size [{}], stride [{}] or offset {} is negative", fmt::join(size, ", "), fmt::join(stride, ", "),
          offset);

  const int64_t available = static_cast<int64_t>(elements.storage().nbytes() / c10::elementSize(dtype));
  const bool empty = std::find(size.begin(), size.end(), 0) != size.end();
  int64_t last = offset;  // the last element the view reaches
  bool overflow = false;
  for (size_t i = 0; i < size.size() && !empty; ++i) {
    int64_t span = 0;
    if (__builtin_mul_overflow(size[i] - 1, stride[i], &span) || __builtin_add_overflow(last, span, &last))
      overflow = true;
  }
  if (overflow || (empty ? offset > available : last >= available))
    error("tensor of size [{}] and stride [{}] at offset {} does not fit its storage of {} {} elements",
          fmt::join(size, ", "), fmt::join(stride, ", "), offset, available, c10::toString(dtype));
  return PickleValue::tensor(torch::empty({0}, torch::dtype(dtype)).set_(elements.storage(), offset, size, stride));
}

// Empties every container reachable from roots, so that any cycles among
// them are freed with the roots.
void Unpickler::empty_containers(Items roots) {
  Items all;
  std::unordered_set<const void*> seen;
  while (!roots.empty()) {
    PickleValue v = std::move(roots.back());
    roots.pop_back();
    if (!container(v) || !seen.insert(container(v)).second) continue;
    for (const PickleValue* child : children(v)) roots.push_back(*child);
    all.push_back(std::move(v));
  }
  for (auto& v : all) {
    if (v.is(Kind::Dict))
      v.mutable_entries().clear();
    else if (v.is(Kind::Object))
      v.mutable_object() = {};
    else
      v.mutable_items().clear();
  }
}

PickleValue Unpickler::run() {
  PickleValue result;
  try {
    result = execute();
    // Python's collector frees containers that hold themselves; shared
    // ownership never would.
    if (has_cycle(result)) error("a container holds itself; self-referencing containers are not supported");
    return result;
  } catch (...) {
    // What was built is dropped: its containers may hold each other.
    Items roots = stack_;
    for (const auto& [index, value] : memo_) roots.push_back(value);
    roots.push_back(result);
    empty_containers(std::move(roots));
    throw;
  }
}

PickleValue Unpickler::execute() {
  for (;;) {
    op_pos_ = pos_;
    if (pos_ >= data_.size()) error("ends without STOP");
    const uint8_t op = uint8_t(data_[pos_++]);
    switch (op) {
      case op::PROTO: {
        const uint8_t protocol = read<uint8_t>();
        if (protocol > 5) error("unsupported pickle protocol {}", protocol);
        break;
      }
      case op::FRAME:  // a length for buffered readers; the opcodes follow inline
        take(8);
        break;
      case op::STOP:
        return pop();
      case op::MARK:
        marks_.push_back(stack_.size());
        break;
      case op::POP:  // drops the innermost mark when nothing is above it
        if (!marks_.empty() && marks_.back() == stack_.size())
          marks_.pop_back();
        else
          pop();
        break;
      case op::POP_MARK:
        pop_mark();
        break;
      case op::EMPTY_DICT:
        push(PickleValue::dict());
        break;
      case op::EMPTY_LIST:
        push(PickleValue::list());
        break;
      case op::EMPTY_TUPLE:
        push(PickleValue::tuple());
        break;
      case op::EMPTY_SET:
        push(PickleValue::set());
        break;
      case op::TUPLE:
        push(PickleValue::tuple(pop_mark()));
        break;
      case op::LIST:
        push(PickleValue::list(pop_mark()));
        break;
      case op::FROZENSET:
        push(PickleValue::set(pop_mark()));
        break;
      case op::TUPLE1:
      case op::TUPLE2:
      case op::TUPLE3: {
        Items items(op == op::TUPLE1 ? 1 : op == op::TUPLE2 ? 2 : 3);
        for (size_t i = items.size(); i-- > 0;) items[i] = pop();
        push(PickleValue::tuple(std::move(items)));
        break;
      }
      case op::DICT: {
        Items flat = pop_mark();
        push(PickleValue::dict());
        set_items(std::move(flat), "DICT");
        break;
      }
      case op::SETITEM: {
        PickleValue value = pop();
        PickleValue key = pop();
        set_items({std::move(key), std::move(value)}, "SETITEM");
        break;
      }
      case op::SETITEMS:
        set_items(pop_mark(), "SETITEMS");
        break;
      case op::APPEND:
        append_items({pop()}, "APPEND");
        break;
      case op::APPENDS:
        append_items(pop_mark(), "APPENDS");
        break;
      case op::ADDITEMS: {
        Items items = pop_mark();
        PickleValue& target = top();
        if (!target.is(Kind::Set)) error("ADDITEMS on {}, expected a set", target.describe());
        for (auto& item : items) target.mutable_items().push_back(std::move(item));
        break;
      }
      case op::BINPUT:
      case op::LONG_BINPUT:
      case op::MEMOIZE: {
        const uint64_t index = op == op::BINPUT        ? read<uint8_t>()
                               : op == op::LONG_BINPUT ? read<uint32_t>()
                                                       : memo_.size();
        memo_[index] = top();
        break;
      }
      case op::BINGET:
      case op::LONG_BINGET: {
        const uint64_t index = op == op::BINGET ? read<uint8_t>() : read<uint32_t>();
        auto it = memo_.find(index);
        if (it == memo_.end()) error("memo index {} was never stored", index);
        push(it->second);
        break;
      }
      case op::GLOBAL: {
        std::string module = read_line();
        push(PickleValue::global(global_name(std::move(module), read_line())));
        break;
      }
      case op::STACK_GLOBAL: {
        PickleValue name = pop();
        PickleValue module = pop();
        if (!module.is(Kind::String) || !name.is(Kind::String))
          error("STACK_GLOBAL of {} and {}, expected two str", module.describe(), name.describe());
        push(PickleValue::global(global_name(module.to_string(), name.to_string())));
        break;
      }
      case op::REDUCE:
      case op::NEWOBJ:
      case op::NEWOBJ_EX: {
        if (op == op::NEWOBJ_EX) pop();  // keyword arguments: no class we model takes any
        PickleValue args = pop();
        PickleValue callable = pop();
        push(call(callable, args, op == op::REDUCE ? "REDUCE" : op == op::NEWOBJ ? "NEWOBJ" : "NEWOBJ_EX"));
        break;
      }
      case op::BUILD: {  // an object keeps its state; the rest (an OrderedDict's _metadata) drop it
        PickleValue state = pop();
        PickleValue& target = top();
        if (target.is(Kind::Object)) target.mutable_object().state = std::move(state);
        break;
      }
      case op::BINPERSID: {
        PickleValue pid = pop();
        push(persistent_load(pid));
        break;
      }
      case op::BININT:
        push(PickleValue::integer(read<int32_t>()));
        break;
      case op::BININT1:
        push(PickleValue::integer(read<uint8_t>()));
        break;
      case op::BININT2:
        push(PickleValue::integer(read<uint16_t>()));
        break;
      case op::LONG1:
        push(PickleValue::integer(read_long(read<uint8_t>())));
        break;
      case op::BINFLOAT:
        push(PickleValue::real(read_binfloat()));
        break;
      case op::NEWTRUE:
      case op::NEWFALSE:
        push(PickleValue::boolean(op == op::NEWTRUE));
        break;
      case op::NONE:
        push(PickleValue());
        break;
      case op::BINUNICODE:
        push(PickleValue::string(std::string(take(read<uint32_t>()))));
        break;
      case op::SHORT_BINUNICODE:
      case op::SHORT_BINSTRING:
        push(PickleValue::string(std::string(take(read<uint8_t>()))));
        break;
      case op::BINUNICODE8:
        push(PickleValue::string(std::string(take(read<uint64_t>()))));
        break;
      case op::BINSTRING: {
        const int32_t n = read<int32_t>();
        if (n < 0) error("BINSTRING of negative length {}", n);
        push(PickleValue::string(std::string(take(n))));
        break;
      }
      case op::BINBYTES:
        push(PickleValue::bytes(std::string(take(read<uint32_t>()))));
        break;
      case op::SHORT_BINBYTES:
        push(PickleValue::bytes(std::string(take(read<uint8_t>()))));
        break;
      case op::BINBYTES8:
        push(PickleValue::bytes(std::string(take(read<uint64_t>()))));
        break;
      default:
        if (op >= 0x20 && op < 0x7f) error("unsupported pickle opcode 0x{:02x} ('{}')", op, char(op));
        error("unsupported pickle opcode 0x{:02x}", op);
    }
  }
}

namespace {

// A zip archive's storages: its data/<key> records, each exactly the bytes
// the pickle declares.
class ZipStorages : public StorageSource {
 public:
  explicit ZipStorages(const ZipArchive& archive) : archive_(archive) {}

  torch::Tensor elements(const std::string& key, torch::ScalarType dtype, uint64_t numel) override {
    const std::string record = "data/" + key;
    const uint64_t nbytes = archive_.size(record);
    const size_t item = c10::elementSize(dtype);
    if (numel > nbytes / item || numel * item != nbytes)
      fail("record '{}' holds {} bytes, expected {} {} elements of {} bytes", record, nbytes, numel,
           c10::toString(dtype), item);
    torch::Tensor elements = torch::empty({static_cast<int64_t>(numel)}, torch::dtype(dtype));
    archive_.read(record, elements.data_ptr());
    return elements;
  }

 private:
  const ZipArchive& archive_;
};

// A legacy file's storages: allocated while the object's pickle runs, their
// bytes read after it. Each needs an 8-byte count and its bytes after the
// pickle, so together they must fit in what is left of the file.
class LegacyStorages : public StorageSource {
 public:
  explicit LegacyStorages(uint64_t bytes_left) : left_(bytes_left) {}

  torch::Tensor elements(const std::string& key, torch::ScalarType dtype, uint64_t numel) override {
    const size_t item = c10::elementSize(dtype);
    if (left_ < 8 || numel > (left_ - 8) / item)
      fail("storage '{}' of {} {} elements does not fit in the {} bytes the file has left for its storages", key, numel,
           c10::toString(dtype), left_);
    left_ -= 8 + numel * item;
    torch::Tensor elements = torch::empty({static_cast<int64_t>(numel)}, torch::dtype(dtype));
    unfilled_.emplace(key, elements);
    return elements;
  }

  // Reads each storage's count and bytes from `pos` on, in the order of `keys`.
  void fill(const std::vector<std::string>& keys, std::string_view bytes, size_t pos) {
    for (const std::string& key : keys) {
      auto it = unfilled_.find(key);
      if (it == unfilled_.end())
        fail("storage key '{}' is listed twice, or names no storage in the object pickle", key);
      pos = read_storage(key, it->second, bytes, pos);
      unfilled_.erase(it);
    }
    if (!unfilled_.empty())
      fail("storage '{}' has no data: the list of storage keys does not name it", unfilled_.begin()->first);
  }

 private:
  // Where the storage's count and bytes at `pos` end.
  static size_t read_storage(const std::string& key, torch::Tensor& elements, std::string_view bytes, size_t pos) {
    if (bytes.size() - pos < 8)
      fail("truncated: storage '{}' at byte {} needs an 8-byte element count, {} bytes left", key, pos,
           bytes.size() - pos);
    uint64_t count = 0;
    std::memcpy(&count, bytes.data() + pos, 8);  // little-endian, as the host
    pos += 8;
    if (count != static_cast<uint64_t>(elements.numel()))
      fail("storage '{}' at byte {} holds {} elements, the object pickle declares {}", key, pos - 8, count,
           elements.numel());
    const size_t nbytes = elements.nbytes();
    if (nbytes > bytes.size() - pos)
      fail("truncated: storage '{}' at byte {} needs {} bytes, {} left", key, pos, nbytes, bytes.size() - pos);
    if (nbytes > 0) std::memcpy(elements.data_ptr(), bytes.data() + pos, nbytes);
    return pos + nbytes;
  }

  uint64_t left_;
  std::map<std::string, torch::Tensor> unfilled_;
};

// Runs read() and makes whatever it throws an Error that names the file.
template <typename Read>
PickleValue reading(const std::string& source, const char* format, Read&& read) {
  try {
    return read();
  } catch (const Error& e) {
    fail("{}: cannot read {}: {}", source, format, e.what());
  } catch (const c10::Error& e) {
    fail("{}: cannot read {}: {}", source, format, e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail("{}: cannot read {}: {}", source, format, e.what());
  }
}

constexpr int64_t kLegacyProtocol = 1001;  // torch/serialization.py's PROTOCOL_VERSION

// torch.save's magic number 0x1950a86a20f9469cfc6c as LONG1 pickles it (ten
// bytes, little-endian), then STOP.
constexpr std::string_view kLegacyMagic("\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 13);

// Where the first pickle, the magic number, ends. An 80-bit int is wider
// than the machine's ints, so that pickle is matched by its bytes: PROTO,
// from protocol 4 a FRAME, then LONG1 and STOP.
size_t after_magic(std::string_view bytes) {
  size_t pos = 2;  // after PROTO
  if (bytes.size() > pos && uint8_t(bytes[pos]) == op::FRAME) pos += 9;
  if (!starts_with_pickle(bytes) || bytes.substr(std::min(pos, bytes.size()), kLegacyMagic.size()) != kLegacyMagic)
    fail(
        "its first pickle is not torch.save's magic number 0x1950a86a20f9469cfc6c (a corrupt file, or a pickle "
        "torch.save did not write)");
  return pos + kLegacyMagic.size();
}

// Runs the pickle at `pos` and moves `pos` past it.
PickleValue unpickle(std::string_view bytes, size_t& pos, const char* what, StorageSource* storages = nullptr) {
  Unpickler unpickler(bytes, pos, fmt::format("{} pickle: file", what), storages);
  PickleValue value = unpickler.run();
  pos = unpickler.end();
  return value;
}

void check_protocol_version(const PickleValue& version) {
  if (!version.is(Kind::Int) || version.to_int() != kLegacyProtocol)
    fail("protocol version is {}, expected {}",
         version.is(Kind::Int) ? std::to_string(version.to_int()) : version.describe(), kLegacyProtocol);
}

std::vector<std::string> storage_keys(const PickleValue& list) {
  if (!list.is(Kind::List)) fail("the storage keys are {}, expected a list of str", list.describe());
  std::vector<std::string> keys;
  for (const PickleValue& key : list.items()) {
    if (!key.is(Kind::String)) fail("a storage key is {}, expected a str", key.describe());
    keys.push_back(key.to_string());
  }
  return keys;
}

PickleValue read_legacy(std::string_view bytes) {
  size_t pos = after_magic(bytes);
  check_protocol_version(unpickle(bytes, pos, "protocol version"));
  // The writer's byte order and C type sizes: PyTorch writes storages
  // little-endian whatever its own, and reads them so.
  unpickle(bytes, pos, "system info");
  LegacyStorages storages(bytes.size() - pos);
  PickleValue object = unpickle(bytes, pos, "object", &storages);
  const std::vector<std::string> keys = storage_keys(unpickle(bytes, pos, "storage keys"));
  storages.fill(keys, bytes, pos);
  return object;
}

}  // namespace

PickleValue load_torch_archive(std::string_view bytes, const std::string& source) {
  return reading(source, "torch.save file", [&] {
    const ZipArchive archive(bytes);
    if (archive.has("byteorder")) {
      const std::string order = archive.read("byteorder");
      if (order != "little") fail("tensors are stored '{}'-endian, only little-endian is supported", order);
    }
    if (!archive.has("data.pkl")) fail("no data.pkl record (a TorchScript module rather than torch.save?)");
    const std::string pickle = archive.read("data.pkl");
    ZipStorages storages(archive);
    return Unpickler(pickle, 0, "data.pkl", &storages).run();
  });
}

bool starts_with_pickle(std::string_view bytes) {
  return bytes.size() >= 2 && uint8_t(bytes[0]) == op::PROTO && uint8_t(bytes[1]) >= 2 && uint8_t(bytes[1]) <= 5;
}

PickleValue load_torch_legacy(std::string_view bytes, const std::string& source) {
  return reading(source, "legacy torch.save file", [&] { return read_legacy(bytes); });
}

}  // namespace vitlab
