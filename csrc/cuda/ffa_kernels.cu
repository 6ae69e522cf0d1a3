// Fast feature-affinity loss (FFA) on CUDA: fused passes, probes Z read from memory or regenerated
// on the fly by Philox (csrc/philox.h), so the Philox path never stores Z.
//
// Math, per sample, u_i = x_i / (||x_i|| + eps):
//   P_S = U_S Z [Cs, k],  Y = U_S^T P_S - U_T^T P_T [N, k] (= D Z),
//   L = sum_ik f(Y_ik) / (k N^2), f = |.| (p = 1) or square (p = 2).
//   Backward: W = g f'(Y) / (k N^2), Q_X = U_X W, dL/du_X = sign_X (W P_X^T + Z Q_X^T)
//   (sign_S = +1, sign_T = -1), chained through the normalization.
// Pixel norms are computed in float64 and stored; unit pixels and the chain rule are formed on the
// fly in the compute dtype (device.cuh, ComputeScale: scale-safe for any finite input and eps > 0).
// The student and teacher terms of Y have their own accumulators, so equal inputs give Y = 0 and
// zero gradients exactly.
// Passes (each a grid of 128-pixel blocks x B; memory-bound on S and T):
//   forward  1. project (S, then T): one read of X -> norms and per-block partials of U Z;
//               a fixed-order reduction over the blocks gives P (deterministic, no atomics).
//            2. backproject: one read of S and T -> Y (written once, [B, N, k]: the op returns it
//               for the backward) and per-block loss partials -> fixed-order final sum.
//   backward 1. project with W (from Y) in place of Z: norms and Q_X (one read of X and of Y).
//            2. grad: reads X (its second sweep over the block hits L1/L2), Y, Z (none with
//               Philox) -> G on the fly and the chain rule -> g_x written once. For k > 16 the
//               probes do not fit in registers: G goes to a [B, C, N] workspace and the shared
//               chain-rule kernel (fa_kernels.cu) finishes.
// Floor: bytes. Forward reads S and T twice and writes Y; backward reads X twice and Y twice and
// writes g_x per tensor that needs a gradient (a Z in memory adds N k per read). FLOPs are ~2 C k
// per pixel per pass (FMA, float32), well under the memory time on current GPUs.
#include <algorithm>
#include <type_traits>

#include "cuda/device.cuh"
#include "cuda/internal.h"
#include "philox.h"

