// CUDA implementations of the ffa loss ops: tensor checks (csrc/common.h, shared with the CPU
// wrappers), device guard and current stream, outputs and one workspace from torch's caching
// allocator, then the torch-free launchers of fa_kernels.cu / ffa_kernels.cu (launch.h).
// Exact FA p = 2 runs here on aten ops (cuBLAS, through the stable dispatcher), in float64 (the
// Gram identity cancels when student ~ teacher): unit pixels packed by a kernel, then the cheaper
// of two exact forms (fa_l2_forward), then the chain-rule kernel. No host synchronization anywhere.
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>

#include "common.h"
#include "cuda/host.h"
#include "cuda/launch.h"

namespace ffa::cuda {
namespace {

Dtype kernel_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Half:
      return Dtype::kHalf;
    case ScalarType::BFloat16:
      return Dtype::kBFloat16;
    case ScalarType::Float:
      return Dtype::kFloat;
    case ScalarType::Double:
      return Dtype::kDouble;
    default:
      FFA_CHECK(false, "ffa: CUDA losses support float16, bfloat16, float32 and float64, got ", t);
  }
}

// Checks shared by every CUDA entry point beyond the backend-independent ones of common.h.
void check_cuda_pair(const Tensor& student, const Tensor& teacher) {
  check_feature_pair(student, teacher);
  FFA_CHECK(student.is_cuda(), "student must be a CUDA tensor, got ", student.device());
  kernel_dtype(student.scalar_type());
  // The kernels put the batch on a grid dimension limited to 65535.
  FFA_CHECK(student.size(0) <= 65535, "ffa: CUDA losses support batch sizes up to 65535, got ",
            student.size(0));
}

void check_same_device(const Tensor& x, const Tensor& like, const char* name) {
  FFA_CHECK(x.device() == like.device(), name, " must be on ", like.device(), ", got ", x.device());
}

Features features_of(const Tensor& x3) {
  return Features{x3.const_data_ptr(), x3.size(1), x3.stride(0), x3.stride(1), x3.stride(2)};
}

