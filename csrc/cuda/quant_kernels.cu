// Low-bit fake quantization on NVIDIA GPUs, torch-free (raw pointers, a stream, cudaError_t).
//
// Math: as csrc/cpu/quant_cpu.cpp (the paper's weight quantizers, the quantized ReLU, affine fake
// quantization). fake_quantize transcribes torch's CUDA kernels expression for expression
// (FakeQuantizeCore.cu: the zero point is added after rounding, per-channel products in float),
// so nvcc contracts them the same way; the int64 levels are bounded first (bounded_level: a NaN
// level is below quant_min and +-Inf saturate, as on the CPU, where torch's conversions are
// undefined).
// Kernels: reductions are block reductions (warp shuffles, float64 accumulators) writing one
// partial per block in a fixed grid (split count from the shapes only, so results are
// deterministic), a one-thread-per-channel kernel finishes them into the device-side parameters
// (delta, scale, grad), then the elementwise pass reads those: no host round trip anywhere.
// Elementwise passes are grid-stride loops; the qparams/step are read from device memory (or
// passed by value when they live on the host).
// Memory: each pass streams the tensor once (weights: 3 reads + 1 write; fake_quantize and
// quant_relu forward: 1 read + 1 write; backward: 2 reads + 1 write), plus O(C x splits) partials.
// Floor: HBM bandwidth (copy rate); per-channel layouts whose channel axis is the fastest
// (inner == 1, e.g. channels_last activations with axis=1) are strided per channel and slower.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/quant_kernels.h"

