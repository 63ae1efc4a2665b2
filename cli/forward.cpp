// `vitlab forward`: an image model in eval mode on a tensor saved by torch.save.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <utility>

#include "cli/commands.h"
#include "common/device.h"
#include "common/error.h"
#include "io/torch_file.h"

namespace vitlab::cli {
namespace {

struct ForwardArgs {
  std::string model, weights, input, output, attention;
  bool no_strict = false;
};

// A float image batch [B, C, H, W] of the model's channels and image size.
torch::Tensor read_input(const std::string& path, Model& m) {
  torch::Tensor x = read_torch_tensor(path);
  if (x.dim() != 4) fail("{}: expected an image batch [B, C, H, W], got shape {}", path, x.sizes().vec());
  if (!x.is_floating_point()) fail("{}: expected a float tensor, got {}", path, c10::toString(x.scalar_type()));
  const int64_t in_chans = m.config["in_chans"], img = m.config["img_size"];
  if (x.size(1) != in_chans || x.size(2) != img || x.size(3) != img)
    fail("{}: input shape {} does not match the model's [B, {}, {}, {}] (model.in_chans, model.img_size)", path,
         x.sizes().vec(), in_chans, img, img);
  return x;
}

// Logits and, when asked for, the attention maps; both float on the CPU.
std::pair<torch::Tensor, torch::Tensor> predict(Model& m, const torch::Tensor& x, bool attention,
                                                const torch::Device& device, at::ScalarType amp) {
  m.module->to(device);
  m.vision->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor input = x.to(device, torch::kFloat);
  torch::Tensor logits, attn;
  {
    Autocast autocast(device, amp);
    if (attention)
      std::tie(logits, attn) = m.vision->forward_with_attention(input);
    else
      logits = m.vision->forward(input);
  }
  logits = logits.to(torch::kCPU, torch::kFloat);
  if (attn.defined()) attn = attn.to(torch::kCPU, torch::kFloat);
  return {logits, attn};
}

// The top-1 class and the first logits of the first images.
void print_logits(const torch::Tensor& logits) {
  auto top = logits.argmax(-1);
  for (int64_t b = 0; b < std::min<int64_t>(logits.size(0), 8); ++b) {
    auto row = logits[b].narrow(0, 0, std::min<int64_t>(logits.size(1), 10));
    fmt::print("  [{}] top-1 class {:>4}  logits[:{}] = [{:.4f}]\n", b, top[b].item<int64_t>(), row.size(0),
               fmt::join(std::vector<float>(row.data_ptr<float>(), row.data_ptr<float>() + row.size(0)), ", "));
  }
}

void run_forward(const ForwardArgs& a, const CommonOptions& common) {
  Model m = create_model(a.model, parse_overrides(common.sets));
  if (!m.vision) fail("forward runs image models; '{}' is a {} model", a.model, m.family);
  LoadReport report = load_weights(m, a.weights, !a.no_strict);
  if (!report.clean()) fmt::print(stderr, "warning: {} loaded partially:{}\n", a.weights, report.describe());
  const torch::Tensor x = read_input(a.input, m);
  const torch::Device device = option_device(common);
  const at::ScalarType amp = option_amp(common, device);
  const auto [logits, attn] = predict(m, x, !a.attention.empty(), device, amp);

  StagedOutputs out;
  out.add(a.output, serialize_torch(logits));
  if (attn.defined()) out.add(a.attention, serialize_torch(attn));
  out.commit();

  fmt::print("model {} ({} parameters), input {}\n", m.name, count_parameters(*m.module), x.sizes().vec());
  print_logits(logits);
  fmt::print("wrote {}{}\n", a.output,
             attn.defined() ? fmt::format(" and {} {}", a.attention, attn.sizes().vec()) : "");
}

}  // namespace

Command add_forward_command(CLI::App& app, CommonOptions& common) {
  auto a = std::make_shared<ForwardArgs>();
  auto* cmd = app.add_subcommand("forward", "Run an image model in eval mode on a tensor saved by torch.save");
  add_model_options(cmd, a->model, common);
  cmd->add_option("--weights", a->weights, "Weights (.safetensors, or .pt/.pth/.bin from torch.save)")->required();
  cmd->add_option("--input", a->input, "Input tensor [B, C, H, W] (torch.save)")->required();
  cmd->add_option("--output", a->output, "Where to write the logits (torch.load reads it)")->required();
  cmd->add_option("--attention", a->attention, "Also write the attention maps [L, B, H, T, T] here");
  cmd->add_flag("--no-strict", a->no_strict, "Load matching keys only (e.g. a new classifier head)");
  add_threads(cmd, common);
  add_device(cmd, common);
  return make_command(cmd, [a, &common] { run_forward(*a, common); });
}

}  // namespace vitlab::cli
