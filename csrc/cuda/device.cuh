// Device helpers shared by the loss kernels: element conversion, fixed-order block reductions,
// launch checking, workspace carving, and the few PTX instructions used (cp.async, ldmatrix,
// mma.sync). Inline functions only (no kernels), so each .cu owns its kernel instantiations.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace ffa::cuda {

// ---- error handling ------------------------------------------------------------------------
#define FFA_CUDA_TRY(expr)              \
  do {                                  \
    const cudaError_t ffa_err_ = (expr); \
    if (ffa_err_ != cudaSuccess) return ffa_err_; \
  } while (0)
// After a <<<>>> launch: configuration errors surface here, without synchronizing.
#define FFA_CHECK_LAUNCH() FFA_CUDA_TRY(cudaGetLastError())

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Carves 256-byte aligned pieces out of one workspace allocation, in call order.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    used = (used + 255) / 256 * 256;
    T* p = reinterpret_cast<T*>(base ? base + used : nullptr);
    used += count * sizeof(T);
    return p;
  }
};

// ---- element conversion --------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Widen an element to the accumulation type A (float or double).
template <typename A, typename T>
__device__ __forceinline__ A widen(T v) {
  return static_cast<A>(to_float(v));
}
template <>
__device__ __forceinline__ double widen<double, double>(double v) {
  return v;
}

