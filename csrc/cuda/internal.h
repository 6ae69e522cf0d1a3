// Launchers shared between the CUDA kernel files (defined in fa_kernels.cu, used by
// ffa_kernels.cu).
#pragma once
#include "cuda/launch.h"

namespace ffa::cuda {

// Chain rule through u = x / (||x|| + eps) for tensor `which` (0 student, 1 teacher) of the pair,
// in float64 whatever the dtypes (device.cuh):
//   out(b, c, i) = s_b r (g(c, i) - xh(c, i) (u . g)_i),  r = 1 / (n + eps),  xh = x / n
//   (0 at n = 0), s_b = factor * grad[b] (grad may be null: 1),
//   g(c, i) = G[b * g_sb + i * g_sp + c * g_sc].
// G is float32, or float64 when g_dtype is kDouble (required for float64 inputs); the pixel norms
// are norms[b * norm_bstride + i]. out: [B, C, N] contiguous in the pair's dtype.
cudaError_t launch_unit_backward(const Pair& in, int which, Dtype g_dtype, const PixelNorm* norms,
                                 int64_t norm_bstride, const void* G, int64_t g_sb, int64_t g_sp,
                                 int64_t g_sc, const double* grad, double factor, double eps,
                                 void* out, cudaStream_t stream);

// out[b] = (sum over t < nparts of partial[b * nparts + t], in a fixed order) / denom, stored as
// out_dtype (kFloat or kDouble).
cudaError_t launch_finalize(Dtype out_dtype, const double* partial, int64_t B, int64_t nparts,
                            double denom, void* out, cudaStream_t stream);

}  // namespace ffa::cuda