namespace ffa::cuda {
namespace {

constexpr int kBP = 128;  // pixels per block (all FFA kernels)
constexpr int kProjThreads = 256;
constexpr int kCC = 32;        // channels per chunk in the projection
constexpr int kJW = 32;        // probes per window in the projection
constexpr int kLDX = kBP + 2;  // shared row stride of feature chunks (spreads the banks)
constexpr int kKT = 16;        // probes per register window (backproject, grad)
constexpr int kLDW = kKT + 1;  // shared row stride of per-pixel probe rows (conflict-free)
constexpr int kGC = 32;        // channels per P / Q chunk staged in shared memory
constexpr int kLDZ = kJW + 1;  // shared row stride of the scaled probes (conflict-free)
constexpr size_t kResidentSmem = 96 * 1024;  // projection keeps the whole block tile up to this

// ---- probe sources: value(b, i, j) of Z (or of W) -----------------------------------------
template <typename A>
struct ProbeMem {  // Z [Bz, N, k] in memory; zb = 0 when the batch shares one Z
  const A* z;
  int64_t zb;
  static constexpr bool kPhilox = false;
  __device__ __forceinline__ A value(int64_t b, int64_t i, int64_t j, int64_t k) const {
    return z[b * zb + i * k + j];
  }
};

template <typename A>
struct ProbePhilox {  // Z regenerated from (seed, offset); the batch shares one Z
  uint64_t seed, offset;
  static constexpr bool kPhilox = true;
  __device__ __forceinline__ A value(int64_t, int64_t i, int64_t j, int64_t k) const {
    return static_cast<A>(philox::normal_at(seed, offset, static_cast<uint64_t>(i * k + j)));
  }
};

template <typename A>
struct GradW {  // W = g_b f'(Y) / (k N^2), from Y [B, N, k]
  const A* y;
  const double* grad;
  int64_t N;
  double inv_kn2;
  int p;
  static constexpr bool kPhilox = false;
  __device__ __forceinline__ A value(int64_t b, int64_t i, int64_t j, int64_t k) const {
    const A scale = static_cast<A>(grad[b] * inv_kn2);
    const A v = y[(b * N + i) * k + j];
    return p == 1 ? scale * sign_of(v) : A(2) * scale * v;
  }
};

// dst[q * ld + jj] = value(b, i0 + q, j0 + jj) for q < kBP, jj < width, zero where i0 + q >= N or
// j0 + jj >= k. Called by the whole block; the caller synchronizes afterwards.
template <typename A, typename Src>
__device__ void fill_probes(const Src& src, A* dst, int ld, int width, int64_t b, int64_t i0,
                            int64_t N, int64_t k, int64_t j0) {
  const int np = static_cast<int>(min64(kBP, N - i0));
  if constexpr (Src::kPhilox) {
    if (j0 == 0 && width >= k) {
      // Whole rows: the block's probes are the contiguous elements [i0 k, (i0 + np) k); one
      // Philox call yields 4 of them.
      for (int idx = threadIdx.x; idx < kBP * width; idx += blockDim.x) {
        const int q = idx / width, jj = idx - q * width;
        if (q >= np || jj >= k) dst[q * ld + jj] = A(0);
      }
      const uint64_t e_lo = static_cast<uint64_t>(i0 * k), e_hi = static_cast<uint64_t>((i0 + np) * k);
      for (uint64_t g = e_lo / 4 + threadIdx.x; g <= (e_hi - 1) / 4; g += blockDim.x) {
        double z[4];
        philox::normal4(src.seed, src.offset, g, z);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const uint64_t e = 4 * g + h;
          if (e >= e_lo && e < e_hi) {
            const int q = static_cast<int>(e / k - i0), jj = static_cast<int>(e % k);
            dst[q * ld + jj] = static_cast<A>(z[h]);
          }
        }
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < kBP * width; idx += blockDim.x) {
    const int q = idx / width, jj = idx - q * width;
    const int64_t j = j0 + jj;
    dst[q * ld + jj] = (q < np && j < k) ? src.value(b, i0 + q, j, k) : A(0);
  }
}

// ---- forward 1 / backward 1: projection --------------------------------------------------------
// part[b, blk, c, j] = sum over the block's pixels i of u(c, i) v(i, j), v = Z or W;
// norms[b, i] = ||x_i||. Shared memory: scale [kBP], red [2][kBP] (float64), zr [kBP][kLDZ], and
// the unit-pixel tile [.][kLDX] (all round_up(C, 32) channels when `resident`, else 32 of them).
template <typename A>
__host__ __device__ constexpr size_t project_head_bytes() {  // scale and red, ahead of zr
  return kBP * (sizeof(ComputeScale<A>) + 2 * sizeof(double));
}
template <typename E, typename A, typename Src>
__global__ void __launch_bounds__(kProjThreads, 2)
    ffa_project_kernel(Features f, int64_t N, int64_t k, double eps, Src src, bool resident,
                       PixelNorm* __restrict__ norms, A* __restrict__ part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ComputeScale<A>* scale = reinterpret_cast<ComputeScale<A>*>(smem_raw);
  double* red = reinterpret_cast<double*>(scale + kBP);
  A* zr = reinterpret_cast<A*>(smem_raw + project_head_bytes<A>());
  A* xt = zr + kBP * kLDZ;
  const int64_t b = blockIdx.y, blk = blockIdx.x, i0 = blk * kBP;
  const int64_t nblk = gridDim.x, C = f.C;
  const int64_t Cpad = (C + kCC - 1) / kCC * kCC;
  const E* x = static_cast<const E*>(f.ptr) + b * f.sb;
  const int tid = threadIdx.x;

  {  // norms: two threads per pixel, channels split by parity; then x -> u in the resident tile
    const int q = tid % kBP, h = tid / kBP;
    const int64_t i = i0 + q;
    double ss = 0.0;
    for (int64_t c = h; c < Cpad; c += 2) {
      const A v = (i < N && c < C) ? widen<A>(x[c * f.sc + i * f.sp]) : A(0);  // exact
      ss += static_cast<double>(v) * static_cast<double>(v);
      if (resident) xt[c * kLDX + q] = v;
    }
    red[h * kBP + q] = ss;
    __syncthreads();
    if (h == 0) {
      const PixelNorm nm =
          i < N ? pixel_norm(red[q] + red[kBP + q], x + i * f.sp, C, f.sc) : PixelNorm{0.0, 0};
      scale[q] = compute_scale<A>(nm, eps);
      if (i < N) norms[b * N + i] = nm;
    }
    __syncthreads();
    if (resident)
      for (int64_t c = h; c < Cpad; c += 2) xt[c * kLDX + q] = unit_of(xt[c * kLDX + q], scale[q]);
  }

  const int s = tid & 7;  // pixel lane of an 8-lane group; the group owns a 4 x 4 (c, j) tile
  for (int64_t j0 = 0; j0 < k; j0 += kJW) {
    const int jw = static_cast<int>(min64(kJW, k - j0));
    const int jg_n = (jw + 3) / 4;
    fill_probes<A>(src, zr, kLDZ, kJW, b, i0, N, k, j0);
    __syncthreads();
    for (int64_t c0 = 0; c0 < C; c0 += kCC) {
      const A* xs = xt + (resident ? c0 * kLDX : 0);
      if (!resident) {
        for (int idx = tid; idx < kCC * kBP; idx += kProjThreads) {
          const int cc = idx / kBP, q = idx % kBP;
          const int64_t c = c0 + cc, i = i0 + q;
          xt[cc * kLDX + q] =
              (i < N && c < C) ? unit_of(widen<A>(x[c * f.sc + i * f.sp]), scale[q]) : A(0);
        }
        __syncthreads();
      }
      // 8 channel groups x jg_n probe groups; the trip count is uniform within a warp.
      for (int t = tid / 8; t < 8 * jg_n; t += kProjThreads / 8) {
        const int cg = t % 8, jg = t / 8;
        A acc[4][4] = {};
        for (int q = s; q < kBP; q += 8) {
          A xv[4], zv[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) xv[u] = xs[(cg * 4 + u) * kLDX + q];
#pragma unroll
          for (int u = 0; u < 4; ++u) zv[u] = zr[q * kLDZ + jg * 4 + u];
#pragma unroll
          for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[u][v] = fma(xv[u], zv[v], acc[u][v]);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v)
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) acc[u][v] += __shfl_xor_sync(0xffffffffu, acc[u][v], o);
        if (s == 0) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int64_t c = c0 + cg * 4 + u;
            if (c >= C) continue;
#pragma unroll
            for (int v = 0; v < 4; ++v) {
              const int64_t j = j0 + jg * 4 + v;
              if (j < k) part[((b * nblk + blk) * C + c) * k + j] = acc[u][v];
            }
          }
        }
      }
      __syncthreads();  // xt chunk (non-resident) and, after the last chunk, zr are reused
    }
  }
}

