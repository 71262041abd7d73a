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
  kTanhGrad,   // C *= 1 - y^2    (y: the step's outputs)
  kReluGrad,   // C *= [y > 0]
};

// Which row of A, C and y is row r of a job: row r, or row a[r] of A, c[r] of C, y[r] of y where
// those are given (a padded batch, whose rows a walk takes in length order).
struct RowIndex {
  const int64_t* a = nullptr;
  const int64_t* c = nullptr;
  const int64_t* y = nullptr;
};

// One step's product C[rows, cols] = epilogue(S + A[rows, depth] @ W[depth, cols]), W packed by
// IsaKernels::pack, where the start S is C itself (accumulate), or else the row vector `row` [cols] on every row
// (zero when row is nullptr). A == nullptr means no product (only the epilogue), e.g. rows that
// receive no recurrent term. Rows are numbered through `index`.
template <typename scalar_t>
struct StepJob {
  int64_t rows, cols, depth;
  const scalar_t* A;  // [rows, depth], rows lda apart
  int64_t lda;
  const scalar_t* W;  // packed [depth, cols]
  scalar_t* C;        // [rows, cols], rows ldc apart
  int64_t ldc;
  Epilogue epilogue;
  const scalar_t* y;  // [rows, cols], rows ldy apart: the outputs the gradient epilogues read
  int64_t ldy;
  bool accumulate;
  const scalar_t* row;  // [cols] or nullptr; read only when !accumulate
  RowIndex index;
};

template <typename scalar_t>
struct IsaKernels {
  // Columns per packed panel. Packed W holds ceil(cols / panel_width) panels of depth x panel_width
  // elements (zero-padded past cols), each contiguous.
  int64_t panel_width;
  void (*pack)(int64_t depth, int64_t cols, const scalar_t* W, int64_t ldw, scalar_t* packed);
  // The job splits into independent tiles [0, num_tiles), run in any order or in parallel.
  int64_t (*num_tiles)(int64_t rows, int64_t cols);
  void (*run_tiles)(const StepJob<scalar_t>& job, int64_t begin, int64_t end);
};

IsaKernels<float> avx512_kernels_f32();
IsaKernels<double> avx512_kernels_f64();
IsaKernels<float> avx2_kernels_f32();
IsaKernels<double> avx2_kernels_f64();
IsaKernels<float> baseline_kernels_f32();
IsaKernels<double> baseline_kernels_f64();

}  // namespace rnn_ext::cpu
