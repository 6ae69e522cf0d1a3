// Exact feature-affinity loss on CPU.
//
// Unit pixels U_S [N, Cs] and U_T [N, Ct] (rows u_i; norms in float64, pixels.h; stored transposed
// for the Gram form), each in its own 64-byte aligned buffer, so that the student's and the
// teacher's products run through identical code and round identically when Cs == Ct: equal unit
// pixels give D = 0 exactly.
//
// Tiled form (p=1 always; p=2 when N < Cs + Ct): D_IJ = U_S,I U_S,J^T - U_T,I U_T,J^T, the two
//   affinity tiles formed by two GEMMs and subtracted elementwise. Tiles are kTile x kTile; only
//   the upper triangle (I <= J) is visited, off-diagonal tiles count twice. Rows are folded (I with
//   T-1-I) so every task has T+1 tiles. Memory: O(N C) + two tiles per thread (+ V and one
//   float64 N x Kg gradient buffer per group in the backward); never N x N. The row reduction
//   sum_j f(D_ij) runs in independent lanes (vectorized). FLOPs: N^2 (Cs+Ct) forward
//   (half the materialized form's 2 N^2 (Cs+Ct)); backward recomputes D (same) and adds
//   G_I += W_IJ V_J, G_J += W_IJ^T V_I (2 N^2 Kg) with W = sign(D) (p=1, sign(0) = 0) or 2 D
//   (p=2), V = [U_S | -U_T] over the Kg channels needing a gradient. The floor is the GEMM rate
//   (all operands stay in cache). Deterministic: forward sums per fold, backward accumulates per
//   fixed group of folds; both are reduced in order, so results are bitwise repeatable for a given
//   thread count.
// Gram form (p=2 when N >= Cs + Ct): ||D||_F^2 = ||G_SS||^2 + ||G_TT||^2 - 2 ||G_ST||^2 with
//   G_AB = U_A^T U_B, float64 (to survive the cancellation when student ~ teacher), clamped at 0
//   (rounding can leave -1e-16). O(N (Cs+Ct)^2) work, (Cs+Ct)^2 memory. Backward:
//   dL/dU_S = 4/N^2 (U_S G_SS - U_T G_TS), dL/dU_T = -4/N^2 (U_S G_ST - U_T G_TT), each Gram matrix
//   its own product and each gradient the difference of two same-shaped products (exact 0 when
//   s == t).
// The tiled form costs ~N^2 (Cs+Ct), the Gram form ~N (Cs+Ct)^2 (forward and backward, within a
// factor ~1.5): p=2 takes the tiled form when N < Cs + Ct.

#include <optional>
#include <vector>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/pixels.h"

namespace ffa::cpu {

const char* blas_name() {
  return detail::use_fortran_blas() ? "MKL sgemm_/dgemm_ (called directly)"
                                    : "torch matmul (torch's BLAS, via the stable ABI)";
}

namespace {

constexpr int64_t kTile = 256;

bool p2_takes_tiled_form(int64_t N, int64_t Cs, int64_t Ct) { return N < Cs + Ct; }

// Unit pixels of one sample, U_S and U_T, and their norms: pixel-major ([N, C], row i = u_i: the
// tiled form's tiles are row blocks) or channel-major ([C, N], the Gram form: BLAS runs its long
// N-deep products faster on rows that are contiguous along N).
template <typename acc_t>
struct Units {
  int64_t N, Cs, Ct;
  AlignedBuffer<acc_t> s, t;
  std::vector<PixelNorm> ns, nt;

