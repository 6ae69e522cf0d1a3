// Exact feature-affinity loss on CPU.
//
// p=1: L = sum_ij |D_ij| / N^2 with D = X_S X_S^T - X_T X_T^T (X: unit pixels, pixel-major [N, C]).
//   One GEMM per tile gives D directly: D_IJ = [X_S X_T]_I [X_S -X_T]_J^T (K = Cs + Ct).
//   Tiles are kTile x kTile; only the upper triangle (I <= J) is visited, off-diagonal tiles count
//   twice. Rows are folded (I with T-1-I) so every task has T+1 tiles. Memory: O(N C) + one tile
//   per thread (+ one float64 N x Kg gradient buffer per group in the backward); never N x N.
//   FLOPs: N^2 (Cs+Ct) forward (half the materialized form's 2 N^2 (Cs+Ct)); backward recomputes
//   D (same) and adds G_I += sign(D_IJ) Xneg_J, G_J += sign(D_IJ)^T Xneg_I (2 N^2 Kg), Kg =
//   channels needing a gradient. The floor is the GEMM rate (all operands stay in cache).
//   Deterministic: forward sums per fold, backward accumulates per fixed group of folds; both are
//   reduced in order, so results are bitwise repeatable for a given thread count.
// p=2: ||D||_F^2 = ||G_SS||^2 + ||G_TT||^2 - 2 ||G_ST||^2 with M = X^T X ([Cs+Ct]^2, float64 to
//   survive the cancellation when student ~ teacher). O(N (Cs+Ct)^2). Backward: dL/dX = 4/N^2 X W,
//   W = M with the student-teacher blocks negated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/pixels.h"

namespace ffa::cpu {
namespace {

constexpr int64_t kTile = 256;

// Unit pixels of one sample: X = [u_S | u_T] and Xneg = [u_S | -u_T], both [N, Cs + Ct].
template <typename scalar_t, typename acc_t>
struct UnitPair {
  int64_t N, Cs, Ct, K;
  std::vector<acc_t> x, xneg, ns, nt;

  UnitPair(const scalar_t* s, PixelView vs, const scalar_t* t, PixelView vt, acc_t eps,
           bool with_neg)
      : N(vs.N), Cs(vs.C), Ct(vt.C), K(vs.C + vt.C), x(N * K), ns(N), nt(N) {
    unit_pixels<scalar_t, acc_t>(s, vs, eps, acc_t(1), x.data(), K, ns.data());
    unit_pixels<scalar_t, acc_t>(t, vt, eps, acc_t(1), x.data() + Cs, K, nt.data());
    if (with_neg) {
      xneg = x;
      at::parallel_for(0, N, 1024, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t c = Cs; c < K; ++c) xneg[i * K + c] = -xneg[i * K + c];
      });
    }
  }
};

// Tile (I, J) of D, row-major with leading dimension kTile: tile[i * kTile + j] = D_{I0+i, J0+j}.
template <typename acc_t>
void compute_d_tile(const acc_t* x, const acc_t* xneg, int64_t K, int64_t I0, int64_t bi,
                    int64_t J0, int64_t bj, acc_t* tile) {
  gemm(false, true, bi, bj, K, acc_t(1), x + I0 * K, K, xneg + J0 * K, K, acc_t(0), tile, kTile);
}

// Visits the tiles of fold q: rows q and T-1-q, each with columns J >= row.
template <typename F>
void for_each_fold_tile(int64_t q, int64_t T, const F& f) {
  const int64_t rows[2] = {q, T - 1 - q};
  for (int r = 0; r < (rows[0] == rows[1] ? 1 : 2); ++r)
    for (int64_t J = rows[r]; J < T; ++J) f(rows[r], J);
}