// out[b, c, j] = sum over blocks of part[b, blk, c, j], in block order, accumulated in double.
template <typename A>
__global__ void __launch_bounds__(256)
    ffa_reduce_blocks_kernel(const A* __restrict__ part, int64_t B, int64_t nblk, int64_t Ck,
                             A* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * Ck) return;
  const int64_t b = e / Ck, r = e % Ck;
  const A* p = part + b * nblk * Ck + r;
  double s = 0.0;
  for (int64_t t = 0; t < nblk; ++t) s += static_cast<double>(p[t * Ck]);
  out[e] = static_cast<A>(s);
}

// ---- forward 2: Y and the loss ---------------------------------------------------------------
// Thread per pixel; probes in register windows of kKT; P_S / P_T staged in shared memory by
// kGC-channel chunks. Y rows are staged through shared memory so the global writes coalesce.
template <typename E, typename A>
__global__ void __launch_bounds__(kBP)
    ffa_backproject_kernel(Features fs, Features ft, int64_t N, int64_t k, double eps, int p,
                           const PixelNorm* __restrict__ norm_s,
                           const PixelNorm* __restrict__ norm_t, const A* __restrict__ Ps,
                           const A* __restrict__ Pt, A* __restrict__ y,
                           double* __restrict__ partial) {
  __shared__ A pc[kGC][kKT];
  __shared__ A yt[kBP][kLDW];
  __shared__ double scratch[32];
  const int64_t b = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kBP;
  const int q = threadIdx.x;
  const int64_t i = i0 + q;
  const bool valid = i < N;
  const ComputeScale<A> us = compute_scale<A>(valid ? norm_s[b * N + i] : PixelNorm{0.0, 0}, eps);
  const ComputeScale<A> ut = compute_scale<A>(valid ? norm_t[b * N + i] : PixelNorm{0.0, 0}, eps);
  A loss = A(0);
  for (int64_t j0 = 0; j0 < k; j0 += kKT) {
    const int jw = static_cast<int>(min64(kKT, k - j0));
    A acc[2][kKT];
#pragma unroll
    for (int w = 0; w < 2; ++w)
#pragma unroll
      for (int jj = 0; jj < kKT; ++jj) acc[w][jj] = A(0);
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const Features& f = w ? ft : fs;
      const ComputeScale<A>& scale = w ? ut : us;
      const A* P = (w ? Pt : Ps) + b * f.C * k;
      const E* x = static_cast<const E*>(f.ptr) + b * f.sb + i * f.sp;
      for (int64_t c0 = 0; c0 < f.C; c0 += kGC) {
        for (int idx = q; idx < kGC * kKT; idx += kBP) {
          const int cc = idx / kKT, jj = idx % kKT;
          pc[cc][jj] = (c0 + cc < f.C && jj < jw) ? P[(c0 + cc) * k + j0 + jj] : A(0);
        }
        __syncthreads();
        const int cn = static_cast<int>(min64(kGC, f.C - c0));
        for (int cc = 0; cc < cn; ++cc) {
          const A xv = valid ? unit_of(widen<A>(x[(c0 + cc) * f.sc]), scale) : A(0);
#pragma unroll
          for (int jj = 0; jj < kKT; ++jj) acc[w][jj] = fma(xv, pc[cc][jj], acc[w][jj]);
        }
        __syncthreads();
      }
    }
#pragma unroll
    for (int jj = 0; jj < kKT; ++jj) {
      const A v = acc[0][jj] - acc[1][jj];
      if (jj < jw) loss += p == 1 ? fabs(v) : v * v;
      yt[q][jj] = v;
    }
    __syncthreads();
    const int np = static_cast<int>(min64(kBP, N - i0));
    for (int idx = q; idx < np * jw; idx += kBP) {
      const int qq = idx / jw, jj = idx % jw;
      y[(b * N + i0 + qq) * k + j0 + jj] = yt[qq][jj];
    }
    __syncthreads();
  }
  const double total = block_sum(static_cast<double>(loss), scratch);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = total;
}

