#pragma once
// Configuration as YAML: `--set section.key=value` overrides, and reading a
// YAML map into an options struct with every key checked.
//
// An options struct names its fields once, in `template <class F> void
// visit(F&& f)` calling f("key", field) for each; reading, writing JSON and
// listing the valid keys all go through that one list.
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/error.h"

namespace vitlab {

// One `--set key=value`: a dotted key ("model.depth") and a YAML value.
struct Override {
  std::string key;
  YAML::Node value;
};

// Parses "model.depth=3" or "model.apply_transform=[false,true]".
Override parse_override(const std::string& text);

// The overrides under `section.` as a YAML map of the remaining key to value
// (a dotted remainder, "analysis.every", as nested maps); an override of
// another section is an error naming the allowed sections.
YAML::Node section_overrides(const std::vector<Override>& overrides, const std::string& section,
                             const std::vector<std::string>& all_sections);

// Copies every entry of `overrides` (a map) into `base` (a map), merging
// the maps both have under one key.
void merge_into(YAML::Node& base, const YAML::Node& overrides);

// The candidate nearest to `key` by edit distance, or "" when none is close.
std::string closest_key(const std::string& key, const std::vector<std::string>& candidates);

// Typed reads of one YAML value; errors name `where` (e.g. "model.depth").
void read_value(const YAML::Node& node, int64_t& out, const std::string& where);
void read_value(const YAML::Node& node, double& out, const std::string& where);
void read_value(const YAML::Node& node, bool& out, const std::string& where);
void read_value(const YAML::Node& node, std::string& out, const std::string& where);
void read_value(const YAML::Node& node, std::vector<bool>& out, const std::string& where);
void read_value(const YAML::Node& node, std::vector<double>& out, const std::string& where);

// A key that may be null, as a Python None (timm's init_values): null reads
// as no value, and no value is written as null.
struct OptionalDouble : std::optional<double> {
  using std::optional<double>::optional;
};
void read_value(const YAML::Node& node, OptionalDouble& out, const std::string& where);
void to_json(nlohmann::json& j, const OptionalDouble& value);

// Whether T is an options struct (has visit): a field of that type is a
// nested map of keys, as train.analysis.every.
struct AnyField {
  template <class V>
  void operator()(const char*, V&) const {}
};
template <class T, class = void>
struct is_options : std::false_type {};
template <class T>
struct is_options<T, std::void_t<decltype(std::declval<T&>().visit(AnyField{}))>> : std::true_type {};

template <class Options>
std::vector<std::string> option_keys(Options& options) {
  std::vector<std::string> keys;
  options.visit([&](const char* key, auto&) { keys.emplace_back(key); });
  return keys;
}

// Reads the YAML map `values` into `options`; an unknown key is an error that
// names it and the closest valid key.
template <class Options>
void read_options(Options& options, const YAML::Node& values, const std::string& section) {
  if (!values || values.IsNull()) return;
  if (!values.IsMap()) fail("{}: expected a map of key: value, got '{}'", section, YAML::Dump(values));
  std::vector<std::string> keys = option_keys(options);
  for (const auto& kv : values) {
    const auto key = kv.first.as<std::string>();
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
      std::string near = closest_key(key, keys);
      fail("unknown key '{}.{}'{}; valid keys: {}", section, key,
           near.empty() ? "" : fmt::format(" (did you mean '{}.{}'?)", section, near), fmt::join(keys, ", "));
    }
  }
  options.visit([&](const char* key, auto& field) {
    YAML::Node v = values[key];
    if (!v) return;
    if constexpr (is_options<std::decay_t<decltype(field)>>::value)
      read_options(field, v, section + "." + key);
    else
      read_value(v, field, section + "." + key);
  });
}

template <class Options>
nlohmann::json options_to_json(Options& options) {
  nlohmann::json j = nlohmann::json::object();
  options.visit([&](const char* key, auto& field) {
    if constexpr (is_options<std::decay_t<decltype(field)>>::value)
      j[key] = options_to_json(field);
    else
      j[key] = field;
  });
  return j;
}

}  // namespace vitlab
