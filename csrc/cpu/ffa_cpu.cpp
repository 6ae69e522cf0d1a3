// Fast feature-affinity loss (FFA) on CPU.
//
// Per sample, with unit pixels U (u_i = x_i / (||x_i|| + eps), pixels.h) and Z [N, k]:
//   P_S = U_S Z                   [Cs, k]
//   Y   = U_S^T P_S - U_T^T P_T   [N, k]   (= D Z, never N x N)
//   L   = sum_ik f(Y_ik) / (k N^2),  f = |.| (p=1) or square (p=2)
// Backward, W = g f'(Y) / (k N^2): dL/dU_S = P_S W^T + Q_S Z^T with Q_S = U_S W; the teacher's
// with a minus sign; then chained through the normalization.
// Tiling: pixel blocks of kBlock. Forward = two passes over each feature map (norms and P; then Y
// and the reduction), backward = two passes (norms and Q; then dL/dU and the chain rule), each pass
// reading a block once while it is hot in cache. GEMMs read the features in place (NCHW or
// channels_last) with r_i = 1 / (||x_i|| + eps) (float64 norms, pixels.h) folded into the k-wide
// operand (r . Z, r . W) or applied to the output rows (Y); a block where some r_i lies outside
// 2^+-40 (extreme input scales, a tiny eps) forms its unit pixels instead (|u| <= 1), so any input
// scale is safe. The student's and the teacher's products have identical shapes and alike
// buffers, so equal inputs give Y = 0 exactly. FLOPs: 4 N C k per map forward and backward; the
// floor is memory: 2 reads of S and T forward, 2 reads + 1 write backward. Y [B, N, k] is the one
// O(N k) intermediate (kept for the backward). Partial P/Q per block are summed in block order:
// deterministic for any thread count.

#include "cpu/ffa_cpu.h"

#include <optional>
#include <vector>

#include "common.h"
#include "cpu/blas.h"
#include "cpu/parallel.h"
#include "cpu/pixels.h"

namespace ffa::cpu {
namespace {

// One sample's features: element (c, i) at ptr[c * cs + i * ps], ps == 1 or cs == 1.
template <typename T>
struct Features {
  const T* ptr;
  PixelView v;
};

// Features with unit stride along pixels or along channels (halves computed in float32).
Tensor gemm_ready(const Tensor& x) {
  auto x3 = as_pixels(x);
  if (x3.scalar_type() != ScalarType::Double && x3.scalar_type() != ScalarType::Float)
    x3 = to_dtype(x3, ScalarType::Float);
  const bool ok = (x3.stride(2) == 1 && x3.stride(1) >= x3.size(2)) ||
                  (x3.stride(1) == 1 && x3.stride(2) >= x3.size(1));
  return ok ? x3 : torch::stable::contiguous(x3);
}

template <typename T>
Features<T> sample(const Tensor& x3, int64_t b) {
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
  parallel_tasks(divup(N, kBlock),
                 [&](int64_t blk) { f(blk * kBlock, std::min(N, (blk + 1) * kBlock), blk); });
}

// Whether a block's GEMMs may run on the features themselves, with r_i = 1 / (||x_i|| + eps) folded
// into the other operand (the fast path: no unit pixels formed): every pixel unscaled with r_i
// within 2^+-40 (so ||x_i|| < 2^40), which keeps r z, x P and their sums far inside the range of
// the compute dtype. Otherwise (extreme input scales, tiny eps) the block's unit pixels are formed.
bool foldable(const PixelNorm* norms, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const double r = norms[i].scale * norms[i].rs;
    if (!(norms[i].scale == 1 && r >= 0x1p-40 && r <= 0x1p40)) return false;
  }
  return true;
}

// The unit pixels [i0, i1) of one map as a GEMM operand U_b [C x nb] (column i: u_{i0+i}): either
// the features with the factors r (folded), or the unit pixels formed in a buffer, stored like the
// features (row-major [C x nb] when their pixels are contiguous, else as its transpose [nb x C]).
template <typename T>
struct UnitBlock {
  int64_t C, nb = 0, ld = 0;
  bool transposed = false, folded = false;
  const T* a = nullptr;
  std::vector<T> r;
  std::optional<AlignedBuffer<T>> u;

