// Low-bit fake quantization on CPU: the paper's weight quantizers, the quantized ReLU and affine
// fake quantization (torch's per-tensor / per-channel / learnable LSQ semantics).
//
// Math (see ffa/quant/functional.py for the full statement):
//   quantize_weight: bits 1: mean|w| sign(w); bits 2: delta = 0.7 mean|w| (<= 100),
//     scale = mean(|w| [|w| >= delta]); bits b >= 3: delta = max|w| / (2^b - 1) (<= 10), level q in
//     0..2^(b-1)-1 by odd multiples of delta, scale = sum|w|q / sum q^2. Per tensor or per dim-0
//     channel.
//   quant_relu: 0 / ceil(x/a) a / L a; backward STE mask and the step gradient sum dy g0.
//   fake_quantize: (clamp(zp + rint(x / s)) - zp) s, with torch's exact rounding; LSQ backward.
// Passes: reductions (scale, delta) read the tensor once per pass (two for the weight quantizers),
// then one elementwise pass; backward passes are fused: one read of x and dy, one write of dx,
// qparam gradients reduced on the fly (no full-size temporaries, unlike torch's LSQ backward).
// Memory: inputs, outputs and O(tasks x channels) accumulators. Work is split into at most
// kMaxTasks fixed blocks of memory, so reductions do not depend on the thread count.
// Layout: any dense tensor (contiguous, channels_last, permuted) is walked in memory order; the
// channel of memory offset k is (k / stride[axis]) % C. Non-dense inputs are copied once.
// Vectorization: the inner loops (cpu/quant_cpu_loops.h) are compiled for AVX-512, AVX2+FMA and
// the baseline, picked at run time (FFA_QUANT_ISA=base|avx2|avx512 forces one, for testing).
// Floor: memory bandwidth; every pass is a streaming read (+ write) of the tensor.

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/parallel.h"

