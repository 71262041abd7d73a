// CUDA implementation of rnn_layer and rnn_layer_backward (shapes in csrc/rnn.h; semantics are
// those of csrc/cpu/rnn_cpu.cpp).
//
// Forward: output = input @ [w_ih of all directions]^T + (b_ih + b_hh) as one GEMM (ATen), then per
// step and direction one cuBLAS GEMM for the recurrent term h_{t-1} @ w_hh^T and one fused kernel
// output[t] = act(output[t] + recurrent term), which also stores h_n for sequences ending there.
//
// Backward: per direction a walk against time; per step one cuBLAS GEMM carries the gradient of
// the neighbouring step back through w_hh, and one fused kernel forms
// grad_z[t] = (grad_output[t] + carried gradient or grad_h_n) * act'(output[t]) and, when the
// weight gradients are wanted, gathers the state each row started from. The input and weight
// gradients are then a few GEMMs over all rows (ATen).
//
// Precision: float32 and float64 run in their own type. float16 and bfloat16 keep tensors in
// their type but accumulate in float32 (at::opmath_type): the per-step cuBLAS GEMMs read 16-bit
// operands and write a float32 scratch (CUBLAS_COMPUTE_32F), the fused kernels add, activate and
// differentiate in float32 and round once when storing, grad_hx is accumulated in float32, and the
// large ATen GEMMs and the bias-gradient sum accumulate in float32 as ATen does for these types.
// float32 GEMMs use TF32 only when torch.backends.cuda.matmul.allow_tf32 allows it, as torch.mm.
//
// cuBLAS is called directly (cublasGemmEx on ATen's handle for the current stream), not through
// at::cuda::blas::gemm: libtorch_cuda does not export those templates to extensions.
#include "../rnn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cublas_v2.h>

#include <algorithm>
#include <climits>
#include <type_traits>

namespace rnn_ext::gpu {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

int64_t blocks_for(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
}

// ---------------------------------------------------------------------------------------------
// Pointwise math, in acc_t (float for float16/bfloat16/float32, double for float64).

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t z, bool relu) {
  if (relu) {
    return z < acc_t(0) ? acc_t(0) : z;  // NaN passes through, as in torch.relu
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    return tanhf(z);
  } else {
    return tanh(z);
  }
}

// The activation's derivative times g, from the activation's output y: tanh' = 1 - y^2, relu' = [y > 0].
template <typename acc_t>
__device__ __forceinline__ acc_t scale_by_activation_grad(acc_t g, acc_t y, bool relu) {
  if (relu) {
    return y > acc_t(0) ? g : acc_t(0);
  }
  return g * (acc_t(1) - y * y);
}

// One step of one direction, forward:
//   h    [rows, ld]  in: input projection plus bias; out: the new state (this direction's columns)
//   z    [rows, H]   the recurrent term h_{t-1} @ w_hh^T
//   h_n  [B, H]      rows r >= h_n_from end their sequence here and are copied to h_n[r]
template <typename scalar_t, typename acc_t>
__global__ void forward_step_kernel(
    scalar_t* __restrict__ h, const acc_t* __restrict__ z, scalar_t* __restrict__ h_n,
    int64_t rows, int64_t H, int64_t ld, int64_t h_n_from, bool relu) {
  const int64_t n = rows * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H;
    const int64_t j = i - r * H;
    const scalar_t y = static_cast<scalar_t>(
        activate(static_cast<acc_t>(h[r * ld + j]) + z[i], relu));
    h[r * ld + j] = y;
    if (r >= h_n_from) {
      h_n[i] = y;
    }
  }
}