  explicit UnitBlock(int64_t C) : C(C) {}

  void load(const Features<T>& x, int64_t i0, int64_t i1, const PixelNorm* norms) {
    nb = i1 - i0;
    transposed = x.v.ps != 1;
    folded = foldable(norms, i0, i1);
    if (folded) {
      a = x.ptr + i0 * x.v.ps;
      ld = transposed ? x.v.ps : x.v.cs;
      r.resize(nb);
      for (int64_t i = 0; i < nb; ++i) r[i] = static_cast<T>(norms[i0 + i].rs);
      return;
    }
    if (!u) u.emplace(C * kBlock);
    a = u->data();
    ld = transposed ? C : nb;
    write_unit_pixels_range(x.ptr, x.v, i0, i1, norms, u->data(), transposed ? C : int64_t(1),
                            transposed ? int64_t(1) : nb);
  }
  // out [C x k] = U_b m, m [nb x k] (folded: X_b (r . m), with `scaled` [nb x k] as scratch).
  void times(const T* m, int64_t k, T* scaled, T* out) const {
    if (folded) {
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t j = 0; j < k; ++j) scaled[i * k + j] = m[i * k + j] * r[i];
      m = scaled;
    }
    gemm(transposed, false, C, k, nb, T(1), a, ld, m, k, T(0), out, k);
  }
  // out [nb x k] = U_b^T p, p [C x k] (folded: r . (X_b^T p)).
  void transposed_times(const T* p, int64_t k, T* out) const {
    gemm(!transposed, false, nb, k, C, T(1), a, ld, p, k, T(0), out, k);
    if (folded)
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t j = 0; j < k; ++j) out[i * k + j] *= r[i];
  }
};

// out [n] = the sum of the per-block parts (each n long), in block order (deterministic for any
// thread count).
template <typename T>
void sum_parts(const T* parts, int64_t nparts, int64_t n, T* out) {
  std::fill(out, out + n, T(0));
  for (int64_t q = 0; q < nparts; ++q)
    for (int64_t e = 0; e < n; ++e) out[e] += parts[q * n + e];
}

template <typename T>
void ffa_forward_impl(const Tensor& s3, const Tensor& t3, const Tensor& z3, int64_t p, double eps,
                      Tensor& loss, Tensor& y, Tensor& ps, Tensor& pt) {
  const int64_t B = s3.size(0), N = s3.size(2), Cs = s3.size(1), Ct = t3.size(1), k = z3.size(2);
  const int64_t nblk = divup(N, kBlock);
  for_each_sample(B, [&](int64_t b) {
    std::vector<PixelNorm> ns(N), nt(N);
    AlignedBuffer<T> part_s(nblk * Cs * k), part_t(nblk * Ct * k);
    std::vector<double> blk_sum(nblk);
    const auto S = sample<T>(s3, b), Tt = sample<T>(t3, b);
    const T* z = z3.const_data_ptr<T>() + (z3.size(0) == 1 ? 0 : b) * N * k;
    T* Y = y.mutable_data_ptr<T>() + b * N * k;
    T* Ps = ps.mutable_data_ptr<T>() + b * Cs * k;
    T* Pt = pt.mutable_data_ptr<T>() + b * Ct * k;
    // Pass 1: norms, unit pixels and P = U Z, one read of each feature map.
    for_each_block(N, [&](int64_t i0, int64_t i1, int64_t blk) {
      UnitBlock<T> us(Cs), ut(Ct);
      std::vector<T> scaled((i1 - i0) * k);
      pixel_norms_range(S.ptr, S.v, i0, i1, eps, ns.data());
      us.load(S, i0, i1, ns.data());
      us.times(z + i0 * k, k, scaled.data(), part_s.data() + blk * Cs * k);
      pixel_norms_range(Tt.ptr, Tt.v, i0, i1, eps, nt.data());
      ut.load(Tt, i0, i1, nt.data());
      ut.times(z + i0 * k, k, scaled.data(), part_t.data() + blk * Ct * k);
    });
    sum_parts(part_s.data(), nblk, Cs * k, Ps);
    sum_parts(part_t.data(), nblk, Ct * k, Pt);
    // Pass 2: Y = U_S^T P_S - U_T^T P_T and sum f(Y), a second read of each map.
    for_each_block(N, [&](int64_t i0, int64_t i1, int64_t blk) {
      const int64_t nb = i1 - i0;
      UnitBlock<T> us(Cs), ut(Ct);
      AlignedBuffer<T> ys(nb * k), yt(nb * k);
      us.load(S, i0, i1, ns.data());
      us.transposed_times(Ps, k, ys.data());
      ut.load(Tt, i0, i1, nt.data());
      ut.transposed_times(Pt, k, yt.data());
      T* Yb = Y + i0 * k;
      T acc = 0;
      for (int64_t e = 0; e < nb * k; ++e) {
        const T v = ys.data()[e] - yt.data()[e];
        Yb[e] = v;
        acc += p == 1 ? std::abs(v) : v * v;
      }
      blk_sum[blk] = acc;
    });
    double total = 0;
    for (double v : blk_sum) total += v;
    loss.mutable_data_ptr<T>()[b] = static_cast<T>(total / (double(k) * double(N) * double(N)));
  });
}

