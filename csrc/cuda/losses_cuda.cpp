// CUDA implementations of the ffa loss ops: tensor checks (csrc/common.h, shared with the CPU
// wrappers), device guard and current stream, outputs and one workspace from torch's caching
// allocator, then the torch-free launchers of fa_kernels.cu / ffa_kernels.cu (launch.h).
// Exact FA p = 2 runs here on ATen (cuBLAS), in float64 (the Gram identity cancels when student ~
// teacher): unit pixels packed by a kernel, then the cheaper of two exact forms (fa_l2_forward),
// then the chain-rule kernel. No host synchronization anywhere.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "common.h"
#include "cuda/launch.h"

namespace ffa::cuda {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ffa: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kFloat:
      return Dtype::kFloat;
    case at::kDouble:
      return Dtype::kDouble;
    default:
      TORCH_CHECK(false, "ffa: CUDA losses support float16, bfloat16, float32 and float64, got ",
                  t);
  }
}

// Checks shared by every CUDA entry point beyond the backend-independent ones of common.h.
void check_cuda_pair(const at::Tensor& student, const at::Tensor& teacher) {
  check_feature_pair(student, teacher);
  TORCH_CHECK(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  to_dtype(student.scalar_type());
  // The kernels put the batch on a grid dimension limited to 65535.
  TORCH_CHECK(student.size(0) <= 65535, "ffa: CUDA losses support batch sizes up to 65535, got ",
              student.size(0));
}

void check_same_device(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.device() == like.device(), name, " must be on ", like.device(), ", got ",
              x.device());
}

Features features_of(const at::Tensor& x3) {
  return Features{x3.const_data_ptr(), x3.size(1), x3.stride(0), x3.stride(1), x3.stride(2)};
}

// The [B, C, N] views must outlive the launches: the caller keeps s3 / t3 alive.
Pair make_pair(const at::Tensor& s3, const at::Tensor& t3) {
  return Pair{to_dtype(s3.scalar_type()), s3.size(0), s3.size(2), features_of(s3), features_of(t3)};
}

int smem_optin(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    int v = 0;
    check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute");
    cache[device] = v;
  }
  return cache[device];
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   like.options().dtype(at::kByte));
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor grad_as_double(const at::Tensor& grad, const at::Tensor& student) {
  check_loss_grad(grad, student.size(0));
  check_same_device(grad, student, "grad");
  return grad.to(at::kDouble).contiguous();
}

std::tuple<at::Tensor, at::Tensor> finish_grads(const at::Tensor& gs, const at::Tensor& gt,
                                                const at::Tensor& student,
                                                const at::Tensor& teacher) {
  return {gs.defined() ? gs : student.new_empty({0}), gt.defined() ? gt : teacher.new_empty({0})};
}

// ---- exact FA ------------------------------------------------------------------------------
// Unit pixels of both tensors in float64, pixel-major: us [B, N, Cs], ut [B, N, Ct] in separate
// buffers of the same layout and alignment, so that equal student and teacher go through identical
// cuBLAS calls and give bitwise-equal products; norms [B, 2, N] for the chain rule (backward).
struct UnitsF64 {
  at::Tensor us, ut, norms;
};

UnitsF64 pack_units_f64(const at::Tensor& like, const Pair& in, double eps, bool with_norms,
                        cudaStream_t stream) {
  const auto f64 = like.options().dtype(at::kDouble);
  UnitsF64 u{at::empty({in.B, in.N, in.s.C}, f64), at::empty({in.B, in.N, in.t.C}, f64), {}};
  if (with_norms)
    u.norms = at::empty({static_cast<int64_t>(in.B * 2 * in.N * sizeof(PixelNorm))},
                        like.options().dtype(at::kByte));
  check_cuda(
      fa_pack_f64(in, eps, u.us.data_ptr<double>(), u.ut.data_ptr<double>(),
                  with_norms ? static_cast<PixelNorm*>(u.norms.data_ptr()) : nullptr, stream),
      "fa_pack_f64");
  return u;
}

