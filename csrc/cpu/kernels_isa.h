// Kernels compiled once per x86-64 instruction set (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_baseline.cpp, all from kernels_impl.h); kernels.cpp picks one set when the library loads.
// Plain pointers only: these translation units include no ATen headers.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

// What a recurrence step does to each finished tile of C before storing it.
enum class Epilogue : int32_t {
  kNone,
  kTanh,       // C = tanh(C)
  kRelu,       // C = relu(C)
  kTanhGrad,   // C *= 1 - H^2    (H: the step's outputs)
  kReluGrad,   // C *= [H > 0]
};

// One step's product C[M, N] = epilogue(S + A[M, K] @ W[K, N]), W packed by IsaKernels::pack,
// where the start S is C itself (accumulate), or else the row vector `row` [N] on every row
// (zero when row is nullptr). A == nullptr means no product (only the epilogue), e.g. rows that
// receive no recurrent term.
template <typename T>
struct StepJob {
  int64_t M, N, K;
  const T* A;  // [M, K], rows lda apart
  int64_t lda;
  const T* W;  // packed [K, N]
  T* C;        // [M, N], rows ldc apart
  int64_t ldc;
  Epilogue epilogue;
  const T* H;  // [M, N], rows ldh apart: the outputs the gradient epilogues read
  int64_t ldh;
  bool accumulate;
  const T* row;  // [N] or nullptr; read only when !accumulate
};

template <typename T>
struct IsaKernels {
  // Columns per packed panel. Packed W holds ceil(N / panel_width) panels of K x panel_width
  // elements (zero-padded past N), each contiguous.
  int64_t panel_width;
  void (*pack)(int64_t K, int64_t N, const T* W, int64_t ldw, T* packed);
  // The job splits into independent tiles [0, num_tiles), run in any order or in parallel.
  int64_t (*num_tiles)(int64_t M, int64_t N);
  void (*run_tiles)(const StepJob<T>& job, int64_t begin, int64_t end);
};

IsaKernels<float> avx512_kernels_f32();
IsaKernels<double> avx512_kernels_f64();
IsaKernels<float> avx2_kernels_f32();
IsaKernels<double> avx2_kernels_f64();
IsaKernels<float> baseline_kernels_f32();
IsaKernels<double> baseline_kernels_f64();

}  // namespace rnn_ext::cpu
