// CPU building blocks of the recurrence: a small-matrix GEMM and the pointwise activation math.
// Float loops are compiled once per x86-64 level (AVX-512, AVX2+FMA, baseline) and picked at load
// time, so the wheel runs anywhere and still vectorises where the CPU allows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnn_ext::cpu {

// C[M, N] += A[M, K] @ B[K, N]; all row-major with leading dimensions lda, ldb, ldc.
// Small products run in a register-blocked loop; large ones in ATen's multithreaded GEMM.
void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc);
void gemm_acc(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc);

// True when gemm_acc of this size stays in the single-threaded register-blocked loop.
bool is_small_gemm(int64_t M, int64_t N, int64_t K);

// h[r, j] = act(h[r, j]) for r < rows, j < H, rows ld apart.
void activate_rows(float* h, int64_t rows, int64_t H, int64_t ld, bool relu);
void activate_rows(double* h, int64_t rows, int64_t H, int64_t ld, bool relu);

// grad[r, j] *= act'(from the output h[r, j]): tanh' = 1 - h^2, relu' = [h > 0].
void scale_by_activation_grad(float* grad, const float* h, int64_t rows, int64_t H, int64_t ld, bool relu);
void scale_by_activation_grad(double* grad, const double* h, int64_t rows, int64_t H, int64_t ld, bool relu);

}  // namespace rnn_ext::cpu
