// Fast feature-affinity loss (FFA) on CPU.
//
// Per sample, with r_i = 1 / (||x_i|| + eps) and Z [N, k]:
//   P_S = U_S Z = S (r_S . Z)                   [Cs, k]
//   Y   = r_S . (S^T P_S) - r_T . (T^T P_T)     [N, k]   (= D Z, never N x N)
//   L   = sum_ik f(Y_ik) / (k N^2),  f = |.| (p=1) or square (p=2)
// Backward, W = g f'(Y) / (k N^2):  dL/dU_S = P_S W^T + Q_S Z^T with Q_S = U_S W; the teacher's
// with a minus sign; then chained through the normalization.
// Tiling: pixel blocks of kBlock. Forward = two passes over each feature map (norms + P; then Y and
// the reduction), backward = two passes (norms + Q; then dL/dU and the chain rule), each pass
// reading a block once while it is hot in cache. GEMMs read the features in place (NCHW or
// channels_last). FLOPs: 4 N C k per map forward and backward; the floor is memory: 2 reads of S
// and T forward, 2 reads + 1 write backward. Y [B, N, k] is the one O(N k) intermediate (kept for
// the backward). Partial P/Q per block are summed in block order: deterministic for any thread
// count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/pixels.h"

namespace ffa::cpu {
namespace {

// One sample's features as a GEMM operand: element (c, i) at ptr[c * cs + i * ps], ps == 1 or cs
// == 1. As a row-major [C x N] matrix that is (ptr, ld) untransposed when ps == 1 (NCHW),
// transposed when cs == 1 (channels_last).
template <typename T>
struct Features {
  const T* ptr;
  PixelView v;
  bool pixel_fast() const { return v.ps == 1; }
  int64_t ld() const { return pixel_fast() ? v.cs : v.ps; }
};

// Features as GEMM operands: features must have unit stride along pixels or along channels.
at::Tensor gemm_ready(const at::Tensor& x) {
  auto x3 = as_pixels(x);
  if (x3.scalar_type() != at::kDouble && x3.scalar_type() != at::kFloat) x3 = x3.to(at::kFloat);
  const bool ok = (x3.stride(2) == 1 && x3.stride(1) >= x3.size(2)) ||
                  (x3.stride(1) == 1 && x3.stride(2) >= x3.size(1));
  return ok ? x3 : x3.contiguous();
}

template <typename T>
Features<T> sample(const at::Tensor& x3, int64_t b) {
  return {x3.const_data_ptr<T>() + b * x3.stride(0),
          PixelView{x3.size(1), x3.size(2), x3.stride(1), x3.stride(2)}};
}

// Pixels per block: a block of features (C x kBlock) stays in cache between the norm step and the
// GEMM that consumes it, so each pass reads the features from memory once.
constexpr int64_t kBlock = 512;

// Runs f(i0, i1, blk) over the pixel blocks of one sample, in parallel (serially when the caller
// already runs samples in parallel).
template <typename F>
void for_each_block(int64_t N, const F& f) {
  at::parallel_for(0, at::divup(N, kBlock), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t blk = k0; blk < k1; ++blk) f(blk * kBlock, std::min(N, (blk + 1) * kBlock), blk);
  });
}

// part [C x k] = X_blk diag(1 / (norm + eps)) A_blk over pixels [i0, i1) (norms computed here).
template <typename T>
void project_block(const Features<T>& x, int64_t i0, int64_t i1, const T* a, int64_t k, T eps,
                   T* norm, T* scaled, T* part) {
  unit_pixels_range<T, T>(x.ptr, x.v, i0, i1, eps, T(1), nullptr, 0, norm);
  for (int64_t i = i0; i < i1; ++i) {
    const T r = T(1) / (norm[i] + eps);
    for (int64_t j = 0; j < k; ++j) scaled[(i - i0) * k + j] = a[(i - i0) * k + j] * r;
  }
  gemm(!x.pixel_fast(), false, x.v.C, k, i1 - i0, T(1), x.ptr + i0 * x.v.ps, x.ld(), scaled, k,
       T(0), part, k);
}

// out [C x k] = sum of the per-block parts, in block order (deterministic for any thread count).
template <typename T>
void sum_parts(const std::vector<T>& parts, int64_t n, T* out) {
  std::fill(out, out + n, T(0));
  for (size_t off = 0; off < parts.size(); off += n)
    for (int64_t e = 0; e < n; ++e) out[e] += parts[off + e];
}

