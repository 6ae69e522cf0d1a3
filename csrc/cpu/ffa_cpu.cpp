// Fast feature-affinity loss (FFA) on CPU.
//
// Per sample, with r_i = 1 / (||x_i|| + eps) and Z [N, k]:
//   P_S = U_S Z = S (r_S . Z)          [Cs, k]   (GEMM, K = N)
//   Y   = r_S . (S^T P_S) - r_T . (T^T P_T)    [N, k]   (= D Z, never N x N)
//   L   = sum_ik f(Y_ik) / (k N^2),  f = |.| (p=1) or square (p=2)
// Backward with W = g f'(Y) / (k N^2):  dL/dU_S = P_S W^T + Q_S Z^T,  Q_S = U_S W;  the teacher's
// with a minus sign; then chained through the normalization. FLOPs: 8 N C k forward and 8 N C k
// backward for C = Cs + Ct... all GEMMs read the features in place (NCHW or channels_last), so the
// only O(N k) state is Y (kept for the backward: the B x N x k intermediate, stored once).
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

// One sample's features as a GEMM operand: element (c, i) at ptr[c * cs + i * ps], ps == 1 or cs == 1.
// As a row-major [C x N] matrix that is (ptr, ld) untransposed when ps == 1 (NCHW), transposed when
// cs == 1 (channels_last).
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

// out [C, k] row-major = X diag(r) A for A [N, k] row-major (r folded into a scaled copy of A).
template <typename T>
void project(const Features<T>& x, const T* norm, T eps, const T* a, int64_t k, T* scaled, T* out) {
  const int64_t N = x.v.N;
  at::parallel_for(0, N, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T r = T(1) / (norm[i] + eps);
      for (int64_t j = 0; j < k; ++j) scaled[i * k + j] = a[i * k + j] * r;
    }
  });
  gemm(!x.pixel_fast(), false, x.v.C, k, N, T(1), x.ptr, x.ld(), scaled, k, T(0), out, k);
}

// y [N, k] row-major = X^T P for P [C, k] row-major (no normalization).
template <typename T>
void back_project(const Features<T>& x, const T* P, int64_t k, T* y) {
  gemm(x.pixel_fast(), false, x.v.N, k, x.v.C, T(1), x.ptr, x.ld(), P, k, T(0), y, k);
}

// Samples run in parallel (one parallel region; each sample's BLAS calls then run single-threaded).
// A batch smaller than the thread count runs its samples one by one, each with parallel inner loops.
template <typename T>
void ffa_forward_impl(const at::Tensor& s3, const at::Tensor& t3, const at::Tensor& z3, int64_t p,
                      double eps, at::Tensor& loss, at::Tensor& y, at::Tensor& ps, at::Tensor& pt) {
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1), k = z3.size(2);
  const int64_t grain = B >= at::get_num_threads() ? 1 : B;
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<T> ns(N), nt(N), scaled(N * k), yt(N * k);
    for (int64_t b = b0; b < b1; ++b) {
      const auto S = sample<T>(s3, b), Tt = sample<T>(t3, b);
      const T* z = z3.const_data_ptr<T>() + (z3.size(0) == 1 ? 0 : b) * N * k;
      T* Y = y.data_ptr<T>() + b * N * k;
      T* Ps = ps.data_ptr<T>() + b * Cs * k;
      T* Pt = pt.data_ptr<T>() + b * Ct * k;
      unit_pixels<T, T>(S.ptr, S.v, T(eps), T(1), nullptr, 0, ns.data());
      unit_pixels<T, T>(Tt.ptr, Tt.v, T(eps), T(1), nullptr, 0, nt.data());
      project(S, ns.data(), T(eps), z, k, scaled.data(), Ps);
      project(Tt, nt.data(), T(eps), z, k, scaled.data(), Pt);
      back_project(S, Ps, k, Y);
      back_project(Tt, Pt, k, yt.data());
      // Y = r_S . Y_S - r_T . Y_T and the loss; fixed-size chunks summed in order (deterministic).
      constexpr int64_t kChunk = 1024;
      const int64_t chunks = at::divup(N, kChunk);
      std::vector<double> chunk_sum(chunks, 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          T acc = 0;
          for (int64_t i = c * kChunk; i < std::min(N, (c + 1) * kChunk); ++i) {
            const T rs = T(1) / (ns[i] + T(eps)), rt = T(1) / (nt[i] + T(eps));
            for (int64_t j = 0; j < k; ++j) {
              const T v = rs * Y[i * k + j] - rt * yt[i * k + j];
              Y[i * k + j] = v;
              acc += p == 1 ? std::abs(v) : v * v;
            }
          }
          chunk_sum[c] = acc;
        }
      });
      double total = 0;
      for (double v : chunk_sum) total += v;
      loss.data_ptr<T>()[b] = static_cast<T>(total / (double(k) * double(N) * double(N)));
    }
  });
}