  template <typename scalar_t>
  Units(const scalar_t* sp, PixelView vs, const scalar_t* tp, PixelView vt, double eps,
        bool channel_major)
      : N(vs.N), Cs(vs.C), Ct(vt.C), s(N * Cs), t(N * Ct), ns(N), nt(N) {
    const int64_t one = 1;
    unit_pixels(sp, vs, eps, s.data(), channel_major ? one : Cs, channel_major ? N : one,
                ns.data());
    unit_pixels(tp, vt, eps, t.data(), channel_major ? one : Ct, channel_major ? N : one,
                nt.data());
  }
};

// The affinity tiles (I, J) of both sides, row-major with leading dimension kTile:
// ts[i * kTile + j] = u_S,I0+i . u_S,J0+j, tt likewise for the teacher.
template <typename acc_t>
void affinity_tiles(const Units<acc_t>& u, int64_t I0, int64_t bi, int64_t J0, int64_t bj,
                    acc_t* ts, acc_t* tt) {
  gemm(false, true, bi, bj, u.Cs, acc_t(1), u.s.data() + I0 * u.Cs, u.Cs, u.s.data() + J0 * u.Cs,
       u.Cs, acc_t(0), ts, kTile);
  gemm(false, true, bi, bj, u.Ct, acc_t(1), u.t.data() + I0 * u.Ct, u.Ct, u.t.data() + J0 * u.Ct,
       u.Ct, acc_t(0), tt, kTile);
}

// f(D) and W = df/dD (p=1: |D| and sign(D), sign(0) = 0; p=2: D^2 and 2 D).
template <int P, typename T>
T loss_term(T d) {
  return P == 1 ? std::abs(d) : d * d;
}
template <int P, typename T>
T loss_weight(T d) {
  return P == 1 ? static_cast<T>((d > 0) - (d < 0)) : 2 * d;
}

// sum_j f(a[j] - b[j]) over a tile row, in kLanes independent partial sums (one dependency chain
// per lane instead of one for the row: vectorizable, and a fixed order, so deterministic).
template <int P, typename T>
T row_loss(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += loss_term<P>(a[j + l] - b[j + l]);
  T r = 0;
  for (; j < n; ++j) r += loss_term<P>(a[j] - b[j]);
  for (int64_t l = 0; l < kLanes; ++l) r += lane[l];
  return r;
}

// Visits the tiles of fold q: rows q and T-1-q, each with columns J >= row.
template <typename F>
void for_each_fold_tile(int64_t q, int64_t T, const F& f) {
  const int64_t rows[2] = {q, T - 1 - q};
  for (int r = 0; r < (rows[0] == rows[1] ? 1 : 2); ++r)
    for (int64_t J = rows[r]; J < T; ++J) f(rows[r], J);
}

template <int P, typename scalar_t>
void fa_tiled_forward(const Tensor& s3, const Tensor& t3, double eps, Tensor& out) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t B = s3.size(0), N = s3.size(2);
  const PixelView vs{s3.size(1), N, s3.stride(1), s3.stride(2)};
  const PixelView vt{t3.size(1), N, t3.stride(1), t3.stride(2)};
  const int64_t T = (N + kTile - 1) / kTile, folds = (T + 1) / 2;
  auto* out_p = out.mutable_data_ptr<acc_t>();
  for_each_sample(B, [&](int64_t b) {
    const Units<acc_t> u(s3.const_data_ptr<scalar_t>() + b * s3.stride(0), vs,
                         t3.const_data_ptr<scalar_t>() + b * t3.stride(0), vt, eps, false);
    std::vector<double> fold_sum(folds, 0.0);
    parallel_tasks(folds, [&](int64_t q) {
      AlignedBuffer<acc_t> tile_s(kTile * kTile), tile_t(kTile * kTile);
      double sum = 0;
      for_each_fold_tile(q, T, [&](int64_t I, int64_t J) {
        const int64_t I0 = I * kTile, J0 = J * kTile;
        const int64_t bi = std::min(kTile, N - I0), bj = std::min(kTile, N - J0);
        affinity_tiles(u, I0, bi, J0, bj, tile_s.data(), tile_t.data());
        acc_t part = 0;
        for (int64_t i = 0; i < bi; ++i)
          part += row_loss<P>(tile_s.data() + i * kTile, tile_t.data() + i * kTile, bj);
        sum += (I == J ? 1.0 : 2.0) * static_cast<double>(part);
      });
      fold_sum[q] = sum;
    });
    double total = 0;
    for (double v : fold_sum) total += v;
    out_p[b] = static_cast<acc_t>(total / (static_cast<double>(N) * N));
  });
}

template <int P, typename scalar_t>
void fa_tiled_backward(const Tensor& grad, const Tensor& s3, const Tensor& t3, double eps,
                       Tensor& gs, Tensor& gt) {
  using acc_t = opmath_t<scalar_t>;
  const bool need_s = gs.defined(), need_t = gt.defined();
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1);
  const PixelView vs{Cs, N, s3.stride(1), s3.stride(2)};
  const PixelView vt{Ct, N, t3.stride(1), t3.stride(2)};
  const int64_t T = (N + kTile - 1) / kTile, folds = (T + 1) / 2;
  // Gradient buffer columns: [student channels | teacher channels], only the sides needed.
  const int64_t ct0 = need_s ? Cs : 0, Kg = ct0 + (need_t ? Ct : 0);
  const auto g = torch::stable::contiguous(to_dtype(grad, ScalarType::Double));
  const double* gp = g.const_data_ptr<double>();
  for_each_sample(B, [&](int64_t b) {
    // Folds are split into fixed groups, each accumulating into its own buffer; groups are handed
    // out dynamically and reduced in group order, so the result does not depend on scheduling.
    // Each tile's GEMM (bj terms) runs in acc_t; the sum over tiles (N / kTile of them) is kept in
    // float64, so float32 gradients stay accurate at large N.
    const int64_t parts =
        in_parallel_region() ? 1 : std::min<int64_t>(folds, 2 * get_num_threads());
    std::vector<double> gbuf(parts * N * Kg, 0.0);
    const scalar_t* sp = s3.const_data_ptr<scalar_t>() + b * s3.stride(0);
    const scalar_t* tp = t3.const_data_ptr<scalar_t>() + b * t3.stride(0);
    const Units<acc_t> u(sp, vs, tp, vt, eps, false);
    // The gradient products' right operand V = [U_S | -U_T] [N, Kg], the sides needing a gradient
    // only: one product per tile direction, as wide as both sides (faster GEMMs than one per side;
    // output columns do not mix, so this changes no rounding).
    std::optional<AlignedBuffer<acc_t>> joint;
    const acc_t* V = need_s ? u.s.data() : u.t.data();
    const acc_t v_sign = need_s ? acc_t(1) : acc_t(-1);
    if (need_s && need_t) {
      joint.emplace(N * Kg);
      acc_t* j = joint->data();
      parallel_for(0, N, 1024, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t c = 0; c < Cs; ++c) j[i * Kg + c] = u.s.data()[i * Cs + c];
          for (int64_t c = 0; c < Ct; ++c) j[i * Kg + Cs + c] = -u.t.data()[i * Ct + c];
        }
      });
      V = j;
    }
    parallel_tasks(parts, [&](int64_t part) {
      AlignedBuffer<acc_t> w(kTile * kTile), tile_t(kTile * kTile);
      std::vector<acc_t> tmp(kTile * Kg);
      double* G = gbuf.data() + part * N * Kg;
      auto add_tmp = [&](int64_t R0, int64_t rows) {
        double* dst = G + R0 * Kg;
        for (int64_t e = 0; e < rows * Kg; ++e) dst[e] += tmp[e];
      };
      for (int64_t q = part * folds / parts; q < (part + 1) * folds / parts; ++q) {
        for_each_fold_tile(q, T, [&](int64_t I, int64_t J) {
          const int64_t I0 = I * kTile, J0 = J * kTile;
          const int64_t bi = std::min(kTile, N - I0), bj = std::min(kTile, N - J0);
          affinity_tiles(u, I0, bi, J0, bj, w.data(), tile_t.data());
          for (int64_t i = 0; i < bi; ++i) {
            acc_t* row = w.data() + i * kTile;
            const acc_t* rt = tile_t.data() + i * kTile;
            for (int64_t j = 0; j < bj; ++j) row[j] = loss_weight<P>(row[j] - rt[j]);
          }
          // G_I [bi x Kg] += W [bi x bj] V_J [bj x Kg]
          gemm(false, false, bi, Kg, bj, v_sign, w.data(), kTile, V + J0 * Kg, Kg, acc_t(0),
               tmp.data(), Kg);
          add_tmp(I0, bi);
          if (I != J) {  // G_J [bj x Kg] += W^T [bj x bi] V_I [bi x Kg]
            gemm(true, false, bj, Kg, bi, v_sign, w.data(), kTile, V + I0 * Kg, Kg, acc_t(0),
                 tmp.data(), Kg);
            add_tmp(J0, bj);
          }
        });
      }
    });
    // Reduce the parts in a fixed order into part 0, scaled by 2 g / N^2.
    const double scale = 2.0 * gp[b] / (double(N) * N);
    parallel_for(0, N * Kg, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        double v = gbuf[e];
        for (int64_t part = 1; part < parts; ++part) v += gbuf[part * N * Kg + e];
        gbuf[e] = scale * v;
      }
    });
    if (need_s)
      unit_pixels_backward(sp, vs, u.ns.data(), gbuf.data(), Kg, int64_t(1),
                           gs.mutable_data_ptr<scalar_t>() + b * Cs * N);
    if (need_t)
      unit_pixels_backward(tp, vt, u.nt.data(), gbuf.data() + ct0, Kg, int64_t(1),
                           gt.mutable_data_ptr<scalar_t>() + b * Ct * N);
  });
}

