// CUDA implementations of the quantization ops: tensor checks, device guard, current stream, a
// small workspace from the caching allocator, then the torch-free launch functions of
// cuda/quant_kernels.cu. Nothing here reads device memory back: qparams and the ReLU step stay on
// the device (a CPU scalar is read on the host and passed by value), so no op syncs the host.
// Semantics and argument rules are those of the CPU ops (csrc/cpu/quant_cpu.cpp); tensor-valued
// qparams on the GPU are not validated (that would need a sync).
#include <cmath>
#include <optional>
#include <string>

#include "common.h"
#include "cuda/host.h"
#include "cuda/quant_kernels.h"

namespace ffa::cuda {
namespace {

#define FFA_QUANT_CUDA_CHECK(expr)                                                              \
  do {                                                                                          \
    const cudaError_t err_ = (expr);                                                            \
    FFA_CHECK(err_ == cudaSuccess, "ffa quant CUDA launch failed: ", cudaGetErrorString(err_)); \
  } while (0)

QDtype qdtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return QDtype::kFloat32;
    case ScalarType::Double:
      return QDtype::kFloat64;
    case ScalarType::Half:
      return QDtype::kFloat16;
    case ScalarType::BFloat16:
      return QDtype::kBFloat16;
    default:
      FFA_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

void check_on_cuda(const Tensor& t, const char* name) {
  FFA_CHECK(t.is_cuda(), name, " must be a CUDA tensor here (the CUDA kernel was dispatched), got ",
            t.device());
}

void check_bits(int64_t bits) {
  FFA_CHECK_VALUE(bits >= 1 && bits <= 8, "bits must be one of 1, 2, ..., 8, got ", bits);
}

QLayout layout_of(const Tensor& t, std::optional<int64_t> axis) {
  const int64_t n = t.numel();
  if (!axis.has_value() || t.size(*axis) == 1) return make_layout(n, 1, n > 0 ? n : 1);
  return make_layout(n, t.size(*axis), t.stride(*axis));
}

Tensor workspace(const Tensor& like, size_t bytes) {
  return empty_on({static_cast<int64_t>(bytes > 0 ? bytes : 16)}, like, ScalarType::Byte);
}

// Lays a float32 device gradient out like `param` (dtype, shape, device).
Tensor grad_like(const Tensor& g, const Tensor& param) {
  return torch::stable::to(torch::stable::view(to_dtype(g, param.scalar_type()), param.sizes()),
                           param.device());
}

// ---- quantize_weight ------------------------------------------------------------------------

Tensor quantize_weight_cuda_op(const Tensor& weight, int64_t bits, bool per_channel) {
  check_floating(weight, "weight");
  check_on_cuda(weight, "weight");
  check_bits(bits);
  FFA_CHECK_VALUE(!per_channel || weight.dim() >= 2,
                  "per_channel=True needs a weight with at least 2 dims, got a ", weight.dim(),
                  "-D tensor");
  const DeviceGuard guard(weight.get_device_index());
  Tensor y;
  const Tensor w = dense_input(weight, y);
  if (w.numel() == 0) return y;
  const QLayout L = layout_of(w, per_channel ? std::optional<int64_t>(0) : std::nullopt);
  const Tensor ws = workspace(w, quantize_weight_workspace_bytes(L));
  FFA_QUANT_CUDA_CHECK(quantize_weight_cuda(qdtype(w.scalar_type()), w.const_data_ptr(),
                                            y.mutable_data_ptr(), L, static_cast<int>(bits),
                                            ws.mutable_data_ptr(), stream_of(w)));
  return y;
}

// ---- quant_relu -----------------------------------------------------------------------------

// alpha: checked by check_relu_alpha (x's device or a CPU scalar).
QAlpha alpha_arg(const Tensor& alpha) {
  QAlpha a{nullptr, qdtype(alpha.scalar_type()), 0.0};
  if (alpha.is_cuda()) {
    a.ptr = alpha.const_data_ptr();
  } else {
    FFA_DISPATCH_FLOATING_AND_HALF_TYPES(alpha.scalar_type(), "alpha", [&] {
      const scalar_t v = alpha.const_data_ptr<scalar_t>()[0];
      const scalar_t lo = static_cast<scalar_t>(1e-3), hi = static_cast<scalar_t>(5.0);
      a.val = static_cast<double>(v < lo ? lo : (hi < v ? hi : v));
    });
  }
  return a;
}

int parse_ste(std::string_view ste) {
  if (ste == "inplt") return kSteInplt;
  if (ste == "idnty") return kSteIdnty;
  FFA_CHECK_VALUE(ste == "relu", "ste must be 'inplt', 'idnty' or 'relu', got '", std::string(ste),
                  "'");
  return kSteRelu;
}

int parse_alpha_grad(std::string_view g) {
  if (g == "mean") return kAgMean;
  if (g == "ae") return kAgAe;
  if (g == "pact") return kAgPact;
  FFA_CHECK_VALUE(g == "min", "alpha_grad must be 'mean', 'ae', 'pact' or 'min', got '",
                  std::string(g), "'");
  return kAgMin;
}

Tensor quant_relu_cuda_op(const Tensor& x_in, const Tensor& alpha, int64_t bits,
                          std::string_view ste, std::string_view alpha_grad, double rate) {
  check_floating(x_in, "x");
  check_relu_alpha(alpha, x_in);  // first: a CPU x with a CUDA alpha lands here
  check_on_cuda(x_in, "x");
  check_bits(bits);
  parse_ste(ste);
  parse_alpha_grad(alpha_grad);
  const DeviceGuard guard(x_in.get_device_index());
  const QAlpha a = alpha_arg(alpha);
  Tensor y;
  const Tensor x = dense_input(x_in, y);
  FFA_QUANT_CUDA_CHECK(quant_relu_forward_cuda(qdtype(x.scalar_type()), x.const_data_ptr(),
                                               y.mutable_data_ptr(), x.numel(), a,
                                               static_cast<int>(bits), stream_of(x)));
  return y;
}

std::tuple<Tensor, Tensor> quant_relu_backward_cuda_op(const Tensor& grad_in, const Tensor& x_in,
                                                       const Tensor& alpha, int64_t bits,
                                                       std::string_view ste,
                                                       std::string_view alpha_grad, double rate,
                                                       std::vector<bool> mask) {
  check_floating(x_in, "x");
  check_relu_alpha(alpha, x_in);
  check_grad_like_x(grad_in, x_in);
  check_on_cuda(x_in, "x");
  check_bits(bits);
  const int ste_i = parse_ste(ste), ag_i = parse_alpha_grad(alpha_grad);
  const DeviceGuard guard(x_in.get_device_index());
  const QAlpha a = alpha_arg(alpha);
  Tensor dx;
  const Tensor x = dense_input(x_in, dx);
  const Tensor grad = match_strides(grad_in, x);
  Tensor galpha = mask[1] ? empty_on({1}, x, ScalarType::Float) : Tensor();
  if (mask[0] || mask[1]) {
    const Tensor ws = workspace(x, quant_relu_backward_workspace_bytes(x.numel()));
    FFA_QUANT_CUDA_CHECK(quant_relu_backward_cuda(
        qdtype(x.scalar_type()), grad.const_data_ptr(), x.const_data_ptr(),
        mask[0] ? dx.mutable_data_ptr() : nullptr, x.numel(), a, static_cast<int>(bits), ste_i,
        ag_i, rate, mask[1] ? galpha.mutable_data_ptr<float>() : nullptr, ws.mutable_data_ptr(),
        stream_of(x)));
  }
  return {mask[0] ? dx : empty_on({0}, x_in),
          mask[1] ? grad_like(galpha, alpha) : empty_on({0}, alpha)};
}

// ---- fake_quantize --------------------------------------------------------------------------

struct FqArgs {
  QFake f;
  Tensor scale, zp;  // float32 device copies kept alive for the launch
};

// A one-element CPU tensor's value (CPU only: no device read).
double host_scalar(const Tensor& t) {
  double v = 0;
  FFA_DISPATCH_ALL_TYPES_AND_HALF(t.scalar_type(), "host_scalar", [&] {
    v = static_cast<double>(t.const_data_ptr<scalar_t>()[0]);
  });
  return v;
}

// The arguments checked by check_fake_quantize_args (the callers run it first).
FqArgs fq_args(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t qmin,
               int64_t qmax, std::optional<int64_t> axis, bool learnable) {
  const bool float_zp = is_floating(zero_point.scalar_type());
  FqArgs a;
  a.f.qmin = qmin;
  a.f.qmax = qmax;
  a.f.per_channel = axis.has_value();
  a.f.float_zp = !learnable && float_zp && axis.has_value();
  a.f.zp_mode = learnable ? kZpRoundClamp : (float_zp && !axis.has_value() ? kZpTrunc : kZpRaw);
  a.f.q = QParams{nullptr, nullptr, 0.0f, 0.0f};
  std::optional<int64_t> ax;
  if (axis.has_value()) {
    int64_t v = *axis;
    FFA_CHECK_VALUE(x.dim() >= 1 && v >= -x.dim() && v < x.dim(), "axis must be in [", -x.dim(),
                    ", ", x.dim(), ") for a ", x.dim(), "-D x, got ", v);
    if (v < 0) v += x.dim();
    ax = v;
    FFA_CHECK_VALUE(scale.dim() == 1 && scale.numel() == x.size(v),
                    "scale must be 1-D with one entry per channel (", x.size(v), "), got shape ",
                    scale.sizes());
    FFA_CHECK_VALUE(zero_point.dim() == 1 && zero_point.numel() == x.size(v),
                    "zero_point must be 1-D with one entry per channel (", x.size(v),
                    "), got shape ", zero_point.sizes());
  } else {
    FFA_CHECK_VALUE(scale.numel() == 1,
                    "scale must have one element for per-tensor quantization, got shape ",
                    scale.sizes());
    FFA_CHECK_VALUE(zero_point.numel() == 1,
                    "zero_point must have one element for per-tensor quantization, got shape ",
                    zero_point.sizes());
  }
  // The per-channel path is always device-resident; a per-tensor CPU scalar is read here.
  if (scale.is_cuda()) {
    a.scale = torch::stable::contiguous(to_dtype(scale, ScalarType::Float));
    a.f.q.scale = a.scale.const_data_ptr<float>();
  } else {
    const double s = host_scalar(scale);
    FFA_CHECK_VALUE(float(s) > 0, "scale must be positive, got ", s);
    a.f.q.scale_val = float(s);
  }
  if (zero_point.is_cuda()) {
    a.zp = torch::stable::contiguous(to_dtype(zero_point, ScalarType::Float));
    a.f.q.zp = a.zp.const_data_ptr<float>();
  } else {
    const double z = host_scalar(zero_point);
    if (!learnable) {
      const double zi = std::trunc(z);
      FFA_CHECK_VALUE(zi >= double(qmin) && zi <= double(qmax),
                      "zero_point must lie in [quant_min, quant_max] = [", qmin, ", ", qmax,
                      "], got ", z);
    }
    a.f.q.zp_val = float(z);
  }
  a.f.L = layout_of(x, ax);  // x: the dense input the kernels walk
  return a;
}

Tensor fake_quantize_cuda_op(const Tensor& x_in, const Tensor& scale, const Tensor& zero_point,
                             int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                             bool learnable, double grad_factor) {
  // First: a CPU x with CUDA qparams lands here, and the error names the qparam.
  check_fake_quantize_args(x_in, scale, zero_point, qmin, qmax, axis.has_value());
  check_on_cuda(x_in, "x");
  const DeviceGuard guard(x_in.get_device_index());
  Tensor y;
  const Tensor x = dense_input(x_in, y);
  const FqArgs a = fq_args(x, scale, zero_point, qmin, qmax, axis, learnable);
  FFA_QUANT_CUDA_CHECK(fake_quantize_forward_cuda(qdtype(x.scalar_type()), x.const_data_ptr(),
                                                  y.mutable_data_ptr(), a.f, stream_of(x)));
  return y;
}

std::tuple<Tensor, Tensor, Tensor> fake_quantize_backward_cuda_op(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& scale, const Tensor& zero_point,
    int64_t qmin, int64_t qmax, std::optional<int64_t> axis, bool learnable, double grad_factor,
    std::vector<bool> mask) {
  check_fake_quantize_args(x_in, scale, zero_point, qmin, qmax, axis.has_value());
  check_grad_like_x(grad_in, x_in);
  check_on_cuda(x_in, "x");
  const DeviceGuard guard(x_in.get_device_index());
  Tensor dx;
  const Tensor x = dense_input(x_in, dx);
  const Tensor grad = match_strides(grad_in, x);
  const FqArgs a = fq_args(x, scale, zero_point, qmin, qmax, axis, learnable);
  const bool qgrads = learnable && (mask[1] || mask[2]);
  FFA_CHECK_TYPE(!(learnable && mask[2]) || is_floating(zero_point.scalar_type()),
                 "a zero_point gradient needs a floating zero_point");
  Tensor gs, gz;
  if (qgrads) {
    gs = empty_on({a.f.L.C}, x, ScalarType::Float);
    gz = empty_on({a.f.L.C}, x, ScalarType::Float);
  }
  if (mask[0] || qgrads) {
    const Tensor ws = workspace(x, fake_quantize_backward_workspace_bytes(a.f.L));
    FFA_QUANT_CUDA_CHECK(fake_quantize_backward_cuda(
        qdtype(x.scalar_type()), grad.const_data_ptr(), x.const_data_ptr(),
        mask[0] ? dx.mutable_data_ptr() : nullptr, a.f, learnable, static_cast<float>(grad_factor),
        qgrads ? gs.mutable_data_ptr<float>() : nullptr,
        qgrads ? gz.mutable_data_ptr<float>() : nullptr, ws.mutable_data_ptr(), stream_of(x)));
  }
  Tensor out_s = empty_on({0}, scale), out_z = empty_on({0}, zero_point);
  if (mask[1]) out_s = qgrads ? grad_like(gs, scale) : zeros_like(scale);
  if (mask[2]) out_z = qgrads ? grad_like(gz, zero_point) : zeros_like(zero_point);
  return {mask[0] ? dx : empty_on({0}, x_in), out_s, out_z};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ffa, CUDA, m) {
  m.impl("quantize_weight", TORCH_BOX(&quantize_weight_cuda_op));
  m.impl("quant_relu", TORCH_BOX(&quant_relu_cuda_op));
  m.impl("quant_relu_backward", TORCH_BOX(&quant_relu_backward_cuda_op));
  m.impl("fake_quantize", TORCH_BOX(&fake_quantize_cuda_op));
  m.impl("fake_quantize_backward", TORCH_BOX(&fake_quantize_backward_cuda_op));
}

}  // namespace ffa::cuda
