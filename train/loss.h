#pragma once
// timm's SoftTargetCrossEntropy: the loss for the soft targets of Mixup/CutMix
// and label smoothing (data/mixup.h).
#include <torch/torch.h>

namespace vitlab {

// The mean over the batch of sum(-target * log_softmax(logits)); logits and
// targets [B, num_classes], the same shape (else an Error).
torch::Tensor soft_target_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets);

}  // namespace vitlab
