// The whole native surface of ffa: every op of the `ffa` namespace is declared here, once.
// Backends only implement (cpu/*.cpp via STABLE_TORCH_LIBRARY_IMPL(ffa, CPU, m) in module ffa._C,
// cuda/*.cpp for CUDA in module ffa._C_cuda). Fake (meta) kernels and autograd are registered in
// Python (ffa/_ops.py). Everything speaks the LibTorch stable ABI and the Python limited API, so
// one build serves every torch from 2.10 on (see CMakeLists.txt).
#include <Python.h>

#include <exception>

#include "stable.h"

STABLE_TORCH_LIBRARY(ffa, m) {
  // ---- feature-affinity losses (per-sample values, shape [B]) -----------------------------
  // Exact FA: mean_ij |D_ij| (p=1) or mean_ij D_ij^2 (p=2), D = U_S^T U_S - U_T^T U_T.
  // student [B,Cs,H,W] and teacher [B,Ct,H,W] share H, W (resizing is done in Python).
  // allow_tf32 (last, default False): torch.backends.cuda.matmul.allow_tf32, passed by
  // ffa.functional because the stable ABI cannot read torch's global context; only the CUDA p=1
  // kernel uses it (tensor cores in TF32).
  m.def(
      "fa_loss(Tensor student, Tensor teacher, int p, float eps, bool allow_tf32=False) -> Tensor");
  m.def(
      "fa_loss_backward(Tensor grad, Tensor student, Tensor teacher, int p, float eps, "
      "bool[2] output_mask, bool allow_tf32=False) -> (Tensor, Tensor)");
  // FFA: sum_i mean_k f((D Z)_ik) / N^2, f = |.| (p=1) or square (p=2); projection Z [Bz,N,k],
  // Bz in {1, B}. Also returns Y = D Z [B,N,k] and P_S = U_S Z [B,Cs,k], P_T = U_T Z [B,Ct,k]
  // for the backward.
  m.def(
      "ffa_loss(Tensor student, Tensor teacher, Tensor projection, int p, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ffa_loss_backward(Tensor grad, Tensor student, Tensor teacher, Tensor projection, "
      "Tensor y, Tensor p_s, Tensor p_t, int p, float eps, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
  // FFA with the probes regenerated from a counter-based generator instead of a projection tensor:
  // Z[i, j] = the (i * k + j)-th normal of Philox4x32-10 at (seed, offset) (csrc/philox.h), [N, k]
  // shared by the batch. The CUDA kernels never store Z; the CPU kernel regenerates the same
  // values. offset is a torch Philox offset (a multiple of 4); a call consumes 4 * ceil(N k / 4) of
  // it. Outputs and backward as ffa_loss / ffa_loss_backward.
  m.def(
      "ffa_loss_philox(Tensor student, Tensor teacher, int k, int p, float eps, int seed, "
      "int offset) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ffa_loss_philox_backward(Tensor grad, Tensor student, Tensor teacher, Tensor y, "
      "Tensor p_s, Tensor p_t, int k, int p, float eps, int seed, int offset, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // The probes Z [1, N, k] (compute dtype of `like`, N = like's H * W) that ffa_loss_philox draws
  // for (k, seed, offset): for the paths that need Z as a tensor (double backward).
  m.def("philox_probes(Tensor like, int k, int seed, int offset) -> Tensor");
  // ---- low-bit fake quantization (ffa.quant) ---------------------------------------------
  // The paper's weight quantizers (bits 1, 2, 4; 3, 5-8 generalized), one scale per tensor or per
  // output channel (dim 0). The gradient is straight-through (identity), so there is no backward
  // op.
  m.def("quantize_weight(Tensor weight, int bits, bool per_channel) -> Tensor");
  // Quantized ReLU with step alpha (1 element, clamped to [1e-3, 5] inside the kernel). ste,
  // alpha_grad and rate only shape the backward; they are here so autograd can see them.
  m.def(
      "quant_relu(Tensor x, Tensor alpha, int bits, str ste, str alpha_grad, float rate) "
      "-> Tensor");
  m.def(
      "quant_relu_backward(Tensor grad, Tensor x, Tensor alpha, int bits, str ste, "
      "str alpha_grad, float rate, bool[2] output_mask) -> (Tensor, Tensor)");
  // Affine fake quantization, torch's per-tensor (axis None) / per-channel ops; learnable=True
  // follows torch's LSQ ops (zero point rounded and clamped; grad_factor scales the qparam grads).
  m.def(
      "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
      "int? axis, bool learnable, float grad_factor) -> Tensor");
  m.def(
      "fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
      "int quant_min, int quant_max, int? axis, bool learnable, float grad_factor, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

// Run-time choices of the CPU kernels, named where they are made.
namespace ffa::cpu {
const char* blas_name();  // cpu/blas.h
namespace quant {
const char* isa_name();  // cpu/quant_cpu.cpp
}  // namespace quant
}  // namespace ffa::cpu

// A tiny Python module (limited API): importing ffa._C runs the static registrations above. No
// pybind11. Its functions report run-time facts for `python -m ffa.info` (ffa/info.py); they use
// the limited CPython API only and no torch types.
namespace {
PyObject* name_or_error(const char* (*fn)()) {
  try {
    return PyUnicode_FromString(fn());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}
PyObject* cpu_capability(PyObject*, PyObject*) { return name_or_error(&ffa::cpu::quant::isa_name); }
PyObject* blas(PyObject*, PyObject*) { return name_or_error(&ffa::cpu::blas_name); }
PyMethodDef ffa_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set of the CPU kernels' vector loops chosen at run time: "
     "'avx512', 'avx2' or 'base' (FFA_QUANT_ISA can lower it)."},
    {"blas", blas, METH_NOARGS, "The GEMM the CPU kernels call."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace
static PyModuleDef ffa_module = {PyModuleDef_HEAD_INIT, "_C", "ffa native ops", -1, ffa_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ffa_module); }
