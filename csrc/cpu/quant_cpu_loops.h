// Inner loops of the CPU quantizers (csrc/cpu/quant_cpu.cpp), written once and compiled per ISA.
//
// No include guard on purpose: quant_cpu.cpp includes this file once per instruction set, inside
// `namespace FFA_QUANT_ISA` and a `#pragma GCC target(...)` + optimize("no-trapping-math") region,
// so GCC if-converts the selects and vectorizes each copy for that ISA. The loops work on one
// contiguous float/double span; the caller converts float16/bfloat16 and walks the layout.
// The helpers below replace <cmath>/<algorithm>: a function defined outside the region keeps the
// default options when inlined and blocks vectorization. fma_ is used exactly where torch's own
// kernels fuse (its CPU kernels are built with FMA contraction on), so values match bit for bit.
// Reductions accumulate in float64 in kLanes independent lanes (vectorizable without
// reassociation), summed in a fixed order: results do not depend on the thread count. The lane
// loops carry `#pragma GCC unroll 1`: completely unrolled, GCC no longer vectorizes them.

constexpr int kLanes = 16;

inline float rnd(float v) { return __builtin_rintf(v); }  // half to even (default rounding mode)
inline double rnd(double v) { return __builtin_rint(v); }
inline float fabs_(float v) { return __builtin_fabsf(v); }
inline double fabs_(double v) { return __builtin_fabs(v); }
inline float fma_(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fma_(double a, double b, double c) { return __builtin_fma(a, b, c); }
template <typename T>
inline T ceil_(T v) {  // exact: rint is exact, so is the +1 correction
  const T r = rnd(v);
  return r < v ? r + T(1) : r;
}
template <typename T>
inline T floor_(T v) {
  const T r = rnd(v);
  return r > v ? r - T(1) : r;
}
template <typename T>
inline T max_(T lo, T v) {  // a NaN v gives lo, as std::fmax does
  return lo < v ? v : lo;
}
template <typename T>
inline T min_(T hi, T v) {
  return v < hi ? v : hi;
}
template <typename T>
inline T sign_(T v) {
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}
// bool -> 0/1 as a select: a (T)bool conversion is not vectorized by GCC.
template <typename T>
inline T one_if(bool b) {
  return b ? T(1) : T(0);
}

// ---- weight quantizers ----------------------------------------------------------------------

// sum |x| and max |x| over a span (max in T is exact).
template <typename T>
void wq_stats(const T* __restrict x, int64_t n, double& sum, T& mx) {
  double s[kLanes] = {};
  T m[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) {
      const T a = fabs_(x[i + j]);
      s[j] += double(a);
      m[j] = max_(m[j], a);
    }
  for (; i < n; ++i) {
    const T a = fabs_(x[i]);
    s[0] += double(a);
    m[0] = max_(m[0], a);
  }
  for (int j = 0; j < kLanes; ++j) {
    sum += s[j];
    mx = max_(mx, m[j]);
  }
}

// sum of |x| over the entries with |x| >= delta (the ternary scale's numerator).
template <typename T>
double wq_ternary_sum(const T* __restrict x, int64_t n, T delta) {
  double s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) {
      const T a = fabs_(x[i + j]);
      s[j] += double(a >= delta ? a : T(0));
    }
  for (; i < n; ++i) {
    const T a = fabs_(x[i]);
    s[0] += double(a >= delta ? a : T(0));
  }
  double r = 0;
  for (int j = 0; j < kLanes; ++j) r += s[j];
  return r;
}

// Level of |x| = a for the multi-bit rule: q = #{k in 1,3,..,2Q-1 : a > fl(k*delta)}, i.e. 0 for
// a <= delta, q for (2q-1)delta < a <= (2q+1)delta, Q above (2Q-1)delta. The thresholds are
// rounded exactly as the released code rounds them (k*delta in T). An estimate from a/delta is
// within one level of the truth; one comparison each way against the exact thresholds fixes it.
// (a/delta, not a*(1/delta): 1/delta overflows for a subnormal delta, a/delta <= 2^b never does;
// delta = 0 means an all-zero channel: 0/0 is NaN, which max_ maps to level 0.)
template <typename T>
inline T wq_level(T a, T delta, T Q) {
  const T qe = min_(Q, max_(T(0), floor_((a / delta + T(1)) * T(0.5))));
  const T up = a > (T(2) * qe + T(1)) * delta ? T(1) : T(0);
  const T dn = a <= (T(2) * qe - T(1)) * delta ? T(1) : T(0);
  return max_(T(0), min_(Q, qe + up) - dn);  // the clamps keep the fix inside 0..Q
}