namespace ffa::cpu::quant {

// Parameters shared by every ISA's loops (cpu/quant_cpu_loops.h).
// Per channel (or per tensor): inv = 1.0f / scale as torch computes it, the scale, the zero point
// (integral values, or float zero points in kFloatZp; the backward's zero point in LSQ).
// In row mode (the span runs along the channel axis) the arrays are indexed by the element.
struct FqParams {
  const float* inv;
  const float* scale;
  const float* zp;
  float lo, hi;  // quant_min, quant_max
};

enum FqMode : int {
  kIntZp = 0,    // zp + rint(x * inv): torch's per-tensor and integer per-channel formula
  kFloatZp = 1,  // rint(fma(x, inv, zp)): torch's per-channel formula for float zero points
};

struct QreluBackParams {
  bool idnty, inplt;  // ste: "idnty" keeps every gradient; "inplt" also zeroes x > L*a
  double g_in;        // g0 inside: 2^(bits-1) ("mean"), 1 ("min"), 0 ("pact"); "ae": ceil(x/a)
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
namespace base {
#include "cpu/quant_cpu_loops.h"
}  // namespace base
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FFA_QUANT_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("no-trapping-math")
namespace avx2 {
#include "cpu/quant_cpu_loops.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#pragma GCC optimize("no-trapping-math")
namespace avx512 {
#include "cpu/quant_cpu_loops.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
  Isa best = Isa::kBase;
#ifdef FFA_QUANT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
#endif
  const char* env = std::getenv("FFA_QUANT_ISA");
  if (env != nullptr) {
    const std::string want(env);
    const Isa forced = want == "avx512" ? Isa::kAvx512 : want == "avx2" ? Isa::kAvx2 : Isa::kBase;
    if (forced <= best) best = forced;  // never pick an ISA the CPU lacks
  }
  return best;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

// Runs `...` with `k` naming the loop namespace of the running CPU's ISA.
#ifdef FFA_QUANT_X86
#define FFA_QUANT_ISA_CALL(...)                \
  switch (isa()) {                             \
    case Isa::kAvx512: {                       \
      namespace k = ::ffa::cpu::quant::avx512; \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case Isa::kAvx2: {                         \
      namespace k = ::ffa::cpu::quant::avx2;   \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    default: {                                 \
      namespace k = ::ffa::cpu::quant::base;   \
      __VA_ARGS__;                             \
    }                                          \
  }
#else
#define FFA_QUANT_ISA_CALL(...)            \
  do {                                     \
    namespace k = ::ffa::cpu::quant::base; \
    __VA_ARGS__;                           \
  } while (0)
#endif

constexpr int64_t kMinBlock = int64_t(1) << 15;
constexpr int64_t kMaxTasks = 64;
constexpr int64_t kBuf = 1024;  // float16/bfloat16 are converted through float buffers this long

// A dense tensor seen in memory order as [outer, C, inner]; C = 1 for per-tensor work.
// row: the channel is the fastest axis (inner == 1), so a span walks across channels.
struct Layout {
  int64_t numel, C, inner;
  bool row;
};

Layout layout_of(const Tensor& t, std::optional<int64_t> axis) {
  const int64_t n = t.numel();
  if (!axis.has_value() || t.size(*axis) == 1) return {n, 1, std::max<int64_t>(n, 1), false};
  const int64_t C = t.size(*axis), inner = t.stride(*axis);
  return {n, C, inner, inner == 1};
}

struct Tasks {
  int64_t block, count;
};

Tasks tasks_of(int64_t n) {
  int64_t block = std::max(kMinBlock, (n + kMaxTasks - 1) / kMaxTasks);
  block = (block + 63) / 64 * 64;
  return {block, std::max<int64_t>(1, (n + block - 1) / block)};
}

// Calls f(offset, len, c) for the pieces of memory range [b, e) of constant channel (c) or, in
// row mode, lying within one row (c = channel of the first element).
template <typename F>
void for_each_piece(const Layout& L, int64_t b, int64_t e, const F& f) {
  if (L.C == 1) {
    if (e > b) f(b, e - b, int64_t(0));
    return;
  }
  while (b < e) {
    int64_t len, c;
    if (L.row) {
      c = b % L.C;
      len = std::min(e - b, L.C - c);
    } else {
      const int64_t seg = b / L.inner;
      c = seg % L.C;
      len = std::min(e, (seg + 1) * L.inner) - b;
    }
    f(b, len, c);
    b += len;
  }
}

// Runs f on float/double spans: float and double directly, float16/bfloat16 through float buffers
// of at most kBuf elements. f(in0, in1, out, sub_offset, len); in1/out may be null.
template <typename scalar_t, typename F>
void on_compute_spans(const scalar_t* in0, const scalar_t* in1, scalar_t* out, int64_t n,
                      const F& f) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    f(in0, in1, out, int64_t(0), n);
  } else {
    float b0[kBuf], b1[kBuf], bo[kBuf] = {};
    for (int64_t s = 0; s < n; s += kBuf) {
      const int64_t len = std::min(kBuf, n - s);
      for (int64_t i = 0; i < len; ++i) b0[i] = static_cast<float>(in0[s + i]);
      if (in1 != nullptr)
        for (int64_t i = 0; i < len; ++i) b1[i] = static_cast<float>(in1[s + i]);
      f(static_cast<const float*>(b0), in1 != nullptr ? static_cast<const float*>(b1) : nullptr,
        out != nullptr ? bo : nullptr, s, len);
      if (out != nullptr)
        for (int64_t i = 0; i < len; ++i) out[s + i] = static_cast<scalar_t>(bo[i]);
    }
  }
}

template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

void check_bits(int64_t bits) {
  FFA_CHECK_VALUE(bits >= 1 && bits <= 8, "bits must be one of 1, 2, ..., 8, got ", bits);
}

// Per-task accumulators reduced in task order (deterministic for any thread count).
std::vector<double> reduce_tasks(const std::vector<double>& acc, int64_t tasks, int64_t width) {
  std::vector<double> out(width, 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < width; ++i) out[i] += acc[t * width + i];
  return out;
}

// ---- quantize_weight ------------------------------------------------------------------------

template <typename scalar_t>
void quantize_weight_impl(const Tensor& w, Tensor& y, int64_t bits, const Layout& L) {
  using C = compute_t<scalar_t>;
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const Tasks T = tasks_of(L.numel);
  const int64_t nc = L.C;
  const C count = C(L.numel / nc);

  // Pass 1: sum |w| and max |w| per channel.
  std::vector<double> sums(T.count * nc, 0.0);
  std::vector<C> maxs(T.count * nc, C(0));
  parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_piece(
          L, t * T.block, std::min(L.numel, (t + 1) * T.block),
          [&](int64_t off, int64_t len, int64_t c) {
            on_compute_spans<scalar_t>(
                wp + off, nullptr, nullptr, len, [&](const C* x, const C*, C*, int64_t, int64_t n) {
                  FFA_QUANT_ISA_CALL(k::wq_stats<C>(x, n, sums[t * nc + c], maxs[t * nc + c]));
                });
          });
  });
  const std::vector<double> sum = reduce_tasks(sums, T.count, nc);
  std::vector<C> delta(nc, C(0)), scale(nc, C(0));
  for (int64_t c = 0; c < nc; ++c) {
    if (std::isnan(sum[c])) {  // a NaN weight: its channel's statistics, and outputs, are NaN
      delta[c] = scale[c] = std::numeric_limits<C>::quiet_NaN();
      continue;
    }
    C mx = C(0);
    for (int64_t t = 0; t < T.count; ++t) mx = std::max(mx, maxs[t * nc + c]);
    if (bits == 1) {
      scale[c] = C(sum[c]) / count;
    } else if (bits == 2) {
      const C d = C(0.7) * (C(sum[c]) / count);
      delta[c] = C(100) < d ? C(100) : d;
    } else {
      const C d = mx / C((int64_t(1) << bits) - 1);
      delta[c] = C(10) < d ? C(10) : d;
    }
  }