namespace ffa::cuda {
namespace {

constexpr int kThreads = 256;
// 4 resident blocks per SM (1024 threads) is plenty for streaming kernels and allows 64 registers
// per thread; __launch_bounds__(256) alone made ptxas cap some kernels at 32 and spill.
constexpr int kMinBlocks = 4;
// Each thread handles kUnroll elements per tile (element u at base + u * kThreads, coalesced),
// loading them all before computing: 4 independent loads per thread keep enough bytes in flight
// to approach HBM bandwidth (one 4-byte load per thread per iteration is about half of it).
constexpr int kUnroll = 4;
constexpr int64_t kTile = int64_t(kThreads) * kUnroll;
constexpr int64_t kMaxGrid = 8192;
constexpr int64_t kPerBlockReduce = kTile * 4;  // elements per block in the reduction grids
constexpr int64_t kMaxReduceBlocks = 2048;

// Tiles first_tile, first_tile + tile_stride, ... of [0, n): `base` is this thread's first element.
#define FFA_TILE_LOOP(base, n, first_tile, tile_stride)                      \
  for (int64_t base = int64_t(first_tile) * kTile + threadIdx.x; base < (n); \
       base += int64_t(tile_stride) * kTile)

// Compute type and conversions: float16/bfloat16 compute in float, as torch's kernels do.
template <typename T>
struct Num {
  using C = T;
  static __device__ __forceinline__ C load(T v) { return v; }
  static __device__ __forceinline__ T store(C v) { return v; }
};
template <>
struct Num<__half> {
  using C = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using C = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

#define FFA_QDISPATCH(dt, ...)      \
  switch (dt) {                     \
    case QDtype::kFloat32: {        \
      using T = float;              \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
    case QDtype::kFloat64: {        \
      using T = double;             \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
    case QDtype::kFloat16: {        \
      using T = __half;             \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
    case QDtype::kBFloat16: {       \
      using T = __nv_bfloat16;      \
      __VA_ARGS__;                  \
      break;                        \
    }                               \
    default:                        \
      return cudaErrorInvalidValue; \
  }

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum / max; the result is valid in thread 0. Reusable back to back.
template <bool kMax>
__device__ double block_reduce(double v) {
  __shared__ double part[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? part[lane] : 0.0;
  if (warp == 0) v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  return v;
}

// floor(a / b) for 0 <= a < 2^52, b >= 1 without a 64-bit integer division (a called subroutine
// with a stack frame on the GPU): a float64 estimate, exact to within one, fixed by one step.
__device__ __forceinline__ int64_t div_floor(int64_t a, int64_t b, double inv_b) {
  int64_t q = static_cast<int64_t>(static_cast<double>(a) * inv_b);
  if (q * b > a)
    --q;
  else if ((q + 1) * b <= a)
    ++q;
  return q;
}

// Memory offset of element k (0 <= k < numel / C) of channel c; 32-bit division when it fits.
__device__ __forceinline__ int64_t channel_addr(const QLayout& L, int64_t c, int64_t k) {
  if (L.C == 1) return k;
  if (L.numel <= int64_t(UINT32_MAX)) {
    const uint32_t in = uint32_t(L.inner), o = uint32_t(k) / in, i = uint32_t(k) - o * in;
    return (int64_t(o) * L.C + c) * L.inner + i;
  }
  const int64_t o = div_floor(k, L.inner, L.inv_inner), i = k - o * L.inner;
  return (o * L.C + c) * L.inner + i;
}

__device__ __forceinline__ int64_t channel_of(const QLayout& L, int64_t addr) {
  if (L.C == 1) return 0;
  if (L.numel <= int64_t(UINT32_MAX))
    return int64_t((uint32_t(addr) / uint32_t(L.inner)) % uint32_t(L.C));
  const int64_t seg = div_floor(addr, L.inner, L.inv_inner);
  return seg - div_floor(seg, L.C, L.inv_C) * L.C;
}

struct ReduceGrid {
  int64_t splits, blocks;
};

ReduceGrid reduce_grid(QLayout L) {
  const int64_t m = L.numel / L.C;
  int64_t s = (m + kPerBlockReduce - 1) / kPerBlockReduce;
  s = s < 1 ? 1 : s;
  const int64_t cap = kMaxReduceBlocks / L.C > 1 ? kMaxReduceBlocks / L.C : 1;
  s = s < cap ? s : cap;
  return {s, s * L.C};
}

int64_t elementwise_blocks(int64_t n) {
  const int64_t b = (n + kTile - 1) / kTile;
  return b < 1 ? 1 : (b < kMaxGrid ? b : kMaxGrid);
}

size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// ---- quantize_weight --------------------------------------------------------------------------

// Multi-bit level of a = |w| (see cpu/quant_cpu_loops.h: an estimate from a / delta, fixed by one
// comparison each way against the thresholds k * delta rounded in the compute type).
template <typename C>
__device__ __forceinline__ C wq_level(C a, C delta, C Q) {
  const C qe = fmin(Q, fmax(C(0), floor((a / delta + C(1)) * C(0.5))));
  const C up = a > (C(2) * qe + C(1)) * delta ? C(1) : C(0);
  const C dn = a <= (C(2) * qe - C(1)) * delta ? C(1) : C(0);
  return fmax(C(0), fmin(Q, qe + up) - dn);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    wq_stats_kernel(const T* __restrict__ w, QLayout L, int64_t splits, double* __restrict__ psum,
                    double* __restrict__ pmax) {
  using C = typename Num<T>::C;
  const int64_t c = blockIdx.x / splits, s = blockIdx.x % splits, m = L.numel / L.C;
  double sum = 0, mx = 0;
  FFA_TILE_LOOP(base, m, s, splits) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < m) v[u] = w[channel_addr(L, c, base + u * kThreads)];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < m) {
        const C a = fabs(Num<T>::load(v[u]));
        sum += double(a);
        mx = fmax(mx, double(a));
      }
  }
  sum = block_reduce<false>(sum);
  mx = block_reduce<true>(mx);
  if (threadIdx.x == 0) {
    psum[blockIdx.x] = sum;
    pmax[blockIdx.x] = mx;
  }
}

// delta (bits >= 2) or scale (bits 1) per channel, in the compute type C, stored as double.
template <typename C>
__global__ void wq_finish_stats_kernel(const double* __restrict__ psum,
                                       const double* __restrict__ pmax, QLayout L, int64_t splits,
                                       int bits, double* __restrict__ delta,
                                       double* __restrict__ scale) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= L.C) return;
  double sum = 0, mx = 0;
  for (int64_t s = 0; s < splits; ++s) {
    sum += psum[c * splits + s];
    mx = fmax(mx, pmax[c * splits + s]);
  }
  const C count = C(L.numel / L.C);
  if (isnan(sum)) {  // a NaN weight: its channel's statistics, and outputs, are NaN
    delta[c] = scale[c] = nan("");
  } else if (bits == 1) {
    scale[c] = double(C(sum) / count);
  } else if (bits == 2) {
    const C d = C(0.7) * (C(sum) / count);
    delta[c] = double(C(100) < d ? C(100) : d);
  } else {
    const C d = C(mx) / C((int64_t(1) << bits) - 1);
    delta[c] = double(C(10) < d ? C(10) : d);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    wq_sums_kernel(const T* __restrict__ w, QLayout L, int64_t splits, int bits,
                   const double* __restrict__ delta, double* __restrict__ p1,
                   double* __restrict__ p2) {
  using C = typename Num<T>::C;
  const int64_t c = blockIdx.x / splits, s = blockIdx.x % splits, m = L.numel / L.C;
  const C d = C(delta[c]), Q = C((int64_t(1) << (bits - 1)) - 1);
  double s1 = 0, s2 = 0;
  FFA_TILE_LOOP(base, m, s, splits) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < m) v[u] = w[channel_addr(L, c, base + u * kThreads)];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < m) {
        const C a = fabs(Num<T>::load(v[u]));
        if (bits == 2) {
          s1 += double(a >= d ? a : C(0));
        } else {
          const C q = wq_level(a, d, Q);
          s1 += double(a) * double(q);
          s2 += double(q) * double(q);
        }
      }
  }
  s1 = block_reduce<false>(s1);
  s2 = block_reduce<false>(s2);
  if (threadIdx.x == 0) {
    p1[blockIdx.x] = s1;
    p2[blockIdx.x] = s2;
  }
}

template <typename C>
__global__ void wq_finish_scale_kernel(const double* __restrict__ p1, const double* __restrict__ p2,
                                       QLayout L, int64_t splits, int bits,
                                       const double* __restrict__ delta,
                                       double* __restrict__ scale) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= L.C || isnan(delta[c])) return;  // a NaN channel keeps its NaN scale
  double a = 0, b = 0;
  for (int64_t s = 0; s < splits; ++s) {
    a += p1[c * splits + s];
    b += p2[c * splits + s];
  }
  if (bits == 2)
    scale[c] = double(C(a) / C(L.numel / L.C));
  else
    scale[c] = b > 0 ? double(C(a) / C(b)) : 0.0;  // an all-zero channel gives zeros
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    wq_apply_kernel(const T* __restrict__ w, T* __restrict__ y, QLayout L, int bits,
                    const double* __restrict__ delta, const double* __restrict__ scale) {
  using C = typename Num<T>::C;
  const C Q = C((int64_t(1) << (bits - 1)) - 1);
  FFA_TILE_LOOP(base, L.numel, blockIdx.x, gridDim.x) {
    T wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < L.numel) wv[u] = w[base + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k >= L.numel) continue;
      const int64_t c = channel_of(L, k);
      const C v = Num<T>::load(wv[u]), a = fabs(v), s = C(scale[c]);
      const C q = bits == 1   ? C(1)
                  : bits == 2 ? (a >= C(delta[c]) ? C(1) : C(0))
                              : wq_level(a, C(delta[c]), Q);
      const C sg = v > C(0) ? C(1) : (v < C(0) ? C(-1) : C(0));
      y[k] = Num<T>::store(sg * (s * q));
    }
  }
}