// ---- backward 2: G and the chain rule ---------------------------------------------------------
// Thread per pixel. W and Z rows (kKT probes) are staged through shared memory into registers;
// P_X and Q_X by kGC-channel chunks. kFused (k <= kKT): sweep 0 accumulates (u . G), sweep 1 writes
//   g_x = r (G - xh (u . G)), r = 1 / (n + eps), xh = x / n (0 at n = 0), G recomputed.
// Otherwise G (sign included) is accumulated over probe windows into Gout [B, C, N].
template <typename E, typename A, typename Src, bool kFused>
__global__ void __launch_bounds__(kBP)
    ffa_grad_kernel(Features f, int64_t N, int64_t k, double eps, A sign, Src src, GradW<A> wsrc,
                    const PixelNorm* __restrict__ norms, const A* __restrict__ P,
                    const A* __restrict__ Q, E* __restrict__ out, A* __restrict__ Gout) {
  __shared__ A ws[kBP * kLDW];
  __shared__ A zs[kBP * kLDW];
  __shared__ A pc[kGC][kKT];
  __shared__ A qc[kGC][kKT];
  const int64_t b = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kBP, C = f.C;
  const int q = threadIdx.x;
  const int64_t i = i0 + q;
  const bool valid = i < N;
  const E* x = static_cast<const E*>(f.ptr) + b * f.sb + i * f.sp;
  const A* Pb = P + b * C * k;
  const A* Qb = Q + b * C * k;

  for (int64_t j0 = 0; j0 < k; j0 += kKT) {
    const int jw = static_cast<int>(min64(kKT, k - j0));
    fill_probes<A>(wsrc, ws, kLDW, kKT, b, i0, N, k, j0);
    fill_probes<A>(src, zs, kLDW, kKT, b, i0, N, k, j0);
    __syncthreads();
    A w[kKT], z[kKT];
#pragma unroll
    for (int jj = 0; jj < kKT; ++jj) {
      w[jj] = ws[q * kLDW + jj];
      z[jj] = zs[q * kLDW + jj];
    }
    // G(c) for the channels of one staged chunk, from the registers above.
    auto g_of = [&](int cc) {
      A g = A(0);
#pragma unroll
      for (int jj = 0; jj < kKT; ++jj) g = fma(w[jj], pc[cc][jj], fma(z[jj], qc[cc][jj], g));
      return sign * g;
    };
    auto stage = [&](int64_t c0) {
      for (int idx = q; idx < kGC * kKT; idx += kBP) {
        const int cc = idx / kKT, jj = idx % kKT;
        const bool in = c0 + cc < C && jj < jw;
        pc[cc][jj] = in ? Pb[(c0 + cc) * k + j0 + jj] : A(0);
        qc[cc][jj] = in ? Qb[(c0 + cc) * k + j0 + jj] : A(0);
      }
      __syncthreads();
    };
    if constexpr (kFused) {
      const ComputeScale<A> us =
          compute_scale<A>(valid ? norms[b * N + i] : PixelNorm{0.0, 0}, eps);
      A dot = A(0);  // |u| <= 1: no range issue in A
      for (int64_t c0 = 0; c0 < C; c0 += kGC) {
        stage(c0);
        const int cn = static_cast<int>(min64(kGC, C - c0));
        if (valid)
          for (int cc = 0; cc < cn; ++cc)
            dot += unit_of(widen<A>(x[(c0 + cc) * f.sc]), us) * g_of(cc);
        __syncthreads();
      }
      E* o = out + b * C * N + i;
      for (int64_t c0 = 0; c0 < C; c0 += kGC) {
        stage(c0);
        const int cn = static_cast<int>(min64(kGC, C - c0));
        if (valid)
          for (int cc = 0; cc < cn; ++cc) {
            const A xh = xhat_of(widen<A>(x[(c0 + cc) * f.sc]), us);
            o[(c0 + cc) * N] = store_as<E>(unit_grad_of(g_of(cc) - xh * dot, us));
          }
        __syncthreads();
      }
    } else {
      A* G = Gout + b * C * N + i;
      for (int64_t c0 = 0; c0 < C; c0 += kGC) {
        stage(c0);
        const int cn = static_cast<int>(min64(kGC, C - c0));
        if (valid)
          for (int cc = 0; cc < cn; ++cc) {
            const A g = g_of(cc);
            G[(c0 + cc) * N] = j0 == 0 ? g : G[(c0 + cc) * N] + g;
          }
        __syncthreads();
      }
    }
  }
}

