#include "train/loss.h"

#include <fmt/ranges.h>

#include "common/error.h"

namespace vitlab {

torch::Tensor soft_target_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets) {
  if (logits.sizes() != targets.sizes())
    fail("soft-target cross entropy: logits {} and targets {} differ in shape", logits.sizes(), targets.sizes());
  return torch::sum(-targets * torch::log_softmax(logits, -1), -1).mean();
}

}  // namespace vitlab
