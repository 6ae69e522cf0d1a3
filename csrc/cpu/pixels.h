// Per-pixel helpers shared by the CPU loss kernels: unit-pixel normalization and its backward.
//
// A sample's features are read through a [C, N] strided view: x(c, i) = x[c * cs + i * ps]
// (NCHW: ps = 1; channels_last: cs = 1). Both passes are O(N C), parallel over pixel blocks.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace ffa::cpu {

struct PixelView {
  int64_t C, N, cs, ps;
};

constexpr int64_t kPixelBlock = 64;

// dst[i * ld + c] = sign * x(c, i) / (||x(:, i)|| + eps); norm[i] = ||x(:, i)||. Either output may be
// null (norms only, or unit pixels only).
template <typename scalar_t, typename acc_t>
void unit_pixels(const scalar_t* x, PixelView v, acc_t eps, acc_t sign, acc_t* dst, int64_t ld,
                 acc_t* norm) {
  at::parallel_for(0, v.N, 4 * kPixelBlock, [&](int64_t i0, int64_t i1) {
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
        if (norm) norm[b0 + i] = n;
        r[i] = sign / (n + eps);
      }
      if (!dst) continue;
      for (int64_t c = 0; c < v.C; ++c) {
        const scalar_t* xc = x + c * v.cs + b0 * v.ps;
        for (int64_t i = 0; i < nb; ++i)
          dst[(b0 + i) * ld + c] = static_cast<acc_t>(xc[i * v.ps]) * r[i];
      }
    }
  });
}

// Chains a gradient g_u (pixel-major, g[i * ldg + c]) through u = x / (||x|| + eps):
//   g_x = scale * (g_u / (n + eps) - x (x . g_u) / (n (n + eps)^2)),  second term 0 where n = 0.
// Writes grad_x contiguous [C, N] (NCHW of one sample).
template <typename scalar_t, typename acc_t>
void unit_pixels_backward(const scalar_t* x, PixelView v, const acc_t* norm, acc_t eps,
                          const acc_t* g, int64_t ldg, acc_t scale, scalar_t* grad_x) {
  at::parallel_for(0, v.N, 4 * kPixelBlock, [&](int64_t i0, int64_t i1) {
    acc_t dot[kPixelBlock], a[kPixelBlock], b[kPixelBlock];
    for (int64_t b0 = i0; b0 < i1; b0 += kPixelBlock) {
      const int64_t nb = std::min(kPixelBlock, i1 - b0);
      std::fill(dot, dot + nb, acc_t(0));
      for (int64_t c = 0; c < v.C; ++c) {
        const scalar_t* xc = x + c * v.cs + b0 * v.ps;
        for (int64_t i = 0; i < nb; ++i)
          dot[i] += static_cast<acc_t>(xc[i * v.ps]) * g[(b0 + i) * ldg + c];
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
          out[i] = static_cast<scalar_t>(g[(b0 + i) * ldg + c] * a[i] -
                                         static_cast<acc_t>(xc[i * v.ps]) * b[i]);
      }
    }
  });
}

}  // namespace ffa::cpu