template <typename T>
void ffa_backward_one(const Features<T>& x, const T* z, const T* W, const T* P, int64_t k, T eps,
                      T sign, std::vector<T>& norm, std::vector<T>& scaled, std::vector<T>& Q,
                      std::vector<T>& G, T* grad_x) {
  const int64_t N = x.v.N, C = x.v.C;
  unit_pixels<T, T>(x.ptr, x.v, eps, T(1), nullptr, 0, norm.data());
  project(x, norm.data(), eps, W, k, scaled.data(), Q.data());
  // G [N x C] = sign (W [N x k] P^T [k x C] + Z Q^T)
  gemm(false, true, N, C, k, sign, W, k, P, k, T(0), G.data(), C);
  gemm(false, true, N, C, k, sign, z, k, Q.data(), k, T(1), G.data(), C);
  unit_pixels_backward<T, T>(x.ptr, x.v, norm.data(), eps, G.data(), C, T(1), grad_x);
}

template <typename T>
void ffa_backward_impl(const at::Tensor& grad, const at::Tensor& s3, const at::Tensor& t3,
                       const at::Tensor& z3, const at::Tensor& y, const at::Tensor& ps,
                       const at::Tensor& pt, int64_t p, double eps, at::Tensor& gs, at::Tensor& gt) {
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1), k = z3.size(2);
  const auto g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  const int64_t grain = B >= at::get_num_threads() ? 1 : B;
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<T> norm(N), scaled(N * k), W(N * k), Q(std::max(Cs, Ct) * k),
        G(N * std::max(Cs, Ct));
    for (int64_t b = b0; b < b1; ++b) {
      const T* z = z3.const_data_ptr<T>() + (z3.size(0) == 1 ? 0 : b) * N * k;
      const T* Y = y.const_data_ptr<T>() + b * N * k;
      const T scale = static_cast<T>(gp[b] / (double(k) * double(N) * double(N)));
      at::parallel_for(0, N * k, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e)
          W[e] = p == 1 ? scale * static_cast<T>((Y[e] > 0) - (Y[e] < 0)) : 2 * scale * Y[e];
      });
      if (gs.defined())
        ffa_backward_one<T>(sample<T>(s3, b), z, W.data(), ps.const_data_ptr<T>() + b * Cs * k, k,
                            T(eps), T(1), norm, scaled, Q, G, gs.data_ptr<T>() + b * Cs * N);
      if (gt.defined())
        ffa_backward_one<T>(sample<T>(t3, b), z, W.data(), pt.const_data_ptr<T>() + b * Ct * k, k,
                            T(eps), T(-1), norm, scaled, Q, G, gt.data_ptr<T>() + b * Ct * N);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffa_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& projection, int64_t p,
    double eps) {
  check_feature_pair(student, teacher);
  check_p(p);
  check_eps(eps);
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
  check_feature_pair(student, teacher);
  check_p(p);
  check_eps(eps);
  check_projection(projection, student);
  const auto s3 = gemm_ready(student), t3 = gemm_ready(teacher);
  const auto dt = s3.scalar_type();
  const auto z3 = projection.to(dt).contiguous();
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == B, "grad must have shape [B]");
  TORCH_CHECK(y.sizes() == at::IntArrayRef({B, N, k}) && y.scalar_type() == dt, "y must be [B,N,k]");
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
