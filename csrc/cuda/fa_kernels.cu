// Exact feature-affinity loss, p = 1, on CUDA (plus the float64 packing and chain-rule kernels that
// the p = 2 host path and FFA reuse).
//
// Math. Unit pixels X = [u_S | u_T], pixel-major [N, K], K = Cs + Ct. Then
//   D = U_S^T U_S - U_T^T U_T,   D_IJ = X_I,S X_J,S^T - X_I,T X_J,T^T   (two products per tile),
//   L = sum_ij |D_ij| / N^2,     dL/du_S,i = (2 g / N^2) sum_j sign(D_ij) u_S,j,
//                                dL/du_T,i = -(2 g / N^2) sum_j sign(D_ij) u_T,j   (D symmetric),
// then chained through u = x / (||x|| + eps) per pixel (device.cuh: in float64, scale-safe).
// Equal pixels give exactly 0: the student and teacher products of a tile run through the same code
// with their own accumulators over their own channel ranges (same padded width when Cs == Ct), so
// bitwise-equal unit pixels give bitwise-equal A_S and A_T entries, D = 0 and sign(D) = 0. This
// holds on every path: mma.sync computes the same fragments from the same operands in the same
// order for bf16, fp16 and TF32 alike, and the SIMT FMA chains are identical (checked under
// tools/cuda_emu). One K-deep product of [u_S u_T] with [u_S -u_T] would instead turn ties into
// rounding noise (1e-8 in float32, with a full-size gradient).
//
// Passes.
//  1. pack_units: one read of S and T -> X [B, Npad, KP] in the operand type (bf16, fp16, float
//     rounded to TF32, float, double), zero rows up to Npad = N rounded up to 128 and zero columns
//     so that each part is a multiple of 16 (student at [0, CsP), teacher at [CsP, KP)). Zero
//     padding makes D exactly 0 there, so no kernel needs a bounds mask.
//  2. forward: a CTA owns a row block I (64 * MT rows) of one sample and walks the column slabs
//     J >= I (64 columns each, upper triangle only), X_I resident in shared memory, X_J slabs
//     double-buffered by cp.async. |D| is reduced in registers with weight 2 above the diagonal,
//     1 on it, 0 below; each CTA writes one double partial, and a final kernel sums the partials
//     of a sample in a fixed order (no float atomics anywhere: bitwise repeatable).
//     Backward: a CTA owns (row block I, 64 gradient columns) and walks ALL column slabs J: it
//     recomputes D_IJ, turns sign(D_IJ) into mma A-fragments in registers (as flash-attention
//     feeds P to P V), and accumulates G_I += sign(D_IJ) X_J[:, cols] in registers (the teacher's
//     minus sign is applied in pass 3). A CTA writes only its own G_I rows: deterministic and
//     atomic-free.
//     The price: D is recomputed on the full N x N instead of the upper triangle, i.e.
//     2 N^2 K + 2 N^2 Kg FLOPs instead of N^2 K + 2 N^2 Kg (1.5x for student-only gradients,
//     Kg = K/2; 1.33x for both). Using the symmetry would need either float atomics on G_J or
//     O(N^2 Kg / tile) partial buffers.
//  3. unit_backward: g_x from G, the norms and x (one more read of S / T).
// Tensor cores: mma.sync m16n8k16 (bf16, fp16 operands) or m16n8k8 (TF32), fp32 accumulation,
//   4 warps per CTA, each warp 16 * MT rows x 64 columns with two accumulator sets (A_S, A_T);
//   MT = 2 where the resident tiles fit in shared memory, else 1. With the third set (G) the MT = 2
//   backward takes 244-255 registers (sm_80 / sm_90, no spills): 2 CTAs per SM.
// SIMT: FMA in float32 or float64, 64 x 64 tiles, 4 x 4 per thread; serves float32 when TF32 is
//   off, float64, and K too large for the resident tiles in shared memory.
// Memory: O(N K) (X, G, norms); never N x N. Floor: FLOPs over the tensor-core rate; forward
//   needs N^2 K (upper triangle), backward N^2 K + 2 N^2 Kg.
#include <algorithm>
#include <type_traits>

#include "cuda/device.cuh"
#include "cuda/internal.h"

