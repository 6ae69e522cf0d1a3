// ffa._C_cuda: the CUDA implementations of the ops that ffa._C defines (losses_cuda.cpp,
// quant_cuda.cpp register them with STABLE_TORCH_LIBRARY_IMPL(ffa, CUDA, m)). ffa/_ops.py imports
// it after ffa._C, and only when torch has CUDA. A tiny limited-API Python module, no pybind11.
#include <Python.h>

static PyModuleDef ffa_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "ffa CUDA kernels", -1,
                                      nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&ffa_cuda_module); }