// ---- quant_relu -------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ double clamp_alpha(A v, A lo, A hi) {
  return double(v < lo ? lo : (hi < v ? hi : v));
}

// The step clamped to [1e-3, 5] in alpha's own dtype (the released code clamps the parameter).
__device__ double load_alpha(const QAlpha& a) {
  if (a.ptr == nullptr) return a.val;  // clamped on the host
  switch (a.dt) {
    case QDtype::kFloat64:
      return clamp_alpha(*static_cast<const double*>(a.ptr), 1e-3, 5.0);
    case QDtype::kFloat16:
      return clamp_alpha(__half2float(*static_cast<const __half*>(a.ptr)),
                         __half2float(__float2half_rn(1e-3f)), 5.0f);
    case QDtype::kBFloat16:
      return clamp_alpha(__bfloat162float(*static_cast<const __nv_bfloat16*>(a.ptr)),
                         __bfloat162float(__float2bfloat16_rn(1e-3f)), 5.0f);
    default:
      return clamp_alpha(*static_cast<const float*>(a.ptr), 1e-3f, 5.0f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    qrelu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n, QAlpha alpha,
                         int bits) {
  using C = typename Num<T>::C;
  const C a = C(load_alpha(alpha)), L = C((int64_t(1) << bits) - 1);
  const C thr1 = a * (L - C(1)), top = a * L;
  FFA_TILE_LOOP(base, n, blockIdx.x, gridDim.x) {
    T xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < n) xv[u] = x[base + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k >= n) continue;
      const C v = Num<T>::load(xv[u]);
      C r = v <= C(0) ? C(0) : v;  // NaN stays NaN
      if (v > C(0) && v <= thr1) r = ceil(v / a) * a;
      if (v > thr1) r = top;
      y[k] = Num<T>::store(r);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    qrelu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                          int64_t n, QAlpha alpha, int bits, int ste, int alpha_grad,
                          bool want_galpha, double* __restrict__ partial) {
  using C = typename Num<T>::C;
  const C a = C(load_alpha(alpha)), L = C((int64_t(1) << bits) - 1);
  const C thr2 = a * L, thr_in = alpha_grad == kAgAe ? a * (L - C(1)) : thr2;
  const C g_in =
      alpha_grad == kAgMean ? C(int64_t(1) << (bits - 1)) : (alpha_grad == kAgMin ? C(1) : C(0));
  const bool idnty = ste == kSteIdnty, inplt = ste == kSteInplt;
  double sum = 0;
  FFA_TILE_LOOP(base, n, blockIdx.x, gridDim.x) {
    T xv[kUnroll], dv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < n) {
        xv[u] = x[base + u * kThreads];
        dv[u] = dy[base + u * kThreads];
      }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k >= n) continue;
      const C v = Num<T>::load(xv[u]);
      const T d = dv[u];
      if (dx != nullptr) {
        const bool zero = (v <= C(0) && !idnty) || (v > thr2 && inplt);
        dx[k] = zero ? Num<T>::store(C(0)) : d;
      }
      if (want_galpha) {
        const C gi = alpha_grad == kAgAe ? ceil(v / a) : g_in;
        const C g0 = v > thr_in ? L : ((v > C(0) && v <= thr_in) ? gi : C(0));
        sum += double(Num<T>::load(d)) * double(g0);
      }
    }
  }
  if (!want_galpha) return;
  sum = block_reduce<false>(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void qrelu_finish_kernel(const double* __restrict__ partial, int64_t blocks, double rate,
                                    float* __restrict__ galpha) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0;
  for (int64_t b = 0; b < blocks; ++b) s += partial[b];
  galpha[0] = float(fmin(1.0, fmax(-1.0, s * rate)));
}