namespace ffa::cuda {
namespace {

constexpr int kRowAlign = 128;  // Npad: multiple of every row block
constexpr int kChanAlign = 16;  // each part's columns: multiple of the mma k and of 16-byte vectors
constexpr int kSlab = 64;       // columns of D per step
constexpr int kTcThreads = 128;
constexpr int kSimtThreads = 256;
constexpr int kSimtBK = 16;
constexpr int kSimtGC = 32;  // gradient columns per SIMT backward CTA
constexpr int kTcGC = 64;    // gradient columns per tensor-core backward CTA

// ---- pass 1: unit pixels -------------------------------------------------------------------
struct PackArgs {
  Features s, t;
  int64_t N, rows;           // real pixels; rows written (Npad for p = 1, N for the f64 pack)
  int64_t s_ld, t_ld;        // row strides of the destinations
  int64_t s_width, t_width;  // columns written per part (incl. zero padding)
  bool tf32;                 // round float operands to TF32
};

template <typename E>
__device__ __forceinline__ E pack_value(double v, bool tf32) {
  if constexpr (std::is_same_v<E, double>) {
    return v;
  } else if constexpr (std::is_same_v<E, float>) {
    return tf32 ? round_tf32(static_cast<float>(v)) : static_cast<float>(v);
  } else {
    return narrow<E>(static_cast<float>(v));
  }
}

// Block: 32 pixels x 8 channel lanes. Norms first (one read), then the values, 32 channels at a
// time, transposed through shared memory so reads run along pixels and writes along channels. The
// unit pixels are formed in float64 (device.cuh) and rounded once to the operand type.
template <typename Ein, typename Eout>
__global__ void __launch_bounds__(256, 2)
    pack_units_kernel(PackArgs p, double eps, Eout* __restrict__ Xs, Eout* __restrict__ Xt,
                      PixelNorm* __restrict__ norms) {
  __shared__ double red[8][33];
  __shared__ UnitScale scale[32];
  __shared__ double tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t b = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * 32, i = i0 + tx;
  const bool valid = i < p.N;
  for (int which = 0; which < 2; ++which) {
    const Features& f = which ? p.t : p.s;
    const Ein* x = static_cast<const Ein*>(f.ptr) + b * f.sb;
    double ss = 0.0;
    if (valid)
      for (int64_t c = ty; c < f.C; c += 8) {
        const double v = widen<double>(x[c * f.sc + i * f.sp]);
        ss += v * v;
      }
    red[ty][tx] = ss;
    __syncthreads();
    if (ty == 0) {
      double tot = 0.0;
      for (int q = 0; q < 8; ++q) tot += red[q][tx];
      const PixelNorm nm = valid ? pixel_norm(tot, x + i * f.sp, f.C, f.sc) : PixelNorm{0.0, 0};
      scale[tx] = unit_scale(nm, eps);
      if (norms != nullptr && valid) norms[(b * 2 + which) * p.N + i] = nm;
    }
    __syncthreads();
    Eout* dst = which ? Xt : Xs;
    const int64_t width = which ? p.t_width : p.s_width, ld = which ? p.t_ld : p.s_ld;
    for (int64_t c0 = 0; c0 < width; c0 += 32) {
      for (int q = ty; q < 32; q += 8) {  // q: channel in chunk, tx: pixel
        const int64_t c = c0 + q;
        tile[q][tx] =
            (valid && c < f.C) ? unit_of(widen<double>(x[c * f.sc + i * f.sp]), scale[tx]) : 0.0;
      }
      __syncthreads();
      for (int q = ty; q < 32; q += 8) {  // q: pixel, tx: channel in chunk
        const int64_t c = c0 + tx, row = i0 + q;
        if (c < width && row < p.rows)
          dst[(b * p.rows + row) * ld + c] = pack_value<Eout>(tile[tx][q], p.tf32);
      }
      __syncthreads();
    }
  }
}

template <typename Ein, typename Eout>
cudaError_t launch_pack(const Pair& in, const PackArgs& args, double eps, Eout* Xs, Eout* Xt,
                        PixelNorm* norms, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(args.rows, 32)), static_cast<unsigned>(in.B));
  pack_units_kernel<Ein, Eout><<<grid, 256, 0, stream>>>(args, eps, Xs, Xt, norms);
  FFA_CHECK_LAUNCH();
  return cudaSuccess;
}

// ---- pass 2, tensor cores ------------------------------------------------------------------
template <typename E>
struct Tc;
template <>
struct Tc<__nv_bfloat16> {
  static constexpr int kPad = 8;  // 16 bytes per row: ldmatrix rows fall in distinct banks
};
template <>
struct Tc<__half> {
  static constexpr int kPad = 8;
};
template <>
struct Tc<float> {  // TF32
  static constexpr int kPad = 4;  // row stride = 4 (mod 32) words: fragment loads conflict-free
};

// cp.async `rows` rows of KP elements (global row stride KP) into shared memory (row stride lds).
template <typename E>
__device__ __forceinline__ void load_rows(E* dst, const E* src, int rows, int KP, int lds) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(E));
  const int per_row = KP / kVec, total = rows * per_row;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int r = idx / per_row, v = idx - r * per_row;
    cp_async16(dst + r * lds + v * kVec, src + static_cast<int64_t>(r) * KP + v * kVec);
  }
}