// G_AB [Ca x Cb] = sum_i u_A,i u_B,i^T for channel-major U_A [Ca, N], U_B [Cb, N].
void gram(const double* ua, int64_t Ca, const double* ub, int64_t Cb, int64_t N, double* G) {
  gemm(false, true, Ca, Cb, N, 1.0, ua, N, ub, N, 0.0, G, Cb);
}

double sum_squares(const double* x, int64_t n) {
  double acc = 0;
  for (int64_t e = 0; e < n; ++e) acc += x[e] * x[e];
  return acc;
}

template <typename scalar_t>
void fa_gram_forward(const Tensor& s3, const Tensor& t3, double eps, Tensor& out) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1);
  const PixelView vs{Cs, N, s3.stride(1), s3.stride(2)};
  const PixelView vt{Ct, N, t3.stride(1), t3.stride(2)};
  for_each_sample(B, [&](int64_t b) {
    const Units<double> u(s3.const_data_ptr<scalar_t>() + b * s3.stride(0), vs,
                          t3.const_data_ptr<scalar_t>() + b * t3.stride(0), vt, eps, true);
    AlignedBuffer<double> gss(Cs * Cs), gtt(Ct * Ct), gst(Cs * Ct);
    gram(u.s.data(), Cs, u.s.data(), Cs, N, gss.data());
    gram(u.t.data(), Ct, u.t.data(), Ct, N, gtt.data());
    gram(u.s.data(), Cs, u.t.data(), Ct, N, gst.data());
    double v = sum_squares(gss.data(), Cs * Cs) + sum_squares(gtt.data(), Ct * Ct) -
               2 * sum_squares(gst.data(), Cs * Ct);
    if (v < 0) v = 0;  // rounding of the cancelling terms when student ~ teacher (keeps NaN)
    out.mutable_data_ptr<acc_t>()[b] = static_cast<acc_t>(v / (double(N) * N));
  });
}

