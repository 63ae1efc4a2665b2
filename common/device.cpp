#include "common/device.h"

#include <ATen/autocast_mode.h>

#include "common/error.h"

// PyTorch 2.4 made autocast device-generic and deprecated the per-device calls.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define VITLAB_GENERIC_AUTOCAST 1
#else
#define VITLAB_GENERIC_AUTOCAST 0
#endif

namespace vitlab {

torch::Device parse_device(const std::string& spec, const std::string& what) {
  if (spec == "cpu") return torch::kCPU;
  if (spec != "cuda" && spec.rfind("cuda:", 0) != 0) fail("{} must be cpu, cuda or cuda:N, got '{}'", what, spec);
  int64_t index = 0;
  if (spec.size() > 5) {
    try {
      size_t used = 0;
      index = std::stoll(spec.substr(5), &used);
      if (used != spec.size() - 5 || index < 0) throw std::invalid_argument(spec);
    } catch (const std::exception&) {
      fail("{} must be cpu, cuda or cuda:N, got '{}'", what, spec);
    }
  }
  if (!torch::cuda::is_available())
    fail(
        "{} is {} but this LibTorch build or machine has no CUDA device (build against a CUDA LibTorch, see "
        "docs/GPU.md)",
        what, spec);
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  if (index >= count) fail("{} is {} but only {} CUDA device(s) are visible", what, spec, count);
  return {torch::kCUDA, static_cast<c10::DeviceIndex>(index)};
}

at::ScalarType parse_amp(const std::string& amp, const torch::Device& device, const std::string& what) {
  if (amp == "off") return at::ScalarType::Undefined;
  if (amp == "bf16") return at::kBFloat16;
  if (amp == "fp16") {
    if (!device.is_cuda())
      fail("{} fp16 needs a CUDA device (CPU autocast is bf16); got device {}", what, device.str());
    return at::kHalf;
  }
  fail("{} must be off, bf16 or fp16, got '{}'", what, amp);
}

namespace {

bool autocast_enabled(torch::DeviceType type) {
#if VITLAB_GENERIC_AUTOCAST
  return at::autocast::is_autocast_enabled(type);
#else
  return type == torch::kCUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

at::ScalarType autocast_dtype(torch::DeviceType type) {
#if VITLAB_GENERIC_AUTOCAST
  return at::autocast::get_autocast_dtype(type);
#else
  return type == torch::kCUDA ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
#endif
}

void set_autocast(torch::DeviceType type, bool enabled, at::ScalarType dtype) {
#if VITLAB_GENERIC_AUTOCAST
  at::autocast::set_autocast_enabled(type, enabled);
  at::autocast::set_autocast_dtype(type, dtype);
#else
  if (type == torch::kCUDA) {
    at::autocast::set_enabled(enabled);
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_cpu_enabled(enabled);
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

}  // namespace

Autocast::Autocast(const torch::Device& device, at::ScalarType dtype) : type_(device.type()) {
  if (dtype == at::ScalarType::Undefined) return;
  TORCH_CHECK(type_ == torch::kCPU || type_ == torch::kCUDA, "autocast supports cpu and cuda, got ", device);
  active_ = true;
  prev_enabled_ = autocast_enabled(type_);
  prev_dtype_ = autocast_dtype(type_);
  set_autocast(type_, true, dtype);
  at::autocast::increment_nesting();
}

Autocast::~Autocast() {
  if (!active_) return;
  // The cast-weight cache lives as long as the outermost autocast region.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_autocast(type_, prev_enabled_, prev_dtype_);
}

}  // namespace vitlab