// d = A (the warp's 16 * MT rows, shared, row stride lds) times Bs^T (64 slab rows): 16*MT x 64,
// over the columns [kb, ke) of both.
template <typename E, int MT>
__device__ __forceinline__ void slab_product(const E* As, const E* Bs, int lds, int kb, int ke,
                                             float (&d)[MT][8][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) d[mt][nt][e] = 0.f;
  if constexpr (std::is_same_v<E, float>) {
    // m16n8k8 TF32, fragments by plain 32-bit loads: a0 (g, c) a1 (g+8, c) a2 (g, c+4)
    // a3 (g+8, c+4); b0 (k c, n g) b1 (k c+4, n g); g = lane / 4, c = lane % 4.
    const int g = lane >> 2, c = lane & 3;
    for (int k0 = kb; k0 < ke; k0 += 8) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float* ap = As + (mt * 16 + g) * lds + k0 + c;
        a[mt][0] = __float_as_uint(ap[0]);
        a[mt][1] = __float_as_uint(ap[8 * lds]);
        a[mt][2] = __float_as_uint(ap[4]);
        a[mt][3] = __float_as_uint(ap[8 * lds + 4]);
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const float* bp = Bs + (nt * 8 + g) * lds + k0 + c;
        const uint32_t b0 = __float_as_uint(bp[0]), b1 = __float_as_uint(bp[4]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_1688_tf32(d[mt][nt], a[mt], b0, b1);
      }
    }
  } else {
    // m16n8k16, fragments by ldmatrix: A x4 = rows 0-15 at k0 and k0+8; B x4 = two n-tiles.
    for (int k0 = kb; k0 < ke; k0 += 16) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(As + (mt * 16 + (lane & 15)) * lds + k0 + (lane >> 4) * 8, a[mt]);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bq[4];
        ldmatrix_x4(Bs + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * lds + k0 +
                        ((lane >> 3) & 1) * 8,
                    bq);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<E>(d[mt][2 * np], a[mt], bq[0], bq[1]);
          mma_16816<E>(d[mt][2 * np + 1], a[mt], bq[2], bq[3]);
        }
      }
    }
  }
}

// d = A_S - A_T for the warp's rows and the slab: the two products by their own accumulators, so
// that equal unit pixels give exactly 0.
template <typename E, int MT>
__device__ __forceinline__ void slab_difference(const E* As, const E* Bs, int lds, int CsP, int KP,
                                                float (&d)[MT][8][4]) {
  float dt[MT][8][4];
  slab_product<E, MT>(As, Bs, lds, 0, CsP, d);
  slab_product<E, MT>(As, Bs, lds, CsP, KP, dt);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) d[mt][nt][e] -= dt[mt][nt][e];
}

// g += sign(d) [16*MT x 64] times Bs[:, gcol, gcol + gw) [64 x gw]; gw a multiple of 16, <= 64.
// The accumulator layout of d is reused as the A operand (no shared-memory round trip).
template <typename E, int MT>
__device__ __forceinline__ void slab_grad(const float (&d)[MT][8][4], const E* Bs, int lds,
                                          int gcol, int gw, float (&g)[MT][8][4]) {
  const int lane = threadIdx.x & 31;
  if constexpr (std::is_same_v<E, float>) {
    // k8-step t covers slab columns [8t, 8t + 8). The accumulator holds columns 2c and 2c + 1, so
    // logical k = c maps to column 2c and k = c + 4 to column 2c + 1; B rows are permuted to match.
    const int gq = lane >> 2, c = lane & 3;
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = __float_as_uint(sign_of(d[mt][t][0]));
        a[mt][1] = __float_as_uint(sign_of(d[mt][t][2]));
        a[mt][2] = __float_as_uint(sign_of(d[mt][t][1]));
        a[mt][3] = __float_as_uint(sign_of(d[mt][t][3]));
      }
      const float* vp = Bs + (8 * t + 2 * c) * lds + gcol + gq;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        if (nt * 8 < gw) {
          const uint32_t b0 = __float_as_uint(vp[nt * 8]), b1 = __float_as_uint(vp[lds + nt * 8]);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_1688_tf32(g[mt][nt], a[mt], b0, b1);
        }
      }
    }
  } else {
    // k16-step t covers slab columns [16t, 16t + 16) = accumulator n-tiles 2t and 2t + 1.
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float(&lo)[4] = d[mt][2 * t];
        const float(&hi)[4] = d[mt][2 * t + 1];
        a[mt][0] = pack2<E>(sign_of(lo[0]), sign_of(lo[1]));
        a[mt][1] = pack2<E>(sign_of(lo[2]), sign_of(lo[3]));
        a[mt][2] = pack2<E>(sign_of(hi[0]), sign_of(hi[1]));
        a[mt][3] = pack2<E>(sign_of(hi[2]), sign_of(hi[3]));
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (np * 16 < gw) {
          uint32_t bq[4];
          ldmatrix_x4_trans(Bs + (16 * t + (lane & 7) + (((lane >> 3) & 1) << 3)) * lds + gcol +
                                np * 16 + (lane >> 4) * 8,
                            bq);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<E>(g[mt][2 * np], a[mt], bq[0], bq[1]);
            mma_16816<E>(g[mt][2 * np + 1], a[mt], bq[2], bq[3]);
          }
        }
      }
    }
  }
}

