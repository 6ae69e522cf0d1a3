// Runs ffa's CUDA launchers (fa_kernels.cu, ffa_kernels.cu) under the CPU emulator (cuda_emu.h) on
// small random inputs and compares with plain float64 references written here from the math in
// shared/design.md. Every path: tensor cores (bf16, fp16, TF32; 1 and 2 m-tiles per warp), SIMT
// (float32, float64, bf16 with large K), FFA with probes from memory (shared and per-sample) and
// from Philox, k in and beyond the register window, both gradients and one; the float64 pack and
// chain rule of p = 2. Numerics: inputs scaled far from 1 (checked against the reference on the
// unscaled values: L(c s, c t, c eps) = L(s, t, eps), gradients / c), eps far below float32's
// normal range with an all-zero pixel, student == teacher (loss and gradients exactly 0 on every
// path), and a teacher equal to the student on half the pixels. Exit code 0 when all pass.
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
std::string only;  // --only=TEXT: run just the checks whose name contains TEXT

bool skipped(const std::string& tag) {
  return !only.empty() && tag.find(only) == std::string::npos;
}

void expect(bool ok, const std::string& what, double err, double tol) {
  std::printf("%s %-58s err %.3e (tol %.1e)\n", ok ? "ok  " : "FAIL", what.c_str(), err, tol);
  if (!ok) ++failures;
}

// ||a - b|| / ||b||; where b is +-inf (a true value beyond the output dtype's range, see
// saturate), a must be the same infinity.
// Computed relative to max |b| so that values near either end of float64's range do not overflow.
double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (double v : b)
    if (std::isfinite(v)) m = std::max(m, std::fabs(v));
  if (m == 0) m = 1;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(b[i]) && a[i] == b[i]) continue;
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    const double d = a[i] / m - b[i] / m, r = b[i] / m;
    num += d * d;
    den += r * r;
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}

template <typename E>
E from_double(double v) {
  return static_cast<E>(static_cast<float>(v));
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __float2bfloat16_rn(static_cast<float>(v));
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

// Features stored in E with layout NCHW (channels_last = false) or NHWC, the values of a random
// draw times `scale`; x64 holds the stored values divided by `scale` as [B][C][N] doubles (what the
// references see).
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

// How the inputs of a check are made: scale of the features (the kernels get eps, the references
// eps / scale), and ties: the teacher equal to the student everywhere or on the even pixels.
enum class Tie { kNone, kAll, kHalf };
struct Numerics {
  double scale = 1.0, eps = 1e-5;
  Tie tie = Tie::kNone;
  std::string label() const {
    std::string r;
    if (scale != 1.0 || eps != 1e-5) {
      char buf[48];
      std::snprintf(buf, sizeof buf, " x%.0e eps %.0e", scale, eps);
      r = buf;
    }
    return r + (tie == Tie::kAll ? " t==s" : tie == Tie::kHalf ? " t==s half" : "");
  }
};

template <typename E>
void set(Tensor<E>& t, int64_t b, int64_t c, int64_t i, E v, double scale) {
  t.data[t.cl ? b * t.C * t.N + i * t.C + c : b * t.C * t.N + c * t.N + i] = v;
  t.x64[b * t.C * t.N + c * t.N + i] = to_double(v) / scale;
}

template <typename E>
Tensor<E> random_tensor(int64_t B, int64_t C, int64_t N, bool cl, std::mt19937_64& rng,
                        double scale = 1.0) {
  std::normal_distribution<double> nd;
  Tensor<E> t{B, C, N, cl, std::vector<E>(B * C * N), std::vector<double>(B * C * N)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < N; ++i) set(t, b, c, i, from_double<E>(scale * nd(rng)), scale);
  if (N > 3 && C > 0)  // one all-zero pixel: its unit vector must be 0, not NaN
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) set(t, b, c, 2, from_double<E>(0.0), scale);
  return t;
}

