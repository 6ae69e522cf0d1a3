// Row-major GEMM for the CPU kernels: C[m x n] = alpha * op(A) op(B) + beta * C.
//
// op(A) is A [m x k] (A[i * lda + l]) or, with ta, the transpose of a stored [k x m] matrix; same
// for B. Goes through ATen's addmm on borrowed buffers, so it runs whatever BLAS torch was built
// with (MKL here) and stays portable: torch does not export its internal cpublas::gemm. Inside an
// at::parallel_for region the BLAS call runs single-threaded; outside it uses torch's threads.
// beta = 0 ignores C's old contents (NaN-safe, as BLAS).
#pragma once
#include <ATen/ATen.h>

namespace ffa::cpu {

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {m, k},
                         ta ? at::IntArrayRef({1, lda}) : at::IntArrayRef({lda, 1}), opts);
  auto b = at::from_blob(const_cast<T*>(B), {k, n},
                         tb ? at::IntArrayRef({1, ldb}) : at::IntArrayRef({ldb, 1}), opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  c.addmm_(a, b, beta, alpha);
}

}  // namespace ffa::cpu