  // Pass 2: the scale's sums over the entries the threshold(s) keep.
  const C Q = C((int64_t(1) << (bits - 1)) - 1);
  if (bits >= 2) {
    std::vector<double> s1(T.count * nc, 0.0), s2(T.count * nc, 0.0);
    parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for_each_piece(
            L, t * T.block, std::min(L.numel, (t + 1) * T.block),
            [&](int64_t off, int64_t len, int64_t c) {
              on_compute_spans<scalar_t>(
                  wp + off, nullptr, nullptr, len,
                  [&](const C* x, const C*, C*, int64_t, int64_t n) {
                    if (bits == 2) {
                      FFA_QUANT_ISA_CALL(s1[t * nc + c] += k::wq_ternary_sum<C>(x, n, delta[c]));
                    } else {
                      FFA_QUANT_ISA_CALL(
                          k::wq_level_sums<C>(x, n, delta[c], Q, s1[t * nc + c], s2[t * nc + c]));
                    }
                  });
            });
    });
    const std::vector<double> a = reduce_tasks(s1, T.count, nc), b = reduce_tasks(s2, T.count, nc);
    for (int64_t c = 0; c < nc; ++c) {
      if (std::isnan(delta[c])) continue;  // a NaN channel keeps its NaN scale
      if (bits == 2)
        scale[c] = C(a[c]) / count;
      else
        scale[c] = b[c] > 0 ? C(a[c]) / C(b[c]) : C(0);  // an all-zero channel gives zeros
    }
  }

  // Pass 3: the elementwise quantization.
  parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_piece(
          L, t * T.block, std::min(L.numel, (t + 1) * T.block),
          [&](int64_t off, int64_t len, int64_t c) {
            on_compute_spans<scalar_t>(
                wp + off, nullptr, yp + off, len,
                [&](const C* x, const C*, C* out, int64_t, int64_t n) {
                  FFA_QUANT_ISA_CALL(k::wq_apply<C>(x, out, n, int(bits), delta[c], Q, scale[c]));
                });
          });
  });
}

Tensor quantize_weight_cpu(const Tensor& weight, int64_t bits, bool per_channel) {
  check_floating(weight, "weight");
  check_bits(bits);
  FFA_CHECK_VALUE(!per_channel || weight.dim() >= 2,
                  "per_channel=True needs a weight with at least 2 dims (one scale per output "
                  "channel, dim 0), got a ",
                  weight.dim(), "-D tensor");
  Tensor y;
  Tensor w = dense_input(weight, y);
  if (w.numel() == 0) return y;
  const std::optional<int64_t> axis = per_channel ? std::optional<int64_t>(0) : std::nullopt;
  Layout L = layout_of(w, axis);
  Tensor out = y;
  bool copied = false;
  if (L.row && L.numel > L.C) {        // dim 0 is the fastest axis (a transposed weight): work on a
    w = torch::stable::contiguous(w);  // contiguous copy, whose channels are runs of numel / C
    out = torch::stable::empty_like(w);
    copied = true;
    L = layout_of(w, axis);
  }
  // The weight loops reduce one channel per span: with one element per channel ([C, 1], [C, 1,
  // 1, 1]: no copy makes runs longer) the spans are single elements, never rows across channels.
  L.row = false;
  FFA_DISPATCH_FLOATING_AND_HALF_TYPES(w.scalar_type(), "quantize_weight_cpu",
                                       [&] { quantize_weight_impl<scalar_t>(w, out, bits, L); });
  if (copied) torch::stable::copy_(y, out);
  return y;
}

