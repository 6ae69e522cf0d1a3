// Per-pixel helpers shared by the CPU loss kernels: unit-pixel normalization and its backward.
//
// A sample's features are read through a [C, N] strided view: x(c, i) = x[c * cs + i * ps]
// (NCHW: ps = 1; channels_last: cs = 1). Both passes are O(N C). The *_range forms work on pixels
// [i0, i1) serially (for kernels that tile pixels themselves); the plain forms run over all pixels
// in parallel.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace ffa::cpu {

struct PixelView {
  int64_t C, N, cs, ps;
};

constexpr int64_t kPixelBlock = 64;

// Grain for at::parallel_for over samples: samples run in parallel when the batch covers the
// threads (their inner loops and BLAS calls then run single-threaded, one parallel region in all);
// otherwise one by one (grain = B runs inline), each with parallel inner loops.
inline int64_t sample_grain(int64_t B) {
  return B >= at::get_num_threads() ? 1 : std::max<int64_t>(B, 1);
}

// For i in [i0, i1): norm[i] = ||x(:, i)||, and when dst != null
// dst[(i - i0) * ld + c] = sign * x(c, i) / (norm[i] + eps).
template <typename scalar_t, typename acc_t>
void unit_pixels_range(const scalar_t* x, PixelView v, int64_t i0, int64_t i1, acc_t eps,
                       acc_t sign, acc_t* dst, int64_t ld, acc_t* norm) {
  acc_t n2[kPixelBlock], r[kPixelBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kPixelBlock) {
    const int64_t nb = std::min(kPixelBlock, i1 - b0);
    std::fill(n2, n2 + nb, acc_t(0));
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = x + c * v.cs + b0 * v.ps;
      for (int64_t i = 0; i < nb; ++i) {
        const acc_t val = static_cast<acc_t>(xc[i * v.ps]);
        n2[i] += val * val;
      }
    }
    for (int64_t i = 0; i < nb; ++i) {
      const acc_t n = std::sqrt(n2[i]);
      norm[b0 + i] = n;
      r[i] = sign / (n + eps);
    }
    if (!dst) continue;
    acc_t* out = dst + (b0 - i0) * ld;
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = x + c * v.cs + b0 * v.ps;
      for (int64_t i = 0; i < nb; ++i) out[i * ld + c] = static_cast<acc_t>(xc[i * v.ps]) * r[i];
    }
  }
}

// All pixels, in parallel: dst[i * ld + c] = sign * u_i[c]; norm[i] = ||x(:, i)||.
template <typename scalar_t, typename acc_t>
void unit_pixels(const scalar_t* x, PixelView v, acc_t eps, acc_t sign, acc_t* dst, int64_t ld,
                 acc_t* norm) {
  at::parallel_for(0, v.N, 4 * kPixelBlock, [&](int64_t i0, int64_t i1) {
    unit_pixels_range<scalar_t, acc_t>(x, v, i0, i1, eps, sign, dst ? dst + i0 * ld : nullptr, ld,
                                       norm);
  });
}

// Chains a gradient g_u through u = x / (||x|| + eps) for pixels [i0, i1):
//   g_x = scale * (g_u / (n + eps) - x (x . g_u) / (n (n + eps)^2)),  second term 0 where n = 0.
// g holds pixel i0 at g[0] (g[(i - i0) * ldg + c]); grad_x is one sample's contiguous [C, N].
template <typename scalar_t, typename acc_t>
void unit_pixels_backward_range(const scalar_t* x, PixelView v, int64_t i0, int64_t i1,
                                const acc_t* norm, acc_t eps, const acc_t* g, int64_t ldg,
                                acc_t scale, scalar_t* grad_x) {
  acc_t dot[kPixelBlock], a[kPixelBlock], b[kPixelBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kPixelBlock) {
    const int64_t nb = std::min(kPixelBlock, i1 - b0);
    const acc_t* gb = g + (b0 - i0) * ldg;
    std::fill(dot, dot + nb, acc_t(0));
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = x + c * v.cs + b0 * v.ps;
      for (int64_t i = 0; i < nb; ++i) dot[i] += static_cast<acc_t>(xc[i * v.ps]) * gb[i * ldg + c];
    }
    for (int64_t i = 0; i < nb; ++i) {
      const acc_t n = norm[b0 + i], ne = n + eps;
      a[i] = scale / ne;
      b[i] = n > 0 ? scale * dot[i] / (n * ne * ne) : acc_t(0);
    }
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = x + c * v.cs + b0 * v.ps;
      scalar_t* out = grad_x + c * v.N + b0;
      for (int64_t i = 0; i < nb; ++i)
        out[i] =
            static_cast<scalar_t>(gb[i * ldg + c] * a[i] - static_cast<acc_t>(xc[i * v.ps]) * b[i]);
    }
  }
}

// All pixels, in parallel; g[i * ldg + c].
template <typename scalar_t, typename acc_t>
void unit_pixels_backward(const scalar_t* x, PixelView v, const acc_t* norm, acc_t eps,
                          const acc_t* g, int64_t ldg, acc_t scale, scalar_t* grad_x) {
  at::parallel_for(0, v.N, 4 * kPixelBlock, [&](int64_t i0, int64_t i1) {
    unit_pixels_backward_range<scalar_t, acc_t>(x, v, i0, i1, norm, eps, g + i0 * ldg, ldg, scale,
                                                grad_x);
  });
}

}  // namespace ffa::cpu