// ---- fake_quantize ----------------------------------------------------------------------------

// Which of torch's formulas a launch transcribes (a template parameter: one lean kernel each).
enum FqKernelMode : int { kFqTensor = 0, kFqChannelIntZp = 1, kFqChannelFloatZp = 2 };

int fq_kernel_mode(const QFake& f) {
  return f.float_zp ? kFqChannelFloatZp : (f.per_channel ? kFqChannelIntZp : kFqTensor);
}

#define FFA_FQ_MODE_DISPATCH(f, ...)           \
  switch (fq_kernel_mode(f)) {                 \
    case kFqChannelFloatZp: {                  \
      constexpr int kMode = kFqChannelFloatZp; \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    case kFqChannelIntZp: {                    \
      constexpr int kMode = kFqChannelIntZp;   \
      __VA_ARGS__;                             \
      break;                                   \
    }                                          \
    default: {                                 \
      constexpr int kMode = kFqTensor;         \
      __VA_ARGS__;                             \
    }                                          \
  }

__device__ __forceinline__ float raw_zp(const QParams& q, int64_t c) {
  return q.zp != nullptr ? q.zp[c] : q.zp_val;
}
__device__ __forceinline__ float raw_scale(const QParams& q, int64_t c) {
  return q.scale != nullptr ? q.scale[c] : q.scale_val;
}

// The rounded level r as torch's int64 level, for every r: torch converts unguarded (a NaN or
// out-of-range level is undefined behaviour, and an integer zero point added afterwards can
// wrap). Bounding r first keeps every in-range level, makes a NaN level count as below quant_min
// (torch's result on x86 and in its per-tensor and LSQ CUDA kernels; fmax drops the NaN) and
// saturates +-Inf and huge levels to quant_max / quant_min.
template <typename C>
__device__ __forceinline__ int64_t bounded_level(C r) {
  const C bound = C(1099511627776.0);  // 2^40: far outside [-2^24, 2^24], exact in float
  return static_cast<int64_t>(fmin(fmax(r, -bound), bound));
}

// The zero point used (integral in every mode but kZpRaw with float zero points).
__device__ __forceinline__ float used_zp(float z, int mode, int64_t qmin, int64_t qmax) {
  const float lo = float(qmin), hi = float(qmax);
  switch (mode) {
    case kZpTrunc:
      return truncf(z);
    case kZpRoundClamp:
      return fminf(fmaxf(nearbyintf(z), lo), hi);
    case kZpHalfUpClamp:
      return float(int64_t(fminf(fmaxf(z + 0.5f, lo), hi)));
    default:
      return z;
  }
}

template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fq_forward_kernel(const T* __restrict__ x, T* __restrict__ y, QFake f) {
  using C = typename Num<T>::C;
  const int64_t quant_min = f.qmin, quant_max = f.qmax;
  FFA_TILE_LOOP(base, f.L.numel, blockIdx.x, gridDim.x) {
    T xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < f.L.numel) xv[u] = x[base + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k >= f.L.numel) continue;
      const int64_t c = channel_of(f.L, k);
      const float scale = raw_scale(f.q, c);
      const float inv_scale = 1.0f / scale;
      const C input_val = Num<T>::load(xv[u]);
      if constexpr (kMode == kFqChannelFloatZp) {  // torch: per-channel, floating zero point
        const float zero_point = raw_zp(f.q, c);
        const auto qval = bounded_level(rint(input_val * inv_scale + zero_point));
        const auto bounded_qval = fminf(quant_max, fmaxf(quant_min, qval));
        y[k] = Num<T>::store(C((bounded_qval - zero_point) * scale));
      } else if constexpr (kMode == kFqChannelIntZp) {  // torch: per-channel, integer zero point
        const int64_t zero_point = int64_t(used_zp(raw_zp(f.q, c), f.zp_mode, f.qmin, f.qmax));
        const auto qval = bounded_level(nearbyint(input_val * inv_scale)) + zero_point;
        const auto bounded_qval =
            qval < quant_min ? quant_min : (qval > quant_max ? quant_max : qval);
        y[k] = Num<T>::store(C((bounded_qval - zero_point) * scale));
      } else {  // torch: per tensor
        const int64_t zero_point = int64_t(used_zp(raw_zp(f.q, 0), f.zp_mode, f.qmin, f.qmax));
        const auto qval = bounded_level(nearbyint(input_val * inv_scale) + zero_point);
        y[k] = Num<T>::store(C((fminf(quant_max, fmaxf(quant_min, qval)) - zero_point) * scale));
      }
    }
  }
}