template <typename T>
void ffa_forward_impl(const at::Tensor& s3, const at::Tensor& t3, const at::Tensor& z3, int64_t p,
                      double eps_d, at::Tensor& loss, at::Tensor& y, at::Tensor& ps,
                      at::Tensor& pt) {
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1), k = z3.size(2);
  const int64_t nblk = at::divup(N, kBlock);
  const T eps = T(eps_d);
  at::parallel_for(0, B, sample_grain(B), [&](int64_t b0, int64_t b1) {
    std::vector<T> ns(N), nt(N), part_s(nblk * Cs * k), part_t(nblk * Ct * k);
    std::vector<double> blk_sum(nblk);
    for (int64_t b = b0; b < b1; ++b) {
      const auto S = sample<T>(s3, b), Tt = sample<T>(t3, b);
      const T* z = z3.const_data_ptr<T>() + (z3.size(0) == 1 ? 0 : b) * N * k;
      T* Y = y.data_ptr<T>() + b * N * k;
      T* Ps = ps.data_ptr<T>() + b * Cs * k;
      T* Pt = pt.data_ptr<T>() + b * Ct * k;
      // Pass 1: norms and P = U Z, one read of each feature map.
      for_each_block(N, [&](int64_t i0, int64_t i1, int64_t blk) {
        std::vector<T> scaled((i1 - i0) * k);
        project_block(S, i0, i1, z + i0 * k, k, eps, ns.data(), scaled.data(),
                      part_s.data() + blk * Cs * k);
        project_block(Tt, i0, i1, z + i0 * k, k, eps, nt.data(), scaled.data(),
                      part_t.data() + blk * Ct * k);
      });
      sum_parts(part_s, Cs * k, Ps);
      sum_parts(part_t, Ct * k, Pt);
      // Pass 2: Y = r_S . (S^T P_S) - r_T . (T^T P_T) and sum f(Y), a second read of each map.
      for_each_block(N, [&](int64_t i0, int64_t i1, int64_t blk) {
        const int64_t nb = i1 - i0;
        std::vector<T> yt(nb * k);
        T* Yb = Y + i0 * k;
        gemm(S.pixel_fast(), false, nb, k, Cs, T(1), S.ptr + i0 * S.v.ps, S.ld(), Ps, k, T(0), Yb,
             k);
        gemm(Tt.pixel_fast(), false, nb, k, Ct, T(1), Tt.ptr + i0 * Tt.v.ps, Tt.ld(), Pt, k, T(0),
             yt.data(), k);
        T acc = 0;
        for (int64_t i = 0; i < nb; ++i) {
          const T rs = T(1) / (ns[i0 + i] + eps), rt = T(1) / (nt[i0 + i] + eps);
          for (int64_t j = 0; j < k; ++j) {
            const T v = rs * Yb[i * k + j] - rt * yt[i * k + j];
            Yb[i * k + j] = v;
            acc += p == 1 ? std::abs(v) : v * v;
          }
        }
        blk_sum[blk] = acc;
      });
      double total = 0;
      for (double v : blk_sum) total += v;
      loss.data_ptr<T>()[b] = static_cast<T>(total / (double(k) * double(N) * double(N)));
    }
  });
}

// W = dL/dY over a block: scale * sign(Y) (p=1) or 2 scale Y (p=2).
template <typename T>
void dl_dy(const T* Y, int64_t n, int64_t p, T scale, T* W) {
  for (int64_t e = 0; e < n; ++e)
    W[e] = p == 1 ? scale * static_cast<T>((Y[e] > 0) - (Y[e] < 0)) : 2 * scale * Y[e];
}

