#pragma once
// `vitlab bench`, in the spirit of timm's benchmark.py: warm-up steps, then
// timed steps of inference or training (forward, loss, backward, AdamW
// step), the data loader alone, or the machine's sgemm peak. Each returns
// one JSON object; the side-by-side with PyTorch is bench/run.py.
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "models/registry.h"

namespace vitlab {

// Multiply-accumulates of one image's forward pass, counted from the
// shapes: every matrix product (patch embedding, qkv, attention scores and
// their product with V, projection, MLP, head, re-attention's head mixing
// Θ, CaiT's talking-heads mixing and class-attention blocks); norms,
// softmax, activations and DeepViT's CNN stem are not counted. A training
// step is taken as 3 forward passes (backward = 2).
double forward_macs(const ModelSpec& spec);

struct BenchOptions {
  std::string mode = "infer";  // infer | train
  int64_t batch = 32;
  int64_t steps = 20;
  int64_t warmup = 5;
  torch::Device device = torch::kCPU;
  at::ScalarType amp = at::ScalarType::Undefined;
  bool attention = false;  // also capture every block's attention maps
  bool profile = false;    // then as many steps again under LibTorch's profiler: self CPU time per operator
};

nlohmann::json bench_model(const ModelSpec& spec, const BenchOptions& options);

// The attention op alone at a model's shapes (q, k, v [batch, heads,
// tokens, head dim], strided views of one qkv tensor as in the model): the
// median ms of vitlab's CPU kernel, at::scaled_dot_product_attention
// (LibTorch >= 2.0) and LibTorch's explicit matmul + softmax + matmul, the
// three run in turn each round; inference without autograd, or training's
// forward and backward. What decides which one the models take.
nlohmann::json bench_attention_op(const ModelSpec& spec, const BenchOptions& options);

// What `vitlab analyze`'s collapse measures add to its forward passes:
// `steps` rounds, each analysing `batch` random images (one batch, eval
// mode) with the similarity alone, each of `measures` alone and all of them
// together, in turn, so that every configuration sees the same drift of a
// shared machine; `warmup` untimed rounds of the similarity alone first.
// Per configuration, from its fastest round (the minimum resists a shared
// machine's noise): forward and analysis seconds, and its cost over the
// similarity alone as a fraction of the forward passes, in total (entropy
// and distance are computed inside the forward passes) and in the analysis.
nlohmann::json bench_analysis(const ModelSpec& spec, const BenchOptions& options,
                              const std::vector<std::string>& measures);

// The best float32 matrix-multiply rate (GFLOP/s) over a few square sizes,
// with the current thread count.
nlohmann::json bench_gemm(const torch::Device& device);

struct LoaderBenchOptions {
  std::string data;  // imagefolder:ROOT (its train split), fashion_mnist or cifar10:ROOT
  int64_t img_size = 224;
  int64_t batch = 32;
  int64_t steps = 20;  // batches timed, after one warm-up batch
  int workers = 1;
};

// Decode + training transforms (RandomResizedCrop, flip, normalise) through
// the threaded loader.
nlohmann::json bench_loader(const LoaderBenchOptions& options);

}  // namespace vitlab