// The teacher of a check: random, or a copy of the student's values (all pixels or the even ones)
// in its own layout.
template <typename E>
Tensor<E> teacher_for(const Tensor<E>& s, int64_t Ct, bool cl, std::mt19937_64& rng,
                      const Numerics& nx) {
  Tensor<E> t = random_tensor<E>(s.B, Ct, s.N, cl, rng, nx.scale);
  if (nx.tie != Tie::kNone)
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c = 0; c < Ct; ++c)
        for (int64_t i = 0; i < s.N; i += nx.tie == Tie::kAll ? 1 : 2)
          set(t, b, c, i, s.data[s.cl ? b * s.C * s.N + i * s.C + c : b * s.C * s.N + c * s.N + i],
              nx.scale);
  return t;
}

std::vector<double> scaled(std::vector<double> v, double f) {
  for (double& e : v) e *= f;
  return v;
}

// Reference values beyond the range of E become the infinity that rounding to E gives (a gradient
// g_u / eps with a tiny eps legitimately overflows float32).
template <typename E>
std::vector<double> saturate(std::vector<double> v) {
  for (double& e : v)
    if (std::isinf(to_double(from_double<E>(e)))) e = to_double(from_double<E>(e));
  return v;
}

// Exactly zero everywhere (no NaN either).
template <typename T>
void expect_zero(const std::vector<T>& v, const std::string& what) {
  double worst = 0.0;
  for (const T& e : v) {
    const double d = to_double(e);
    if (!(d == 0.0)) worst = std::isnan(d) ? INFINITY : std::max(worst, std::fabs(d));
  }
  expect(worst == 0.0, what + " exactly 0", worst, 0.0);
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
        double ds = 0, dt = 0;  // separate sums, so that ties give exactly 0 here too
        for (int64_t c = 0; c < Cs; ++c)
          ds += us.u[(b * N + i) * Cs + c] * us.u[(b * N + j) * Cs + c];
        for (int64_t c = 0; c < Ct; ++c)
          dt += ut.u[(b * N + i) * Ct + c] * ut.u[(b * N + j) * Ct + c];
        const double d = ds - dt;
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
        double vs = 0, vt = 0;
        for (int64_t c = 0; c < Cs; ++c) vs += us.u[(b * N + i) * Cs + c] * Ps[c * k + j];
        for (int64_t c = 0; c < Ct; ++c) vt += ut.u[(b * N + i) * Ct + c] * Pt[c * k + j];
        const double v = vs - vt;
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
            bool tf32, int smem_optin, FaPath want_path, int want_mt, double tol,
            const Numerics& nx = {}, int first_mask = 1) {
  using A = std::conditional_t<std::is_same_v<E, double>, double, float>;
  std::mt19937_64 rng(Cs * 1000 + Ct * 10 + H);
  const int64_t N = H * W;
  auto s = random_tensor<E>(B, Cs, N, cl, rng, nx.scale);
  auto t = teacher_for<E>(s, Ct, false, rng, nx);
  const Pair in{dtype_of<E>(), B, N, s.view(), t.view()};
  const FaL1Plan plan = fa_l1_plan(in, tf32, smem_optin);
  const std::string tag = std::string("fa p1 ") + name + nx.label();
  if (skipped(tag)) return;
  if (plan.path != want_path || (want_path == FaPath::kTensorCore && plan.mt != want_mt)) {
    std::printf("FAIL %s: plan path %d mt %d\n", tag.c_str(), int(plan.path), plan.mt);
    ++failures;
    return;
  }
  std::vector<double> grad(B);
  for (int64_t b = 0; b < B; ++b) grad[b] = 0.5 + 0.25 * b;
  const FaRef ref = fa_l1_ref(s.x64, t.x64, B, Cs, Ct, N, nx.eps / nx.scale, grad);

  std::vector<unsigned char> ws(fa_l1_forward_workspace(in, plan));
  std::vector<A> out(B, A(NAN));
  check_cuda(fa_l1_forward(in, plan, nx.eps, ws.data(), out.data(), nullptr), "fa_l1_forward");
  if (nx.tie == Tie::kAll) {
    expect_zero(out, tag + " loss");
  } else {
    const double e = rel(widen_all(out), ref.loss);
    expect(e <= tol, tag + " loss", e, tol);
  }

  for (int mask = first_mask; mask <= 3; ++mask) {
    const bool ns = mask & 1, nt = mask & 2;
    std::vector<unsigned char> wb(fa_l1_backward_workspace(in, plan, ns, nt));
    std::vector<E> gs(B * Cs * N, from_double<E>(NAN)), gt(B * Ct * N, from_double<E>(NAN));
    check_cuda(fa_l1_backward(in, plan, nx.eps, grad.data(), wb.data(), ns ? gs.data() : nullptr,
                              nt ? gt.data() : nullptr, nullptr),
               "fa_l1_backward");
    const std::string m = " mask " + std::to_string(mask);
    if (nx.tie == Tie::kAll) {
      if (ns) expect_zero(gs, tag + " grad_s" + m);
      if (nt) expect_zero(gt, tag + " grad_t" + m);
      continue;
    }
    // sign(D) may flip where |D| is at rounding level: gradients get a looser bound.
    if (ns) {
      const double eg = rel(widen_all(gs), saturate<E>(scaled(ref.gs, 1 / nx.scale)));
      expect(eg <= 10 * tol, tag + " grad_s" + m, eg, 10 * tol);
    }
    if (nt) {
      const double eg = rel(widen_all(gt), saturate<E>(scaled(ref.gt, 1 / nx.scale)));
      expect(eg <= 10 * tol, tag + " grad_t" + m, eg, 10 * tol);
    }
  }
}