// Non-learnable backward: dx = dy * mask, the mask of the forward formula.
template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fq_backward_mask_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                            QFake f) {
  using C = typename Num<T>::C;
  const int64_t quant_min = f.qmin, quant_max = f.qmax;
  FFA_TILE_LOOP(base, f.L.numel, blockIdx.x, gridDim.x) {
    T xv[kUnroll], dv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * kThreads < f.L.numel) {
        xv[u] = x[base + u * kThreads];
        dv[u] = dy[base + u * kThreads];
      }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k >= f.L.numel) continue;
      const int64_t c = channel_of(f.L, k);
      const float inv_scale = 1.0f / raw_scale(f.q, c);
      const C input_val = Num<T>::load(xv[u]);
      bool mask;
      if constexpr (kMode == kFqChannelFloatZp) {
        const float zero_point = raw_zp(f.q, c);
        const auto qval = bounded_level(rint(input_val * inv_scale + zero_point));
        mask = (quant_min <= qval) && (qval <= quant_max);
      } else if constexpr (kMode == kFqChannelIntZp) {
        const int64_t zero_point = int64_t(used_zp(raw_zp(f.q, c), f.zp_mode, f.qmin, f.qmax));
        const auto qval = bounded_level(nearbyint(input_val * inv_scale)) + zero_point;
        mask = (quant_min <= qval) && (qval <= quant_max);
      } else {
        const int64_t zero_point = int64_t(used_zp(raw_zp(f.q, 0), f.zp_mode, f.qmin, f.qmax));
        const auto qval = bounded_level(nearbyint(input_val * inv_scale) + zero_point);
        mask = (quant_min <= qval) && (qval <= quant_max);
      }
      dx[k] = Num<T>::store(Num<T>::load(dv[u]) * C(mask ? 1 : 0));
    }
  }
}

