// What the CUDA host wrappers need beyond csrc/common.h, with the stable ABI only (so ffa._C_cuda
// builds on a machine with nvcc and a CPU-only torch): the device guard, torch's current CUDA
// stream, and aten ops called through the stable dispatcher (tensor overloads: no Scalar
// arguments cross it at the 2.10 API level).
#pragma once
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <torch/csrc/stable/accelerator.h>

#include <array>

#include "common.h"

namespace ffa::cuda {

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline void check_cuda(cudaError_t err, const char* what) {
  FFA_CHECK(err == cudaSuccess, "ffa: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

// torch's current CUDA stream on `device`. The shim's aoti_torch_get_current_cuda_stream (a C
// function of libtorch_cuda, from torch 2.2 on) is looked up at run time: libtorch_cuda is loaded
// by then (ffa imports this module only when torch has CUDA), but it is not linked here, so the
// module builds against a CPU-only torch. (torch_stream_native_handle would do from 2.13 on.)
inline cudaStream_t current_stream(int32_t device) {
  using Fn = int32_t (*)(int32_t, void**);
  static const Fn fn = [] {
    void* sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    if (sym == nullptr) {
      void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
      if (lib != nullptr) sym = dlsym(lib, "aoti_torch_get_current_cuda_stream");
    }
    return reinterpret_cast<Fn>(sym);
  }();
  FFA_CHECK(fn != nullptr,
            "ffa: torch's CUDA library (aoti_torch_get_current_cuda_stream) is not loaded");
  void* stream = nullptr;
  FFA_CHECK(fn(device, &stream) == 0, "ffa: could not get the current CUDA stream of device ",
            device);
  return static_cast<cudaStream_t>(stream);
}

inline cudaStream_t stream_of(const Tensor& t) { return current_stream(t.get_device_index()); }

// aten::name.overload(args...) through the stable dispatcher; returns the first output.
template <size_t N>
Tensor call_aten(const char* name, const char* overload, const std::array<Tensor, N>& args) {
  std::array<StableIValue, N> stack;
  for (size_t i = 0; i < N; ++i) stack[i] = torch::stable::detail::from(args[i]);
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

inline Tensor bmm(const Tensor& a, const Tensor& b) {
  return call_aten<2>("aten::bmm", "", {a, b});
}
inline Tensor mul(const Tensor& a, const Tensor& b) {
  return call_aten<2>("aten::mul", "Tensor", {a, b});
}
inline Tensor sub(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b); }
inline Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }
inline Tensor transpose12(const Tensor& t) { return torch::stable::transpose(t, 1, 2); }
// A 0-d tensor on like's device (dtype of like), for the tensor overloads of scalar ops.
inline Tensor scalar_like(double v, const Tensor& like) {
  return torch::stable::full({}, v, like.scalar_type(), std::nullopt, like.device());
}

}  // namespace ffa::cuda
