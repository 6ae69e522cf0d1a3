// Launch functions of the low-bit quantization CUDA kernels (csrc/cuda/quant_kernels.cu).
// Torch-free: raw pointers, sizes, a stream; each returns the first CUDA error (cudaSuccess when
// all launches were queued). The host wrapper (quant_cuda.cpp) checks tensors and allocates the
// workspace; nothing here synchronizes with the host.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ffa::cuda {

enum class QDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// A dense tensor in memory order seen as [outer, C, inner]: the channel of memory offset k is
// (k / inner) % C. Per-tensor work uses C = 1, inner = numel.
struct QLayout {
  int64_t numel, C, inner;
};

// ---- quantize_weight: reductions (delta, scale) per channel, then the elementwise pass ---------
// Workspace bytes for quantize_weight_cuda (device memory, any alignment of 16).
size_t quantize_weight_workspace_bytes(QLayout L);
cudaError_t quantize_weight_cuda(QDtype dt, const void* w, void* y, QLayout L, int bits,
                                 void* workspace, cudaStream_t stream);

// ---- quant_relu -------------------------------------------------------------------------------
// The step: alpha_ptr (device, dtype alpha_dt, one element) or, when alpha_ptr is null, the host
// value alpha_val. Clamped to [1e-3, 5] in alpha's dtype inside the kernel.
struct QAlpha {
  const void* ptr;
  QDtype dt;
  double val;
};

enum QSte : int { kSteInplt = 0, kSteIdnty = 1, kSteRelu = 2 };
enum QAlphaGrad : int { kAgMean = 0, kAgAe = 1, kAgPact = 2, kAgMin = 3 };

cudaError_t quant_relu_forward_cuda(QDtype dt, const void* x, void* y, int64_t n, QAlpha alpha,
                                    int bits, cudaStream_t stream);
size_t quant_relu_backward_workspace_bytes(int64_t n);
// dx (dtype dt) may be null; galpha (one float32, device) may be null: clamp(rate * sum dy g0).
cudaError_t quant_relu_backward_cuda(QDtype dt, const void* grad, const void* x, void* dx,
                                     int64_t n, QAlpha alpha, int bits, int ste, int alpha_grad,
                                     double rate, float* galpha, void* workspace,
                                     cudaStream_t stream);

// ---- fake_quantize (torch's CUDA formulas) -----------------------------------------------------
// Per-channel qparams: float32 device arrays [C]; per tensor: device pointers to one element, or
// null pointers and the host values (a CPU scalar scale / zero point).
struct QParams {
  const float* scale;
  const float* zp;
  float scale_val, zp_val;
};

// How the raw zero point becomes the one used: as is; trunc (torch reads a per-tensor float zero
// point with toInt); round half-even then clamp (LSQ forward, per-channel LSQ backward);
// floor(z + 0.5) clamped, truncated (per-tensor LSQ backward).
enum QZpMode : int { kZpRaw = 0, kZpTrunc = 1, kZpRoundClamp = 2, kZpHalfUpClamp = 3 };

struct QFake {
  QLayout L;
  QParams q;
  int64_t qmin, qmax;
  int zp_mode;       // QZpMode
  bool float_zp;     // per-channel float zero points: torch's lrint(x * inv + zp) formula
  bool per_channel;  // C > 1 possible
};

cudaError_t fake_quantize_forward_cuda(QDtype dt, const void* x, void* y, const QFake& f,
                                       cudaStream_t stream);
size_t fake_quantize_backward_workspace_bytes(QLayout L);
// Non-learnable: dx = dy * mask. Learnable (LSQ): dx (nullable), and the qparam gradients
// gscale, gzp (float32 device arrays [C], nullable) scaled by grad_factor.
cudaError_t fake_quantize_backward_cuda(QDtype dt, const void* grad, const void* x, void* dx,
                                        const QFake& f, bool learnable, float grad_factor,
                                        float* gscale, float* gzp, void* workspace,
                                        cudaStream_t stream);

}  // namespace ffa::cuda