template <typename T>
void ffa_backward_impl(const at::Tensor& grad, const at::Tensor& s3, const at::Tensor& t3,
                       const at::Tensor& z3, const at::Tensor& y, const at::Tensor& ps,
                       const at::Tensor& pt, int64_t p, double eps_d, at::Tensor& gs,
                       at::Tensor& gt) {
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  const int64_t nblk = at::divup(N, kBlock);
  const T eps = T(eps_d);
  const auto g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  // The features needing a gradient: (features, P, sign, grad output).
  struct Side {
    const at::Tensor* x3;
    const at::Tensor* P;
    T sign;
    at::Tensor* grad;
  };
  std::vector<Side> sides;
  if (gs.defined()) sides.push_back({&s3, &ps, T(1), &gs});
  if (gt.defined()) sides.push_back({&t3, &pt, T(-1), &gt});
  at::parallel_for(0, B, sample_grain(B), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* z = z3.const_data_ptr<T>() + (z3.size(0) == 1 ? 0 : b) * N * k;
      const T* Y = y.const_data_ptr<T>() + b * N * k;
      const T scale = static_cast<T>(gp[b] / (double(k) * double(N) * double(N)));
      for (const Side& side : sides) {
        const auto X = sample<T>(*side.x3, b);
        const int64_t C = X.v.C;
        const T* P = side.P->template const_data_ptr<T>() + b * C * k;
        std::vector<T> norm(N), parts(nblk * C * k), Q(C * k);
        // Pass 1: norms and Q = U W (dL/dU = P W^T + Q Z^T needs all of Q first).
        for_each_block(N, [&](int64_t i0, int64_t i1, int64_t blk) {
          std::vector<T> W((i1 - i0) * k), scaled((i1 - i0) * k);
          dl_dy(Y + i0 * k, (i1 - i0) * k, p, scale, W.data());
          project_block(X, i0, i1, W.data(), k, eps, norm.data(), scaled.data(),
                        parts.data() + blk * C * k);
        });
        sum_parts(parts, C * k, Q.data());
        // Pass 2: G = sign (W P^T + Z Q^T) per block, chained through the normalization.
        T* out = side.grad->template data_ptr<T>() + b * C * N;
        for_each_block(N, [&](int64_t i0, int64_t i1, int64_t) {
          const int64_t nb = i1 - i0;
          std::vector<T> W(nb * k), G(nb * C);
          dl_dy(Y + i0 * k, nb * k, p, scale, W.data());
          gemm(false, true, nb, C, k, side.sign, W.data(), k, P, k, T(0), G.data(), C);
          gemm(false, true, nb, C, k, side.sign, z + i0 * k, k, Q.data(), k, T(1), G.data(), C);
          unit_pixels_backward_range<T, T>(X.ptr, X.v, i0, i1, norm.data(), eps, G.data(), C, T(1),
                                           out);
        });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffa_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& projection, int64_t p,
    double eps) {
  check_loss_args(student, teacher, p, eps);
  check_projection(projection, student);
  const auto s3 = gemm_ready(student), t3 = gemm_ready(teacher);
  const auto z3 = projection.to(s3.scalar_type()).contiguous();
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  const auto opts = s3.options();
  auto loss = at::empty({B}, opts), y = at::empty({B, N, k}, opts);
  auto ps = at::empty({B, s3.size(1), k}, opts), pt = at::empty({B, t3.size(1), k}, opts);
  AT_DISPATCH_FLOATING_TYPES(s3.scalar_type(), "ffa_loss_cpu", [&] {
    ffa_forward_impl<scalar_t>(s3, t3, z3, p, eps, loss, y, ps, pt);
  });
  return {loss, y, ps, pt};
}

std::tuple<at::Tensor, at::Tensor> ffa_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& projection, const at::Tensor& y, const at::Tensor& p_s, const at::Tensor& p_t,
    int64_t p, double eps, std::array<bool, 2> mask) {
  check_loss_args(student, teacher, p, eps);
  check_projection(projection, student);
  const auto s3 = gemm_ready(student), t3 = gemm_ready(teacher);
  const auto dt = s3.scalar_type();
  const auto z3 = projection.to(dt).contiguous();
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  check_loss_grad(grad, B);
  TORCH_CHECK(y.sizes() == at::IntArrayRef({B, N, k}) && y.scalar_type() == dt,
              "y must be [B,N,k]");
  TORCH_CHECK(p_s.sizes() == at::IntArrayRef({B, s3.size(1), k}) && p_s.scalar_type() == dt,
              "p_s must be [B,Cs,k]");
  TORCH_CHECK(p_t.sizes() == at::IntArrayRef({B, t3.size(1), k}) && p_t.scalar_type() == dt,
              "p_t must be [B,Ct,k]");
  // Gradients are computed in the compute dtype, then cast to the features' dtype.
  at::Tensor gs = mask[0] ? at::empty(s3.sizes(), s3.options()) : at::Tensor();
  at::Tensor gt = mask[1] ? at::empty(t3.sizes(), t3.options()) : at::Tensor();
  if (mask[0] || mask[1]) {
    AT_DISPATCH_FLOATING_TYPES(dt, "ffa_loss_backward_cpu", [&] {
      ffa_backward_impl<scalar_t>(grad, s3, t3, z3, y.contiguous(), p_s.contiguous(),
                                  p_t.contiguous(), p, eps, gs, gt);
    });
  }
  auto finish = [](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g.view(like.sizes()).to(like.scalar_type()) : like.new_empty({0});
  };
  return {finish(gs, student), finish(gt, teacher)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("ffa_loss", &ffa_loss_cpu);
  m.impl("ffa_loss_backward", &ffa_loss_backward_cpu);
}

}  // namespace ffa::cpu