// ---- FFA -----------------------------------------------------------------------------------
template <typename E>
void run_ffa(const char* name, int64_t B, int64_t Cs, int64_t Ct, int64_t H, int64_t W, int64_t k,
             int p, int zmode /*0 philox, 1 shared Z, 2 per-sample Z*/, bool cl, double tol,
             const Numerics& nx = {}, int first_mask = 1) {
  using A = std::conditional_t<std::is_same_v<E, double>, double, float>;
  std::mt19937_64 rng(k * 100 + p * 10 + zmode);
  const int64_t N = H * W;
  auto s = random_tensor<E>(B, Cs, N, cl, rng, nx.scale);
  auto t = teacher_for<E>(s, Ct, false, rng, nx);
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
  const FfaRef ref =
      ffa_ref(s.x64, t.x64, B, Cs, Ct, N, k, p, nx.eps / nx.scale, widen_all(z), zb, grad);
  const std::string tag = std::string("ffa ") + name + " p" + std::to_string(p) + " k" +
                          std::to_string(k) +
                          (zmode == 0   ? " philox"
                           : zmode == 1 ? " Z"
                                        : " Zb") +
                          nx.label();
  if (skipped(tag)) return;

  std::vector<unsigned char> ws(ffa_forward_workspace(in, k));
  std::vector<A> loss(B, A(NAN)), y(B * N * k, A(NAN)), ps(B * Cs * k, A(NAN)), pt(B * Ct * k, A(NAN));
  check_cuda(ffa_forward(in, k, p, nx.eps, probes, ws.data(), loss.data(), y.data(), ps.data(),
                         pt.data(), nullptr),
             "ffa_forward");
  if (nx.tie == Tie::kAll) {
    expect_zero(loss, tag + " loss");
    expect_zero(y, tag + " y");
  } else {
    double e = std::max({rel(widen_all(loss), ref.loss), rel(widen_all(y), ref.y),
                         rel(widen_all(ps), ref.ps), rel(widen_all(pt), ref.pt)});
    expect(e <= tol, tag + " forward", e, tol);
  }
  for (int mask = first_mask; mask <= 3; ++mask) {
    const bool ns = mask & 1, nt = mask & 2;
    std::vector<unsigned char> wb(ffa_backward_workspace(in, k, ns, nt));
    std::vector<E> gs(B * Cs * N, from_double<E>(NAN)), gt(B * Ct * N, from_double<E>(NAN));
    check_cuda(ffa_backward(in, k, p, nx.eps, probes, grad.data(), y.data(), ps.data(), pt.data(),
                            wb.data(), ns ? gs.data() : nullptr, nt ? gt.data() : nullptr, nullptr),
               "ffa_backward");
    const std::string m = " mask " + std::to_string(mask);
    if (nx.tie == Tie::kAll) {
      if (ns) expect_zero(gs, tag + " grad_s" + m);
      if (nt) expect_zero(gt, tag + " grad_t" + m);
      continue;
    }
    const double gtol = std::is_same_v<E, float> || std::is_same_v<E, double> ? tol : 1e-2;
    if (ns) {
      const double eg = rel(widen_all(gs), saturate<E>(scaled(ref.gs, 1 / nx.scale)));
      expect(eg <= gtol, tag + " grad_s" + m, eg, gtol);
    }
    if (nt) {
      const double eg = rel(widen_all(gt), saturate<E>(scaled(ref.gt, 1 / nx.scale)));
      expect(eg <= gtol, tag + " grad_t" + m, eg, gtol);
    }
  }
}