// Forward: CTA (row block I, sample b) walks slabs J0 = I0, I0 + 64, ... < Npad.
template <typename E, int MT>
__global__ void __launch_bounds__(kTcThreads)
    fa_l1_tc_forward_kernel(const E* __restrict__ X, int64_t Npad, int CsP, int KP,
                            double* __restrict__ partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ double scratch[32];
  constexpr int BM = 64 * MT;
  const int lds = KP + Tc<E>::kPad;
  E* As = reinterpret_cast<E*>(smem_raw);
  E* const Bs0 = As + BM * lds;  // slab buffer s & 1 is Bs0 + (s & 1) * kSlab * lds
  const int64_t b = blockIdx.y, I0 = static_cast<int64_t>(blockIdx.x) * BM;
  const E* Xb = X + b * Npad * KP;
  const int nslab = static_cast<int>((Npad - I0) / kSlab);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  load_rows(As, Xb + I0 * KP, BM, KP, lds);
  cp_async_commit();
  load_rows(Bs0, Xb + I0 * KP, kSlab, KP, lds);
  cp_async_commit();
  double total = 0.0;
  for (int s = 0; s < nslab; ++s) {
    if (s + 1 < nslab)
      load_rows(Bs0 + ((s + 1) & 1) * kSlab * lds,
                Xb + (I0 + static_cast<int64_t>(s + 1) * kSlab) * KP, kSlab, KP, lds);
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait<1>
    cp_async_wait<1>();
    __syncthreads();
    float d[MT][8][4];
    slab_difference<E, MT>(As + warp * 16 * MT * lds, Bs0 + (s & 1) * kSlab * lds, lds, CsP, KP, d);
    float part = 0.f;
    const int dj0 = s * kSlab;  // slab start relative to I0
    if (dj0 >= BM) {            // strictly above the diagonal: every entry counts twice
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) part += fabsf(d[mt][nt][e]);
      part *= 2.f;
    } else {  // straddles the diagonal: weight 2 above, 1 on, 0 below
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int di = warp * 16 * MT + mt * 16 + (lane >> 2) + (e >> 1) * 8;
            const int dj = dj0 + nt * 8 + (lane & 3) * 2 + (e & 1);
            const float w = dj > di ? 2.f : (dj == di ? 1.f : 0.f);
            part += w * fabsf(d[mt][nt][e]);
          }
    }
    total += static_cast<double>(part);
    __syncthreads();  // everyone is done with Bs0 + (s & 1) * kSlab * lds before it is refilled
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = total;
}

// Backward: CTA (row block I, gradient columns [gbeg, gbeg + 64), sample b) walks all slabs.
// G: [B, Npad, Kg] float; column q of G is column gcol0 + q of X.
template <typename E, int MT>
__global__ void __launch_bounds__(kTcThreads)
    fa_l1_tc_backward_kernel(const E* __restrict__ X, int64_t Npad, int CsP, int KP, int gcol0,
                             int Kg, float* __restrict__ G) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int BM = 64 * MT;
  const int lds = KP + Tc<E>::kPad;
  E* As = reinterpret_cast<E*>(smem_raw);
  E* const Bs0 = As + BM * lds;
  const int64_t b = blockIdx.z, I0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int gbeg = blockIdx.y * kTcGC, gw = min(kTcGC, Kg - gbeg);
  const E* Xb = X + b * Npad * KP;
  const int nslab = static_cast<int>(Npad / kSlab);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  float g[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) g[mt][nt][e] = 0.f;

  load_rows(As, Xb + I0 * KP, BM, KP, lds);
  cp_async_commit();
  load_rows(Bs0, Xb, kSlab, KP, lds);
  cp_async_commit();
  for (int s = 0; s < nslab; ++s) {
    if (s + 1 < nslab)
      load_rows(Bs0 + ((s + 1) & 1) * kSlab * lds, Xb + static_cast<int64_t>(s + 1) * kSlab * KP,
                kSlab, KP, lds);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float d[MT][8][4];
    slab_difference<E, MT>(As + warp * 16 * MT * lds, Bs0 + (s & 1) * kSlab * lds, lds, CsP, KP, d);
    slab_grad<E, MT>(d, Bs0 + (s & 1) * kSlab * lds, lds, gcol0 + gbeg, gw, g);
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = I0 + warp * 16 * MT + mt * 16 + (lane >> 2) + h * 8;
      float* out = G + (b * Npad + row) * Kg + gbeg + (lane & 3) * 2;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        if (nt * 8 < gw)
          *reinterpret_cast<float2*>(out + nt * 8) = make_float2(g[mt][nt][2 * h], g[mt][nt][2 * h + 1]);
    }
}

// ---- pass 2, SIMT (float32 without TF32, float64, or K too large for the resident tiles) -----
template <typename A>
struct SimtTileSmem {
  A as[kSimtBK][65];
  A bs[kSimtBK][65];
};

