#include <catch2/catch.hpp>

#include "common/config.h"
#include "models/registry.h"

using namespace vitlab;

namespace {
YAML::Node sets(std::initializer_list<const char*> items) {
  std::vector<Override> o;
  for (const char* s : items) o.push_back(parse_override(s));
  return section_overrides(o, "model", {"model"});
}
}  // namespace

TEST_CASE("overrides (--set) parse dotted keys and YAML values") {
  Override o = parse_override("model.apply_transform=[false, true]");
  CHECK(o.key == "model.apply_transform");
  REQUIRE(o.value.IsSequence());
  CHECK(o.value.size() == 2);
  CHECK(parse_override("model.depth=3").value.as<int>() == 3);
  CHECK_THROWS_WITH(parse_override("model.depth"), Catch::Contains("expected KEY=VALUE"));
  CHECK_THROWS_WITH(parse_override("model.depth=[1,"), Catch::Contains("not valid YAML"));
  CHECK_THROWS_WITH(section_overrides({parse_override("depth=3")}, "model", {"model"}), Catch::Contains("model.KEY"));
  CHECK_THROWS_WITH(parse_override("model.depth="), Catch::Contains("--set model.depth: empty value"));
  // null, as a Python None, turns a nullable key off (LayerScale here).
  const ModelSpec on = resolve_model("vit_tiny_patch16_224", sets({"model.init_values=1e-5"}));
  CHECK(on.config["init_values"] == 1e-5);
  CHECK(resolve_model("vit_tiny_patch16_224", sets({"model.init_values=1e-5", "model.init_values=null"}))
            .config["init_values"]
            .is_null());
  CHECK(spec_parameters(resolve_model("vit_tiny_patch16_224", sets({"model.init_values=~"}))) ==
        spec_parameters(resolve_model("vit_tiny_patch16_224")));
}

TEST_CASE("init_values: cait resolves CaiT's depth rule per depth") {
  auto init = [](const std::string& name, int depth) {
    const std::string depth_set = "model.depth=" + std::to_string(depth);
    return resolve_model(name, sets({"model.init_values=cait", depth_set.c_str()}))
        .config["init_values"]
        .template get<double>();
  };
  // Touvron et al. 2021: 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond.
  CHECK(init("vit_tiny_patch16_224", 4) == 0.1);
  CHECK(init("vit_tiny_patch16_224", 18) == 0.1);
  CHECK(init("deepvit_patch16_224_re_attn_16b", 19) == 1e-5);
  CHECK(init("cait_xxs24_224", 24) == 1e-5);
  CHECK(init("cait_xxs24_224", 25) == 1e-6);
  // The rule is resolved in the model's copy: the overrides keep it for the next depth, as a study reuses them.
  YAML::Node overrides = YAML::Load("{init_values: cait, depth: 4, apply_transform: last:2}");
  CHECK(resolve_model("deepvit_patch16_224_re_attn_16b", overrides).config["init_values"] == 0.1);
  CHECK(overrides["init_values"].as<std::string>() == "cait");
  CHECK(overrides["apply_transform"].as<std::string>() == "last:2");
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", sets({"model.init_values=caitt"})),
                    Catch::Contains("model.init_values") && Catch::Contains("cait (CaiT's depth rule)") &&
                        Catch::Contains("'caitt'"));
}

TEST_CASE("unknown keys name the closest valid key") {
  CHECK_THROWS_WITH(
      resolve_model("vit_tiny_patch16_224", sets({"model.num_head=4"})),
      Catch::Contains("unknown key 'model.num_head'") && Catch::Contains("did you mean 'model.num_heads'"));
  // DeepViT keys are not ViT keys.
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16_224", sets({"model.apply_transform=all"})),
                    Catch::Contains("unknown key 'model.apply_transform'"));
  CHECK_THROWS_WITH(resolve_model("vit_tiny_patch16"), Catch::Contains("did you mean 'vit_tiny_patch16_224'"));
}

TEST_CASE("bad values are errors naming the key and the expectation") {
  auto bad = [](std::initializer_list<const char*> s) { return resolve_model("deepvit_S", sets(s)); };
  CHECK_THROWS_WITH(bad({"model.depth=0"}), Catch::Contains("model.depth"));
  CHECK_THROWS_WITH(bad({"model.img_size=30"}),
                    Catch::Contains("model.img_size 30 is not divisible by model.patch_size 16"));
  CHECK_THROWS_WITH(bad({"model.embed_dim=100"}),
                    Catch::Contains("model.embed_dim 100 is not divisible by model.num_heads 12"));
  CHECK_THROWS_WITH(bad({"model.apply_transform=[true, false]"}),
                    Catch::Contains("model.apply_transform has 2 entries but model.depth is 16"));
  CHECK_THROWS_WITH(bad({"model.apply_transform=some"}), Catch::Contains("model.apply_transform"));
  CHECK_THROWS_WITH(bad({"model.depth=three"}), Catch::Contains("model.depth: expected an integer, got 'three'"));
  CHECK_THROWS_WITH(bad({"model.global_pool=max"}), Catch::Contains("'token' or 'avg'"));
  CHECK_THROWS_WITH(bad({"model.drop_path_rate=1.5"}), Catch::Contains("model.drop_path_rate must be in [0, 1)"));
  CHECK_THROWS_WITH(bad({"model.qkv_bias=maybe"}), Catch::Contains("model.qkv_bias: expected true or false"));
}

TEST_CASE("apply_transform rules expand against the resolved depth") {
  auto spec = resolve_model("deepvit_S", sets({"model.depth=4", "model.apply_transform=last:1"}));
  CHECK(spec.config["apply_transform"] == nlohmann::json({false, false, false, true}));
  spec = resolve_model("deepvit_patch16_224_re_attn_16b", sets({"model.depth=3"}));
  CHECK(spec.config["apply_transform"] == nlohmann::json({true, true, true}));
  spec = resolve_model("deepvit_S", sets({"model.depth=3", "model.apply_transform=[false,false,true]",
                                          "model.img_size=32", "model.patch_size=8"}));
  CHECK(spec.config["depth"] == 3);
  CHECK(spec.config["img_size"] == 32);
  CHECK(spec.config["use_cnn_embed"] == true);
}