// LSQ backward (torch's _fake_quantize_grad_learnable_{tensor,channel}_kernel_cuda), one block
// group per channel; dx written when requested, dscale / dzp reduced into per-block partials.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    fq_backward_lsq_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                           QFake f, int64_t splits, float grad_factor, double* __restrict__ ps,
                           double* __restrict__ pz) {
  using C = typename Num<T>::C;
  const int64_t c = blockIdx.x / splits, s = blockIdx.x % splits, m = f.L.numel / f.L.C;
  const int64_t quant_min = f.qmin, quant_max = f.qmax;
  const C scale = C(raw_scale(f.q, c));
  const C inv_scale = C(1.0f / raw_scale(f.q, c));
  const C gf = C(grad_factor);
  double sum_s = 0, sum_z = 0;
  if (!f.per_channel) {
    const int64_t zero_point = int64_t(used_zp(raw_zp(f.q, 0), kZpHalfUpClamp, f.qmin, f.qmax));
    const C dscale_small = C(quant_min - zero_point), dscale_big = C(quant_max - zero_point);
    FFA_TILE_LOOP(base, m, s, splits) {
      T xv[kUnroll], dv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kThreads < m) {
          xv[u] = x[base + u * kThreads];
          dv[u] = dy[base + u * kThreads];
        }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kThreads;
        if (k >= m) continue;
        const C XInput = Num<T>::load(xv[u]), dYInput = Num<T>::load(dv[u]);
        const int64_t xq = bounded_level(nearbyint(XInput * inv_scale) + zero_point);
        if (dx != nullptr) dx[k] = Num<T>::store(dYInput * C(xq >= quant_min && xq <= quant_max));
        const C xfq =
            static_cast<C>((xq > quant_max ? quant_max : (xq < quant_min ? quant_min : xq)) -
                           zero_point) *
            scale;
        if (xq < quant_min || xq > quant_max) {
          sum_z += double((dYInput) * (-1) * scale * gf);
          sum_s +=
              double(((xq < quant_min) ? (dYInput * dscale_small) : (dYInput * dscale_big)) * gf);
        } else {
          sum_s += double((dYInput) * (xfq - (XInput)) * inv_scale * gf);
        }
      }
    }
  } else {
    const C zero_point_input = C(used_zp(raw_zp(f.q, c), kZpRoundClamp, f.qmin, f.qmax));
    const C dscale_small = C(quant_min) - zero_point_input;
    const C dscale_big = C(quant_max) - zero_point_input;
    FFA_TILE_LOOP(base, m, s, splits) {
      T xv[kUnroll], dv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * kThreads < m) {
          const int64_t addr = channel_addr(f.L, c, base + u * kThreads);
          xv[u] = x[addr];
          dv[u] = dy[addr];
        }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k = base + u * kThreads;
        if (k >= m) continue;
        const int64_t addr = channel_addr(f.L, c, k);
        const C x_input = Num<T>::load(xv[u]), dy_input = Num<T>::load(dv[u]);
        const int64_t xqi =
            bounded_level(nearbyint(x_input * inv_scale) + static_cast<int64_t>(zero_point_input));
        if (dx != nullptr)
          dx[addr] = Num<T>::store(dy_input * C(xqi >= quant_min && xqi <= quant_max));
        const C xfqi =
            static_cast<C>((C((xqi > quant_max ? quant_max : (xqi < quant_min ? quant_min : xqi))) -
                            zero_point_input) *
                           scale);
        if (xqi < quant_min || xqi > quant_max) {
          sum_z += double(dy_input * (-1) * scale * gf);
          sum_s += double(
              ((xqi < quant_min) ? (dy_input * dscale_small) : (dy_input * dscale_big)) * gf);
        } else {
          sum_s += double(dy_input * (xfqi - x_input) * inv_scale * gf);
        }
      }
    }
  }
  sum_s = block_reduce<false>(sum_s);
  sum_z = block_reduce<false>(sum_z);
  if (threadIdx.x == 0) {
    ps[blockIdx.x] = sum_s;
    pz[blockIdx.x] = sum_z;
  }
}

