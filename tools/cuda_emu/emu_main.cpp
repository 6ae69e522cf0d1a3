// Runs ffa's CUDA launchers (fa_kernels.cu, ffa_kernels.cu) under the CPU emulator (cuda_emu.h) on
// small random inputs and compares with plain float64 references written here from the math in
// shared/design.md. Every path: tensor cores (bf16, fp16, TF32; 1 and 2 m-tiles per warp), SIMT
// (float32, float64, bf16 with large K), FFA with probes from memory (shared and per-sample) and from
// Philox, k in and beyond the register window, both gradients and one. Exit code 0 when all pass.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/launch.h"
#include "philox.h"

using namespace ffa::cuda;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what, double err, double tol) {
  std::printf("%s %-58s err %.3e (tol %.1e)\n", ok ? "ok  " : "FAIL", what.c_str(), err, tol);
  if (!ok) ++failures;
}

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}

template <typename E>
E from_double(double v) {
  return static_cast<E>(static_cast<float>(v));
}
template <>
double from_double<double>(double v) {
  return v;
}
template <typename E>
double to_double(E v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
double to_double<double>(double v) {
  return v;
}

template <typename E>
Dtype dtype_of();
template <>
Dtype dtype_of<__half>() { return Dtype::kHalf; }
template <>
Dtype dtype_of<__nv_bfloat16>() { return Dtype::kBFloat16; }
template <>
Dtype dtype_of<float>() { return Dtype::kFloat; }
template <>
Dtype dtype_of<double>() { return Dtype::kDouble; }

// Features stored in E with layout NCHW (channels_last = false) or NHWC; x64 holds the rounded
// values as [B][C][N] doubles.
template <typename E>
struct Tensor {
  int64_t B, C, N;
  bool cl;
  std::vector<E> data;
  std::vector<double> x64;
  Features view() const {
    return cl ? Features{data.data(), C, C * N, 1, C} : Features{data.data(), C, C * N, N, 1};
  }
};

template <typename E>
Tensor<E> random_tensor(int64_t B, int64_t C, int64_t N, bool cl, std::mt19937_64& rng) {
  std::normal_distribution<double> nd;
  Tensor<E> t{B, C, N, cl, std::vector<E>(B * C * N), std::vector<double>(B * C * N)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < N; ++i) {
        const E v = from_double<E>(nd(rng));
        const int64_t at = cl ? b * C * N + i * C + c : b * C * N + c * N + i;
        t.data[at] = v;
        t.x64[b * C * N + c * N + i] = to_double(v);
      }
  if (N > 3 && C > 0)  // one all-zero pixel: its unit vector must be 0, not NaN
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = cl ? 2 * C + c : c * N + 2;
      t.data[at] = from_double<E>(0.0);
      t.x64[c * N + 2] = 0.0;
    }
  return t;
}

// ---- float64 references --------------------------------------------------------------------
struct Units {
  std::vector<double> u, n;  // u [B][N][C], n [B][N]
};

Units units(const std::vector<double>& x, int64_t B, int64_t C, int64_t N, double eps) {
  Units r{std::vector<double>(B * N * C), std::vector<double>(B * N)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      double s = 0;
      for (int64_t c = 0; c < C; ++c) s += x[b * C * N + c * N + i] * x[b * C * N + c * N + i];
      const double n = std::sqrt(s);
      r.n[b * N + i] = n;
      for (int64_t c = 0; c < C; ++c) r.u[(b * N + i) * C + c] = x[b * C * N + c * N + i] / (n + eps);
    }
  return r;
}

// g_x from g_u (both [B][C][N] / [B][N][C]).
std::vector<double> chain(const std::vector<double>& x, const Units& un, const std::vector<double>& gu,
                          int64_t B, int64_t C, int64_t N, double eps) {
  std::vector<double> gx(B * C * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      double dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += x[b * C * N + c * N + i] * gu[(b * N + i) * C + c];
      const double n = un.n[b * N + i], ne = n + eps;
      for (int64_t c = 0; c < C; ++c)
        gx[b * C * N + c * N + i] =
            gu[(b * N + i) * C + c] / ne - (n > 0 ? x[b * C * N + c * N + i] * dot / (n * ne * ne) : 0);
    }
  return gx;
}

struct FaRef {
  std::vector<double> loss, gs, gt;
};

