#pragma once
// Named presets (timm's and the official DeepViT code's names) and building a
// model from a preset plus `model.KEY=VALUE` overrides.
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <variant>
#include <vector>

#include "common/config.h"
#include "io/state_dict.h"
#include "models/cait.h"
#include "models/deepvit.h"
#include "models/transformer.h"
#include "models/vit.h"

namespace vitlab {

struct Preset {
  std::string name;
  std::string family;  // vit | deepvit | cait | transformer
  std::string config;  // YAML map of the keys that differ from the family's defaults
  std::string description;
};

const std::vector<Preset>& presets();

// A preset with its overrides applied and checked, not yet built.
struct ModelSpec {
  std::string name;
  std::string family;
  nlohmann::json config;  // every key, resolved
  std::variant<ViTOptions, DeepViTOptions, CaitOptions, TransformerOptions> options;
};

// `overrides` is a YAML map of model keys (without the `model.` prefix).
// Unknown names and keys, and bad values, are errors naming them.
ModelSpec resolve_model(const std::string& name, const YAML::Node& overrides = YAML::Node(YAML::NodeType::Map));
ModelSpec resolve_model(const std::string& name, const std::vector<Override>& overrides);

// The parameter count a spec will have, from its shapes alone (building
// vit_huge just to count takes seconds and gigabytes). Tests hold it equal to
// count_parameters() of the built model for every preset.
int64_t spec_parameters(const ModelSpec& spec);

struct Model {
  std::string name;
  std::string family;
  nlohmann::json config;  // every key, resolved
  std::shared_ptr<torch::nn::Module> module;
  std::shared_ptr<VisionTransformerImpl> vision;    // ViT, DeepViT and CaiT
  std::shared_ptr<Seq2SeqTransformerImpl> seq2seq;  // Transformer
};

Model build_model(const ModelSpec& spec);
Model create_model(const std::string& name, const YAML::Node& overrides = YAML::Node(YAML::NodeType::Map));
Model create_model(const std::string& name, const std::vector<Override>& overrides);

// Trainable parameters, each shared (tied) tensor counted once.
int64_t count_parameters(const torch::nn::Module& module);

// Reads a weights file into the model (resampling pos_embed for another image
// size); strict by default.
LoadReport load_weights(Model& model, const std::filesystem::path& path, bool strict = true);

}  // namespace vitlab