// sum a*q and sum q^2 (the least-squares scale's numerator and denominator).
template <typename T>
void wq_level_sums(const T* __restrict x, int64_t n, T delta, T Q, double& saq, double& sqq) {
  double s1[kLanes] = {}, s2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) {
      const T a = fabs_(x[i + j]);
      const T q = wq_level(a, delta, Q);
      s1[j] += double(a) * double(q);
      s2[j] += double(q) * double(q);
    }
  for (; i < n; ++i) {
    const T a = fabs_(x[i]);
    const T q = wq_level(a, delta, Q);
    s1[0] += double(a) * double(q);
    s2[0] += double(q) * double(q);
  }
  for (int j = 0; j < kLanes; ++j) {
    saq += s1[j];
    sqq += s2[j];
  }
}

// y = sign(x) * (s * q(x)); bits 1: q = 1, bits 2: q = [|x| >= delta], else the level rule.
template <typename T>
void wq_apply(const T* __restrict x, T* __restrict y, int64_t n, int bits, T delta, T Q, T s) {
  if (bits == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] = sign_(x[i]) * s;
  } else if (bits == 2) {
    for (int64_t i = 0; i < n; ++i) {
      const T q = one_if<T>(fabs_(x[i]) >= delta);
      y[i] = sign_(x[i]) * (s * q);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T q = wq_level(fabs_(x[i]), delta, Q);
      y[i] = sign_(x[i]) * (s * q);
    }
  }
}

// ---- affine fake quantization ---------------------------------------------------------------
// FqParams and FqMode are defined by quant_cpu.cpp, outside the per-ISA namespaces.

// Quantized level before clamping, in the compute type C (float; double for float64 inputs).
template <int kMode, typename C>
inline C fq_level(C x, float inv, float zp) {
  if constexpr (kMode == kIntZp) {
    return rnd(x * C(inv)) + C(zp);
  } else if constexpr (std::is_same_v<C, float>) {
    return rnd(fma_(x, inv, zp));
  } else {  // float64 input, float zero point: torch rounds in float (lrintf)
    return C(rnd(float(fma_(x, C(inv), C(zp)))));
  }
}

// y = (clamp(q) - zp) * scale with torch's rounding: per-tensor multiplies in float; per-channel
// in double, which differs only for float64 outputs and for float zero points.
template <int kMode, bool kChannel, typename T>
inline T fq_output(T qc, float zp, float scale) {
  if constexpr (kChannel && (kMode == kFloatZp || std::is_same_v<T, double>)) {
    return T((double(qc) - double(zp)) * double(scale));
  } else {
    return T(float(qc - T(zp)) * scale);
  }
}

template <int kMode, bool kChannel, bool kRow, typename T>
void fq_forward(const T* __restrict x, T* __restrict y, int64_t n, const FqParams& p) {
  const float inv0 = p.inv[0], sc0 = p.scale[0], zp0 = p.zp[0];
  const T lo = T(p.lo), hi = T(p.hi);
  for (int64_t j = 0; j < n; ++j) {
    const float inv = kRow ? p.inv[j] : inv0, sc = kRow ? p.scale[j] : sc0;
    const float zp = kRow ? p.zp[j] : zp0;
    const T q = fq_level<kMode, T>(x[j], inv, zp);
    y[j] = fq_output<kMode, kChannel, T>(min_(hi, max_(lo, q)), zp, sc);
  }
}

// Non-learnable backward: dx = dy * [quant_min <= q <= quant_max] (torch's dY * mask).
template <int kMode, bool kRow, typename T>
void fq_backward_mask(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n,
                      const FqParams& p) {
  const float inv0 = p.inv[0], zp0 = p.zp[0];
  const T lo = T(p.lo), hi = T(p.hi);
  for (int64_t j = 0; j < n; ++j) {
    const float inv = kRow ? p.inv[j] : inv0, zp = kRow ? p.zp[j] : zp0;
    const T q = fq_level<kMode, T>(x[j], inv, zp);
    dx[j] = dy[j] * one_if<T>((lo <= q) & (q <= hi));
  }
}