// W = dL/dY over a block: scale * sign(Y) (p=1) or 2 scale Y (p=2).
template <typename T>
void dl_dy(const T* Y, int64_t n, int64_t p, T scale, T* W) {
  for (int64_t e = 0; e < n; ++e)
    W[e] = p == 1 ? scale * static_cast<T>((Y[e] > 0) - (Y[e] < 0)) : 2 * scale * Y[e];
}

template <typename T>
void ffa_backward_impl(const Tensor& grad, const Tensor& s3, const Tensor& t3, const Tensor& z3,
                       const Tensor& y, const Tensor& ps, const Tensor& pt, int64_t p, double eps,
                       Tensor& gs, Tensor& gt) {
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  const int64_t nblk = divup(N, kBlock);
  const auto g = torch::stable::contiguous(to_dtype(grad, ScalarType::Double));
  const double* gp = g.const_data_ptr<double>();
  // The features needing a gradient: (features, P, sign, grad output).
  struct Side {
    const Tensor* x3;
    const Tensor* P;
    T sign;
    Tensor* grad;
  };
  std::vector<Side> sides;
  if (gs.defined()) sides.push_back({&s3, &ps, T(1), &gs});
  if (gt.defined()) sides.push_back({&t3, &pt, T(-1), &gt});
  for_each_sample(B, [&](int64_t b) {
    const T* z = z3.const_data_ptr<T>() + (z3.size(0) == 1 ? 0 : b) * N * k;
    const T* Y = y.const_data_ptr<T>() + b * N * k;
    const T scale = static_cast<T>(gp[b] / (double(k) * double(N) * double(N)));
    for (const Side& side : sides) {
      const auto X = sample<T>(*side.x3, b);
      const int64_t C = X.v.C;
      const T* P = side.P->template const_data_ptr<T>() + b * C * k;
      std::vector<PixelNorm> norms(N);
      std::vector<T> parts(nblk * C * k), Q(C * k);
      // Pass 1: norms, unit pixels and Q = U W (dL/dU = P W^T + Q Z^T needs all of Q first).
      for_each_block(N, [&](int64_t i0, int64_t i1, int64_t blk) {
        std::vector<T> W((i1 - i0) * k), scaled((i1 - i0) * k);
        UnitBlock<T> ub(C);
        dl_dy(Y + i0 * k, (i1 - i0) * k, p, scale, W.data());
        pixel_norms_range(X.ptr, X.v, i0, i1, eps, norms.data());
        ub.load(X, i0, i1, norms.data());
        ub.times(W.data(), k, scaled.data(), parts.data() + blk * C * k);
      });
      sum_parts(parts.data(), nblk, C * k, Q.data());
      // Pass 2: G^T = sign (P W^T + Q Z^T) [C x nb] per block, chained through the normalization.
      T* out = side.grad->template mutable_data_ptr<T>() + b * C * N;
      for_each_block(N, [&](int64_t i0, int64_t i1, int64_t) {
        const int64_t nb = i1 - i0;
        std::vector<T> W(nb * k), G(C * nb);
        dl_dy(Y + i0 * k, nb * k, p, scale, W.data());
        gemm(false, true, C, nb, k, side.sign, P, k, W.data(), k, T(0), G.data(), nb);
        gemm(false, true, C, nb, k, side.sign, Q.data(), k, z + i0 * k, k, T(1), G.data(), nb);
        unit_pixels_backward_range(X.ptr, X.v, i0, i1, norms.data(), G.data(), int64_t(1), nb, out);
      });
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> ffa_loss_cpu(const Tensor& student,
                                                        const Tensor& teacher,
                                                        const Tensor& projection, int64_t p,
                                                        double eps) {
  check_loss_args(student, teacher, p, eps);
  check_projection(projection, student);
  const auto s3 = gemm_ready(student), t3 = gemm_ready(teacher);
  const auto z3 = torch::stable::contiguous(to_dtype(projection, s3.scalar_type()));
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  auto loss = empty_on({B}, s3), y = empty_on({B, N, k}, s3);
  auto ps = empty_on({B, s3.size(1), k}, s3), pt = empty_on({B, t3.size(1), k}, s3);
  FFA_DISPATCH_FLOATING_TYPES(s3.scalar_type(), "ffa_loss_cpu", [&] {
    ffa_forward_impl<scalar_t>(s3, t3, z3, p, eps, loss, y, ps, pt);
  });
  return {loss, y, ps, pt};
}

std::tuple<Tensor, Tensor> ffa_loss_backward_cpu(const Tensor& grad, const Tensor& student,
                                                 const Tensor& teacher, const Tensor& projection,
                                                 const Tensor& y, const Tensor& p_s,
                                                 const Tensor& p_t, int64_t p, double eps,
                                                 std::vector<bool> mask) {
  check_loss_args(student, teacher, p, eps);
  check_projection(projection, student);
  const auto s3 = gemm_ready(student), t3 = gemm_ready(teacher);
  const auto dt = s3.scalar_type();
  const auto z3 = torch::stable::contiguous(to_dtype(projection, dt));
  const int64_t B = s3.size(0), N = s3.size(2), k = z3.size(2);
  check_loss_grad(grad, B);
  FFA_CHECK(y.sizes() == IntArrayRef({B, N, k}) && y.scalar_type() == dt, "y must be [B,N,k]");
  FFA_CHECK(p_s.sizes() == IntArrayRef({B, s3.size(1), k}) && p_s.scalar_type() == dt,
            "p_s must be [B,Cs,k]");
  FFA_CHECK(p_t.sizes() == IntArrayRef({B, t3.size(1), k}) && p_t.scalar_type() == dt,
            "p_t must be [B,Ct,k]");
  // Gradients are computed in the compute dtype, then cast to the features' dtype.
  Tensor gs = mask[0] ? empty_on(s3.sizes(), s3) : Tensor();
  Tensor gt = mask[1] ? empty_on(t3.sizes(), t3) : Tensor();
  if (mask[0] || mask[1]) {
    FFA_DISPATCH_FLOATING_TYPES(dt, "ffa_loss_backward_cpu", [&] {
      ffa_backward_impl<scalar_t>(grad, s3, t3, z3, torch::stable::contiguous(y),
                                  torch::stable::contiguous(p_s), torch::stable::contiguous(p_t), p,
                                  eps, gs, gt);
    });
  }
  auto finish = [](const Tensor& g, const Tensor& like) {
    return g.defined() ? to_dtype(torch::stable::view(g, like.sizes()), like.scalar_type())
                       : empty_on({0}, like);
  };
  return {finish(gs, student), finish(gt, teacher)};
}

STABLE_TORCH_LIBRARY_IMPL(ffa, CPU, m) {
  m.impl("ffa_loss", TORCH_BOX(&ffa_loss_cpu));
  m.impl("ffa_loss_backward", TORCH_BOX(&ffa_loss_backward_cpu));
}

}  // namespace ffa::cpu