// ---- host side -------------------------------------------------------------------------------
int64_t num_blocks(int64_t N) { return ceil_div(N, kBP); }

size_t project_smem(int64_t C, size_t as, bool resident) {
  const int64_t rows = resident ? round_up(C, kCC) : kCC;
  const size_t head = as == 8 ? project_head_bytes<double>() : project_head_bytes<float>();
  return head + (kBP * kLDZ + rows * kLDX) * as;
}
bool project_resident(int64_t C, size_t as) { return project_smem(C, as, true) <= kResidentSmem; }

struct FfaWorkspace {
  PixelNorm* norm_s;
  PixelNorm* norm_t;
  void* part;      // per-block partial projections, [B, nblk, max C, k]
  void* q;         // backward: Q_X [B, max C, k]
  void* g;         // backward, k > kKT: G [B, max C, N]
  double* loss_part;  // forward: [B, nblk]
  size_t bytes;
};

FfaWorkspace carve_ffa(const Pair& in, int64_t k, void* base, bool backward) {
  Carver c{static_cast<char*>(base)};
  const size_t as = dtype_size(acc_dtype(in.dtype));
  const int64_t nblk = num_blocks(in.N), Cm = std::max(in.s.C, in.t.C);
  FfaWorkspace w{};
  w.norm_s = c.take<PixelNorm>(static_cast<size_t>(in.B * in.N));
  w.norm_t = c.take<PixelNorm>(static_cast<size_t>(in.B * in.N));
  w.part = c.take<char>(static_cast<size_t>(in.B * nblk * Cm * k) * as);
  if (backward) {
    w.q = c.take<char>(static_cast<size_t>(in.B * Cm * k) * as);
    if (k > kKT) w.g = c.take<char>(static_cast<size_t>(in.B * Cm * in.N) * as);
  } else {
    w.loss_part = c.take<double>(static_cast<size_t>(in.B * nblk));
  }
  w.bytes = c.used;
  return w;
}

