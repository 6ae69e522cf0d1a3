// Row-major GEMM for the CPU kernels: C[m x n] = alpha * op(A) op(B) + beta * C.
//
// op(A) is A [m x k] (A[i * lda + l]) or, with ta, the transpose of a stored [k x m] matrix; same
// for B. beta = 0 ignores C's old contents (NaN-safe, as BLAS).
//
// Fast path: the Fortran BLAS symbols sgemm_/dgemm_ that torch's MKL build exports, bound weakly so
// the extension still loads against a torch without them. Tiled kernels issue thousands of small
// GEMMs; calling BLAS directly skips ~5-10 us of dispatcher and tensor-construction overhead per
// call. Fallback (a torch whose BLAS is not MKL): torch's matmul on borrowed buffers through the
// stable ABI, then C = alpha * AB + beta * C here. Inside a parallel region either path runs
// single-threaded; outside it uses torch's threads.
#pragma once
#include <limits>

#include "stable.h"

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*)
    __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
// Present only when torch links MKL (the stable ABI has no at::hasMKL()).
int mkl_get_max_threads() __attribute__((weak));
}

namespace ffa::cpu {

namespace detail {
inline bool fits_int(std::initializer_list<int64_t> v) {
  for (int64_t x : v)
    if (x > std::numeric_limits<int>::max()) return false;
  return true;
}
// Only trust the exported symbols when they come from torch's MKL (LP64 Fortran ABI).
inline bool use_fortran_blas() {
  static const bool ok = mkl_get_max_threads != nullptr && sgemm_ != nullptr && dgemm_ != nullptr;
  return ok;
}
}  // namespace detail

// The GEMM that gemm() runs, named for `python -m ffa.info` (defined in cpu/fa_cpu.cpp).
const char* blas_name();

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (detail::use_fortran_blas() && detail::fits_int({m, n, k, lda, ldb, ldc})) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    const int M = int(n), N = int(m), K = int(k), la = int(ldb), lb = int(lda), lc = int(ldc);
    if (k == 0) {  // BLAS would leave C untouched; we want beta * C (0 when beta == 0)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
      return;
    }
    if constexpr (std::is_same_v<T, float>)
      sgemm_(&tra, &trb, &M, &N, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
    else
      dgemm_(&tra, &trb, &M, &N, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const Device cpu(DeviceType::CPU);
  const ScalarType dt = scalar_type_of<T>();
  const int64_t a_st[2] = {ta ? 1 : lda, ta ? lda : 1}, b_st[2] = {tb ? 1 : ldb, tb ? ldb : 1};
  const int64_t a_sz[2] = {m, k}, b_sz[2] = {k, n};
  const Tensor a = torch::stable::from_blob(const_cast<T*>(A), IntArrayRef(a_sz, 2),
                                            IntArrayRef(a_st, 2), cpu, dt);
  const Tensor b = torch::stable::from_blob(const_cast<T*>(B), IntArrayRef(b_sz, 2),
                                            IntArrayRef(b_st, 2), cpu, dt);
  const Tensor ab = torch::stable::contiguous(torch::stable::matmul(a, b));
  const T* p = ab.const_data_ptr<T>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T& c = C[i * ldc + j];
      c = alpha * p[i * n + j] + (beta == T(0) ? T(0) : beta * c);
    }
}

}  // namespace ffa::cpu
