// The CPU FFA kernels' entry points, shared with ffa_philox_cpu.cpp (which runs them on the
// regenerated probes).
#pragma once
#include <tuple>
#include <vector>

#include "stable.h"

namespace ffa::cpu {

std::tuple<Tensor, Tensor, Tensor, Tensor> ffa_loss_cpu(const Tensor& student,
                                                        const Tensor& teacher,
                                                        const Tensor& projection, int64_t p,
                                                        double eps);

std::tuple<Tensor, Tensor> ffa_loss_backward_cpu(const Tensor& grad, const Tensor& student,
                                                 const Tensor& teacher, const Tensor& projection,
                                                 const Tensor& y, const Tensor& p_s,
                                                 const Tensor& p_t, int64_t p, double eps,
                                                 std::vector<bool> mask);

}  // namespace ffa::cpu