// d = X[I0 : I0 + 64, kb : ke] X[J0 : J0 + 64, kb : ke]^T by 256 threads; thread (ty, tx) owns
// rows ty + 16q and columns tx + 16p. Begins and ends with a barrier-protected use of `sm`.
template <typename E, typename A>
__device__ __forceinline__ void simt_product(const E* Xi, const E* Xj, int KP, int kb, int ke,
                                             SimtTileSmem<A>& sm, A (&d)[4][4]) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int p = 0; p < 4; ++p) d[q][p] = A(0);
  for (int k0 = kb; k0 < ke; k0 += kSimtBK) {
    for (int idx = threadIdx.x; idx < 64 * kSimtBK; idx += kSimtThreads) {
      const int r = idx / kSimtBK, kk = idx % kSimtBK;
      sm.as[kk][r] = widen<A>(Xi[static_cast<int64_t>(r) * KP + k0 + kk]);
      sm.bs[kk][r] = widen<A>(Xj[static_cast<int64_t>(r) * KP + k0 + kk]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      A av[4], bv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) av[q] = sm.as[kk][ty + 16 * q];
#pragma unroll
      for (int p = 0; p < 4; ++p) bv[p] = sm.bs[kk][tx + 16 * p];
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int p = 0; p < 4; ++p) d[q][p] = fma(av[q], bv[p], d[q][p]);
    }
    __syncthreads();
  }
}

// d = A_S - A_T on the 64 x 64 tile (I0, J0), each product by its own accumulators.
template <typename E, typename A>
__device__ __forceinline__ void simt_difference(const E* Xi, const E* Xj, int CsP, int KP,
                                                SimtTileSmem<A>& sm, A (&d)[4][4]) {
  A dt[4][4];
  simt_product<E, A>(Xi, Xj, KP, 0, CsP, sm, d);
  simt_product<E, A>(Xi, Xj, KP, CsP, KP, sm, dt);
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int p = 0; p < 4; ++p) d[q][p] -= dt[q][p];
}

template <typename E, typename A>
__global__ void __launch_bounds__(kSimtThreads, 2)
    fa_l1_simt_forward_kernel(const E* __restrict__ X, int64_t Npad, int CsP, int KP,
                              double* __restrict__ partial) {
  __shared__ SimtTileSmem<A> sm;
  __shared__ double scratch[32];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t b = blockIdx.y, I0 = static_cast<int64_t>(blockIdx.x) * 64;
  const E* Xi = X + (b * Npad + I0) * KP;
  double total = 0.0;
  for (int64_t J0 = I0; J0 < Npad; J0 += 64) {
    A d[4][4];
    simt_difference<E, A>(Xi, X + (b * Npad + J0) * KP, CsP, KP, sm, d);
    A part = A(0);
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const int di = ty + 16 * q, dj = tx + 16 * p;  // J0 == I0 is the only straddling tile
        const A w = J0 > I0 ? A(2) : (dj > di ? A(2) : (dj == di ? A(1) : A(0)));
        part += w * fabs(d[q][p]);
      }
    total += static_cast<double>(part);
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = total;
}

template <typename A>
struct SimtGradSmem {
  union {
    SimtTileSmem<A> tile;
    A vs[64][kSimtGC + 1];  // X_J[:, gradient columns]
  } u;
  float ss[64][65];  // sign(D_IJ), exact in float
};

