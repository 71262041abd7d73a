// CPU building blocks of the recurrence: one step's C = epilogue(C + A @ W) with W packed once
// per call, threaded over tiles when the step is large enough. The tile code is compiled per
// instruction set (kernels_isa.h); the best one for this CPU is picked when the library loads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels_isa.h"

namespace rnn_ext::cpu {

// The instruction set the CPU kernels run with: "avx512", "avx2" or "baseline".
std::string cpu_isa();

// W [depth, cols] (row-major, rows ldw apart), packed into the active ISA's column panels.
// (GEMM dimensions here are rows, cols and depth: the shape legend's letters mean other things.)
template <typename scalar_t>
class PackedWeight {
 public:
  PackedWeight(const scalar_t* W, int64_t ldw, int64_t depth, int64_t cols);
  const scalar_t* data() const { return buffer_.data_ptr<scalar_t>(); }
  int64_t depth() const { return depth_; }
  int64_t cols() const { return cols_; }

 private:
  int64_t depth_, cols_;
  at::Tensor buffer_;
};

// C[rows, cols] = epilogue(C + A[rows, depth] @ W) (A == nullptr: epilogue only); y is what the
// gradient epilogues read (the step's outputs), rows ldy apart; rows numbered through index.
// Threads over tiles unless single_thread.
template <typename scalar_t>
void step(
    int64_t rows, const std::type_identity_t<scalar_t>* A, int64_t lda, const PackedWeight<scalar_t>& W, scalar_t* C, int64_t ldc,
    Epilogue epilogue, const std::type_identity_t<scalar_t>* y = nullptr, int64_t ldy = 0, bool single_thread = false,
    RowIndex index = {});

// C[rows, cols] = row + A[rows, depth] @ W (row [cols] added to every row, nullptr: nothing), rows
// numbered through index (only the rows it names are touched), threaded over tiles: the all-rows
// products (input projection with its bias, grad_input), with no pass to initialise C.
template <typename scalar_t>
void product(
    int64_t rows, const std::type_identity_t<scalar_t>* A, int64_t lda, const PackedWeight<scalar_t>& W, scalar_t* C,
    int64_t ldc, const std::type_identity_t<scalar_t>* row = nullptr, RowIndex index = {});

// A DotJob (kernels_isa.h), threaded over columns when it is large enough.
template <typename scalar_t>
void dot_step(const DotJob<scalar_t>& job);

// A DotGradJob (kernels_isa.h), its two operand pairs on two threads when it is large enough.
template <typename scalar_t>
void dot_grad(const DotGradJob<scalar_t>& job);

}  // namespace rnn_ext::cpu