template <typename scalar_t>
void fa_l1_forward(const at::Tensor& s3, const at::Tensor& t3, double eps, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s3.size(0), N = s3.size(2);
  const PixelView vs{s3.size(1), N, s3.stride(1), s3.stride(2)};
  const PixelView vt{t3.size(1), N, t3.stride(1), t3.stride(2)};
  const int64_t T = (N + kTile - 1) / kTile, folds = (T + 1) / 2;
  auto* out_p = out.data_ptr<acc_t>();
  for_each_sample(B, [&](int64_t b) {
    UnitPair<scalar_t, acc_t> u(s3.const_data_ptr<scalar_t>() + b * s3.stride(0), vs,
                                t3.const_data_ptr<scalar_t>() + b * t3.stride(0), vt, acc_t(eps),
                                true);
    std::vector<double> fold_sum(folds, 0.0);
    parallel_tasks(folds, [&](int64_t q) {
      std::vector<acc_t> tile(kTile * kTile);
      double sum = 0;
      for_each_fold_tile(q, T, [&](int64_t I, int64_t J) {
        const int64_t I0 = I * kTile, J0 = J * kTile;
        const int64_t bi = std::min(kTile, N - I0), bj = std::min(kTile, N - J0);
        compute_d_tile(u.x.data(), u.xneg.data(), u.K, I0, bi, J0, bj, tile.data());
        acc_t part = 0;
        for (int64_t i = 0; i < bi; ++i) {
          const acc_t* row = tile.data() + i * kTile;
          acc_t r = 0;
          for (int64_t j = 0; j < bj; ++j) r += std::abs(row[j]);
          part += r;
        }
        sum += (I == J ? 1.0 : 2.0) * static_cast<double>(part);
      });
      fold_sum[q] = sum;
    });
    double total = 0;
    for (double v : fold_sum) total += v;
    out_p[b] = static_cast<acc_t>(total / (static_cast<double>(N) * N));
  });
}

