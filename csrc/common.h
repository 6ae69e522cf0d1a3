// Argument checks and tensor plumbing shared by every backend wrapper (CPU and CUDA), so each rule
// lives in one place. The Python layer raises friendlier errors first (with the TypeError /
// ValueError types users expect); these keep direct op calls safe (RuntimeError).
#pragma once
#include <cmath>
#include <cstdlib>

#include "stable.h"

namespace ffa {

inline void check_feature_pair(const Tensor& student, const Tensor& teacher) {
  FFA_CHECK(student.dim() == 4, "student must be 4-D [B,C,H,W], got ", student.dim(), "-D");
  FFA_CHECK(teacher.dim() == 4, "teacher must be 4-D [B,C,H,W], got ", teacher.dim(), "-D");
  FFA_CHECK(student.size(0) == teacher.size(0),
            "student and teacher batch sizes differ: ", student.size(0), " vs ", teacher.size(0));
  FFA_CHECK(student.size(2) == teacher.size(2) && student.size(3) == teacher.size(3),
            "student and teacher must share H,W at the op level, got ", student.sizes(), " and ",
            teacher.sizes());
  FFA_CHECK(is_floating(student.scalar_type()), "student must be a floating tensor, got ",
            student.scalar_type());
  FFA_CHECK(student.scalar_type() == teacher.scalar_type(),
            "student and teacher must have the same dtype, got ", student.scalar_type(), " and ",
            teacher.scalar_type());
  FFA_CHECK(student.device() == teacher.device(), "student and teacher must be on the same device");
  FFA_CHECK(student.size(1) > 0 && teacher.size(1) > 0, "channels must be positive");
}

inline void check_floating(const Tensor& t, const char* name) {
  FFA_CHECK_TYPE(is_floating(t.scalar_type()), name, " must be a floating-point tensor, got ",
                 t.scalar_type());
}

// A quantizer parameter (scale, zero_point, alpha) lives on x's device; with cpu_scalar_ok a
// one-element CPU tensor is accepted too (the CUDA wrappers read it on the host and pass it by
// value). Checked before anything reads it: a parameter elsewhere would be read as garbage.
inline void check_qparam_device(const Tensor& t, const char* name, const Tensor& x,
                                bool cpu_scalar_ok) {
  FFA_CHECK_VALUE(t.device() == x.device() || (cpu_scalar_ok && t.is_cpu() && t.numel() == 1), name,
                  " must be on x's device (", x.device(), ")",
                  cpu_scalar_ok ? " or be a one-element CPU tensor" : "", ", got ", t.device());
}

// The quantized ReLU's step: one floating element on x's device (or the CPU).
inline void check_relu_alpha(const Tensor& alpha, const Tensor& x) {
  check_floating(alpha, "alpha");
  FFA_CHECK_VALUE(alpha.numel() == 1, "alpha must have exactly one element, got shape ",
                  alpha.sizes());
  check_qparam_device(alpha, "alpha", x, true);
}

// The upstream gradient of an elementwise quantizer: x's shape, dtype and device.
inline void check_grad_like_x(const Tensor& grad, const Tensor& x) {
  FFA_CHECK_VALUE(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ",
                  grad.sizes());
  FFA_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad must have x's dtype ",
                 x.scalar_type(), ", got ", grad.scalar_type());
  FFA_CHECK_VALUE(grad.device() == x.device(), "grad must be on x's device (", x.device(),
                  "), got ", grad.device());
}

// The argument checks of ffa::fake_quantize(_backward) that need no device read. Per-tensor
// qparams may be one-element CPU tensors for a CUDA x; per-channel ones live on x's device.
inline void check_fake_quantize_args(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                                     int64_t qmin, int64_t qmax, bool per_channel) {
  check_floating(x, "x");
  check_floating(scale, "scale");
  check_qparam_device(scale, "scale", x, !per_channel);
  check_qparam_device(zero_point, "zero_point", x, !per_channel);
  FFA_CHECK_VALUE(qmin < qmax, "quant_min must be less than quant_max, got quant_min=", qmin,
                  " and quant_max=", qmax);
  FFA_CHECK_VALUE(std::abs(qmin) <= (int64_t(1) << 24) && std::abs(qmax) <= (int64_t(1) << 24),
                  "quant_min and quant_max must lie in [-2^24, 2^24]");
  FFA_CHECK_TYPE(
      zero_point.scalar_type() != ScalarType::Bool && !is_complex(zero_point.scalar_type()),
      "zero_point must be an integer or floating tensor, got ", zero_point.scalar_type());
}

inline void check_p(int64_t p) { FFA_CHECK(p == 1 || p == 2, "p must be 1 or 2, got ", p); }

// Any finite eps > 0 (the kernels form norms in float64, scale-safe); inf would zero every unit
// pixel.
inline void check_eps(double eps) {
  FFA_CHECK(eps > 0 && std::isfinite(eps), "eps must be positive and finite, got ", eps);
}

inline void check_loss_options(int64_t p, double eps) {
  check_p(p);
  check_eps(eps);
}

// Everything a loss op checks about its common arguments.
inline void check_loss_args(const Tensor& student, const Tensor& teacher, int64_t p, double eps) {
  check_feature_pair(student, teacher);
  check_loss_options(p, eps);
}

// The upstream gradient of a per-sample loss.
inline void check_loss_grad(const Tensor& grad, int64_t batch) {
  FFA_CHECK(grad.dim() == 1 && grad.size(0) == batch, "grad must have shape [", batch, "], got ",
            grad.sizes());
}

inline void check_projection(const Tensor& z, const Tensor& student) {
  const int64_t B = student.size(0), N = student.size(2) * student.size(3);
  FFA_CHECK(z.dim() == 3, "projection must be 3-D [Bz,N,k], got ", z.dim(), "-D");
  FFA_CHECK(z.size(0) == 1 || z.size(0) == B, "projection batch must be 1 or ", B, ", got ",
            z.size(0));
  FFA_CHECK(z.size(1) == N, "projection must have N=", N, " rows, got ", z.size(1));
  FFA_CHECK(z.size(2) >= 1, "projection must have k >= 1 columns");
  FFA_CHECK(z.scalar_type() == student.scalar_type() ||
                (z.scalar_type() == ScalarType::Float && student.element_size() < 4),
            "projection dtype ", z.scalar_type(), " does not match the features' ",
            student.scalar_type());
  FFA_CHECK(z.device() == student.device(), "projection must be on the features' device");
}

// [B,C,H,W] -> [B,C,N] with N = H*W, a view whenever H and W can be merged (NCHW, channels_last,
// channel slices), a copy otherwise. Kernels then read x(b, c, i) = x[b*sb + c*sc + i*sp].
inline Tensor as_pixels(const Tensor& x) { return torch::stable::flatten(x, 2); }

// Allocates the output y like x and returns a dense input sharing y's strides (a copy only when x
// is not dense), so elementwise kernels can walk both in memory order.
inline Tensor dense_input(const Tensor& x, Tensor& y) {
  y = torch::stable::empty_like(x);
  if (x.strides() == y.strides()) return x;
  Tensor d = torch::stable::empty_like(y);
  torch::stable::copy_(d, x);
  return d;
}

// t with like's strides (a copy only when they differ).
inline Tensor match_strides(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) return t;
  Tensor d = torch::stable::empty_like(like);
  torch::stable::copy_(d, t);
  return d;
}

// float32 accumulation for half types, float64 stays float64.
inline ScalarType compute_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

}  // namespace ffa
