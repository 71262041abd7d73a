// Kernels compiled once per x86-64 instruction set (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_baseline.cpp, all from kernels_impl.h); kernels.cpp picks one set when the library loads.
// Plain pointers only: these translation units include no ATen headers.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

template <typename T>
struct IsaKernels {
  // C[M, N] += A[M, K] @ B[K, N], row-major with leading dimensions.
  void (*gemm_acc)(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc);
  // h[r, j] = act(h[r, j]) for r < rows, j < H; rows ld apart.
  void (*activate_rows)(T* h, int64_t rows, int64_t H, int64_t ld, bool relu);
  // grad[r, j] *= act'(h[r, j]) written from the output h: tanh' = 1 - h^2, relu' = [h > 0].
  void (*scale_by_activation_grad)(T* grad, const T* h, int64_t rows, int64_t H, int64_t ld, bool relu);
};

IsaKernels<float> avx512_kernels_f32();
IsaKernels<double> avx512_kernels_f64();
IsaKernels<float> avx2_kernels_f32();
IsaKernels<double> avx2_kernels_f64();
IsaKernels<float> baseline_kernels_f32();
IsaKernels<double> baseline_kernels_f64();

}  // namespace rnn_ext::cpu