// Exact FA p = 2 has two exact forms; the one with fewer FLOPs is used, forward and backward:
//  - pixel form, N < Cs + Ct: D = U_S U_S^T - U_T U_T^T materialized per sample, O(N^2 (Cs + Ct))
//    work and N^2 memory (C = 4096, N = 4: the channel form would need 4096^2 Grams);
//  - channel form: ||D||^2 = ||G_SS||^2 + ||G_TT||^2 - 2 ||G_ST||^2 with G_XY = U_X^T U_Y,
//    O(N (Cs + Ct)^2) work, clamped at 0 (rounding can leave -1e-16 when student ~ teacher; the
//    gradient stays the analytic one, ~0 there).
// Every product is its own bmm on same-shaped operands, so student == teacher gives exactly 0.
bool pixel_form(const Pair& in) { return in.N < in.s.C + in.t.C; }

at::Tensor squared_norm(const at::Tensor& m) { return m.square().sum({1, 2}); }

at::Tensor affinity_difference(const UnitsF64& u) {
  return at::bmm(u.us, u.us.transpose(1, 2)) - at::bmm(u.ut, u.ut.transpose(1, 2));
}

at::Tensor fa_l2_forward(const at::Tensor& s3, const Pair& in, double eps, cudaStream_t stream) {
  const UnitsF64 u = pack_units_f64(s3, in, eps, false, stream);
  const double n2 = static_cast<double>(in.N) * static_cast<double>(in.N);
  if (pixel_form(in)) return squared_norm(affinity_difference(u)).div_(n2);
  const auto usT = u.us.transpose(1, 2), utT = u.ut.transpose(1, 2);
  const auto ss = squared_norm(at::bmm(usT, u.us)), tt = squared_norm(at::bmm(utT, u.ut));
  const auto st = squared_norm(at::bmm(usT, u.ut));
  return (ss + tt - 2.0 * st).clamp_min_(0.0).div_(n2);
}

// dL/dU_S = 4 g / N^2 D U_S = 4 g / N^2 (U_S G_SS - U_T G_TS) (pixel-major rows),
// dL/dU_T = -4 g / N^2 D U_T = 4 g / N^2 (U_T G_TT - U_S G_ST).
void fa_l2_backward(const at::Tensor& grad, const at::Tensor& s3, const Pair& in, double eps,
                    at::Tensor& gs, at::Tensor& gt, cudaStream_t stream) {
  const bool need_s = gs.defined(), need_t = gt.defined();
  const UnitsF64 u = pack_units_f64(s3, in, eps, true, stream);
  const double factor = 4.0 / (static_cast<double>(in.N) * static_cast<double>(in.N));
  at::Tensor gus, gut;  // dL/du up to the factor, [B, N, C]
  double teacher_factor = factor;
  if (pixel_form(in)) {
    const auto D = affinity_difference(u);
    if (need_s) gus = at::bmm(D, u.us);
    if (need_t) gut = at::bmm(D, u.ut);
    teacher_factor = -factor;
  } else {
    const auto usT = u.us.transpose(1, 2), utT = u.ut.transpose(1, 2);
    if (need_s) gus = at::bmm(u.us, at::bmm(usT, u.us)) - at::bmm(u.ut, at::bmm(utT, u.us));
    if (need_t) gut = at::bmm(u.ut, at::bmm(utT, u.ut)) - at::bmm(u.us, at::bmm(usT, u.ut));
  }
  const double* gp = grad.const_data_ptr<double>();
  const auto* norms = static_cast<const PixelNorm*>(u.norms.const_data_ptr());
  if (need_s)
    check_cuda(fa_unit_backward_f64(in, 0, norms, gus.const_data_ptr<double>(), in.N * in.s.C,
                                    in.s.C, 1, gp, factor, eps, gs.data_ptr(), stream),
               "fa_unit_backward_f64");
  if (need_t)
    check_cuda(fa_unit_backward_f64(in, 1, norms, gut.const_data_ptr<double>(), in.N * in.t.C,
                                    in.t.C, 1, gp, teacher_factor, eps, gt.data_ptr(), stream),
               "fa_unit_backward_f64");
}

