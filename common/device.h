#pragma once
// Device selection and mixed precision, with the LibTorch 1.13 / 2.x API
// differences kept in one place.
#include <torch/torch.h>

#include <string>

namespace vitlab {

// "cpu", "cuda" or "cuda:N"; `what` names the option in errors. Asking for
// CUDA from a build or machine without it is an error, not a silent CPU run.
torch::Device parse_device(const std::string& spec, const std::string& what = "device");

// "off" | "bf16" | "fp16": the autocast dtype, or Undefined for off.
// fp16 is CUDA-only (it needs the loss scaler, and CPU autocast is bf16).
at::ScalarType parse_amp(const std::string& amp, const torch::Device& device, const std::string& what = "amp");

// Autocast for the scope of the guard (like `with torch.autocast(...)`):
// matrix products in `dtype`, reductions and norms in fp32.
class Autocast {
 public:
  Autocast(const torch::Device& device, at::ScalarType dtype);
  ~Autocast();
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  bool active_ = false;
  torch::DeviceType type_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kFloat;
};

}  // namespace vitlab