// float64: the two D accumulator sets and G take more than the 128 registers that 2 CTAs per SM
// would leave, so it runs 1 CTA (8 warps) per SM.
template <typename E, typename A>
__global__ void __launch_bounds__(kSimtThreads, sizeof(A) == 8 ? 1 : 2)
    fa_l1_simt_backward_kernel(const E* __restrict__ X, int64_t Npad, int CsP, int KP, int gcol0,
                               int Kg, A* __restrict__ G) {
  __shared__ SimtGradSmem<A> sm;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t b = blockIdx.z, I0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int gbeg = blockIdx.y * kSimtGC, gw = min(kSimtGC, Kg - gbeg);
  const E* Xi = X + (b * Npad + I0) * KP;
  A g[4][2];
#pragma unroll
  for (int q = 0; q < 4; ++q) g[q][0] = g[q][1] = A(0);
  for (int64_t J0 = 0; J0 < Npad; J0 += 64) {
    const E* Xj = X + (b * Npad + J0) * KP;
    A d[4][4];
    simt_difference<E, A>(Xi, Xj, CsP, KP, sm.u.tile, d);  // ends with a barrier: sm.u is free
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int p = 0; p < 4; ++p) sm.ss[ty + 16 * q][tx + 16 * p] = static_cast<float>(sign_of(d[q][p]));
    for (int idx = threadIdx.x; idx < 64 * kSimtGC; idx += kSimtThreads) {
      const int j = idx / kSimtGC, cc = idx % kSimtGC;
      sm.u.vs[j][cc] =
          cc < gw ? widen<A>(Xj[static_cast<int64_t>(j) * KP + gcol0 + gbeg + cc]) : A(0);
    }
    __syncthreads();
    for (int j = 0; j < 64; ++j) {
      const A v0 = sm.u.vs[j][tx], v1 = sm.u.vs[j][tx + 16];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const A sv = static_cast<A>(sm.ss[ty + 16 * q][j]);
        g[q][0] = fma(sv, v0, g[q][0]);
        g[q][1] = fma(sv, v1, g[q][1]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    A* out = G + (b * Npad + I0 + ty + 16 * q) * Kg + gbeg;
    if (tx < gw) out[tx] = g[q][0];
    if (tx + 16 < gw) out[tx + 16] = g[q][1];
  }
}

// ---- pass 3 and the final reduction (shared with p = 2 and FFA through internal.h) ----------
// Thread per pixel: g_x = scale r (g_u - xh (u . g_u)) in float64 (device.cuh), two sweeps over
// the pixel's channels.
template <typename Ein, typename Gt>
__global__ void __launch_bounds__(256, 2)
    unit_backward_kernel(Features f, int64_t N, const PixelNorm* __restrict__ norms,
                         int64_t norm_bstride, const Gt* __restrict__ G, int64_t g_sb, int64_t g_sp,
                         int64_t g_sc, const double* __restrict__ grad, double factor, double eps,
                         Ein* __restrict__ out) {
  const int64_t b = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const Ein* x = static_cast<const Ein*>(f.ptr) + b * f.sb + i * f.sp;
  const Gt* gp = G + b * g_sb + i * g_sp;
  const UnitScale us = unit_scale(norms[b * norm_bstride + i], eps);
  double dot = 0.0;
  for (int64_t c = 0; c < f.C; ++c)
    dot += unit_of(widen<double>(x[c * f.sc]), us) * static_cast<double>(gp[c * g_sc]);
  const double scale = factor * (grad != nullptr ? grad[b] : 1.0);
  Ein* o = out + b * f.C * N + i;
  for (int64_t c = 0; c < f.C; ++c) {
    const double t =
        static_cast<double>(gp[c * g_sc]) - xhat_of(widen<double>(x[c * f.sc]), us) * dot;
    o[c * N] = store_as<Ein>(unit_grad_of(scale * t, us));
  }
}

template <typename O>
__global__ void __launch_bounds__(256, 2)
    finalize_kernel(const double* __restrict__ partial, int64_t nparts, double denom,
                    O* __restrict__ out) {
  __shared__ double scratch[32];
  const int64_t b = blockIdx.x;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < nparts; t += blockDim.x) s += partial[b * nparts + t];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[b] = static_cast<O>(s / denom);
}

// ---- host side -------------------------------------------------------------------------------
PackArgs l1_pack_args(const Pair& in, const FaL1Plan& plan, bool tf32) {
  PackArgs a{};
  a.s = in.s;
  a.t = in.t;
  a.N = in.N;
  a.rows = plan.Npad;
  a.s_ld = a.t_ld = plan.KP;
  a.s_width = plan.CsP;
  a.t_width = plan.CtP;
  a.tf32 = tf32;
  return a;
}

struct L1Workspace {
  void* X;
  double* partial;   // forward
  PixelNorm* norms;  // backward
  void* G;           // backward
  size_t bytes;
};

L1Workspace carve_l1(const Pair& in, const FaL1Plan& plan, void* base, bool backward, int64_t Kg) {
  Carver c{static_cast<char*>(base)};
  const size_t xs = static_cast<size_t>(in.B * plan.Npad * plan.KP);
  const size_t es = dtype_size(plan.packed), as = dtype_size(acc_dtype(in.dtype));
  L1Workspace w{};
  w.X = c.take<char>(xs * es);
  if (!backward) {
    w.partial = c.take<double>(static_cast<size_t>(in.B * (plan.Npad / plan.row_block)));
  } else {
    w.norms = c.take<PixelNorm>(static_cast<size_t>(in.B * 2 * in.N));
    w.G = c.take<char>(static_cast<size_t>(in.B * plan.Npad * Kg) * as);
  }
  w.bytes = c.used;
  return w;
}

// Packs X (student columns [0, CsP), teacher columns [CsP, KP)) in the operand type.
template <typename E>
cudaError_t pack_l1(const Pair& in, const FaL1Plan& plan, double eps, const L1Workspace& w,
                    PixelNorm* norms, cudaStream_t stream) {
  const bool tf32 = plan.path == FaPath::kTensorCore && in.dtype == Dtype::kFloat;
  E* X = static_cast<E*>(w.X);
  return launch_pack<E, E>(in, l1_pack_args(in, plan, tf32), eps, X, X + plan.CsP, norms, stream);
}

int64_t grad_cols(const FaL1Plan& plan, bool need_s, bool need_t) {
  return (need_s ? plan.CsP : 0) + (need_t ? plan.CtP : 0);
}

template <typename E, int MT>
cudaError_t tc_forward(const Pair& in, const FaL1Plan& plan, const L1Workspace& w,
                       cudaStream_t stream) {
  auto kernel = fa_l1_tc_forward_kernel<E, MT>;
  FFA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(plan.smem)));
  const dim3 grid(static_cast<unsigned>(plan.Npad / plan.row_block), static_cast<unsigned>(in.B));
  kernel<<<grid, kTcThreads, plan.smem, stream>>>(static_cast<const E*>(w.X), plan.Npad,
                                                  static_cast<int>(plan.CsP),
                                                  static_cast<int>(plan.KP), w.partial);
  FFA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename E, int MT>