at::Tensor fa_loss_cuda(const at::Tensor& student, const at::Tensor& teacher, int64_t p,
                        double eps) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  const auto out_dtype = compute_dtype(student.scalar_type());
  if (in.B == 0) return at::empty({0}, student.options().dtype(out_dtype));
  if (in.N == 0)  // 0 / 0, as the CPU kernel gives
    return at::full({in.B}, std::numeric_limits<double>::quiet_NaN(),
                    student.options().dtype(out_dtype));
  if (p == 2) return fa_l2_forward(s3, in, eps, stream).to(out_dtype);
  auto out = at::empty({in.B}, student.options().dtype(out_dtype));
  const FaL1Plan plan =
      fa_l1_plan(in, at::globalContext().allowTF32CuBLAS(), smem_optin(student.get_device()));
  auto ws = workspace(fa_l1_forward_workspace(in, plan), student);
  check_cuda(fa_l1_forward(in, plan, eps, ws.data_ptr(), out.data_ptr(), stream), "fa_l1_forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor> fa_loss_backward_cuda(const at::Tensor& grad,
                                                         const at::Tensor& student,
                                                         const at::Tensor& teacher, int64_t p,
                                                         double eps, std::array<bool, 2> mask) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  const auto g = grad_as_double(grad, student);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  at::Tensor gs = mask[0] ? at::empty(student.sizes(), student.options()) : at::Tensor();
  at::Tensor gt = mask[1] ? at::empty(teacher.sizes(), teacher.options()) : at::Tensor();
  if ((mask[0] || mask[1]) && in.B > 0 && in.N > 0) {
    if (p == 2) {
      fa_l2_backward(g, s3, in, eps, gs, gt, stream);
    } else {
      const FaL1Plan plan =
          fa_l1_plan(in, at::globalContext().allowTF32CuBLAS(), smem_optin(student.get_device()));
      auto ws = workspace(fa_l1_backward_workspace(in, plan, mask[0], mask[1]), student);
      check_cuda(fa_l1_backward(in, plan, eps, g.const_data_ptr<double>(), ws.data_ptr(),
                                ptr_or_null(gs), ptr_or_null(gt), stream),
                 "fa_l1_backward");
    }
  }
  return finish_grads(gs, gt, student, teacher);
}

