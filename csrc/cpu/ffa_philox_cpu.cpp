// CPU implementation of ffa_loss_philox / ffa_loss_philox_backward: regenerates the probes that the
// CUDA kernels generate on the fly (the same Philox4x32-10 stream and Box-Muller transform,
// csrc/philox.h), materializes them as Z [1, N, k] in the compute dtype, and runs the CPU ffa_loss
// kernels on it. So CPU and CUDA give the same values for the same (seed, offset), and
// ffa_loss_philox(s, t, k, ...) == ffa_loss(s, t, Z, ...) exactly on CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "common.h"
#include "philox.h"

namespace ffa::cpu {
namespace {

using FfaOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor philox_probes(const at::Tensor& student, int64_t k, int64_t seed, int64_t offset) {
  TORCH_CHECK(student.dim() == 4, "like must be 4-D [B,C,H,W], got ", student.dim(), "-D");
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(offset >= 0 && offset % 4 == 0,
              "offset must be a non-negative multiple of 4 (a Philox offset), got ", offset);
  const int64_t N = student.size(2) * student.size(3), n = N * k;
  auto z = at::empty({1, N, k}, student.options().dtype(compute_dtype(student.scalar_type())));
  const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ffa_philox_probes", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, (n + 3) / 4, 2048, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        double v[4];
        philox::normal4(s, o, static_cast<uint64_t>(g), v);
        for (int64_t h = 0; h < 4 && 4 * g + h < n; ++h)
          zp[4 * g + h] = static_cast<scalar_t>(v[h]);
      }
    });
  });
  return z;
}

FfaOut ffa_loss_philox_cpu(const at::Tensor& student, const at::Tensor& teacher, int64_t k,
                           int64_t p, double eps, int64_t seed, int64_t offset) {
  check_feature_pair(student, teacher);
  const auto z = philox_probes(student, k, seed, offset);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ffa::ffa_loss", "")
                             .typed<FfaOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           int64_t, double)>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), student, teacher, z, p, eps);
}

std::tuple<at::Tensor, at::Tensor> ffa_loss_philox_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& y, const at::Tensor& p_s, const at::Tensor& p_t, int64_t k, int64_t p,
    double eps, int64_t seed, int64_t offset, std::array<bool, 2> mask) {
  check_feature_pair(student, teacher);
  const auto z = philox_probes(student, k, seed, offset);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ffa::ffa_loss_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, int64_t, double, std::array<bool, 2>)>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), grad, student, teacher, z, y,
                       p_s, p_t, p, eps, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("ffa_loss_philox", &ffa_loss_philox_cpu);
  m.impl("ffa_loss_philox_backward", &ffa_loss_philox_backward_cpu);
  m.impl("philox_probes", &philox_probes);
}

// Z is a constant of the estimator: nothing to differentiate.
TORCH_LIBRARY_IMPL(ffa, Autograd, m) {
  m.impl("philox_probes", torch::CppFunction::makeFallthrough());
}

}  // namespace ffa::cpu