cudaError_t tc_backward(const Pair& in, const FaL1Plan& plan, const L1Workspace& w, int gcol0,
                        int Kg, cudaStream_t stream) {
  auto kernel = fa_l1_tc_backward_kernel<E, MT>;
  FFA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(plan.smem)));
  const dim3 grid(static_cast<unsigned>(plan.Npad / plan.row_block),
                  static_cast<unsigned>(ceil_div(Kg, kTcGC)), static_cast<unsigned>(in.B));
  kernel<<<grid, kTcThreads, plan.smem, stream>>>(
      static_cast<const E*>(w.X), plan.Npad, static_cast<int>(plan.CsP), static_cast<int>(plan.KP),
      gcol0, Kg, static_cast<float*>(w.G));
  FFA_CHECK_LAUNCH();
  return cudaSuccess;
}

template <typename E>
cudaError_t l1_products(const Pair& in, const FaL1Plan& plan, const L1Workspace& w, bool backward,
                        int gcol0, int Kg, cudaStream_t stream) {
  using A = acc_t<E>;
  if constexpr (!std::is_same_v<E, double>) {
    if (plan.path == FaPath::kTensorCore) {
      if (backward)
        return plan.mt == 2 ? tc_backward<E, 2>(in, plan, w, gcol0, Kg, stream)
                            : tc_backward<E, 1>(in, plan, w, gcol0, Kg, stream);
      return plan.mt == 2 ? tc_forward<E, 2>(in, plan, w, stream)
                          : tc_forward<E, 1>(in, plan, w, stream);
    }
  }
  const int CsP = static_cast<int>(plan.CsP), KP = static_cast<int>(plan.KP);
  if (backward) {
    const dim3 grid(static_cast<unsigned>(plan.Npad / 64), static_cast<unsigned>(ceil_div(Kg, kSimtGC)),
                    static_cast<unsigned>(in.B));
    fa_l1_simt_backward_kernel<E, A><<<grid, kSimtThreads, 0, stream>>>(
        static_cast<const E*>(w.X), plan.Npad, CsP, KP, gcol0, Kg, static_cast<A*>(w.G));
  } else {
    const dim3 grid(static_cast<unsigned>(plan.Npad / 64), static_cast<unsigned>(in.B));
    fa_l1_simt_forward_kernel<E, A><<<grid, kSimtThreads, 0, stream>>>(
        static_cast<const E*>(w.X), plan.Npad, CsP, KP, w.partial);
  }
  FFA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace

// ---- public launchers ------------------------------------------------------------------------
FaL1Plan fa_l1_plan(const Pair& in, bool allow_tf32, int smem_optin) {
  FaL1Plan p{};
  p.Npad = round_up(std::max<int64_t>(in.N, 1), kRowAlign);
  p.CsP = round_up(in.s.C, kChanAlign);
  p.CtP = round_up(in.t.C, kChanAlign);
  p.KP = p.CsP + p.CtP;
  p.packed = in.dtype;
  p.path = FaPath::kSimt;
  p.mt = 1;
  p.row_block = 64;
  p.smem = 0;
  const bool tc = in.dtype == Dtype::kHalf || in.dtype == Dtype::kBFloat16 ||
                  (in.dtype == Dtype::kFloat && allow_tf32);
  if (tc) {
    const size_t es = dtype_size(in.dtype), pad = es == 2 ? 8 : 4;
    const size_t reserve = 1024;  // static shared memory of the kernels (scratch) and slack
    for (int mt : {2, 1}) {
      const size_t bytes = static_cast<size_t>(64 * mt + 2 * kSlab) * (p.KP + pad) * es;
      if (bytes + reserve <= static_cast<size_t>(smem_optin)) {
        p.path = FaPath::kTensorCore;
        p.mt = mt;
        p.row_block = 64 * mt;
        p.smem = bytes;
        break;
      }
    }
  }
  return p;
}

size_t fa_l1_forward_workspace(const Pair& in, const FaL1Plan& plan) {
  return carve_l1(in, plan, nullptr, false, 0).bytes;
}

size_t fa_l1_backward_workspace(const Pair& in, const FaL1Plan& plan, bool need_s, bool need_t) {
  return carve_l1(in, plan, nullptr, true, grad_cols(plan, need_s, need_t)).bytes;
}

cudaError_t fa_l1_forward(const Pair& in, const FaL1Plan& plan, double eps, void* workspace,
                          void* out, cudaStream_t stream) {
  if (in.B == 0) return cudaSuccess;
  const L1Workspace w = carve_l1(in, plan, workspace, false, 0);
  FFA_CUDA_TRY(dispatch_dtype(in.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    FFA_CUDA_TRY(pack_l1<E>(in, plan, eps, w, nullptr, stream));
    return l1_products<E>(in, plan, w, false, 0, 0, stream);
  }));
  return launch_finalize(acc_dtype(in.dtype), w.partial, in.B, plan.Npad / plan.row_block,
                         static_cast<double>(in.N) * static_cast<double>(in.N), out, stream);
}