// P (or Q) [B, C, k] of one tensor: projection partials, then the fixed-order block sum.
template <typename E, typename A, typename Src>
cudaError_t project(const Pair& in, const Features& f, int64_t k, double eps, const Src& src,
                    PixelNorm* norms, A* part, A* out, cudaStream_t stream) {
  const int64_t nblk = num_blocks(in.N);
  const bool resident = project_resident(f.C, sizeof(A));
  const size_t smem = project_smem(f.C, sizeof(A), resident);
  auto kernel = ffa_project_kernel<E, A, Src>;
  FFA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
  kernel<<<dim3(static_cast<unsigned>(nblk), static_cast<unsigned>(in.B)), kProjThreads, smem,
           stream>>>(f, in.N, k, eps, src, resident, norms, part);
  FFA_CHECK_LAUNCH();
  const int64_t total = in.B * f.C * k;
  ffa_reduce_blocks_kernel<A><<<static_cast<unsigned>(ceil_div(total, 256)), 256, 0, stream>>>(
      part, in.B, nblk, f.C * k, out);
  FFA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename E, typename Src>
cudaError_t forward_impl(const Pair& in, int64_t k, int p, double eps, const Src& src,
                         const FfaWorkspace& w, void* loss, void* y, void* ps, void* pt,
                         cudaStream_t stream) {
  using A = acc_t<E>;
  PixelNorm* ns = w.norm_s;
  PixelNorm* nt = w.norm_t;
  A* part = static_cast<A*>(w.part);
  FFA_CUDA_TRY((project<E, A>(in, in.s, k, eps, src, ns, part, static_cast<A*>(ps), stream)));
  FFA_CUDA_TRY((project<E, A>(in, in.t, k, eps, src, nt, part, static_cast<A*>(pt), stream)));
  const int64_t nblk = num_blocks(in.N);
  ffa_backproject_kernel<E, A>
      <<<dim3(static_cast<unsigned>(nblk), static_cast<unsigned>(in.B)), kBP, 0, stream>>>(
          in.s, in.t, in.N, k, eps, p, ns, nt, static_cast<const A*>(ps), static_cast<const A*>(pt),
          static_cast<A*>(y), w.loss_part);
  FFA_CHECK_LAUNCH();
  const double denom = static_cast<double>(k) * static_cast<double>(in.N) * static_cast<double>(in.N);
  return launch_finalize(acc_dtype(in.dtype), w.loss_part, in.B, nblk, denom, loss, stream);
}

template <typename E, typename Src>
cudaError_t backward_impl(const Pair& in, int64_t k, int p, double eps, const Src& src,
                          const double* grad, const void* y, const void* ps, const void* pt,
                          const FfaWorkspace& w, void* gs, void* gt, cudaStream_t stream) {
  using A = acc_t<E>;
  const int64_t nblk = num_blocks(in.N);
  const double inv_kn2 =
      1.0 / (static_cast<double>(k) * static_cast<double>(in.N) * static_cast<double>(in.N));
  const GradW<A> wsrc{static_cast<const A*>(y), grad, in.N, inv_kn2, p};
  PixelNorm* norms = w.norm_s;
  A* part = static_cast<A*>(w.part);
  A* Q = static_cast<A*>(w.q);
  for (int which = 0; which < 2; ++which) {
    void* out = which ? gt : gs;
    if (out == nullptr) continue;
    const Features& f = which ? in.t : in.s;
    const A* P = static_cast<const A*>(which ? pt : ps);
    const A sign = which ? A(-1) : A(1);
    FFA_CUDA_TRY((project<E, A>(in, f, k, eps, wsrc, norms, part, Q, stream)));
    const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(in.B));
    if (k <= kKT) {
      ffa_grad_kernel<E, A, Src, true><<<grid, kBP, 0, stream>>>(
          f, in.N, k, eps, sign, src, wsrc, norms, P, Q, static_cast<E*>(out), nullptr);
      FFA_CHECK_LAUNCH();
    } else {
      A* G = static_cast<A*>(w.g);
      ffa_grad_kernel<E, A, Src, false>
          <<<grid, kBP, 0, stream>>>(f, in.N, k, eps, sign, src, wsrc, norms, P, Q, nullptr, G);
      FFA_CHECK_LAUNCH();
      FFA_CUDA_TRY(launch_unit_backward(in, which, acc_dtype(in.dtype), norms, in.N, G, f.C * in.N,
                                        1, in.N, nullptr, 1.0, eps, out, stream));
    }
  }
  return cudaSuccess;
}

}  // namespace