template <typename scalar_t>
void fa_gram_backward(const Tensor& grad, const Tensor& s3, const Tensor& t3, double eps,
                      Tensor& gs, Tensor& gt) {
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1);
  const PixelView vs{Cs, N, s3.stride(1), s3.stride(2)};
  const PixelView vt{Ct, N, t3.stride(1), t3.stride(2)};
  const auto g = torch::stable::contiguous(to_dtype(grad, ScalarType::Double));
  const double* gp = g.const_data_ptr<double>();
  for_each_sample(B, [&](int64_t b) {
    const scalar_t* sp = s3.const_data_ptr<scalar_t>() + b * s3.stride(0);
    const scalar_t* tp = t3.const_data_ptr<scalar_t>() + b * t3.stride(0);
    const Units<double> u(sp, vs, tp, vt, eps, true);
    const double alpha = 4.0 * gp[b] / (double(N) * N);
    // Side A (U_A [Ca, N]): (dL/dU_A)^T = sign alpha (G_SA^T U_S - G_TA^T U_T), two same-shaped
    // products.
    auto side = [&](const double* ua, int64_t Ca, double sign, const scalar_t* xp, PixelView v,
                    const PixelNorm* norms, scalar_t* grad_x) {
      AlignedBuffer<double> gsa(Cs * Ca), gta(Ct * Ca), ps(Ca * N), pt(Ca * N);
      gram(u.s.data(), Cs, ua, Ca, N, gsa.data());
      gram(u.t.data(), Ct, ua, Ca, N, gta.data());
      gemm(true, false, Ca, N, Cs, 1.0, gsa.data(), Ca, u.s.data(), N, 0.0, ps.data(), N);
      gemm(true, false, Ca, N, Ct, 1.0, gta.data(), Ca, u.t.data(), N, 0.0, pt.data(), N);
      double* d = ps.data();
      const double* e = pt.data();
      parallel_for(0, Ca * N, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t i = e0; i < e1; ++i) d[i] = sign * alpha * (d[i] - e[i]);
      });
      unit_pixels_backward(xp, v, norms, d, int64_t(1), N, grad_x);
    };
    if (gs.defined())
      side(u.s.data(), Cs, 1.0, sp, vs, u.ns.data(), gs.mutable_data_ptr<scalar_t>() + b * Cs * N);
    if (gt.defined())
      side(u.t.data(), Ct, -1.0, tp, vt, u.nt.data(), gt.mutable_data_ptr<scalar_t>() + b * Ct * N);
  });
}