template <typename scalar_t>
void fa_l1_backward(const at::Tensor& grad, const at::Tensor& s3, const at::Tensor& t3, double eps,
                    at::Tensor& gs, at::Tensor& gt) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool need_s = gs.defined(), need_t = gt.defined();
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1);
  const PixelView vs{Cs, N, s3.stride(1), s3.stride(2)};
  const PixelView vt{Ct, N, t3.stride(1), t3.stride(2)};
  const int64_t T = (N + kTile - 1) / kTile, folds = (T + 1) / 2;
  // Gradient columns [c0, c0 + Kg) of [u_S | u_T]: skip the teacher's (or student's) when unneeded.
  const int64_t c0 = need_s ? 0 : Cs, Kg = (need_s ? Cs : 0) + (need_t ? Ct : 0);
  const auto g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  for_each_sample(B, [&](int64_t b) {
    // Folds are split into fixed groups, each accumulating into its own buffer; groups are handed
    // out dynamically and reduced in group order, so the result does not depend on scheduling.
    // Each tile's GEMM (bj terms) runs in acc_t; the sum over tiles (N / kTile of them) is kept in
    // float64, so float32 gradients stay accurate at large N.
    const int64_t parts =
        at::in_parallel_region() ? 1 : std::min<int64_t>(folds, 2 * at::get_num_threads());
    std::vector<double> gbuf(parts * N * Kg, 0.0);
    const scalar_t* sp = s3.const_data_ptr<scalar_t>() + b * s3.stride(0);
    const scalar_t* tp = t3.const_data_ptr<scalar_t>() + b * t3.stride(0);
    UnitPair<scalar_t, acc_t> u(sp, vs, tp, vt, acc_t(eps), true);
    const int64_t K = u.K;
    parallel_tasks(parts, [&](int64_t part) {
      std::vector<acc_t> tile(kTile * kTile), tmp(kTile * Kg);
      double* G = gbuf.data() + part * N * Kg;
      auto add_tmp = [&](int64_t R0, int64_t rows) {
        double* dst = G + R0 * Kg;
        for (int64_t e = 0; e < rows * Kg; ++e) dst[e] += tmp[e];
      };
      for (int64_t q = part * folds / parts; q < (part + 1) * folds / parts; ++q) {
        for_each_fold_tile(q, T, [&](int64_t I, int64_t J) {
          const int64_t I0 = I * kTile, J0 = J * kTile;
          const int64_t bi = std::min(kTile, N - I0), bj = std::min(kTile, N - J0);
          compute_d_tile(u.x.data(), u.xneg.data(), K, I0, bi, J0, bj, tile.data());
          for (int64_t i = 0; i < bi; ++i) {
            acc_t* row = tile.data() + i * kTile;
            for (int64_t j = 0; j < bj; ++j)
              row[j] = static_cast<acc_t>((row[j] > 0) - (row[j] < 0));
          }
          // G_I [bi x Kg] += sign [bi x bj] Xneg_J [bj x Kg]
          gemm(false, false, bi, Kg, bj, acc_t(1), tile.data(), kTile, u.xneg.data() + J0 * K + c0,
               K, acc_t(0), tmp.data(), Kg);
          add_tmp(I0, bi);
          if (I != J) {  // G_J [bj x Kg] += sign^T [bj x bi] Xneg_I [bi x Kg]
            gemm(true, false, bj, Kg, bi, acc_t(1), tile.data(), kTile, u.xneg.data() + I0 * K + c0,
                 K, acc_t(0), tmp.data(), Kg);
            add_tmp(J0, bj);
          }
        });
      }
    });
    // Reduce the parts in a fixed order, scaled by 2 g / N^2, into the compute dtype.
    const double scale = 2.0 * gp[b] / (double(N) * N);
    std::vector<acc_t> G(N * Kg);
    at::parallel_for(0, N * Kg, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        double v = gbuf[e];
        for (int64_t part = 1; part < parts; ++part) v += gbuf[part * N * Kg + e];
        G[e] = static_cast<acc_t>(scale * v);
      }
    });
    if (need_s)
      unit_pixels_backward<scalar_t, acc_t>(sp, vs, u.ns.data(), acc_t(eps), G.data(), Kg, acc_t(1),
                                            gs.mutable_data_ptr<scalar_t>() + b * Cs * N);
    if (need_t)
      unit_pixels_backward<scalar_t, acc_t>(tp, vt, u.nt.data(), acc_t(eps),
                                            G.data() + (need_s ? Cs : 0), Kg, acc_t(1),
                                            gt.mutable_data_ptr<scalar_t>() + b * Ct * N);
  });
}

// M = X^T X for X = [u_S | u_T] (pixel-major [N, K], float64).
template <typename scalar_t>
void gram_of_sample(const UnitPair<scalar_t, double>& u, std::vector<double>& M) {
  gemm(true, false, u.K, u.K, u.N, 1.0, u.x.data(), u.K, u.x.data(), u.K, 0.0, M.data(), u.K);
}

template <typename scalar_t>
void fa_l2_forward(const at::Tensor& s3, const at::Tensor& t3, double eps, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1), K = Cs + Ct;
  const PixelView vs{Cs, N, s3.stride(1), s3.stride(2)};
  const PixelView vt{Ct, N, t3.stride(1), t3.stride(2)};
  for_each_sample(B, [&](int64_t b) {
    std::vector<double> M(K * K);
    UnitPair<scalar_t, double> u(s3.const_data_ptr<scalar_t>() + b * s3.stride(0), vs,
                                 t3.const_data_ptr<scalar_t>() + b * t3.stride(0), vt, eps, false);
    gram_of_sample(u, M);
    double ss = 0, tt = 0, st = 0;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) {
        const double m2 = M[i * K + j] * M[i * K + j];
        if (i < Cs && j < Cs)
          ss += m2;
        else if (i >= Cs && j >= Cs)
          tt += m2;
        else
          st += m2;  // both off-diagonal blocks: 2 ||G_ST||^2
      }
    out.data_ptr<acc_t>()[b] = static_cast<acc_t>((ss + tt - st) / (double(N) * N));
  });
}