cudaError_t fa_l1_backward(const Pair& in, const FaL1Plan& plan, double eps, const double* grad,
                           void* workspace, void* gs, void* gt, cudaStream_t stream) {
  const bool need_s = gs != nullptr, need_t = gt != nullptr;
  if (in.B == 0 || in.N == 0 || (!need_s && !need_t)) return cudaSuccess;
  const int Kg = static_cast<int>(grad_cols(plan, need_s, need_t));
  const int gcol0 = need_s ? 0 : static_cast<int>(plan.CsP);
  const L1Workspace w = carve_l1(in, plan, workspace, true, Kg);
  FFA_CUDA_TRY(dispatch_dtype(in.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    FFA_CUDA_TRY(pack_l1<E>(in, plan, eps, w, w.norms, stream));
    return l1_products<E>(in, plan, w, true, gcol0, Kg, stream);
  }));
  const Dtype gd = acc_dtype(in.dtype);
  const double factor = 2.0 / (static_cast<double>(in.N) * static_cast<double>(in.N));
  const int64_t g_sb = plan.Npad * Kg;
  if (need_s)
    FFA_CUDA_TRY(launch_unit_backward(in, 0, gd, w.norms, 2 * in.N, w.G, g_sb, Kg, 1, grad, factor,
                                      eps, gs, stream));
  if (need_t) {  // G holds sum_j sign(D_ij) u_T,j: the teacher's gradient has the opposite sign
    const char* gt_cols = static_cast<const char*>(w.G) + (need_s ? plan.CsP : 0) * dtype_size(gd);
    FFA_CUDA_TRY(launch_unit_backward(in, 1, gd, w.norms + in.N, 2 * in.N, gt_cols, g_sb, Kg, 1,
                                      grad, -factor, eps, gt, stream));
  }
  return cudaSuccess;
}

cudaError_t fa_pack_f64(const Pair& in, double eps, double* us, double* ut, PixelNorm* norms,
                        cudaStream_t stream) {
  if (in.B == 0 || in.N == 0) return cudaSuccess;
  PackArgs a{};
  a.s = in.s;
  a.t = in.t;
  a.N = in.N;
  a.rows = in.N;
  a.s_ld = a.s_width = in.s.C;
  a.t_ld = a.t_width = in.t.C;
  a.tf32 = false;
  return dispatch_dtype(in.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    return launch_pack<E, double>(in, a, eps, us, ut, norms, stream);
  });
}

cudaError_t fa_unit_backward_f64(const Pair& in, int which, const PixelNorm* norms, const double* G,
                                 int64_t g_sb, int64_t g_sp, int64_t g_sc, const double* grad,
                                 double factor, double eps, void* out, cudaStream_t stream) {
  return launch_unit_backward(in, which, Dtype::kDouble, norms + which * in.N, 2 * in.N, G, g_sb,
                              g_sp, g_sc, grad, factor, eps, out, stream);
}

cudaError_t launch_unit_backward(const Pair& in, int which, Dtype g_dtype, const PixelNorm* norms,
                                 int64_t norm_bstride, const void* G, int64_t g_sb, int64_t g_sp,
                                 int64_t g_sc, const double* grad, double factor, double eps,
                                 void* out, cudaStream_t stream) {
  if (in.B == 0 || in.N == 0) return cudaSuccess;
  const Features& f = which ? in.t : in.s;
  const dim3 grid(static_cast<unsigned>(ceil_div(in.N, 256)), static_cast<unsigned>(in.B));
  return dispatch_dtype(in.dtype, [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    if (g_dtype == Dtype::kDouble) {
      unit_backward_kernel<E, double>
          <<<grid, 256, 0, stream>>>(f, in.N, norms, norm_bstride, static_cast<const double*>(G),
                                     g_sb, g_sp, g_sc, grad, factor, eps, static_cast<E*>(out));
    } else if constexpr (!std::is_same_v<E, double>) {
      unit_backward_kernel<E, float>
          <<<grid, 256, 0, stream>>>(f, in.N, norms, norm_bstride, static_cast<const float*>(G),
                                     g_sb, g_sp, g_sc, grad, factor, eps, static_cast<E*>(out));
    } else {
      return cudaErrorInvalidValue;  // float64 features need float64 gradients
    }
    FFA_CHECK_LAUNCH();
    return cudaSuccess;
  });
}

cudaError_t launch_finalize(Dtype out_dtype, const double* partial, int64_t B, int64_t nparts,
                            double denom, void* out, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (out_dtype == Dtype::kDouble)
    finalize_kernel<double><<<static_cast<unsigned>(B), 256, 0, stream>>>(
        partial, nparts, denom, static_cast<double*>(out));
  else
    finalize_kernel<float><<<static_cast<unsigned>(B), 256, 0, stream>>>(
        partial, nparts, denom, static_cast<float*>(out));
  FFA_CHECK_LAUNCH();
  return cudaSuccess;
}

}  // namespace ffa::cuda