// ---- quant_relu -----------------------------------------------------------------------------

// The step alpha clamped to [1e-3, 5] in alpha's own dtype (as the released code clamps it),
// read without a device sync (alpha lives on the CPU here).
double clamped_alpha(const Tensor& alpha) {
  double a = 0;
  FFA_DISPATCH_FLOATING_AND_HALF_TYPES(alpha.scalar_type(), "alpha", [&] {
    const scalar_t v = alpha.const_data_ptr<scalar_t>()[0];
    const scalar_t lo = static_cast<scalar_t>(1e-3), hi = static_cast<scalar_t>(5.0);
    a = static_cast<double>(v < lo ? lo : (hi < v ? hi : v));
  });
  return a;
}

void check_relu_args(const Tensor& x, const Tensor& alpha, int64_t bits) {
  check_floating(x, "x");
  check_relu_alpha(alpha, x);
  check_bits(bits);
}

Tensor quant_relu_cpu(const Tensor& x_in, const Tensor& alpha, int64_t bits, std::string_view ste,
                      std::string_view alpha_grad, double rate) {
  check_relu_args(x_in, alpha, bits);
  Tensor y;
  const Tensor x = dense_input(x_in, y);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const double a = clamped_alpha(alpha), L = double((int64_t(1) << bits) - 1);
  const Tasks T = tasks_of(n);
  FFA_DISPATCH_FLOATING_AND_HALF_TYPES(x.scalar_type(), "quant_relu_cpu", [&] {
    using C = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t off = t * T.block, len = std::min(n, off + T.block) - off;
        on_compute_spans<scalar_t>(xp + off, nullptr, yp + off, len,
                                   [&](const C* xs, const C*, C* ys, int64_t, int64_t m) {
                                     FFA_QUANT_ISA_CALL(k::qrelu_forward<C>(xs, ys, m, C(a), C(L)));
                                   });
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> quant_relu_backward_cpu(const Tensor& grad_in, const Tensor& x_in,
                                                   const Tensor& alpha, int64_t bits,
                                                   std::string_view ste,
                                                   std::string_view alpha_grad, double rate,
                                                   std::vector<bool> mask) {
  check_relu_args(x_in, alpha, bits);
  check_grad_like_x(grad_in, x_in);
  QreluBackParams p{};
  FFA_CHECK_VALUE(ste == "inplt" || ste == "idnty" || ste == "relu",
                  "ste must be 'inplt', 'idnty' or 'relu', got '", std::string(ste), "'");
  FFA_CHECK_VALUE(
      alpha_grad == "mean" || alpha_grad == "ae" || alpha_grad == "pact" || alpha_grad == "min",
      "alpha_grad must be 'mean', 'ae', 'pact' or 'min', got '", std::string(alpha_grad), "'");
  p.idnty = ste == "idnty";
  p.inplt = ste == "inplt";
  const bool ae = alpha_grad == "ae";
  p.g_in = alpha_grad == "mean"  ? double(int64_t(1) << (bits - 1))
           : alpha_grad == "min" ? 1.0
                                 : 0.0;

  Tensor dx;
  const Tensor x = dense_input(x_in, dx);
  const Tensor grad = match_strides(grad_in, x);
  Tensor galpha = zeros_like(alpha);
  const int64_t n = x.numel();
  if (n > 0 && (mask[0] || mask[1])) {
    const double a = clamped_alpha(alpha), L = double((int64_t(1) << bits) - 1);
    const Tasks T = tasks_of(n);
    std::vector<double> part(T.count, 0.0);
    FFA_DISPATCH_FLOATING_AND_HALF_TYPES(x.scalar_type(), "quant_relu_backward_cpu", [&] {
      using C = compute_t<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      scalar_t* dxp = mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
      auto run = [&](auto kdx, auto kga, auto kae) {
        parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t off = t * T.block, len = std::min(n, off + T.block) - off;
            on_compute_spans<scalar_t>(
                gp + off, xp + off, dxp != nullptr ? dxp + off : nullptr, len,
                [&](const C* g, const C* xs, C* d, int64_t, int64_t m) {
                  FFA_QUANT_ISA_CALL(
                      part[t] +=
                      (k::qrelu_backward<decltype(kdx)::value, decltype(kga)::value,
                                         decltype(kae)::value, C>(g, xs, d, m, C(a), C(L), p)));
                });
          }
        });
      };
      using TT = std::true_type;
      using FF = std::false_type;
      if (mask[0] && mask[1])
        ae ? run(TT{}, TT{}, TT{}) : run(TT{}, TT{}, FF{});
      else if (mask[0])
        run(TT{}, FF{}, FF{});
      else
        ae ? run(FF{}, TT{}, TT{}) : run(FF{}, TT{}, FF{});
    });
    if (mask[1]) {
      double s = 0;
      for (double v : part) s += v;
      const double ga = std::min(1.0, std::max(-1.0, s * rate));
      torch::stable::fill_(galpha, ga);
    }
  }
  return {mask[0] ? dx : empty_on({0}, x_in), mask[1] ? galpha : empty_on({0}, alpha)};
}