template <typename scalar_t>
void fa_l2_backward(const at::Tensor& grad, const at::Tensor& s3, const at::Tensor& t3, double eps,
                    at::Tensor& gs, at::Tensor& gt) {
  const bool need_s = gs.defined(), need_t = gt.defined();
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1), K = Cs + Ct;
  const PixelView vs{Cs, N, s3.stride(1), s3.stride(2)};
  const PixelView vt{Ct, N, t3.stride(1), t3.stride(2)};
  const int64_t c0 = need_s ? 0 : Cs, Kg = (need_s ? Cs : 0) + (need_t ? Ct : 0);
  const auto g = grad.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  for_each_sample(B, [&](int64_t b) {
    std::vector<double> M(K * K), G(N * Kg);
    const scalar_t* sp = s3.const_data_ptr<scalar_t>() + b * s3.stride(0);
    const scalar_t* tp = t3.const_data_ptr<scalar_t>() + b * t3.stride(0);
    UnitPair<scalar_t, double> u(sp, vs, tp, vt, eps, false);
    gram_of_sample(u, M);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j)
        if ((i < Cs) != (j < Cs)) M[i * K + j] = -M[i * K + j];
    // G [N x Kg] = 4 g / N^2 * X [N x K] W[:, c0:c0+Kg] [K x Kg]
    const double alpha = 4.0 * gp[b] / (double(N) * N);
    gemm(false, false, N, Kg, K, alpha, u.x.data(), K, M.data() + c0, K, 0.0, G.data(), Kg);
    if (need_s)
      unit_pixels_backward<scalar_t, double>(sp, vs, u.ns.data(), eps, G.data(), Kg, 1.0,
                                             gs.mutable_data_ptr<scalar_t>() + b * Cs * N);
    if (need_t)
      unit_pixels_backward<scalar_t, double>(tp, vt, u.nt.data(), eps, G.data() + (need_s ? Cs : 0),
                                             Kg, 1.0, gt.mutable_data_ptr<scalar_t>() + b * Ct * N);
  });
}

at::Tensor fa_loss_cpu(const at::Tensor& student, const at::Tensor& teacher, int64_t p,
                       double eps) {
  check_loss_args(student, teacher, p, eps);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  auto out =
      at::empty({student.size(0)}, student.options().dtype(compute_dtype(student.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "fa_loss_cpu",
                                  [&] {
                                    if (p == 1)
                                      fa_l1_forward<scalar_t>(s3, t3, eps, out);
                                    else
                                      fa_l2_forward<scalar_t>(s3, t3, eps, out);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fa_loss_backward_cpu(const at::Tensor& grad,
                                                        const at::Tensor& student,
                                                        const at::Tensor& teacher, int64_t p,
                                                        double eps, std::array<bool, 2> mask) {
  check_loss_args(student, teacher, p, eps);
  check_loss_grad(grad, student.size(0));
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  at::Tensor gs = mask[0] ? at::empty(student.sizes(), student.options()) : at::Tensor();
  at::Tensor gt = mask[1] ? at::empty(teacher.sizes(), teacher.options()) : at::Tensor();
  if (mask[0] || mask[1]) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                    "fa_loss_backward_cpu", [&] {
                                      if (p == 1)
                                        fa_l1_backward<scalar_t>(grad, s3, t3, eps, gs, gt);
                                      else
                                        fa_l2_backward<scalar_t>(grad, s3, t3, eps, gs, gt);
                                    });
  }
  return {gs.defined() ? gs : student.new_empty({0}), gt.defined() ? gt : teacher.new_empty({0})};
}

}  // namespace

TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("fa_loss", &fa_loss_cpu);
  m.impl("fa_loss_backward", &fa_loss_backward_cpu);
}

}  // namespace ffa::cpu
