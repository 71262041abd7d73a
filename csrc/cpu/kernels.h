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

// W [K, N] (row-major, rows ldw apart), packed into the active ISA's column panels.
template <typename T>
class PackedWeight {
 public:
  PackedWeight(const T* W, int64_t ldw, int64_t K, int64_t N);
  const T* data() const { return buffer_.data_ptr<T>(); }
  int64_t K() const { return K_; }
  int64_t N() const { return N_; }

 private:
  int64_t K_, N_;
  at::Tensor buffer_;
};

// C[M, N] = epilogue(C + A[M, K] @ W) (A == nullptr: epilogue only); H is what the gradient
// epilogues read (the step's outputs), rows ldh apart. Threads over tiles unless single_thread.
template <typename T>
void step(
    int64_t M, const std::type_identity_t<T>* A, int64_t lda, const PackedWeight<T>& W, T* C, int64_t ldc,
    Epilogue epilogue, const std::type_identity_t<T>* H = nullptr, int64_t ldh = 0, bool single_thread = false);

// C[M, N] = row + A[M, K] @ W, row [N] added to every row (nullptr: nothing), threaded over tiles:
// the all-rows products (input projection with its bias, grad_input), with no pass to initialise C.
template <typename T>
void product(
    int64_t M, const std::type_identity_t<T>* A, int64_t lda, const PackedWeight<T>& W, T* C, int64_t ldc,
    const std::type_identity_t<T>* row = nullptr);

}  // namespace rnn_ext::cpu