// allow_tf32 only matters on CUDA.
Tensor fa_loss_cpu(const Tensor& student, const Tensor& teacher, int64_t p, double eps,
                   bool allow_tf32) {
  check_loss_args(student, teacher, p, eps);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const bool tiled_p2 = p2_takes_tiled_form(s3.size(2), s3.size(1), t3.size(1));
  auto out = empty_on({student.size(0)}, student, compute_dtype(student.scalar_type()));
  FFA_DISPATCH_FLOATING_AND_HALF_TYPES(student.scalar_type(), "fa_loss_cpu", [&] {
    if (p == 1)
      fa_tiled_forward<1, scalar_t>(s3, t3, eps, out);
    else if (tiled_p2)
      fa_tiled_forward<2, scalar_t>(s3, t3, eps, out);
    else
      fa_gram_forward<scalar_t>(s3, t3, eps, out);
  });
  return out;
}

std::tuple<Tensor, Tensor> fa_loss_backward_cpu(const Tensor& grad, const Tensor& student,
                                                const Tensor& teacher, int64_t p, double eps,
                                                std::vector<bool> mask, bool allow_tf32) {
  check_loss_args(student, teacher, p, eps);
  check_loss_grad(grad, student.size(0));
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const bool tiled_p2 = p2_takes_tiled_form(s3.size(2), s3.size(1), t3.size(1));
  Tensor gs = mask[0] ? empty_on(student.sizes(), student) : Tensor();
  Tensor gt = mask[1] ? empty_on(teacher.sizes(), teacher) : Tensor();
  if (mask[0] || mask[1]) {
    FFA_DISPATCH_FLOATING_AND_HALF_TYPES(student.scalar_type(), "fa_loss_backward_cpu", [&] {
      if (p == 1)
        fa_tiled_backward<1, scalar_t>(grad, s3, t3, eps, gs, gt);
      else if (tiled_p2)
        fa_tiled_backward<2, scalar_t>(grad, s3, t3, eps, gs, gt);
      else
        fa_gram_backward<scalar_t>(grad, s3, t3, eps, gs, gt);
    });
  }
  return {gs.defined() ? gs : empty_on({0}, student), gt.defined() ? gt : empty_on({0}, teacher)};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("fa_loss", TORCH_BOX(&fa_loss_cpu));
  m.impl("fa_loss_backward", TORCH_BOX(&fa_loss_backward_cpu));
}

}  // namespace ffa::cpu
