// CPU building blocks of the recurrence: one step's C = epilogue(C + A @ W) with W packed once
// per call, threaded over tiles when the step is large enough. The tile code is compiled per
// instruction set (kernels_isa.h); the best one for this CPU is picked when the library loads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels_isa.h"

namespace rnn_ext::cpu {

// The instruction set the CPU kernels run with: "avx512_bf16", "avx512", "avx2" or "baseline".
std::string cpu_isa();

// Whether the kernels below run bfloat16 (scalar_t c10::BFloat16): only the avx512_bf16 set has
// them. float and double always run.
bool has_bf16_kernels();

// Columns of a packed W: whole panels of it, read in place (PackedWeight::columns).
template <typename scalar_t>
struct PackedColumns {
  const scalar_t* data;
  int64_t depth, cols;
};

// W [depth, cols], packed into the active ISA's column panels. W may be any 2-d tensor of
// scalar_t; a transposed view of a contiguous matrix (w_hh.t()) packs without a copy.
// (GEMM dimensions here are rows, cols and depth: the shape legend's letters mean other things.)
template <typename scalar_t>
class PackedWeight {
 public:
  explicit PackedWeight(const at::Tensor& W);
  const scalar_t* data() const { return buffer_.data_ptr<scalar_t>(); }
  int64_t depth() const { return depth_; }
  int64_t cols() const { return cols_; }
  // Columns [col0, col_end) (col0 a multiple of the panel width, col_end <= cols()), in place.
  PackedColumns<scalar_t> columns(int64_t col0, int64_t col_end) const;
  PackedColumns<scalar_t> all() const { return {data(), depth_, cols_}; }

 private:
  int64_t depth_, cols_;
  at::Tensor buffer_;
};

// Columns per packed panel of a W of this dtype, with the active ISA: a walk's column slices are
// runs of whole panels.
int64_t packed_panel_width(at::ScalarType dtype);

// C[rows, cols] = epilogue(S + A[rows, depth] @ W) (A == nullptr: epilogue only), the start S
// C itself, or the rows `start` (rows ld_start apart, numbered as y's) where given; y is what the
// gradient epilogues read (the step's outputs), rows ldy apart; rows numbered through index. On the
// calling thread: the walks split their steps over threads themselves (walk_threads.h). C has W's
// type (c_t = scalar_t), or is float for bfloat16 operands (a sum kept in float across calls).
template <typename scalar_t, typename c_t>
void step(
    int64_t rows, const std::type_identity_t<scalar_t>* A, int64_t lda, const PackedColumns<scalar_t>& W, c_t* C,
    int64_t ldc, Epilogue epilogue, const std::type_identity_t<scalar_t>* y = nullptr, int64_t ldy = 0,
    RowIndex index = {}, const std::type_identity_t<c_t>* start = nullptr, int64_t ld_start = 0);

// C[rows, cols] = row + A[rows, depth] @ W (row [cols] added to every row, nullptr: nothing), rows
// numbered through index (only the rows it names are touched), threaded over tiles: the all-rows
// products (input projection with its bias, grad_input), with no pass to initialise C.
template <typename scalar_t>
void product(
    int64_t rows, const std::type_identity_t<scalar_t>* A, int64_t lda, const PackedWeight<scalar_t>& W, scalar_t* C,
    int64_t ldc, const std::type_identity_t<scalar_t>* row = nullptr, RowIndex index = {});

// A matrix [rows.size(), cols] as pointers to its rows.
template <typename scalar_t>
struct MatrixRows {
  std::vector<const scalar_t*> rows;
  int64_t cols;
};

// The weight gradients' products of a bfloat16 layer: g^T @ m for each m of ms, with g [rows, cols]
// (a direction's grad_z) and every m [rows, m.cols] (the input, the states), the depth being every
// step's row (thousands). They go kTransposedChunkRows rows at a time: the chunk of g and of each m
// is packed as W is (pack_pairs; g as the transpose's rows, 32 at a time, a depth pair at a time),
// and the product adds it into a float sum, so that both operands' chunks stay in cache while C's
// tiles pass by. Every element sums its rows in order, at any thread count. Returns g^T @ m
// [cols, m.cols] per m, each element rounded once to bfloat16. Needs has_bf16_kernels().
constexpr int64_t kTransposedChunkRows = 1024;
std::vector<at::Tensor> bf16_transposed_products(
    const MatrixRows<c10::BFloat16>& g, const std::vector<MatrixRows<c10::BFloat16>>& ms);

// The sum of each column of t [rows, cols] (rows in order, in double; bfloat16 in float; then rounded): the
// bias gradients, the same bits at every thread count.
at::Tensor column_sums(const at::Tensor& t);

// A DotJob (kernels_isa.h), threaded over columns when it is large enough.
template <typename scalar_t>
void dot_step(const DotJob<scalar_t>& job);

// A DotGradJob (kernels_isa.h), its two operand pairs on two threads when it is large enough.
template <typename scalar_t>
void dot_grad(const DotGradJob<scalar_t>& job);

}  // namespace rnn_ext::cpu