// ---- FFA -----------------------------------------------------------------------------------
using FfaOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FfaOut ffa_forward_common(const at::Tensor& student, const at::Tensor& teacher, int64_t k,
                          int64_t p, double eps, const Probes& z) {
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  const auto opts = student.options().dtype(compute_dtype(student.scalar_type()));
  auto loss = at::empty({in.B}, opts), y = at::empty({in.B, in.N, k}, opts);
  auto ps = at::empty({in.B, in.s.C, k}, opts), pt = at::empty({in.B, in.t.C, k}, opts);
  if (in.B == 0) return {loss, y, ps, pt};
  if (in.N == 0) {  // as the CPU kernel: 0 / 0 loss, empty projections of nothing
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
    ps.zero_();
    pt.zero_();
    return {loss, y, ps, pt};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  auto ws = workspace(ffa_forward_workspace(in, k), student);
  check_cuda(ffa_forward(in, k, static_cast<int>(p), eps, z, ws.data_ptr(), loss.data_ptr(),
                         y.data_ptr(), ps.data_ptr(), pt.data_ptr(), stream),
             "ffa_forward");
  return {loss, y, ps, pt};
}

std::tuple<at::Tensor, at::Tensor> ffa_backward_common(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& y, const at::Tensor& p_s, const at::Tensor& p_t, int64_t k, int64_t p,
    double eps, const Probes& z, std::array<bool, 2> mask) {
  const auto g = grad_as_double(grad, student);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  const auto dt = compute_dtype(student.scalar_type());
  TORCH_CHECK(y.sizes() == at::IntArrayRef({in.B, in.N, k}) && y.scalar_type() == dt,
              "y must be [B,N,k]");
  TORCH_CHECK(p_s.sizes() == at::IntArrayRef({in.B, in.s.C, k}) && p_s.scalar_type() == dt,
              "p_s must be [B,Cs,k]");
  TORCH_CHECK(p_t.sizes() == at::IntArrayRef({in.B, in.t.C, k}) && p_t.scalar_type() == dt,
              "p_t must be [B,Ct,k]");
  check_same_device(y, student, "y");
  check_same_device(p_s, student, "p_s");
  check_same_device(p_t, student, "p_t");
  at::Tensor gs = mask[0] ? at::empty(student.sizes(), student.options()) : at::Tensor();
  at::Tensor gt = mask[1] ? at::empty(teacher.sizes(), teacher.options()) : at::Tensor();
  if ((mask[0] || mask[1]) && in.B > 0 && in.N > 0) {
    const auto yc = y.contiguous(), psc = p_s.contiguous(), ptc = p_t.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
    auto ws = workspace(ffa_backward_workspace(in, k, mask[0], mask[1]), student);
    check_cuda(ffa_backward(in, k, static_cast<int>(p), eps, z, g.const_data_ptr<double>(),
                            yc.const_data_ptr(), psc.const_data_ptr(), ptc.const_data_ptr(),
                            ws.data_ptr(), ptr_or_null(gs), ptr_or_null(gt), stream),
               "ffa_backward");
  }
  return finish_grads(gs, gt, student, teacher);
}

// Z in the compute dtype, [Bz, N, k] contiguous; the returned tensor keeps it alive.
at::Tensor probes_of(const at::Tensor& projection, const at::Tensor& student, Probes& z) {
  check_projection(projection, student);
  auto z3 = projection.to(compute_dtype(student.scalar_type())).contiguous();
  z = Probes{z3.const_data_ptr(), z3.size(0) == 1 ? 0 : z3.size(1) * z3.size(2), 0, 0};
  return z3;
}

FfaOut ffa_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                     const at::Tensor& projection, int64_t p, double eps) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  Probes z{};
  const auto z3 = probes_of(projection, student, z);
  return ffa_forward_common(student, teacher, z3.size(2), p, eps, z);
}

std::tuple<at::Tensor, at::Tensor> ffa_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& projection, const at::Tensor& y, const at::Tensor& p_s, const at::Tensor& p_t,
    int64_t p, double eps, std::array<bool, 2> mask) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  Probes z{};
  const auto z3 = probes_of(projection, student, z);
  return ffa_backward_common(grad, student, teacher, y, p_s, p_t, z3.size(2), p, eps, z, mask);
}

Probes philox_probes(int64_t k, int64_t seed, int64_t offset) {
  TORCH_CHECK(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK(offset >= 0 && offset % 4 == 0,
              "offset must be a non-negative multiple of 4 (a Philox offset), got ", offset);
  return Probes{nullptr, 0, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

FfaOut ffa_loss_philox_cuda(const at::Tensor& student, const at::Tensor& teacher, int64_t k,
                            int64_t p, double eps, int64_t seed, int64_t offset) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const Probes z = philox_probes(k, seed, offset);
  const c10::cuda::CUDAGuard guard(student.device());
  return ffa_forward_common(student, teacher, k, p, eps, z);
}

std::tuple<at::Tensor, at::Tensor> ffa_loss_philox_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& y, const at::Tensor& p_s, const at::Tensor& p_t, int64_t k, int64_t p,
    double eps, int64_t seed, int64_t offset, std::array<bool, 2> mask) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const Probes z = philox_probes(k, seed, offset);
  const c10::cuda::CUDAGuard guard(student.device());
  return ffa_backward_common(grad, student, teacher, y, p_s, p_t, k, p, eps, z, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(ffa, CUDA, m) {
  m.impl("fa_loss", &fa_loss_cuda);
  m.impl("fa_loss_backward", &fa_loss_backward_cuda);
  m.impl("ffa_loss", &ffa_loss_cuda);
  m.impl("ffa_loss_backward", &ffa_loss_backward_cuda);
  m.impl("ffa_loss_philox", &ffa_loss_philox_cuda);
  m.impl("ffa_loss_philox_backward", &ffa_loss_philox_backward_cuda);
}

}  // namespace ffa::cuda
