// CPU implementation of ffa_loss_philox / ffa_loss_philox_backward: regenerates the probes that the
// CUDA kernels generate on the fly (the same Philox4x32-10 stream and Box-Muller transform,
// csrc/philox.h), materializes them as Z [1, N, k] in the compute dtype, and runs the CPU ffa_loss
// kernels on it (called directly, as the CPU kernel of ffa_loss). So CPU and CUDA give the same
// values for the same (seed, offset), and ffa_loss_philox(s, t, k, ...) == ffa_loss(s, t, Z, ...)
// exactly on CPU.

#include <array>
#include <tuple>

#include "common.h"
#include "cpu/ffa_cpu.h"
#include "cpu/parallel.h"
#include "philox.h"

namespace ffa::cpu {
namespace {

using FfaOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Tensor philox_probes(const Tensor& student, int64_t k, int64_t seed, int64_t offset) {
  FFA_CHECK(student.dim() == 4, "like must be 4-D [B,C,H,W], got ", student.dim(), "-D");
  FFA_CHECK(k >= 1, "k must be >= 1, got ", k);
  FFA_CHECK(offset >= 0 && offset % 4 == 0,
            "offset must be a non-negative multiple of 4 (a Philox offset), got ", offset);
  const int64_t N = student.size(2) * student.size(3), n = N * k;
  auto z = empty_on({1, N, k}, student, compute_dtype(student.scalar_type()));
  const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  FFA_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ffa_philox_probes", [&] {
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    parallel_for(0, (n + 3) / 4, 2048, [&](int64_t g0, int64_t g1) {
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

FfaOut ffa_loss_philox_cpu(const Tensor& student, const Tensor& teacher, int64_t k, int64_t p,
                           double eps, int64_t seed, int64_t offset) {
  check_feature_pair(student, teacher);
  const auto z = philox_probes(student, k, seed, offset);
  return ffa_loss_cpu(student, teacher, z, p, eps);
}

std::tuple<Tensor, Tensor> ffa_loss_philox_backward_cpu(const Tensor& grad, const Tensor& student,
                                                        const Tensor& teacher, const Tensor& y,
                                                        const Tensor& p_s, const Tensor& p_t,
                                                        int64_t k, int64_t p, double eps,
                                                        int64_t seed, int64_t offset,
                                                        std::vector<bool> mask) {
  check_feature_pair(student, teacher);
  const auto z = philox_probes(student, k, seed, offset);
  return ffa_loss_backward_cpu(grad, student, teacher, z, y, p_s, p_t, p, eps, mask);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("ffa_loss_philox", TORCH_BOX(&ffa_loss_philox_cpu));
  m.impl("ffa_loss_philox_backward", TORCH_BOX(&ffa_loss_philox_backward_cpu));
  m.impl("philox_probes", TORCH_BOX(&philox_probes));
}

// philox_probes' Autograd fallthrough (Z is a constant of the estimator) is registered in
// Python (ffa/_ops.py): the stable ABI has no fallthrough kernel.

}  // namespace ffa::cpu
