// Per-pixel helpers shared by the CPU loss kernels: unit-pixel normalization and its backward.
//
// A sample's features are read through a [C, N] strided view: x(c, i) = x[c * cs + i * ps]
// (NCHW: ps = 1; channels_last: cs = 1). Every pass is O(N C). The *_range forms work on pixels
// [i0, i1) serially (for kernels that tile pixels themselves); the plain forms run over all pixels
// in parallel.
//
// Scale safety: norms, unit pixels and their backward are computed in float64 for every input dtype
// and rounded once to the output type. Squares of any float32/half value are exact and in range in
// float64, so those inputs work at any finite magnitude (1e-45 .. 3e38) with any eps > 0. For
// float64 inputs the plain sum of squares is the fast path; a pixel whose sum of squares overflows
// or may have underflowed is recomputed with a power-of-two scale (as LAPACK's nrm2 scales).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#include "cpu/parallel.h"

namespace ffa::cpu {

struct PixelView {
  int64_t C, N, cs, ps;
};

constexpr int64_t kPixelBlock = 256;

// How one pixel x is normalized: u = x / (||x|| + eps) = (scale * x) * rs.
struct PixelNorm {
  double scale;  // a power of two: 1 unless ||x||^2 overflows or may underflow in float64
  double nn;     // ||scale * x||
  double rs;     // 1 / (nn + scale * eps): finite for every finite x and eps > 0
};

namespace detail {

constexpr double kDoubleMax = std::numeric_limits<double>::max();
constexpr double kTinySquares = 0x1p-1000;  // below this, squares of float64 values may underflow
constexpr double kScaleUp = 0x1p600, kScaleDown = 0x1p-600;

// n2: the pixel's plain float64 sum of squares. Scaled pixels: 2^-600 x keeps squares of values up
// to 2^1024 in range; 2^600 x those of values down to 2^-1074 (then |x| < 2^-500). An eps >= 2^400
// dominates such a tiny norm and needs no scale (and 2^600 eps would overflow).
template <typename scalar_t>
PixelNorm pixel_norm(const scalar_t* xi, int64_t C, int64_t cs, double n2, double eps) {
  double s = 1;
  if (n2 > kDoubleMax)
    s = kScaleDown;
  else if (n2 < kTinySquares && eps < 0x1p400)
    s = kScaleUp;  // also for x = 0 with a tiny eps: 1 / eps may overflow, 1 / (2^600 eps) cannot
  // Squares of float32/half values never overflow or underflow in float64: n2 < 2^-1000 means 0.
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (s != 1) {
      n2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double v = s * xi[c * cs];
        n2 += v * v;
      }
    }
  }
  const double nn = std::sqrt(n2);
  return {s, nn, 1.0 / (nn + s * eps)};
}

}  // namespace detail

// norms[i] for the pixels i in [i0, i1).
template <typename scalar_t>
void pixel_norms_range(const scalar_t* x, PixelView v, int64_t i0, int64_t i1, double eps,
                       PixelNorm* norms) {
  double n2[kPixelBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kPixelBlock) {
    const int64_t nb = std::min(kPixelBlock, i1 - b0);
    std::fill(n2, n2 + nb, 0.0);
    for (int64_t c = 0; c < v.C; ++c) {
      const scalar_t* xc = x + c * v.cs + b0 * v.ps;
      for (int64_t i = 0; i < nb; ++i) {
        const double val = static_cast<double>(xc[i * v.ps]);
        n2[i] += val * val;
      }
    }
    for (int64_t i = 0; i < nb; ++i)
      norms[b0 + i] = detail::pixel_norm(x + (b0 + i) * v.ps, v.C, v.cs, n2[i], eps);
  }
}

// u_i[c] (float64 math, rounded once to out_t) at dst[(i - i0) * dp + c * dc], i in [i0, i1).
template <typename scalar_t, typename out_t>
void write_unit_pixels_range(const scalar_t* x, PixelView v, int64_t i0, int64_t i1,
                             const PixelNorm* norms, out_t* dst, int64_t dp, int64_t dc) {
  auto unit = [](scalar_t xv, const PixelNorm& n) {
    return static_cast<out_t>(n.scale * static_cast<double>(xv) * n.rs);
  };
  if (v.cs == 1 && dc == 1) {  // channels contiguous on both sides
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* xi = x + i * v.ps;
      out_t* o = dst + (i - i0) * dp;
      const PixelNorm n = norms[i];
      for (int64_t c = 0; c < v.C; ++c) o[c] = unit(xi[c], n);
    }
    return;
  }
  for (int64_t c = 0; c < v.C; ++c) {
    const scalar_t* xc = x + c * v.cs;
    out_t* o = dst + c * dc;
    if (v.ps == 1 && dp == 1) {  // pixels contiguous on both sides
      for (int64_t i = i0; i < i1; ++i) o[i - i0] = unit(xc[i], norms[i]);
    } else {
      for (int64_t i = i0; i < i1; ++i) o[(i - i0) * dp] = unit(xc[i * v.ps], norms[i]);
    }
  }
}