// ---- fake_quantize --------------------------------------------------------------------------

struct FqSetup {
  std::optional<int64_t> axis;
  int64_t C;
  std::vector<float> inv, scale, zp;  // per channel (one entry per tensor)
  int mode;                           // kIntZp or kFloatZp
};

// The values of a 0-d / one-element / 1-D qparam tensor on the CPU (checked by
// check_fake_quantize_args), read in place (no copies).
std::vector<double> host_values(const Tensor& t) {
  std::vector<double> out(t.numel());
  const int64_t stride = t.dim() == 1 ? t.stride(0) : 1;
  FFA_DISPATCH_ALL_TYPES_AND_HALF(t.scalar_type(), "qparams", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i * stride]);
  });
  return out;
}

// Validates the qparams and turns them into per-channel floats with torch's conventions.
// backward_lsq: the zero point torch's LSQ backward uses (per-tensor: trunc(clamp(zp + 0.5)),
// per-channel: clamp(round(zp))); otherwise the forward's.
FqSetup fq_setup(const Tensor& x, const Tensor& scale, const Tensor& zero_point, int64_t qmin,
                 int64_t qmax, std::optional<int64_t> axis, bool learnable, bool backward_lsq) {
  check_fake_quantize_args(x, scale, zero_point, qmin, qmax, axis.has_value());
  FqSetup s;
  if (axis.has_value()) {
    int64_t ax = *axis;
    FFA_CHECK_VALUE(x.dim() >= 1 && ax >= -x.dim() && ax < x.dim(), "axis must be in [", -x.dim(),
                    ", ", x.dim(), ") for a ", x.dim(), "-D x, got ", ax);
    if (ax < 0) ax += x.dim();
    s.axis = ax;
    s.C = x.size(ax);
    FFA_CHECK_VALUE(scale.dim() == 1 && scale.numel() == s.C,
                    "scale must be 1-D with one entry per channel (", s.C, "), got shape ",
                    scale.sizes());
    FFA_CHECK_VALUE(zero_point.dim() == 1 && zero_point.numel() == s.C,
                    "zero_point must be 1-D with one entry per channel (", s.C, "), got shape ",
                    zero_point.sizes());
  } else {
    s.C = 1;
    FFA_CHECK_VALUE(scale.numel() == 1,
                    "scale must have one element for per-tensor "
                    "quantization, got shape ",
                    scale.sizes());
    FFA_CHECK_VALUE(zero_point.numel() == 1,
                    "zero_point must have one element for "
                    "per-tensor quantization, got shape ",
                    zero_point.sizes());
  }
  const std::vector<double> sv = host_values(scale), zv = host_values(zero_point);
  const bool float_zp = is_floating(zero_point.scalar_type());
  const float lo = float(qmin), hi = float(qmax);
  s.mode = kIntZp;
  s.inv.resize(s.C);
  s.scale.resize(s.C);
  s.zp.resize(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    const float sc = float(sv[c]);
    FFA_CHECK_VALUE(sc > 0, "scale must be positive, got ", sv[c],
                    axis ? " at channel " + std::to_string(c) : std::string());
    s.scale[c] = sc;
    s.inv[c] = 1.0f / sc;
    const float z = float(zv[c]);
    if (learnable) {
      float r;
      if (backward_lsq && !axis)
        r = std::trunc(std::min(std::max(z + 0.5f, lo), hi));
      else
        r = std::min(std::max(std::nearbyint(z), lo), hi);
      s.zp[c] = r;
    } else if (float_zp && axis) {
      s.mode = kFloatZp;  // torch keeps float per-channel zero points unrounded
      s.zp[c] = z;
    } else {
      const double zi = std::trunc(zv[c]);  // torch reads a per-tensor zero point with toInt()
      FFA_CHECK_VALUE(zi >= double(qmin) && zi <= double(qmax),
                      "zero_point must lie in [quant_min, quant_max] = [", qmin, ", ", qmax,
                      "], got ", zv[c], axis ? " at channel " + std::to_string(c) : std::string());
      s.zp[c] = float(zi);
    }
  }
  return s;
}