FaRef fa_l1_ref(const std::vector<double>& s, const std::vector<double>& t, int64_t B, int64_t Cs,
                int64_t Ct, int64_t N, double eps, const std::vector<double>& grad) {
  const Units us = units(s, B, Cs, N, eps), ut = units(t, B, Ct, N, eps);
  FaRef r{std::vector<double>(B), {}, {}};
  std::vector<double> gus(B * N * Cs, 0.0), gut(B * N * Ct, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    double total = 0;
    const double scale = 2 * grad[b] / (double(N) * N);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double d = 0;
        for (int64_t c = 0; c < Cs; ++c) d += us.u[(b * N + i) * Cs + c] * us.u[(b * N + j) * Cs + c];
        for (int64_t c = 0; c < Ct; ++c) d -= ut.u[(b * N + i) * Ct + c] * ut.u[(b * N + j) * Ct + c];
        total += std::fabs(d);
        const double sg = (d > 0) - (d < 0);
        for (int64_t c = 0; c < Cs; ++c) gus[(b * N + i) * Cs + c] += scale * sg * us.u[(b * N + j) * Cs + c];
        for (int64_t c = 0; c < Ct; ++c) gut[(b * N + i) * Ct + c] -= scale * sg * ut.u[(b * N + j) * Ct + c];
      }
    r.loss[b] = total / (double(N) * N);
  }
  r.gs = chain(s, us, gus, B, Cs, N, eps);
  r.gt = chain(t, ut, gut, B, Ct, N, eps);
  return r;
}

struct FfaRef {
  std::vector<double> loss, y, ps, pt, gs, gt;
};

FfaRef ffa_ref(const std::vector<double>& s, const std::vector<double>& t, int64_t B, int64_t Cs,
               int64_t Ct, int64_t N, int64_t k, int p, double eps, const std::vector<double>& z,
               int64_t zb, const std::vector<double>& grad) {
  const Units us = units(s, B, Cs, N, eps), ut = units(t, B, Ct, N, eps);
  FfaRef r{std::vector<double>(B), std::vector<double>(B * N * k), std::vector<double>(B * Cs * k),
           std::vector<double>(B * Ct * k), {}, {}};
  std::vector<double> gus(B * N * Cs), gut(B * N * Ct);
  for (int64_t b = 0; b < B; ++b) {
    const double* Z = z.data() + b * zb;
    auto proj = [&](const Units& u, int64_t C, double* P) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < k; ++j) {
          double v = 0;
          for (int64_t i = 0; i < N; ++i) v += u.u[(b * N + i) * C + c] * Z[i * k + j];
          P[c * k + j] = v;
        }
    };
    double* Ps = r.ps.data() + b * Cs * k;
    double* Pt = r.pt.data() + b * Ct * k;
    proj(us, Cs, Ps);
    proj(ut, Ct, Pt);
    double total = 0;
    std::vector<double> W(N * k);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < k; ++j) {
        double v = 0;
        for (int64_t c = 0; c < Cs; ++c) v += us.u[(b * N + i) * Cs + c] * Ps[c * k + j];
        for (int64_t c = 0; c < Ct; ++c) v -= ut.u[(b * N + i) * Ct + c] * Pt[c * k + j];
        r.y[(b * N + i) * k + j] = v;
        total += p == 1 ? std::fabs(v) : v * v;
        const double scale = grad[b] / (double(k) * N * N);
        W[i * k + j] = p == 1 ? scale * ((v > 0) - (v < 0)) : 2 * scale * v;
      }
    r.loss[b] = total / (double(k) * N * N);
    auto grad_u = [&](const Units& u, int64_t C, const double* P, double sign, double* gu) {
      std::vector<double> Q(C * k, 0.0);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < k; ++j)
          for (int64_t i = 0; i < N; ++i) Q[c * k + j] += u.u[(b * N + i) * C + c] * W[i * k + j];
      for (int64_t i = 0; i < N; ++i)
        for (int64_t c = 0; c < C; ++c) {
          double g = 0;
          for (int64_t j = 0; j < k; ++j) g += W[i * k + j] * P[c * k + j] + Z[i * k + j] * Q[c * k + j];
          gu[(b * N + i) * C + c] = sign * g;
        }
    };
    grad_u(us, Cs, Ps, 1.0, gus.data());
    grad_u(ut, Ct, Pt, -1.0, gut.data());
  }
  r.gs = chain(s, us, gus, B, Cs, N, eps);
  r.gt = chain(t, ut, gut, B, Ct, N, eps);
  return r;
}

template <typename T>
std::vector<double> widen_all(const std::vector<T>& v) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = to_double(v[i]);
  return r;
}

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("FAIL %s returned error %d\n", what, static_cast<int>(e));
    ++failures;
  }
}

