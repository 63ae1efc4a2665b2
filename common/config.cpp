#include "common/config.h"

#include <fmt/ranges.h>

#include <algorithm>

namespace vitlab {

Override parse_override(const std::string& text) {
  auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0) fail("--set '{}': expected KEY=VALUE, e.g. --set model.depth=6", text);
  Override o;
  o.key = text.substr(0, eq);
  std::string value = text.substr(eq + 1);
  try {
    o.value = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    fail("--set {}: value '{}' is not valid YAML ({})", o.key, value, e.msg);
  }
  // null (a Python None) is a value; nothing is not.
  if (!o.value || (o.value.IsNull() && value != "null" && value != "~")) fail("--set {}: empty value", o.key);
  return o;
}

YAML::Node section_overrides(const std::vector<Override>& overrides, const std::string& section,
                             const std::vector<std::string>& all_sections) {
  YAML::Node out(YAML::NodeType::Map);
  for (const auto& o : overrides) {
    auto dot = o.key.find('.');
    std::string head = dot == std::string::npos ? "" : o.key.substr(0, dot);
    if (std::find(all_sections.begin(), all_sections.end(), head) == all_sections.end())
      fail("--set {}: keys start with a section ({}), e.g. {}.KEY", o.key, fmt::join(all_sections, ", "),
           all_sections.front());
    if (head != section) continue;
    YAML::Node into(YAML::NodeType::Map), leaf = into;
    std::string rest = o.key.substr(dot + 1);
    for (auto next = rest.find('.'); next != std::string::npos; next = rest.find('.')) {
      leaf[rest.substr(0, next)] = YAML::Node(YAML::NodeType::Map);
      leaf.reset(leaf[rest.substr(0, next)]);
      rest = rest.substr(next + 1);
    }
    leaf[rest] = o.value;
    merge_into(out, into);
  }
  return out;
}

void merge_into(YAML::Node& base, const YAML::Node& overrides) {
  for (const auto& kv : overrides) {
    const auto key = kv.first.as<std::string>();
    YAML::Node existing = base[key];
    if (existing && existing.IsMap() && kv.second.IsMap())
      merge_into(existing, kv.second);
    else  // a copy: later merges or rules (init_values: cait) must not change `overrides`
      base[key] = YAML::Clone(kv.second);
  }
}

namespace {
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}
}  // namespace

std::string closest_key(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(3, key.size() / 2) + 1;
  for (const auto& c : candidates) {
    size_t d = edit_distance(key, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best;
}

namespace {
template <class T>
T scalar_as(const YAML::Node& node, const std::string& where, const char* expected) {
  if (!node.IsScalar()) fail("{}: expected {}, got '{}'", where, expected, YAML::Dump(node));
  try {
    return node.as<T>();
  } catch (const YAML::Exception&) {
    fail("{}: expected {}, got '{}'", where, expected, node.Scalar());
  }
}
}  // namespace

void read_value(const YAML::Node& node, int64_t& out, const std::string& where) {
  out = scalar_as<int64_t>(node, where, "an integer");
}
void read_value(const YAML::Node& node, double& out, const std::string& where) {
  out = scalar_as<double>(node, where, "a number");
}
void read_value(const YAML::Node& node, bool& out, const std::string& where) {
  out = scalar_as<bool>(node, where, "true or false");
}
void read_value(const YAML::Node& node, std::string& out, const std::string& where) {
  out = scalar_as<std::string>(node, where, "a string");
}
namespace {
template <class T>
void read_list(const YAML::Node& node, std::vector<T>& out, const std::string& where, const char* expected) {
  if (!node.IsSequence()) fail("{}: expected {}, got '{}'", where, expected, YAML::Dump(node));
  out.clear();
  for (size_t i = 0; i < node.size(); ++i) {
    T v{};
    read_value(node[i], v, fmt::format("{}[{}]", where, i));
    out.push_back(v);
  }
}
}  // namespace

void read_value(const YAML::Node& node, std::vector<bool>& out, const std::string& where) {
  read_list(node, out, where, "a list of booleans, e.g. [false, true]");
}
void read_value(const YAML::Node& node, std::vector<double>& out, const std::string& where) {
  read_list(node, out, where, "a list of numbers, e.g. [0.5, 1.0]");
}

void read_value(const YAML::Node& node, OptionalDouble& out, const std::string& where) {
  if (node.IsNull()) {
    out.reset();
    return;
  }
  read_value(node, out.emplace(), where);
}

void to_json(nlohmann::json& j, const OptionalDouble& value) {
  j = value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

}  // namespace vitlab