size_t ffa_forward_workspace(const Pair& in, int64_t k) {
  return carve_ffa(in, k, nullptr, false).bytes;
}

size_t ffa_backward_workspace(const Pair& in, int64_t k, bool, bool) {
  return carve_ffa(in, k, nullptr, true).bytes;
}

cudaError_t ffa_forward(const Pair& in, int64_t k, int p, double eps, const Probes& z,
                        void* workspace, void* loss, void* y, void* ps, void* pt,
                        cudaStream_t stream) {
  if (in.B == 0) return cudaSuccess;
  const FfaWorkspace w = carve_ffa(in, k, workspace, false);
  return dispatch_dtype(in.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    using A = acc_t<E>;
    if (z.z != nullptr)
      return forward_impl<E>(in, k, p, eps, ProbeMem<A>{static_cast<const A*>(z.z), z.z_bstride},
                             w, loss, y, ps, pt, stream);
    return forward_impl<E>(in, k, p, eps, ProbePhilox<A>{z.seed, z.offset}, w, loss, y, ps, pt,
                           stream);
  });
}

cudaError_t ffa_backward(const Pair& in, int64_t k, int p, double eps, const Probes& z,
                         const double* grad, const void* y, const void* ps, const void* pt,
                         void* workspace, void* gs, void* gt, cudaStream_t stream) {
  if (in.B == 0 || in.N == 0 || (gs == nullptr && gt == nullptr)) return cudaSuccess;
  const FfaWorkspace w = carve_ffa(in, k, workspace, true);
  return dispatch_dtype(in.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    using A = acc_t<E>;
    if (z.z != nullptr)
      return backward_impl<E>(in, k, p, eps, ProbeMem<A>{static_cast<const A*>(z.z), z.z_bstride},
                              grad, y, ps, pt, w, gs, gt, stream);
    return backward_impl<E>(in, k, p, eps, ProbePhilox<A>{z.seed, z.offset}, grad, y, ps, pt, w,
                            gs, gt, stream);
  });
}

}  // namespace ffa::cuda