// ---- FA p = 1 ------------------------------------------------------------------------------
template <typename E>
void run_fa(const char* name, int64_t B, int64_t Cs, int64_t Ct, int64_t H, int64_t W, bool cl,
            bool tf32, int smem_optin, FaPath want_path, int want_mt, double tol) {
  using A = std::conditional_t<std::is_same_v<E, double>, double, float>;
  std::mt19937_64 rng(Cs * 1000 + Ct * 10 + H);
  const int64_t N = H * W;
  const double eps = 1e-5;
  auto s = random_tensor<E>(B, Cs, N, cl, rng), t = random_tensor<E>(B, Ct, N, false, rng);
  const Pair in{dtype_of<E>(), B, N, s.view(), t.view()};
  const FaL1Plan plan = fa_l1_plan(in, tf32, smem_optin);
  const std::string tag = std::string("fa p1 ") + name;
  if (plan.path != want_path || (want_path == FaPath::kTensorCore && plan.mt != want_mt)) {
    std::printf("FAIL %s: plan path %d mt %d\n", tag.c_str(), int(plan.path), plan.mt);
    ++failures;
    return;
  }
  std::vector<double> grad(B);
  for (int64_t b = 0; b < B; ++b) grad[b] = 0.5 + 0.25 * b;
  const FaRef ref = fa_l1_ref(s.x64, t.x64, B, Cs, Ct, N, eps, grad);

  std::vector<unsigned char> ws(fa_l1_forward_workspace(in, plan));
  std::vector<A> out(B, A(NAN));
  check_cuda(fa_l1_forward(in, plan, eps, ws.data(), out.data(), nullptr), "fa_l1_forward");
  const double e = rel(widen_all(out), ref.loss);
  expect(e <= tol, tag + " loss", e, tol);

  for (int mask = 1; mask <= 3; ++mask) {
    const bool ns = mask & 1, nt = mask & 2;
    std::vector<unsigned char> wb(fa_l1_backward_workspace(in, plan, ns, nt));
    std::vector<E> gs(B * Cs * N, from_double<E>(NAN)), gt(B * Ct * N, from_double<E>(NAN));
    check_cuda(fa_l1_backward(in, plan, eps, grad.data(), wb.data(), ns ? gs.data() : nullptr,
                              nt ? gt.data() : nullptr, nullptr),
               "fa_l1_backward");
    // sign(D) may flip where |D| is at rounding level: gradients get a looser bound.
    if (ns) {
      const double eg = rel(widen_all(gs), ref.gs);
      expect(eg <= 10 * tol, tag + " grad_s mask " + std::to_string(mask), eg, 10 * tol);
    }
    if (nt) {
      const double eg = rel(widen_all(gt), ref.gt);
      expect(eg <= 10 * tol, tag + " grad_t mask " + std::to_string(mask), eg, 10 * tol);
    }
  }
}