// Learnable (LSQ) backward, torch's formulas: q = rint(fma(x, inv, zp)) with the backward zero
// point; inside [qmin, qmax]: dx = dy, dscale = dy * (fma(clamp(q) - zp, s, -x)) * inv * g, dzp =
// 0; outside: dx = 0, dscale = dy * (qmin|qmax - zp) * g, dzp = -dy * s * g. A NaN level is below
// qmin, as in torch (its int64 level of a NaN is INT64_MIN) and as in the forward's clamp. Row
// mode adds the per-element qparam grads to acc_s[j], acc_z[j]; run mode adds the span's sums to
// acc_s[0], acc_z[0].
template <bool kDx, bool kRow, typename T>
void fq_backward_lsq(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n,
                     const FqParams& p, float grad_factor, double* __restrict acc_s,
                     double* __restrict acc_z) {
  const T lo = T(p.lo), hi = T(p.hi), g = T(grad_factor);
  auto one = [&](int64_t j, T& ds, T& dz) {
    const T inv = T(kRow ? p.inv[j] : p.inv[0]), sc = T(kRow ? p.scale[j] : p.scale[0]);
    const T zp = T(kRow ? p.zp[j] : p.zp[0]);
    const T xv = x[j], d = dy[j];
    const T q = rnd(fma_(xv, inv, zp));
    const bool below = !(q >= lo), above = q > hi, inside = !(below | above);
    const T qc = min_(hi, max_(lo, q));
    const T ds_in = d * fma_(qc - zp, sc, -xv) * inv * g;
    const T edge = below ? lo - zp : hi - zp;
    const T ds_out = d * edge * g;
    const T dz_out = d * T(-1) * sc * g;
    if constexpr (kDx) dx[j] = d * one_if<T>(inside);
    ds = inside ? ds_in : ds_out;
    dz = inside ? T(0) : dz_out;
  };
  if constexpr (kRow) {
    for (int64_t j = 0; j < n; ++j) {
      T ds, dz;
      one(j, ds, dz);
      acc_s[j] += double(ds);
      acc_z[j] += double(dz);
    }
  } else {
    double s[kLanes] = {}, z[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 1
      for (int j = 0; j < kLanes; ++j) {
        T ds, dz;
        one(i + j, ds, dz);
        s[j] += double(ds);
        z[j] += double(dz);
      }
    for (; i < n; ++i) {
      T ds, dz;
      one(i, ds, dz);
      s[0] += double(ds);
      z[0] += double(dz);
    }
    for (int j = 0; j < kLanes; ++j) {
      acc_s[0] += s[j];
      acc_z[0] += z[j];
    }
  }
}

// ---- quantized ReLU -------------------------------------------------------------------------
// Forward: 0 for x <= 0, ceil(x/a)*a for 0 < x <= a(L-1), L*a above; NaN stays NaN.
template <typename T>
void qrelu_forward(const T* __restrict x, T* __restrict y, int64_t n, T a, T L) {
  const T thr1 = a * (L - T(1)), top = a * L;
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    const T stepped = ceil_(v / a) * a;
    T r = v <= T(0) ? T(0) : v;
    r = (v > T(0)) & (v <= thr1) ? stepped : r;
    y[i] = v > thr1 ? top : r;
  }
}

// Backward, one fused pass: dx = dy where the STE passes it (zeroed, not multiplied, as the
// released code does) and sum dy * g0 for the step's gradient: g0 = g_in inside (0, thr_in] and L
// above thr_in, where thr_in = L*a ("mean", "min", "pact") or (L-1)*a ("ae", g_in = ceil(x/a)).
// QreluBackParams is defined by quant_cpu.cpp.
template <bool kDx, bool kGa, bool kAe, typename T>
double qrelu_backward(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t n,
                      T a, T L, const QreluBackParams& p) {
  const T thr2 = a * L, thr_in = kAe ? a * (L - T(1)) : thr2;
  const T g_in = T(p.g_in);
  const bool idnty = p.idnty, inplt = p.inplt;
  auto one = [&](int64_t i) {
    const T v = x[i], d = dy[i];
    if constexpr (kDx) {
      const bool zero = ((v <= T(0)) & !idnty) | ((v > thr2) & inplt);
      dx[i] = zero ? T(0) : d;
    }
    const T gi = kAe ? ceil_(v / a) : g_in;
    const T r = (v > T(0)) & (v <= thr_in) ? gi : T(0);
    return double(d) * double(v > thr_in ? L : r);
  };
  double s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) {
      const double t = one(i + j);
      if constexpr (kGa) s[j] += t;
    }
  for (; i < n; ++i) {
    const double t = one(i);
    if constexpr (kGa) s[0] += t;
  }
  double r = 0;
  for (int j = 0; j < kLanes; ++j) r += s[j];
  return r;
}