template <typename scalar_t>
void fq_forward_impl(const Tensor& x, Tensor& y, const FqSetup& s, int64_t qmin, int64_t qmax) {
  using C = compute_t<scalar_t>;
  const Layout L = layout_of(x, s.axis);
  const Tasks T = tasks_of(L.numel);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const bool channel = s.axis.has_value();
  parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_piece(
          L, t * T.block, std::min(L.numel, (t + 1) * T.block),
          [&](int64_t off, int64_t len, int64_t c) {
            on_compute_spans<scalar_t>(
                xp + off, nullptr, yp + off, len,
                [&](const C* xs, const C*, C* ys, int64_t sub, int64_t n) {
                  const int64_t c0 = L.row ? c + sub : c;
                  const FqParams p{s.inv.data() + c0, s.scale.data() + c0, s.zp.data() + c0,
                                   float(qmin), float(qmax)};
                  auto go = [&](auto mode, auto ch, auto row) {
                    FFA_QUANT_ISA_CALL(k::fq_forward<decltype(mode)::value, decltype(ch)::value,
                                                     decltype(row)::value, C>(xs, ys, n, p));
                  };
                  using I = std::integral_constant<int, kIntZp>;
                  using Fz = std::integral_constant<int, kFloatZp>;
                  using TT = std::true_type;
                  using FF = std::false_type;
                  if (!channel)
                    go(I{}, FF{}, FF{});
                  else if (s.mode == kFloatZp)
                    L.row ? go(Fz{}, TT{}, TT{}) : go(Fz{}, TT{}, FF{});
                  else
                    L.row ? go(I{}, TT{}, TT{}) : go(I{}, TT{}, FF{});
                });
          });
  });
}

Tensor fake_quantize_cpu(const Tensor& x_in, const Tensor& scale, const Tensor& zero_point,
                         int64_t qmin, int64_t qmax, std::optional<int64_t> axis, bool learnable,
                         double grad_factor) {
  const FqSetup s = fq_setup(x_in, scale, zero_point, qmin, qmax, axis, learnable, false);
  Tensor y;
  const Tensor x = dense_input(x_in, y);
  if (x.numel() == 0) return y;
  FFA_DISPATCH_FLOATING_AND_HALF_TYPES(x.scalar_type(), "fake_quantize_cpu",
                                       [&] { fq_forward_impl<scalar_t>(x, y, s, qmin, qmax); });
  return y;
}

template <typename scalar_t>
void fq_backward_impl(const Tensor& grad, const Tensor& x, Tensor* dx, const FqSetup& s,
                      int64_t qmin, int64_t qmax, bool learnable, double grad_factor,
                      std::vector<double>* gscale, std::vector<double>* gzp) {
  using C = compute_t<scalar_t>;
  const Layout L = layout_of(x, s.axis);
  const Tasks T = tasks_of(L.numel);
  const int64_t nc = s.C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx != nullptr ? dx->mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<double> acc_s(learnable ? T.count * nc : 0, 0.0), acc_z(acc_s.size(), 0.0);
  parallel_for(0, T.count, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for_each_piece(
          L, t * T.block, std::min(L.numel, (t + 1) * T.block),
          [&](int64_t off, int64_t len, int64_t c) {
            on_compute_spans<scalar_t>(
                gp + off, xp + off, dxp != nullptr ? dxp + off : nullptr, len,
                [&](const C* g, const C* xs, C* d, int64_t sub, int64_t n) {
                  const int64_t c0 = L.row ? c + sub : c;
                  const FqParams p{s.inv.data() + c0, s.scale.data() + c0, s.zp.data() + c0,
                                   float(qmin), float(qmax)};
                  using TT = std::true_type;
                  using FF = std::false_type;
                  if (!learnable) {
                    auto go = [&](auto mode, auto row) {
                      FFA_QUANT_ISA_CALL(
                          k::fq_backward_mask<decltype(mode)::value, decltype(row)::value, C>(
                              g, xs, d, n, p));
                    };
                    using I = std::integral_constant<int, kIntZp>;
                    using Fz = std::integral_constant<int, kFloatZp>;
                    if (s.mode == kFloatZp)
                      L.row ? go(Fz{}, TT{}) : go(Fz{}, FF{});
                    else
                      L.row ? go(I{}, TT{}) : go(I{}, FF{});
                    return;
                  }
                  double* as = acc_s.data() + t * nc + c0;
                  double* az = acc_z.data() + t * nc + c0;
                  auto go = [&](auto kdx, auto row) {
                    FFA_QUANT_ISA_CALL(
                        k::fq_backward_lsq<decltype(kdx)::value, decltype(row)::value, C>(
                            g, xs, d, n, p, float(grad_factor), as, az));
                  };
                  if (d != nullptr)
                    L.row ? go(TT{}, TT{}) : go(TT{}, FF{});
                  else
                    L.row ? go(FF{}, TT{}) : go(FF{}, FF{});
                });
          });
  });
  if (learnable) {
    *gscale = reduce_tasks(acc_s, T.count, nc);
    *gzp = reduce_tasks(acc_z, T.count, nc);
  }
}