// ---- the float64 pack and chain rule of FA p = 2 ------------------------------------------------
// fa_pack_f64 against the reference unit pixels, then fa_unit_backward_f64 with a random g_u
// (scaled with the features so that g_x stays inside float64's range: chain(c x, g, c eps) =
// chain(x, g / c, eps)). tol: the unit pixels' (float64); g_x is judged at E's rounding.
template <typename E>
void run_pack_f64(const char* name, int64_t B, int64_t Cs, int64_t Ct, int64_t N, bool cl,
                  double tol, const Numerics& nx) {
  std::mt19937_64 rng(Cs * 7 + Ct + N);
  auto s = random_tensor<E>(B, Cs, N, cl, rng, nx.scale);
  auto t = teacher_for<E>(s, Ct, !cl, rng, nx);
  const Pair in{dtype_of<E>(), B, N, s.view(), t.view()};
  const std::string tag = std::string("f64 pack ") + name + nx.label();
  if (skipped(tag)) return;
  const double eps_ref = nx.eps / nx.scale;
  std::vector<double> us(B * N * Cs, NAN), ut(B * N * Ct, NAN), grad{0.75, -1.25};
  std::vector<PixelNorm> norms(B * 2 * N);
  check_cuda(fa_pack_f64(in, nx.eps, us.data(), ut.data(), norms.data(), nullptr), "fa_pack_f64");
  for (int which = 0; which < 2; ++which) {
    const Tensor<E>& x = which ? t : s;
    const int64_t C = x.C;
    const Units ref = units(x.x64, B, C, N, eps_ref);
    const std::vector<double>& u = which ? ut : us;
    const double eu = rel(u, ref.u);
    expect(eu <= tol, tag + (which ? " u_T" : " u_S"), eu, tol);
    std::vector<double> gu(B * N * C), gu_ref(B * N * C);
    std::normal_distribution<double> nd;
    const double g_scale = nx.scale < 1 ? nx.scale : std::sqrt(nx.scale);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < N * C; ++e) {
        gu[b * N * C + e] = g_scale * nd(rng);
        gu_ref[b * N * C + e] = 3.0 * grad[b] * (gu[b * N * C + e] / nx.scale);
      }
    std::vector<E> gx(B * C * N, from_double<E>(NAN));
    check_cuda(fa_unit_backward_f64(in, which, norms.data(), gu.data(), N * C, C, 1, grad.data(),
                                    3.0, nx.eps, gx.data(), nullptr),
               "fa_unit_backward_f64");
    const double eg = rel(widen_all(gx), saturate<E>(chain(x.x64, ref, gu_ref, B, C, N, eps_ref)));
    const double gtol = std::is_same_v<E, double> ? tol : std::is_same_v<E, float> ? 1e-7 : 4e-3;
    expect(eg <= gtol, tag + (which ? " g_t" : " g_s"), eg, gtol);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--quick") quick = true;
    if (arg.rfind("--only=", 0) == 0) only = arg.substr(7);
  }
  const int h100 = 232448;
  const auto tc = FaPath::kTensorCore, simt = FaPath::kSimt;
  // K = 16 + 32 = 48 (Cs = 5, Ct = 19 padded); N = 11 x 13 = 143 -> Npad 256.
  run_fa<__nv_bfloat16>("bf16 tc mt2", 2, 5, 19, 11, 13, true, false, h100, tc, 2, 2e-2);
  run_fa<__half>("fp16 tc mt1", 2, 5, 19, 11, 13, false, false, 25000, tc, 1, 5e-3);
  run_fa<float>("fp32 tf32 tc mt2", 2, 5, 19, 11, 13, false, true, h100, tc, 2, 5e-3);
  run_fa<float>("fp32 simt", 2, 5, 19, 11, 13, true, false, h100, simt, 1, 1e-5);
  run_fa<double>("fp64 simt", 2, 5, 19, 11, 13, false, false, h100, simt, 1, 1e-12);
  run_fa<__nv_bfloat16>("bf16 simt (K too large)", 1, 5, 19, 11, 13, false, false, 0, simt, 1,
                        2e-2);
  if (!quick) {
    run_fa<float>("fp32 tf32 tc mt1", 1, 40, 24, 9, 15, true, true, 70000, tc, 1, 5e-3);
    run_fa<__nv_bfloat16>("bf16 tc mt2 K=128", 1, 64, 64, 12, 12, false, false, h100, tc, 2, 2e-2);
  }
  // Student == teacher (the teacher in the other layout): exactly 0 loss and gradients, every
  // path. Cs = Ct = 24 -> CsP = CtP = 32.
  const Numerics all{1.0, 1e-5, Tie::kAll}, half{1.0, 1e-5, Tie::kHalf};
  const int m = quick ? 3 : 1;  // first gradient mask
  run_fa<float>("fp32 simt", 2, 24, 24, 11, 13, true, false, h100, simt, 1, 0, all, m);
  run_fa<double>("fp64 simt", 2, 24, 24, 11, 13, true, false, h100, simt, 1, 0, all, m);
  run_fa<__nv_bfloat16>("bf16 tc mt2", 2, 24, 24, 11, 13, true, false, h100, tc, 2, 0, all, m);
  run_fa<__half>("fp16 tc mt1", 2, 24, 24, 11, 13, true, false, 30000, tc, 1, 0, all, m);
  run_fa<float>("fp32 tf32 tc mt2", 2, 24, 24, 11, 13, true, true, h100, tc, 2, 0, all, m);
  if (!quick) {
    run_fa<float>("fp32 tf32 tc mt1", 1, 24, 24, 11, 13, false, true, 60000, tc, 1, 0, all, 3);
    run_fa<__nv_bfloat16>("bf16 simt (K too large)", 1, 24, 24, 11, 13, true, false, 0, simt, 1, 0,
                          all, 3);
  }
  // The teacher equal to the student on the even pixels: the usual tolerances.
  run_fa<float>("fp32 simt", 2, 24, 24, 11, 13, true, false, h100, simt, 1, 1e-5, half, 3);
  run_fa<float>("fp32 tf32 tc mt2", 2, 24, 24, 11, 13, true, true, h100, tc, 2, 5e-3, half, 3);
  run_fa<__nv_bfloat16>("bf16 tc mt2", 2, 24, 24, 11, 13, true, false, h100, tc, 2, 2e-2, half, 3);
  if (!quick)
    run_fa<double>("fp64 simt", 1, 24, 24, 11, 13, true, false, h100, simt, 1, 1e-12, half, 3);
  // Scale: squared norms far outside float32's range, eps below its normal range.
  const Numerics tiny{1e-25, 1e-30}, big{1e30, 1e-5}, eps40{1.0, 1e-40};
  run_fa<float>("fp32 simt", 2, 5, 19, 11, 13, true, false, h100, simt, 1, 1e-5, tiny, 3);
  run_fa<float>("fp32 simt", 2, 5, 19, 11, 13, true, false, h100, simt, 1, 1e-5, big, 3);
  run_fa<float>("fp32 simt", 2, 5, 19, 11, 13, true, false, h100, simt, 1, 1e-5, eps40, 3);
  run_fa<double>("fp64 simt", 2, 5, 19, 11, 13, false, false, h100, simt, 1, 1e-12, {1e200, 1e-5},
                 3);
  run_fa<double>("fp64 simt", 2, 5, 19, 11, 13, false, false, h100, simt, 1, 1e-12,
                 {1e-200, 1e-205}, 3);
  if (!quick) {
    run_fa<float>("fp32 simt", 2, 5, 19, 11, 13, true, false, h100, simt, 1, 1e-5, {1e20, 1e-5}, 3);
    run_fa<float>("fp32 tf32 tc mt2", 2, 5, 19, 11, 13, false, true, h100, tc, 2, 5e-3, big, 3);
    run_fa<__nv_bfloat16>("bf16 tc mt2", 2, 5, 19, 11, 13, true, false, h100, tc, 2, 2e-2, tiny, 3);
    run_fa<__nv_bfloat16>("bf16 tc mt2", 2, 5, 19, 11, 13, true, false, h100, tc, 2, 2e-2, eps40,
                          3);
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
  run_ffa<float>("fp32", 2, 24, 24, 11, 13, 15, 1, 0, true, 0, all, m);
  run_ffa<float>("fp32", 2, 5, 19, 11, 13, 15, 1, 0, true, 1e-5, tiny, 3);
  run_ffa<float>("fp32", 2, 5, 19, 11, 13, 21, 2, 1, true, 1e-5, big, 3);
  run_ffa<float>("fp32", 2, 5, 19, 11, 13, 15, 1, 0, true, 1e-5, eps40, 3);
  run_ffa<double>("fp64", 2, 5, 19, 11, 13, 3, 2, 2, false, 1e-12, {1e-200, 1e-205}, 3);
  if (!quick) {
    run_ffa<double>("fp64", 2, 24, 24, 11, 13, 3, 2, 2, false, 0, all, 3);
    run_ffa<__nv_bfloat16>("bf16", 2, 24, 24, 11, 13, 40, 2, 0, false, 0, all, 3);
    run_ffa<double>("fp64", 2, 5, 19, 11, 13, 17, 1, 1, false, 1e-12, {1e200, 1e-5}, 3);
    run_ffa<__nv_bfloat16>("bf16", 2, 37, 6, 11, 13, 40, 1, 0, false, 1e-5, {1e20, 1e-5}, 3);
    run_ffa<float>("fp32 non-resident", 1, 200, 8, 9, 15, 15, 1, 1, false, 1e-5, tiny, 3);
  }

  // The float64 pack and chain rule of p = 2: float inputs at extreme scales, float64 inputs whose
  // squares overflow (n itself beyond DBL_MAX at 3e307 x 64 channels) or underflow (subnormals),
  // an eps below float32's (1e-40) or float64's (5e-324) normal range.
  run_pack_f64<float>("fp32", 2, 5, 19, 37, true, 1e-15, tiny);
  run_pack_f64<float>("fp32", 2, 5, 19, 37, false, 1e-15, big);
  run_pack_f64<float>("fp32", 2, 5, 19, 37, true, 1e-15, eps40);
  run_pack_f64<__nv_bfloat16>("bf16", 2, 5, 19, 37, true, 1e-15, {1e20, 1e-5});
  run_pack_f64<double>("fp64", 2, 5, 19, 37, false, 1e-14, {1e200, 1e-5});
  run_pack_f64<double>("fp64", 2, 64, 8, 37, true, 1e-14, {3e307, 1e300});
  run_pack_f64<double>("fp64", 2, 5, 19, 37, false, 1e-14, {1e-310, 1e-315});
  run_pack_f64<double>("fp64", 2, 5, 19, 37, true, 1e-14, {1.0, 5e-324});
  run_pack_f64<double>("fp64", 2, 5, 19, 37, false, 1e-14, {1e-200, 1e-5});

  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