__global__ void fq_finish_kernel(const double* __restrict__ ps, const double* __restrict__ pz,
                                 int64_t channels, int64_t splits, float* __restrict__ gscale,
                                 float* __restrict__ gzp) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  double a = 0, b = 0;
  for (int64_t s = 0; s < splits; ++s) {
    a += ps[c * splits + s];
    b += pz[c * splits + s];
  }
  if (gscale != nullptr) gscale[c] = float(a);
  if (gzp != nullptr) gzp[c] = float(b);
}

int64_t per_channel_blocks(int64_t channels) { return (channels + kThreads - 1) / kThreads; }

}  // namespace

// ---- launch functions
// -----------------------------------------------------------------------------

size_t quantize_weight_workspace_bytes(QLayout L) {
  const ReduceGrid g = reduce_grid(L);
  return 4 * align16(sizeof(double) * g.blocks) + 2 * align16(sizeof(double) * L.C);
}

cudaError_t quantize_weight_cuda(QDtype dt, const void* w, void* y, QLayout L, int bits,
                                 void* workspace, cudaStream_t stream) {
  if (L.numel == 0) return cudaSuccess;
  if (bits < 1 || bits > 8 || L.C < 1 || L.numel % L.C != 0) return cudaErrorInvalidValue;
  const ReduceGrid g = reduce_grid(L);
  char* ws = static_cast<char*>(workspace);
  const size_t pb = align16(sizeof(double) * g.blocks), cb = align16(sizeof(double) * L.C);
  double* p1 = reinterpret_cast<double*>(ws);
  double* p2 = reinterpret_cast<double*>(ws + pb);
  double* p3 = reinterpret_cast<double*>(ws + 2 * pb);
  double* p4 = reinterpret_cast<double*>(ws + 3 * pb);
  double* delta = reinterpret_cast<double*>(ws + 4 * pb);
  double* scale = reinterpret_cast<double*>(ws + 4 * pb + cb);
  const int64_t fb = per_channel_blocks(L.C);
  FFA_QDISPATCH(dt, {
    using C = typename Num<T>::C;
    const T* wp = static_cast<const T*>(w);
    wq_stats_kernel<T><<<g.blocks, kThreads, 0, stream>>>(wp, L, g.splits, p1, p2);
    wq_finish_stats_kernel<C><<<fb, kThreads, 0, stream>>>(p1, p2, L, g.splits, bits, delta, scale);
    if (bits >= 2) {
      wq_sums_kernel<T><<<g.blocks, kThreads, 0, stream>>>(wp, L, g.splits, bits, delta, p3, p4);
      wq_finish_scale_kernel<C>
          <<<fb, kThreads, 0, stream>>>(p3, p4, L, g.splits, bits, delta, scale);
    }
    wq_apply_kernel<T><<<elementwise_blocks(L.numel), kThreads, 0, stream>>>(wp, static_cast<T*>(y),
                                                                             L, bits, delta, scale);
  });
  return cudaGetLastError();
}

