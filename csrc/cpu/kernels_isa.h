// Kernels compiled once per x86-64 instruction set (kernels_avx512_bf16.cpp, kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_baseline.cpp, all from kernels_impl.h); kernels.cpp picks one set when
// the library loads. Plain pointers only: these translation units include no ATen headers.
#pragma once

#include <cstdint>

namespace rnn_ext::cpu {

// A bfloat16 value as its bits (c10::BFloat16's layout: the high half of a float).
using bf16_t = uint16_t;

// Whether kernels_avx512_bf16.cpp compiles the bfloat16 kernels: x86-64 GCC 10 or later, for its
// `#pragma GCC target("avx512bf16")` and the intrinsics that need it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define RNN_EXT_HAS_BF16_KERNELS 1
#else
#define RNN_EXT_HAS_BF16_KERNELS 0
#endif

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
// IsaKernels::pack, where the start S is C itself (accumulate), or the rows `start` (accumulate
// with start given; numbered as y's), or else the row vector `row` [cols] on every row (zero when
// row is nullptr). A == nullptr means no product (only the epilogue), e.g. rows that
// receive no recurrent term. Rows are numbered through `index`. C has the operands' type, except
// that a bfloat16 product may also add into a float C (c_t); the sums run in float for bfloat16.
template <typename scalar_t, typename c_t = scalar_t>
struct StepJob {
  int64_t rows, cols, depth;
  const scalar_t* A;  // [rows, depth], rows lda apart
  int64_t lda;
  const scalar_t* W;  // packed [depth, cols]
  c_t* C;             // [rows, cols], rows ldc apart
  int64_t ldc;
  Epilogue epilogue;
  const scalar_t* y;  // [rows, cols], rows ldy apart: the outputs the gradient epilogues read
  int64_t ldy;
  bool accumulate;
  const c_t* row;  // [cols] or nullptr; read only when !accumulate
  RowIndex index;
  // bfloat16 only: elements from depth pair q of an A row to pair q + 1. 2: A's rows run along the
  // depth; else A is in pack_pairs' layout (a row's pairs are this far apart, rows lda = 2 apart).
  int64_t a_pair_stride = 2;
  const c_t* start = nullptr;  // [rows, cols], rows ld_start apart, or nullptr: C
  int64_t ld_start = 0;
};

// One step with the weights as stored, unpacked (nn.Linear's [out, in] layout), for a few rows:
// C[rows, cols] = epilogue(bias1 + bias2 + A1 @ W1^T + A2 @ W2^T), each element a pair of dot products
// along the weights' contiguous rows. Packing W per call would cost as much as the product itself.
template <typename scalar_t>
struct DotJob {
  int64_t rows, cols;
  const scalar_t* a1;  // [rows, depth1], rows lda1 apart
  int64_t lda1, depth1;
  const scalar_t* w1;  // [cols, depth1], contiguous
  const scalar_t* a2;  // [rows, depth2], rows lda2 apart
  int64_t lda2, depth2;
  const scalar_t* w2;  // [cols, depth2], contiguous
  const scalar_t* bias1;  // [cols] or nullptr
  const scalar_t* bias2;  // [cols] or nullptr
  scalar_t* C;  // [rows, cols], rows ldc apart
  int64_t ldc;
  Epilogue epilogue;  // kNone, kTanh or kRelu
};

// The gradients of a DotJob for a few rows (rnn_cell_backward), W read as stored: grad_a = grad_z @ W
// (per row of grad_a, a combination of W's rows, accumulated in registers), then grad_w = grad_z^T a
// (each row of grad_w a combination of a's rows, written once), for the operand pairs (a1, W1) and
// (a2, W2). Any output may be nullptr.
template <typename scalar_t>
struct DotGradJob {
  int64_t rows, cols;
  const scalar_t* grad_z;  // [rows, cols] contiguous: the gradient of the pre-activation
  const scalar_t* a1;      // [rows, depth1] contiguous
  int64_t depth1;
  const scalar_t* w1;    // [cols, depth1] contiguous
  scalar_t* grad_a1;     // [rows, depth1]
  scalar_t* grad_w1;     // [cols, depth1]
  const scalar_t* a2;    // [rows, depth2] contiguous
  int64_t depth2;
  const scalar_t* w2;    // [cols, depth2] contiguous
  scalar_t* grad_a2;     // [rows, depth2]
  scalar_t* grad_w2;     // [cols, depth2]
};

template <typename scalar_t>
struct IsaKernels {
  // Columns per packed panel. Packed W holds ceil(cols / panel_width) panels of depth x panel_width
  // elements (zero-padded past cols), each contiguous: packed_size(depth, cols) elements. pack
  // reads W[k, j] at W + k * stride_k + j * stride_j, along j when stride_j is 1 (W row-major),
  // else along k (fast when stride_k is 1: the transpose of a row-major matrix).
  int64_t panel_width;
  int64_t (*packed_size)(int64_t depth, int64_t cols);
  void (*pack)(int64_t depth, int64_t cols, const scalar_t* W, int64_t stride_k, int64_t stride_j, scalar_t* packed);
  // The job splits into independent tiles [0, num_tiles), run in any order or in parallel.
  int64_t (*num_tiles)(int64_t rows, int64_t cols);
  void (*run_tiles)(const StepJob<scalar_t>& job, int64_t begin, int64_t end);
  // Columns [begin, end) of a DotJob, every row; split the columns in multiples of 8 to run in parallel.
  void (*dot_columns)(const DotJob<scalar_t>& job, int64_t begin, int64_t end);
  // The gradients of operand pair 0 (a1, W1) or 1 (a2, W2) of a DotGradJob: the pairs are independent.
  void (*dot_grad_pair)(const DotGradJob<scalar_t>& job, int64_t operand);
};

// The bfloat16 step kernels (the CPU's bf16 dot-product instruction, vdpbf16ps): only the
// avx512_bf16 set has them. A panel holds, for each pair of depth rows (2q, 2q + 1), its columns'
// two values side by side (one 32-bit lane per column, as the instruction pairs its operands),
// the second zero past an odd depth: ceil(depth / 2) * 2 * panel_width elements.
template <>
struct IsaKernels<bf16_t> {
  int64_t panel_width;
  int64_t (*packed_size)(int64_t depth, int64_t cols);
  void (*pack)(int64_t depth, int64_t cols, const bf16_t* W, int64_t stride_k, int64_t stride_j, bf16_t* packed);
  int64_t (*num_tiles)(int64_t rows, int64_t cols);
  void (*run_tiles)(const StepJob<bf16_t>& job, int64_t begin, int64_t end);
  void (*run_tiles_float_c)(const StepJob<bf16_t, float>& job, int64_t begin, int64_t end);
  // Pairs [begin, end) of the rows row[0, rows) (each [cols]) side by side: for pair q (rows 2q and
  // 2q + 1, the second zero past an odd count) and column group p (columns 32p to 32p + 31, zero
  // past cols), the group's values of both rows, one 32-bit lane per column, at dst + q *
  // pair_stride + p * group_stride (64 elements). With group_stride 64 a pair's groups follow each
  // other: the transpose of the rows, as a bf16 tile's A taken a depth pair at a time
  // (StepJob::a_pair_stride = pair_stride); with pair_stride 64, it is pack's layout of the rows
  // as W [rows, cols] (group_stride = ceil(rows / 2) * 64).
  void (*pack_pairs)(int64_t rows, int64_t cols, const bf16_t* const* row, bf16_t* dst, int64_t pair_stride,
                     int64_t group_stride, int64_t begin, int64_t end);
};

IsaKernels<float> avx512_bf16_kernels_f32();
IsaKernels<double> avx512_bf16_kernels_f64();
IsaKernels<bf16_t> avx512_bf16_kernels_bf16();
IsaKernels<float> avx512_kernels_f32();
IsaKernels<double> avx512_kernels_f64();
IsaKernels<float> avx2_kernels_f32();
IsaKernels<double> avx2_kernels_f64();
IsaKernels<float> baseline_kernels_f32();
IsaKernels<double> baseline_kernels_f64();

}  // namespace rnn_ext::cpu