// ---- FFA -----------------------------------------------------------------------------------
template <typename E>
void run_ffa(const char* name, int64_t B, int64_t Cs, int64_t Ct, int64_t H, int64_t W, int64_t k,
             int p, int zmode /*0 philox, 1 shared Z, 2 per-sample Z*/, bool cl, double tol) {
  using A = std::conditional_t<std::is_same_v<E, double>, double, float>;
  std::mt19937_64 rng(k * 100 + p * 10 + zmode);
  const int64_t N = H * W;
  const double eps = 1e-5;
  auto s = random_tensor<E>(B, Cs, N, cl, rng), t = random_tensor<E>(B, Ct, N, false, rng);
  const Pair in{dtype_of<E>(), B, N, s.view(), t.view()};
  const uint64_t seed = 0x123456789abcdefULL, offset = 8;
  const int64_t zb = zmode == 2 ? N * k : 0;
  std::vector<A> z((zmode == 2 ? B : 1) * N * k);
  std::normal_distribution<double> nd;
  for (size_t e = 0; e < z.size(); ++e)
    z[e] = static_cast<A>(zmode == 0 ? ffa::philox::normal_at(seed, offset, e) : nd(rng));
  const Probes probes{zmode == 0 ? nullptr : z.data(), zb, seed, offset};
  std::vector<double> grad(B);
  for (int64_t b = 0; b < B; ++b) grad[b] = 0.75 + 0.5 * b;
  const FfaRef ref = ffa_ref(s.x64, t.x64, B, Cs, Ct, N, k, p, eps, widen_all(z), zb, grad);
  const std::string tag = std::string("ffa ") + name + " p" + std::to_string(p) + " k" +
                          std::to_string(k) + (zmode == 0 ? " philox" : zmode == 1 ? " Z" : " Zb");

  std::vector<unsigned char> ws(ffa_forward_workspace(in, k));
  std::vector<A> loss(B, A(NAN)), y(B * N * k, A(NAN)), ps(B * Cs * k, A(NAN)), pt(B * Ct * k, A(NAN));
  check_cuda(ffa_forward(in, k, p, eps, probes, ws.data(), loss.data(), y.data(), ps.data(),
                         pt.data(), nullptr),
             "ffa_forward");
  double e = std::max({rel(widen_all(loss), ref.loss), rel(widen_all(y), ref.y),
                       rel(widen_all(ps), ref.ps), rel(widen_all(pt), ref.pt)});
  expect(e <= tol, tag + " forward", e, tol);
  for (int mask = 1; mask <= 3; ++mask) {
    const bool ns = mask & 1, nt = mask & 2;
    std::vector<unsigned char> wb(ffa_backward_workspace(in, k, ns, nt));
    std::vector<E> gs(B * Cs * N, from_double<E>(NAN)), gt(B * Ct * N, from_double<E>(NAN));
    check_cuda(ffa_backward(in, k, p, eps, probes, grad.data(), y.data(), ps.data(), pt.data(),
                            wb.data(), ns ? gs.data() : nullptr, nt ? gt.data() : nullptr, nullptr),
               "ffa_backward");
    const double gtol = std::is_same_v<E, float> || std::is_same_v<E, double> ? tol : 1e-2;
    if (ns) {
      const double eg = rel(widen_all(gs), ref.gs);
      expect(eg <= gtol, tag + " grad_s mask " + std::to_string(mask), eg, gtol);
    }
    if (nt) {
      const double eg = rel(widen_all(gt), ref.gt);
      expect(eg <= gtol, tag + " grad_t mask " + std::to_string(mask), eg, gtol);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const int h100 = 232448;
  // K = 16 + 32 = 48 (Cs = 5, Ct = 19 padded); N = 11 x 13 = 143 -> Npad 256.
  run_fa<__nv_bfloat16>("bf16 tc mt2", 2, 5, 19, 11, 13, true, false, h100, FaPath::kTensorCore, 2, 2e-2);
  run_fa<__half>("fp16 tc mt1", 2, 5, 19, 11, 13, false, false, 25000, FaPath::kTensorCore, 1, 5e-3);
  run_fa<float>("fp32 tf32 tc mt2", 2, 5, 19, 11, 13, false, true, h100, FaPath::kTensorCore, 2, 5e-3);
  run_fa<float>("fp32 simt", 2, 5, 19, 11, 13, true, false, h100, FaPath::kSimt, 1, 1e-5);
  run_fa<double>("fp64 simt", 2, 5, 19, 11, 13, false, false, h100, FaPath::kSimt, 1, 1e-12);
  run_fa<__nv_bfloat16>("bf16 simt (K too large)", 1, 5, 19, 11, 13, false, false, 0, FaPath::kSimt, 1, 2e-2);
  if (!quick) {
    run_fa<float>("fp32 tf32 tc mt1", 1, 40, 24, 9, 15, true, true, 70000, FaPath::kTensorCore, 1, 5e-3);
    run_fa<__nv_bfloat16>("bf16 tc mt2 K=128", 1, 64, 64, 12, 12, false, false, h100, FaPath::kTensorCore, 2, 2e-2);
  }
  for (int p : {1, 2}) {
    run_ffa<float>("fp32", 2, 5, 19, 11, 13, 15, p, 0, true, 1e-5);
    run_ffa<float>("fp32", 2, 5, 19, 11, 13, 21, p, 1, false, 1e-5);
    run_ffa<double>("fp64", 2, 5, 19, 11, 13, 3, p, 2, false, 1e-12);
    run_ffa<__nv_bfloat16>("bf16", 2, 37, 6, 11, 13, 40, p, 0, false, 1e-5);
  }
  if (!quick) {
    run_ffa<__half>("fp16", 1, 70, 33, 5, 31, 16, 1, 1, true, 1e-5);
    // Channel counts whose block tile does not fit in shared memory: the projection re-reads X.
    run_ffa<float>("fp32 non-resident", 1, 200, 8, 9, 15, 15, 1, 1, false, 1e-5);
    run_ffa<double>("fp64 non-resident", 1, 70, 8, 9, 15, 5, 2, 0, true, 1e-12);
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