// One step of one direction, backward:
//   grad_z      [rows, ld]  out: gradient of the pre-activation
//   grad_out    [rows, ld]  grad_output rows of this step
//   carry       [rows, H]   rows r < carry_rows: gradient carried back from the neighbouring step
//   grad_h_n    [B, H]      rows r >= carry_rows: their sequence's last state is here, so grad_h_n[r]
//   h           [rows, ld]  this step's output (the activation's output)
//   h_prev      [rows, ld]  optional out (nullptr to skip): the state each row started from, for grad_w_hh
//   prev_out    [rows, ld]  rows r < prev_rows started from the neighbouring step's output ...
//   hx          [B, H]      ... rows r >= prev_rows from hx[r]
template <typename scalar_t, typename acc_t>
__global__ void backward_step_kernel(
    scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ carry,
    const scalar_t* __restrict__ grad_h_n, const scalar_t* __restrict__ h, scalar_t* __restrict__ h_prev,
    const scalar_t* __restrict__ prev_out, const scalar_t* __restrict__ hx,
    int64_t rows, int64_t H, int64_t ld, int64_t carry_rows, int64_t prev_rows, bool relu) {
  const int64_t n = rows * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H;
    const int64_t j = i - r * H;
    const int64_t k = r * ld + j;
    const acc_t incoming = r < carry_rows ? carry[i] : static_cast<acc_t>(grad_h_n[i]);
    const acc_t g = static_cast<acc_t>(grad_out[k]) + incoming;
    grad_z[k] = static_cast<scalar_t>(scale_by_activation_grad(g, static_cast<acc_t>(h[k]), relu));
    if (h_prev != nullptr) {
      h_prev[k] = r < prev_rows ? prev_out[k] : hx[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cuBLAS

template <typename T>
constexpr cudaDataType_t cublas_type() {
  if constexpr (std::is_same_v<T, double>) {
    return CUDA_R_64F;
  } else if constexpr (std::is_same_v<T, float>) {
    return CUDA_R_32F;
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return CUDA_R_16F;
  } else {
    static_assert(std::is_same_v<T, at::BFloat16>, "rnn_ext: no cuBLAS type for this dtype");
    return CUDA_R_16BF;
  }
}

// C[M, N] = A[M, K] @ op(W), row-major with leading dimensions lda, ldw, ldc;
// op(W) = W^T for w_transposed (W: [N, K]), else W (W: [K, N]).
// A and W are scalar_t; C and the accumulation are acc_t (float32 for the 16-bit types).
// cuBLAS is column-major, where a row-major X is X^T: it computes C^T = op(W)^T @ A^T.
template <typename scalar_t>
void gemm_rows(
    cublasHandle_t handle, bool w_transposed, int64_t M, int64_t N, int64_t K,
    const scalar_t* A, int64_t lda, const scalar_t* W, int64_t ldw, at::opmath_type<scalar_t>* C, int64_t ldc) {
  using acc_t = at::opmath_type<scalar_t>;
  if (M == 0 || N == 0) {
    return;
  }
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if constexpr (std::is_same_v<scalar_t, double>) {
    compute = CUBLAS_COMPUTE_64F;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (at::globalContext().allowTF32CuBLAS()) {
      compute = CUBLAS_COMPUTE_32F_FAST_TF32;
    }
  }
  const acc_t alpha = 1;
  const acc_t beta = 0;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, w_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
      static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
      &alpha, W, cublas_type<scalar_t>(), static_cast<int>(ldw), A, cublas_type<scalar_t>(), static_cast<int>(lda),
      &beta, C, cublas_type<acc_t>(), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------------
// Walking time

// How the rows of step t connect to a neighbouring step: rows [0, split) continue at `neighbor`
// (t + 1 toward later steps, t - 1 toward earlier ones); rows [split, size(t)) have no neighbour
// that way, so their sequence ends (toward later) or begins (toward earlier) at t.
struct Link {
  int64_t neighbor;
  int64_t split;
};

Link link(const StepSchedule& steps, int64_t t, bool toward_later) {
  if (toward_later) {
    return {t + 1, steps.size_after(t)};
  }
  return {t - 1, t > 0 ? steps.size(t) : 0};
}

// Calls body(t) for every step in the order a direction's recurrence runs (forward = true) or
// in the order its gradient flows (forward = false).
template <typename F>
void walk(const StepSchedule& steps, bool reverse, bool forward, F&& body) {
  const int64_t T = steps.steps();
  if (reverse != forward) {
    for (int64_t t = 0; t < T; ++t) body(t);
  } else {
    for (int64_t t = T - 1; t >= 0; --t) body(t);
  }
}

void check_int_sizes(const LayerSizes& s) {
  // Per-step GEMMs pass these to cuBLAS as int.
  TORCH_CHECK(
      s.B <= INT_MAX && s.D * s.H <= INT_MAX,
      "rnn_ext: batch (", s.B, ") and directions * hidden_size (", s.D * s.H, ") must fit in int32 on CUDA");
}

void check_cuda_input(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "rnn_ext: input must be a CUDA tensor for the CUDA kernels, got ", input.device());
}

// One direction of the forward recurrence over out, which already holds the input projection plus bias.
//   hx [B, H], w_hh [H, H], out [N, ld] (this direction's columns), h_n [B, H], z [B, H] scratch
template <typename scalar_t>
void forward_direction(
    cublasHandle_t handle, cudaStream_t stream, const StepSchedule& steps, bool reverse, bool relu,
    int64_t H, const scalar_t* hx, const scalar_t* w_hh, scalar_t* out, int64_t ld, scalar_t* h_n,
    at::opmath_type<scalar_t>* z) {
  walk(steps, reverse, /*forward=*/true, [&](int64_t t) {
    const int64_t rows = steps.size(t);
    // Rows [0, prev.split) continue from the neighbouring step; the others start from hx.
    const Link prev = link(steps, t, /*toward_later=*/reverse);
    if (prev.split > 0) {
      gemm_rows(handle, true, prev.split, H, H, out + steps.offset(prev.neighbor) * ld, ld, w_hh, H, z, H);
    }
    gemm_rows(handle, true, rows - prev.split, H, H, hx + prev.split * H, H, w_hh, H, z + prev.split * H, H);
    // Rows [next.split, rows) end their sequence at this step.
    const Link next = link(steps, t, /*toward_later=*/!reverse);
    const int64_t n = rows * H;
    if (n > 0) {
      forward_step_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
          out + steps.offset(t) * ld, z, h_n, rows, H, ld, next.split, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// One direction's walk against time; writes this direction's columns of grad_z and h_prev.
//   grad_output, out, grad_z, h_prev [N, ld], grad_h_n, hx [B, H], w_hh [H, H],
//   grad_hx [B, H] in acc_t, z [B, H] scratch in acc_t; h_prev and grad_hx may be nullptr (not wanted)
template <typename scalar_t>
void backward_direction(
    cublasHandle_t handle, cudaStream_t stream, const StepSchedule& steps, bool reverse, bool relu,
    int64_t H, const scalar_t* grad_output, const scalar_t* grad_h_n, const scalar_t* hx,
    const scalar_t* w_hh, const scalar_t* out, int64_t ld, scalar_t* grad_z, scalar_t* h_prev,
    at::opmath_type<scalar_t>* grad_hx, at::opmath_type<scalar_t>* z) {
  walk(steps, reverse, /*forward=*/false, [&](int64_t t) {
    const int64_t rows = steps.size(t);
    const int64_t at_t = steps.offset(t) * ld;
    // Rows [0, next.split) feed the neighbouring step, whose grad_z is known: carry it back.
    const Link next = link(steps, t, /*toward_later=*/!reverse);
    if (next.split > 0) {
      gemm_rows(handle, false, next.split, H, H, grad_z + steps.offset(next.neighbor) * ld, ld, w_hh, H, z, H);
    }
    const Link prev = link(steps, t, /*toward_later=*/reverse);
    const scalar_t* prev_out = prev.split > 0 ? out + steps.offset(prev.neighbor) * ld : nullptr;
    const int64_t n = rows * H;
    if (n > 0) {
      backward_step_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
          grad_z + at_t, grad_output + at_t, z, grad_h_n, out + at_t,
          h_prev != nullptr ? h_prev + at_t : nullptr, prev_out, hx, rows, H, ld, next.split, prev.split, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Rows [prev.split, rows) started from hx: their gradient goes to grad_hx (each row once).
    if (grad_hx != nullptr) {
      gemm_rows(
          handle, false, rows - prev.split, H, H, grad_z + at_t + prev.split * ld, ld, w_hh, H,
          grad_hx + prev.split * H, H);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points

std::tuple<at::Tensor, at::Tensor> rnn_layer_cuda(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes);  // host-only checks
  check_cuda_input(input);
  const c10::cuda::CUDAGuard guard(input.device());
  check_int_sizes(s);
  const int64_t ld = s.D * s.H;

  auto output = at::empty({s.N, ld}, input.options());  // [N, D*H]
  const StepSchedule steps(batch_sizes, s.N, s.B);
  if (steps.steps() == 0) {
    return {output, hx.clone()};  // no step ran: the final state is the initial one
  }
  auto h_n = at::empty({s.D, s.B, s.H}, input.options());  // [D, B, H]

  const auto w_ih = stacked_w_ih(weights, s);  // [D*H, I]
  const auto bias = stacked_bias(weights, s);  // [D*H] or undefined
  const auto x = input.contiguous();           // [N, I]
  if (bias.defined()) {
    at::addmm_out(output, bias, x, w_ih.t());
  } else {
    at::mm_out(output, x, w_ih.t());
  }

  const auto h0 = hx.contiguous();  // [D, B, H]
  const auto acc_type = at::toOpMathType(input.scalar_type());
  auto z = at::empty({s.B, s.H}, input.options().dtype(acc_type));  // [B, H] recurrent term of one step
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rnn_layer_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t d = 0; d < s.D; ++d) {
      const auto w_hh = direction_weights(weights, d, s.has_bias).w_hh.contiguous();  // [H, H]
      forward_direction<scalar_t>(
          handle, stream, steps, d == 1, relu, s.H, h0[d].data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
          output.data_ptr<scalar_t>() + d * s.H, ld, h_n[d].data_ptr<scalar_t>(), z.data_ptr<acc_t>());
    }
  });
  return {output, h_n};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
    bool relu, const at::Tensor& output, std::array<bool, 3> output_mask) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes);  // host-only checks
  check_backward_args(s, input, grad_output, grad_h_n, output);
  check_cuda_input(input);
  const c10::cuda::CUDAGuard guard(input.device());
  check_int_sizes(s);
  if (s.N == 0) {
    return no_step_backward(input, grad_h_n, weights, output_mask);
  }
  const int64_t ld = s.D * s.H;
  const StepSchedule steps(batch_sizes, s.N, s.B);

  const auto out = output.contiguous();            // [N, D*H]
  const auto grad_out = grad_output.contiguous();  // [N, D*H]
  const auto grad_last = grad_h_n.contiguous();    // [D, B, H]
  const auto h0 = hx.contiguous();                 // [D, B, H]
  const auto acc_type = at::toOpMathType(input.scalar_type());
  auto grad_z = at::empty({s.N, ld}, input.options());  // [N, D*H], every row written by the walk
  at::Tensor grad_hx;  // [D, B, H] in acc_t
  if (output_mask[1]) {
    grad_hx = at::zeros({s.D, s.B, s.H}, input.options().dtype(acc_type));
  }
  auto z = at::empty({s.B, s.H}, input.options().dtype(acc_type));  // [B, H] gradient carried one step
  at::Tensor h_prev;  // [N, D*H]: the state each row started from, for grad_w_hh
  if (output_mask[2]) {
    h_prev = at::empty({s.N, ld}, input.options());
  }

  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "rnn_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t d = 0; d < s.D; ++d) {
      const auto w_hh = direction_weights(weights, d, s.has_bias).w_hh.contiguous();  // [H, H]
      backward_direction<scalar_t>(
          handle, stream, steps, d == 1, relu, s.H, grad_out.data_ptr<scalar_t>() + d * s.H,
          grad_last[d].data_ptr<scalar_t>(), h0[d].data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>() + d * s.H, ld, grad_z.data_ptr<scalar_t>() + d * s.H,
          h_prev.defined() ? h_prev.data_ptr<scalar_t>() + d * s.H : nullptr,
          grad_hx.defined() ? grad_hx[d].data_ptr<acc_t>() : nullptr, z.data_ptr<acc_t>());
    }
  });

  at::Tensor grad_input = at::empty({0}, input.options());
  if (output_mask[0]) {
    grad_input = at::mm(grad_z, stacked_w_ih(weights, s));  // [N, I]
  }
  grad_hx = output_mask[1] ? grad_hx.to(input.scalar_type()) : at::empty({0}, input.options());
  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    grad_weights = weight_grads(grad_z, h_prev, input, s);
  }
  return {grad_input, grad_hx, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) {
  m.impl("rnn_layer", &rnn_layer_entry<&rnn_layer_cuda>);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cuda);
}

}  // namespace rnn_ext::gpu