std::tuple<Tensor, Tensor, Tensor> fake_quantize_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, const Tensor& scale, const Tensor& zero_point,
    int64_t qmin, int64_t qmax, std::optional<int64_t> axis, bool learnable, double grad_factor,
    std::vector<bool> mask) {
  const FqSetup s = fq_setup(x_in, scale, zero_point, qmin, qmax, axis, learnable, true);
  check_grad_like_x(grad_in, x_in);
  const bool qgrads = learnable && (mask[1] || mask[2]);
  Tensor dx, gs, gz;
  if (mask[0] || qgrads) {
    Tensor dx_;
    const Tensor x = dense_input(x_in, dx_);
    const Tensor grad = match_strides(grad_in, x);
    std::vector<double> vs, vz;
    if (x.numel() > 0) {
      FFA_DISPATCH_FLOATING_AND_HALF_TYPES(x.scalar_type(), "fake_quantize_backward_cpu", [&] {
        // learnable: dx follows torch's LSQ backward (its own zero point and rounding) even
        // when only dx is wanted.
        fq_backward_impl<scalar_t>(grad, x, mask[0] ? &dx_ : nullptr, s, qmin, qmax, learnable,
                                   grad_factor, &vs, &vz);
      });
    } else {
      vs.assign(s.C, 0.0);
      vz.assign(s.C, 0.0);
    }
    if (mask[0]) dx = dx_;
    if (qgrads) {
      // The float64 sums are rounded once to the qparams' dtypes (torch sums in float32).
      auto to_tensor = [&](const std::vector<double>& v, const Tensor& like) {
        Tensor t = empty_on({int64_t(v.size())}, like, ScalarType::Double);
        std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
        return torch::stable::view(to_dtype(t, like.scalar_type()), like.sizes());
      };
      if (mask[1]) gs = to_tensor(vs, scale);
      if (mask[2]) {
        FFA_CHECK_TYPE(is_floating(zero_point.scalar_type()),
                       "a zero_point gradient needs a floating zero_point");
        gz = to_tensor(vz, zero_point);
      }
    }
  }
  if (mask[1] && !gs.defined()) gs = zeros_like(scale);
  if (mask[2] && !gz.defined()) gz = zeros_like(zero_point);
  return {mask[0] ? dx : empty_on({0}, x_in), mask[1] ? gs : empty_on({0}, scale),
          mask[2] ? gz : empty_on({0}, zero_point)};
}

}  // namespace

// The loop ISA the kernels run with, named for `python -m ffa.info`: "avx512", "avx2" or "base".
const char* isa_name() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

STABLE_TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("quantize_weight", TORCH_BOX(&quantize_weight_cpu));
  m.impl("quant_relu", TORCH_BOX(&quant_relu_cpu));
  m.impl("quant_relu_backward", TORCH_BOX(&quant_relu_backward_cpu));
  m.impl("fake_quantize", TORCH_BOX(&fake_quantize_cpu));
  m.impl("fake_quantize_backward", TORCH_BOX(&fake_quantize_backward_cpu));
}

}  // namespace ffa::cpu::quant