cudaError_t quant_relu_forward_cuda(QDtype dt, const void* x, void* y, int64_t n, QAlpha alpha,
                                    int bits, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (bits < 1 || bits > 8) return cudaErrorInvalidValue;
  FFA_QDISPATCH(dt, {
    qrelu_forward_kernel<T><<<elementwise_blocks(n), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), n, alpha, bits);
  });
  return cudaGetLastError();
}

size_t quant_relu_backward_workspace_bytes(int64_t n) {
  return align16(sizeof(double) * elementwise_blocks(n));
}

cudaError_t quant_relu_backward_cuda(QDtype dt, const void* grad, const void* x, void* dx,
                                     int64_t n, QAlpha alpha, int bits, int ste, int alpha_grad,
                                     double rate, float* galpha, void* workspace,
                                     cudaStream_t stream) {
  if (bits < 1 || bits > 8) return cudaErrorInvalidValue;
  if (n == 0) {
    if (galpha != nullptr) return cudaMemsetAsync(galpha, 0, sizeof(float), stream);
    return cudaSuccess;
  }
  const int64_t blocks = elementwise_blocks(n);
  double* partial = static_cast<double*>(workspace);
  FFA_QDISPATCH(dt, {
    qrelu_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(dx), n, alpha, bits,
        ste, alpha_grad, galpha != nullptr, partial);
  });
  if (galpha != nullptr) qrelu_finish_kernel<<<1, 32, 0, stream>>>(partial, blocks, rate, galpha);
  return cudaGetLastError();
}

cudaError_t fake_quantize_forward_cuda(QDtype dt, const void* x, void* y, const QFake& f,
                                       cudaStream_t stream) {
  if (f.L.numel == 0) return cudaSuccess;
  FFA_QDISPATCH(dt, FFA_FQ_MODE_DISPATCH(f, {
                  fq_forward_kernel<T, kMode>
                      <<<elementwise_blocks(f.L.numel), kThreads, 0, stream>>>(
                          static_cast<const T*>(x), static_cast<T*>(y), f);
                }));
  return cudaGetLastError();
}

size_t fake_quantize_backward_workspace_bytes(QLayout L) {
  return 2 * align16(sizeof(double) * reduce_grid(L).blocks);
}

cudaError_t fake_quantize_backward_cuda(QDtype dt, const void* grad, const void* x, void* dx,
                                        const QFake& f, bool learnable, float grad_factor,
                                        float* gscale, float* gzp, void* workspace,
                                        cudaStream_t stream) {
  if (f.L.numel == 0) {
    if (gscale != nullptr) {
      const cudaError_t e = cudaMemsetAsync(gscale, 0, sizeof(float) * f.L.C, stream);
      if (e != cudaSuccess) return e;
    }
    if (gzp != nullptr) return cudaMemsetAsync(gzp, 0, sizeof(float) * f.L.C, stream);
    return cudaSuccess;
  }
  if (!learnable) {
    if (dx == nullptr) return cudaSuccess;
    FFA_QDISPATCH(
        dt, FFA_FQ_MODE_DISPATCH(f, {
          fq_backward_mask_kernel<T, kMode><<<elementwise_blocks(f.L.numel), kThreads, 0, stream>>>(
              static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<T*>(dx), f);
        }));
    return cudaGetLastError();
  }
  const ReduceGrid g = reduce_grid(f.L);
  double* ps = static_cast<double*>(workspace);
  double* pz =
      reinterpret_cast<double*>(static_cast<char*>(workspace) + align16(sizeof(double) * g.blocks));
  FFA_QDISPATCH(dt, {
    fq_backward_lsq_kernel<T>
        <<<g.blocks, kThreads, 0, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(x),
                                            static_cast<T*>(dx), f, g.splits, grad_factor, ps, pz);
  });
  if (gscale != nullptr || gzp != nullptr)
    fq_finish_kernel<<<per_channel_blocks(f.L.C), kThreads, 0, stream>>>(ps, pz, f.L.C, g.splits,
                                                                         gscale, gzp);
  return cudaGetLastError();
}

}  // namespace ffa::cuda