// The [B, C, N] views must outlive the launches: the caller keeps s3 / t3 alive.
Pair make_pair(const Tensor& s3, const Tensor& t3) {
  return Pair{kernel_dtype(s3.scalar_type()), s3.size(0), s3.size(2), features_of(s3),
              features_of(t3)};
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

Tensor workspace(size_t bytes, const Tensor& like) {
  return empty_on({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like, ScalarType::Byte);
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

Tensor grad_as_double(const Tensor& grad, const Tensor& student) {
  check_loss_grad(grad, student.size(0));
  check_same_device(grad, student, "grad");
  return torch::stable::contiguous(to_dtype(grad, ScalarType::Double));
}

std::tuple<Tensor, Tensor> finish_grads(const Tensor& gs, const Tensor& gt, const Tensor& student,
                                        const Tensor& teacher) {
  return {gs.defined() ? gs : empty_on({0}, student), gt.defined() ? gt : empty_on({0}, teacher)};
}

// ---- exact FA ------------------------------------------------------------------------------
// Unit pixels of both tensors in float64, pixel-major: us [B, N, Cs], ut [B, N, Ct] in separate
// buffers of the same layout and alignment, so that equal student and teacher go through identical
// cuBLAS calls and give bitwise-equal products; norms [B, 2, N] for the chain rule (backward).
struct UnitsF64 {
  Tensor us, ut, norms;
};

UnitsF64 pack_units_f64(const Tensor& like, const Pair& in, double eps, bool with_norms,
                        cudaStream_t stream) {
  const auto f64 = ScalarType::Double;
  UnitsF64 u{
      empty_on({in.B, in.N, in.s.C}, like, f64), empty_on({in.B, in.N, in.t.C}, like, f64), {}};
  if (with_norms)
    u.norms = empty_on({static_cast<int64_t>(in.B * 2 * in.N * sizeof(PixelNorm))}, like,
                       ScalarType::Byte);
  check_cuda(fa_pack_f64(in, eps, u.us.mutable_data_ptr<double>(), u.ut.mutable_data_ptr<double>(),
                         with_norms ? static_cast<PixelNorm*>(u.norms.mutable_data_ptr()) : nullptr,
                         stream),
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

Tensor squared_norm(const Tensor& m) {
  const int64_t dims[2] = {1, 2};
  return torch::stable::sum(mul(m, m), IntArrayRef(dims, 2));
}

Tensor affinity_difference(const UnitsF64& u) {
  return sub(bmm(u.us, transpose12(u.us)), bmm(u.ut, transpose12(u.ut)));
}

// x / n2 (in place) and max(x, 0) through tensor overloads (no Scalar through the stable ABI).
Tensor div_scalar(const Tensor& x, double n2) {
  return call_aten<2>("aten::div_", "Tensor", {x, scalar_like(n2, x)});
}

Tensor fa_l2_forward(const Tensor& s3, const Pair& in, double eps, cudaStream_t stream) {
  const UnitsF64 u = pack_units_f64(s3, in, eps, false, stream);
  const double n2 = static_cast<double>(in.N) * static_cast<double>(in.N);
  if (pixel_form(in)) return div_scalar(squared_norm(affinity_difference(u)), n2);
  const auto usT = transpose12(u.us), utT = transpose12(u.ut);
  const auto ss = squared_norm(bmm(usT, u.us)), tt = squared_norm(bmm(utT, u.ut));
  const auto st = squared_norm(bmm(usT, u.ut));
  const auto d = torch::stable::subtract(add(ss, tt), st, 2.0);  // ss + tt - 2 st
  return div_scalar(call_aten<2>("aten::clamp_min", "Tensor", {d, scalar_like(0.0, d)}), n2);
}

// dL/dU_S = 4 g / N^2 D U_S = 4 g / N^2 (U_S G_SS - U_T G_TS) (pixel-major rows),
// dL/dU_T = -4 g / N^2 D U_T = 4 g / N^2 (U_T G_TT - U_S G_ST).
void fa_l2_backward(const Tensor& grad, const Tensor& s3, const Pair& in, double eps, Tensor& gs,
                    Tensor& gt, cudaStream_t stream) {
  const bool need_s = gs.defined(), need_t = gt.defined();
  const UnitsF64 u = pack_units_f64(s3, in, eps, true, stream);
  const double factor = 4.0 / (static_cast<double>(in.N) * static_cast<double>(in.N));
  Tensor gus, gut;  // dL/du up to the factor, [B, N, C]
  double teacher_factor = factor;
  if (pixel_form(in)) {
    const auto D = affinity_difference(u);
    if (need_s) gus = bmm(D, u.us);
    if (need_t) gut = bmm(D, u.ut);
    teacher_factor = -factor;
  } else {
    const auto usT = transpose12(u.us), utT = transpose12(u.ut);
    if (need_s) gus = sub(bmm(u.us, bmm(usT, u.us)), bmm(u.ut, bmm(utT, u.us)));
    if (need_t) gut = sub(bmm(u.ut, bmm(utT, u.ut)), bmm(u.us, bmm(usT, u.ut)));
  }
  const double* gp = grad.const_data_ptr<double>();
  const auto* norms = static_cast<const PixelNorm*>(u.norms.const_data_ptr());
  if (need_s)
    check_cuda(fa_unit_backward_f64(in, 0, norms, gus.const_data_ptr<double>(), in.N * in.s.C,
                                    in.s.C, 1, gp, factor, eps, gs.mutable_data_ptr(), stream),
               "fa_unit_backward_f64");
  if (need_t)
    check_cuda(
        fa_unit_backward_f64(in, 1, norms, gut.const_data_ptr<double>(), in.N * in.t.C, in.t.C, 1,
                             gp, teacher_factor, eps, gt.mutable_data_ptr(), stream),
        "fa_unit_backward_f64");
}

// allow_tf32: torch.backends.cuda.matmul.allow_tf32, passed by ffa.functional (the stable ABI
// cannot read torch's global context); only the p = 1 tensor-core path uses it.
Tensor fa_loss_cuda(const Tensor& student, const Tensor& teacher, int64_t p, double eps,
                    bool allow_tf32) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const DeviceGuard guard(student.get_device_index());
  const cudaStream_t stream = stream_of(student);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  const auto out_dtype = compute_dtype(student.scalar_type());
  if (in.B == 0) return empty_on({0}, student, out_dtype);
  if (in.N == 0)  // 0 / 0, as the CPU kernel gives
    return torch::stable::full({in.B}, std::numeric_limits<double>::quiet_NaN(), out_dtype,
                               std::nullopt, student.device());
  if (p == 2) return to_dtype(fa_l2_forward(s3, in, eps, stream), out_dtype);
  auto out = empty_on({in.B}, student, out_dtype);
  const FaL1Plan plan = fa_l1_plan(in, allow_tf32, smem_optin(student.get_device_index()));
  auto ws = workspace(fa_l1_forward_workspace(in, plan), student);
  check_cuda(fa_l1_forward(in, plan, eps, ws.mutable_data_ptr(), out.mutable_data_ptr(), stream),
             "fa_l1_forward");
  return out;
}

std::tuple<Tensor, Tensor> fa_loss_backward_cuda(const Tensor& grad, const Tensor& student,
                                                 const Tensor& teacher, int64_t p, double eps,
                                                 std::vector<bool> mask, bool allow_tf32) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const DeviceGuard guard(student.get_device_index());
  const cudaStream_t stream = stream_of(student);
  const auto g = grad_as_double(grad, student);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  Tensor gs = mask[0] ? empty_on(student.sizes(), student) : Tensor();
  Tensor gt = mask[1] ? empty_on(teacher.sizes(), teacher) : Tensor();
  if ((mask[0] || mask[1]) && in.B > 0 && in.N > 0) {
    if (p == 2) {
      fa_l2_backward(g, s3, in, eps, gs, gt, stream);
    } else {
      const FaL1Plan plan = fa_l1_plan(in, allow_tf32, smem_optin(student.get_device_index()));
      auto ws = workspace(fa_l1_backward_workspace(in, plan, mask[0], mask[1]), student);
      check_cuda(fa_l1_backward(in, plan, eps, g.const_data_ptr<double>(), ws.mutable_data_ptr(),
                                ptr_or_null(gs), ptr_or_null(gt), stream),
                 "fa_l1_backward");
    }
  }
  return finish_grads(gs, gt, student, teacher);
}

// ---- FFA -----------------------------------------------------------------------------------
using FfaOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

FfaOut ffa_forward_common(const Tensor& student, const Tensor& teacher, int64_t k, int64_t p,
                          double eps, const Probes& z) {
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  const auto dt = compute_dtype(student.scalar_type());
  auto loss = empty_on({in.B}, student, dt), y = empty_on({in.B, in.N, k}, student, dt);
  auto ps = empty_on({in.B, in.s.C, k}, student, dt), pt = empty_on({in.B, in.t.C, k}, student, dt);
  if (in.B == 0) return {loss, y, ps, pt};
  if (in.N == 0) {  // as the CPU kernel: 0 / 0 loss, empty projections of nothing
    torch::stable::fill_(loss, std::numeric_limits<double>::quiet_NaN());
    torch::stable::zero_(ps);
    torch::stable::zero_(pt);
    return {loss, y, ps, pt};
  }
  const cudaStream_t stream = stream_of(student);
  auto ws = workspace(ffa_forward_workspace(in, k), student);
  check_cuda(ffa_forward(in, k, static_cast<int>(p), eps, z, ws.mutable_data_ptr(),
                         loss.mutable_data_ptr(), y.mutable_data_ptr(), ps.mutable_data_ptr(),
                         pt.mutable_data_ptr(), stream),
             "ffa_forward");
  return {loss, y, ps, pt};
}

std::tuple<Tensor, Tensor> ffa_backward_common(const Tensor& grad, const Tensor& student,
                                               const Tensor& teacher, const Tensor& y,
                                               const Tensor& p_s, const Tensor& p_t, int64_t k,
                                               int64_t p, double eps, const Probes& z,
                                               std::vector<bool> mask) {
  const auto g = grad_as_double(grad, student);
  const auto s3 = as_pixels(student), t3 = as_pixels(teacher);
  const Pair in = make_pair(s3, t3);
  const auto dt = compute_dtype(student.scalar_type());
  FFA_CHECK(y.sizes() == IntArrayRef({in.B, in.N, k}) && y.scalar_type() == dt,
            "y must be [B,N,k]");
  FFA_CHECK(p_s.sizes() == IntArrayRef({in.B, in.s.C, k}) && p_s.scalar_type() == dt,
            "p_s must be [B,Cs,k]");
  FFA_CHECK(p_t.sizes() == IntArrayRef({in.B, in.t.C, k}) && p_t.scalar_type() == dt,
            "p_t must be [B,Ct,k]");
  check_same_device(y, student, "y");
  check_same_device(p_s, student, "p_s");
  check_same_device(p_t, student, "p_t");
  Tensor gs = mask[0] ? empty_on(student.sizes(), student) : Tensor();
  Tensor gt = mask[1] ? empty_on(teacher.sizes(), teacher) : Tensor();
  if ((mask[0] || mask[1]) && in.B > 0 && in.N > 0) {
    const auto yc = torch::stable::contiguous(y), psc = torch::stable::contiguous(p_s),
               ptc = torch::stable::contiguous(p_t);
    const cudaStream_t stream = stream_of(student);
    auto ws = workspace(ffa_backward_workspace(in, k, mask[0], mask[1]), student);
    check_cuda(ffa_backward(in, k, static_cast<int>(p), eps, z, g.const_data_ptr<double>(),
                            yc.const_data_ptr(), psc.const_data_ptr(), ptc.const_data_ptr(),
                            ws.mutable_data_ptr(), ptr_or_null(gs), ptr_or_null(gt), stream),
               "ffa_backward");
  }
  return finish_grads(gs, gt, student, teacher);
}

// Z in the compute dtype, [Bz, N, k] contiguous; the returned tensor keeps it alive.
Tensor probes_of(const Tensor& projection, const Tensor& student, Probes& z) {
  check_projection(projection, student);
  auto z3 = torch::stable::contiguous(to_dtype(projection, compute_dtype(student.scalar_type())));
  z = Probes{z3.const_data_ptr(), z3.size(0) == 1 ? 0 : z3.size(1) * z3.size(2), 0, 0};
  return z3;
}

FfaOut ffa_loss_cuda(const Tensor& student, const Tensor& teacher, const Tensor& projection,
                     int64_t p, double eps) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const DeviceGuard guard(student.get_device_index());
  Probes z{};
  const auto z3 = probes_of(projection, student, z);
  return ffa_forward_common(student, teacher, z3.size(2), p, eps, z);
}

std::tuple<Tensor, Tensor> ffa_loss_backward_cuda(const Tensor& grad, const Tensor& student,
                                                  const Tensor& teacher, const Tensor& projection,
                                                  const Tensor& y, const Tensor& p_s,
                                                  const Tensor& p_t, int64_t p, double eps,
                                                  std::vector<bool> mask) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const DeviceGuard guard(student.get_device_index());
  Probes z{};
  const auto z3 = probes_of(projection, student, z);
  return ffa_backward_common(grad, student, teacher, y, p_s, p_t, z3.size(2), p, eps, z, mask);
}

Probes philox_probes(int64_t k, int64_t seed, int64_t offset) {
  FFA_CHECK(k >= 1, "k must be >= 1, got ", k);
  FFA_CHECK(offset >= 0 && offset % 4 == 0,
            "offset must be a non-negative multiple of 4 (a Philox offset), got ", offset);
  return Probes{nullptr, 0, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

FfaOut ffa_loss_philox_cuda(const Tensor& student, const Tensor& teacher, int64_t k, int64_t p,
                            double eps, int64_t seed, int64_t offset) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const Probes z = philox_probes(k, seed, offset);
  const DeviceGuard guard(student.get_device_index());
  return ffa_forward_common(student, teacher, k, p, eps, z);
}

std::tuple<Tensor, Tensor> ffa_loss_philox_backward_cuda(const Tensor& grad, const Tensor& student,
                                                         const Tensor& teacher, const Tensor& y,
                                                         const Tensor& p_s, const Tensor& p_t,
                                                         int64_t k, int64_t p, double eps,
                                                         int64_t seed, int64_t offset,
                                                         std::vector<bool> mask) {
  check_cuda_pair(student, teacher);
  check_loss_options(p, eps);
  const Probes z = philox_probes(k, seed, offset);
  const DeviceGuard guard(student.get_device_index());
  return ffa_backward_common(grad, student, teacher, y, p_s, p_t, k, p, eps, z, mask);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ffa, CUDA, m) {
  m.impl("fa_loss", TORCH_BOX(&fa_loss_cuda));
  m.impl("fa_loss_backward", TORCH_BOX(&fa_loss_backward_cuda));
  m.impl("ffa_loss", TORCH_BOX(&ffa_loss_cuda));
  m.impl("ffa_loss_backward", TORCH_BOX(&ffa_loss_backward_cuda));
  m.impl("ffa_loss_philox", TORCH_BOX(&ffa_loss_philox_cuda));
  m.impl("ffa_loss_philox_backward", TORCH_BOX(&ffa_loss_philox_backward_cuda));
}

}  // namespace ffa::cuda
