// `vitlab data export`: a built-in dataset written as an ImageFolder of PNG files.
#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <utility>

#include "cli/commands.h"
#include "common/error.h"
#include "data/datasets.h"
#include "data/export.h"

namespace vitlab::cli {
namespace {

struct ExportArgs {
  std::string dataset, root, out;
  int64_t limit = 0;
};

// The train and test splits of --dataset.
std::pair<ImageSet, ImageSet> load_splits(const ExportArgs& a) {
  if (a.dataset == "fashion_mnist") {
    const std::string root = a.root.empty() ? kFashionMnistDir : a.root;
    return {load_fashion_mnist(root, "train"), load_fashion_mnist(root, "test")};
  }
  if (a.root.empty()) fail("--root is required for cifar10 (the folder of data_batch_*.bin)");
  return {load_cifar10(a.root, "train"), load_cifar10(a.root, "test")};
}

void run_data_export(const ExportArgs& a) {
  const auto [train, val] = load_splits(a);
  export_image_folder(train, val, a.out, a.limit);
  const int64_t n_train = a.limit > 0 ? std::min(a.limit, train.size()) : train.size();
  const int64_t n_val = a.limit > 0 ? std::min(a.limit, val.size()) : val.size();
  fmt::print("wrote {}: train {} and val {} PNG images in {} class folders\n", a.out, n_train, n_val,
             train.classes.size());
}

}  // namespace

Command add_data_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<ExportArgs>();
  auto* data = app.add_subcommand("data", "Datasets");
  data->require_subcommand(1);
  auto* cmd = data->add_subcommand("export", "Write a built-in dataset as an ImageFolder of PNG files");
  cmd->add_option("--dataset", a->dataset, "Dataset")->required()->check(CLI::IsMember({"fashion_mnist", "cifar10"}));
  cmd->add_option("--root", a->root, "Where its files are (fashion_mnist: Debian's dataset-fashion-mnist)");
  cmd->add_option("--out", a->out, "New ImageFolder directory (OUT/train/<class>, OUT/val/<class>)")->required();
  cmd->add_option("--limit", a->limit, "At most this many images per split (0: all)")->check(CLI::NonNegativeNumber);
  add_threads(cmd, common);
  return make_command(cmd, [a] { run_data_export(*a); });
}

}  // namespace vitlab::cli