template <typename T>
__device__ __forceinline__ T narrow(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half narrow<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
// From the accumulation type to the storage type (double -> double stays exact).
template <typename T, typename A>
__device__ __forceinline__ T store_as(A v) {
  return narrow<T>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double store_as<double, double>(double v) {
  return v;
}

template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// ---- scale-safe unit pixels ----------------------------------------------------------------
// Every kernel normalizes pixels through these, in float64 for every input type, so that norms,
// unit pixels and their backward are what float64 arithmetic gives on the input values (rounded
// once to the compute dtype) for any finite magnitude and any eps > 0.
//   u = x / (n + eps),  g_x = r (g_u - xh (u . g_u)),  r = 1 / (n + eps),  xh = x / n (0 at n = 0)
// (the backward never forms n^3, so huge norms cannot overflow it).

// n of a pixel from the plain float64 sum of squares ss of its values x[c * stride], c < C.
// Squares of float32 (and narrower) values always fit float64's range. float64 values may not:
// when ss is inf or below 2^-1000 (squares may have underflowed) the pixel is summed again scaled
// by 2^-k, k the exponent of max |x_c| (as LAPACK's nrm2 scales), n = ns 2^k. A serial loop: rare.
template <typename E>
__device__ __forceinline__ PixelNorm pixel_norm(double ss, const E* x, int64_t C, int64_t stride) {
  if constexpr (std::is_same_v<E, double>) {
    if (!(ss >= 0x1p-1000 && ss <= DBL_MAX)) {
      double m = 0.0;
      for (int64_t c = 0; c < C; ++c) m = fmax(m, fabs(x[c * stride]));
      if (m > 0.0 && m <= DBL_MAX) {
        const int k = ilogb(m);
        double t = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double v = ldexp(x[c * stride], -k);
          t += v * v;
        }
        return PixelNorm{sqrt(t), k};
      }
    }
  }
  return PixelNorm{sqrt(ss), 0};
}

// How to apply one pixel's normalization. Usually u = x w with w = 1 / (n + eps) and xh = x h with
// h = 1 / n. When n + eps is outside [2^-1020, 2^1020] (1 / (n + eps) would not be a normal
// float64: an all-zero pixel with a subnormal eps, or float64 norms near the range ends), `wide`
// scales by exact powers of two instead: u = (x 2^-e) w, w = 1 / ((n + eps) 2^-e), and
// xh = (x 2^-en) h, h = 1 / ns.
struct UnitScale {
  double w, h;
  int e, en;
  bool wide;
};

__device__ __forceinline__ UnitScale unit_scale(PixelNorm nm, double eps) {
  UnitScale s{0.0, nm.ns > 0.0 ? 1.0 / nm.ns : 0.0, 0, nm.en, false};
  const double d = nm.en == 0 ? nm.ns + eps : 0.0;
  if ((d >= 0x1p-1020 && d <= 0x1p1020) || !(nm.ns <= DBL_MAX)) {  // NaN / inf: propagate
    s.w = 1.0 / d;
    return s;
  }
  const int en = nm.ns > 0.0 ? nm.en + ilogb(nm.ns) : INT_MIN / 2, ee = ilogb(eps);
  s.e = en > ee ? en : ee;
  s.w = 1.0 / ((nm.ns > 0.0 ? ldexp(nm.ns, nm.en - s.e) : 0.0) + ldexp(eps, -s.e));  // in (1/4, 1]
  s.wide = true;
  return s;
}

// u = x / (n + eps) (0 for an all-zero pixel, whatever eps).
__device__ __forceinline__ double unit_of(double x, const UnitScale& s) {
  return s.wide ? ldexp(x, -s.e) * s.w : x * s.w;
}
// xh = x / n (0 for an all-zero pixel).
__device__ __forceinline__ double xhat_of(double x, const UnitScale& s) {
  return s.wide ? ldexp(x, -s.en) * s.h : x * s.h;
}
// g_x = t / (n + eps) for t = g_u - xh (u . g_u) (may legitimately overflow when eps is tiny).
__device__ __forceinline__ double unit_grad_of(double t, const UnitScale& s) {
  return s.wide ? ldexp(t * s.w, -s.e) : t * s.w;
}

// The same normalization applied in the compute dtype A, for the per-element loops of FFA's
// memory-bound passes (float64 conversions run at 1/8 of the FMA rate there): when w and h lie
// well inside A's range (always for float64 outside `wide`; for float32 within [2^-100, 2^100],
// i.e. norms between ~1e-30 and ~1e30), u = x w, xh = x h and g_x = t w in A, which is at most one
// rounding more than float64 (<= 1 ulp); other pixels take the float64 forms above per element.
template <typename A>
struct ComputeScale {
  UnitScale s;
  A w, h;
  bool fast;
};

template <typename A>
__device__ __forceinline__ ComputeScale<A> compute_scale(PixelNorm nm, double eps) {
  constexpr bool kF64 = std::is_same_v<A, double>;
  constexpr double lo = kF64 ? DBL_MIN : 0x1p-100, hi = kF64 ? DBL_MAX : 0x1p100;
  const UnitScale s = unit_scale(nm, eps);
  const bool fast = !s.wide && s.w >= lo && s.w <= hi && (s.h == 0.0 || (s.h >= lo && s.h <= hi));
  return ComputeScale<A>{s, static_cast<A>(s.w), static_cast<A>(s.h), fast};
}
template <typename A>
__device__ __forceinline__ A unit_of(A x, const ComputeScale<A>& c) {
  return c.fast ? x * c.w : static_cast<A>(unit_of(static_cast<double>(x), c.s));
}
template <typename A>
__device__ __forceinline__ A xhat_of(A x, const ComputeScale<A>& c) {
  return c.fast ? x * c.h : static_cast<A>(xhat_of(static_cast<double>(x), c.s));
}
template <typename A>
__device__ __forceinline__ A unit_grad_of(A t, const ComputeScale<A>& c) {
  return c.fast ? t * c.w : static_cast<A>(unit_grad_of(static_cast<double>(t), c.s));
}

// ---- fixed-order reductions (bitwise repeatable) -------------------------------------------
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `scratch` holds 32 values. Ends with a barrier, so it may be called again right away.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < nw; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// ---- PTX wrappers (sm_80+) -----------------------------------------------------------------
// tools/cuda_emu/cuda_emu.h provides CPU versions of exactly these when the kernels are emulated.
#ifndef FFA_CUDA_EMULATION
// Rounds a float to the nearest TF32 value (what the tensor cores would otherwise truncate).
__device__ __forceinline__ float round_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (the operands are reused from shared memory).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(const void* smem, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(const void* smem, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem))
               : "memory");
}

// D (16x8 fp32) += A (16x16) B (16x8), A row-major, B column-major, 16-bit operands.
template <typename E>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D (16x8 fp32) += A (16x8) B (8x8), TF32 operands passed as float bit patterns.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // FFA_CUDA_EMULATION

// Two floats (each exactly -1, 0 or 1 here) packed as a 16-bit pair, low half first.
template <typename E>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Runs f(T{}) with the element type T of a runtime Dtype (host side).
template <typename F>
cudaError_t dispatch_dtype(Dtype t, F&& f) {
  switch (t) {
    case Dtype::kHalf: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
    case Dtype::kFloat: return f(float{});
    case Dtype::kDouble: return f(double{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace ffa::cuda