// All pixels, in parallel: norms[i], and u_i[c] at dst[i * dp + c * dc].
template <typename scalar_t, typename out_t>
void unit_pixels(const scalar_t* x, PixelView v, double eps, out_t* dst, int64_t dp, int64_t dc,
                 PixelNorm* norms) {
  parallel_for(0, v.N, 4 * kPixelBlock, [&](int64_t i0, int64_t i1) {
    pixel_norms_range(x, v, i0, i1, eps, norms);
    write_unit_pixels_range(x, v, i0, i1, norms, dst + i0 * dp, dp, dc);
  });
}

// Chains g = dL/du through u = x / (n + eps), n = ||x||, for pixels [i0, i1), in float64:
//   g_x = r (g - xh (u . g)),  r = 1 / (n + eps),  xh = x / n (0 where n = 0),
// which equals g / (n + eps) - x (x . g) / (n (n + eps)^2) but never forms n^3. In scaled terms
// (PixelNorm): xh = (s x) / nn, u . g = rs (s x) . g, r = s rs; r is applied in two factors where
// it alone would overflow or be subnormal. g(c, i) = g[(i - i0) * gp + c * gc]; grad_x is one
// sample's contiguous [C, N], written as scalar_t.
template <typename scalar_t, typename g_t>
void unit_pixels_backward_range(const scalar_t* x, PixelView v, int64_t i0, int64_t i1,
                                const PixelNorm* norms, const g_t* g, int64_t gp, int64_t gc,
                                scalar_t* grad_x) {
  double s[kPixelBlock], dot[kPixelBlock], k[kPixelBlock], a[kPixelBlock], b[kPixelBlock];
  for (int64_t b0 = i0; b0 < i1; b0 += kPixelBlock) {
    const int64_t nb = std::min(kPixelBlock, i1 - b0);
    const g_t* gb = g + (b0 - i0) * gp;
    // The common case (plain: every pixel unscaled, r applied in one factor) skips the multiplies
    // by 1 in both loops.
    bool plain = true;
    for (int64_t i = 0; i < nb; ++i) {
      s[i] = norms[b0 + i].scale;
      plain = plain && s[i] == 1;
    }
    auto dot_pass = [&](auto plain_tag) {
      std::fill(dot, dot + nb, 0.0);
      for (int64_t c = 0; c < v.C; ++c) {
        const scalar_t* xc = x + c * v.cs + b0 * v.ps;
        const g_t* gcc = gb + c * gc;
        for (int64_t i = 0; i < nb; ++i) {
          double xs = static_cast<double>(xc[i * v.ps]);
          if constexpr (!decltype(plain_tag)::value) xs *= s[i];
          dot[i] += xs * static_cast<double>(gcc[i * gp]);
        }
      }
    };
    plain ? dot_pass(std::true_type{}) : dot_pass(std::false_type{});
    for (int64_t i = 0; i < nb; ++i) {
      const PixelNorm& n = norms[b0 + i];
      k[i] = n.nn > 0 ? n.rs * dot[i] / n.nn : 0.0;  // (u . g) / nn
      const double r = n.scale * n.rs;
      const bool normal = r >= std::numeric_limits<double>::min() && r <= detail::kDoubleMax;
      a[i] = normal ? r : n.rs;
      b[i] = normal ? 1.0 : n.scale;
      plain = plain && normal;
    }
    auto out_pass = [&](auto plain_tag) {
      for (int64_t c = 0; c < v.C; ++c) {
        const scalar_t* xc = x + c * v.cs + b0 * v.ps;
        const g_t* gcc = gb + c * gc;
        scalar_t* out = grad_x + c * v.N + b0;
        for (int64_t i = 0; i < nb; ++i) {
          const double gv = static_cast<double>(gcc[i * gp]);
          const double xv = static_cast<double>(xc[i * v.ps]);
          if constexpr (decltype(plain_tag)::value)
            out[i] = static_cast<scalar_t>(a[i] * (gv - k[i] * xv));
          else
            out[i] = static_cast<scalar_t>(b[i] * (a[i] * (gv - k[i] * (s[i] * xv))));
        }
      }
    };
    plain ? out_pass(std::true_type{}) : out_pass(std::false_type{});
  }
}

// All pixels, in parallel.
template <typename scalar_t, typename g_t>
void unit_pixels_backward(const scalar_t* x, PixelView v, const PixelNorm* norms, const g_t* g,
                          int64_t gp, int64_t gc, scalar_t* grad_x) {
  parallel_for(0, v.N, 4 * kPixelBlock, [&](int64_t i0, int64_t i1) {
    unit_pixels_backward_range(x, v, i0, i1, norms, g + i0 * gp, gp, gc, grad_x);
  });
}

// A buffer of n elements on a 64-byte boundary. Buffers that feed the two products whose results
// must round identically (student and teacher) are allocated alike, so BLAS takes the same
// alignment-dependent path for both.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n) {
    const size_t bytes = (std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!p_) throw std::bad_alloc();
  }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
};

}  // namespace ffa::cpu
