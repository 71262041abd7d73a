// The CUDA backend of the layer driver (csrc/layer.h; shapes in csrc/rnn.h): only the
// device-specific parts, the step kernels and the GEMM calls.
//
// Forward: output = input @ [w_ih of all directions]^T + (b_ih + b_hh) as one GEMM (ATen), then per
// step and direction one cuBLAS GEMM for the recurrent term h_{t-1} @ w_hh^T and one fused kernel
// output[t] = act(output[t] + recurrent term), which also stores h_n for sequences ending there.
//
// Backward: per direction a walk against time; per step one cuBLAS GEMM carries the gradient of
// the neighbouring step back through w_hh, and one fused kernel forms
// grad_z[t] = (grad_output[t] + carried gradient or grad_h_n) * act'(output[t]) and, when the
// weight gradients of a packed batch are wanted, gathers the state each row started from. The
// input and weight gradients are then a few GEMMs over all rows (ATen).
//
// Precision: float32 and float64 run in their own type. float16 and bfloat16 keep tensors in
// their type but accumulate in float32 (at::opmath_type): the per-step cuBLAS GEMMs read 16-bit
// operands and write a float32 scratch (CUBLAS_COMPUTE_32F), the fused kernels add, activate and
// differentiate in float32 and round once when storing, grad_hx is accumulated in float32, and the
// large ATen GEMMs and the bias-gradient sum accumulate in float32 as ATen does for these types.
// float32 GEMMs use TF32 only when torch.backends.cuda.matmul.allow_tf32 allows it and no
// at::NoTF32Guard is active, as torch.mm.
//
// cuBLAS is called directly (cublasGemmEx on ATen's handle for the current stream), not through
// at::cuda::blas::gemm: libtorch_cuda does not export those templates to extensions.
#include "../layer.h"

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
//   h_n  [B, H]      rows r >= continuing end their sequence here and are copied to h_n[r]
template <typename scalar_t, typename acc_t>
__global__ void forward_step_kernel(
    scalar_t* __restrict__ h, const acc_t* __restrict__ z, scalar_t* __restrict__ h_n,
    int64_t rows, int64_t H, int64_t ld, int64_t continuing, bool relu) {
  const int64_t n = rows * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H;
    const int64_t j = i - r * H;
    const scalar_t y = static_cast<scalar_t>(
        activate(static_cast<acc_t>(h[r * ld + j]) + z[i], relu));
    h[r * ld + j] = y;
    if (r >= continuing) {
      h_n[i] = y;
    }
  }
}

// One step of one direction, backward:
//   grad_z      [rows, ld]  out: gradient of the pre-activation
//   grad_out    [rows, ld]  grad_output rows of this step
//   carry       [rows, H]   rows r < continuing: gradient carried back from the walk's next step
//   grad_h_n    [B, H]      rows r >= continuing: their sequence's last state is here, so grad_h_n[r]
//   h           [rows, ld]  this step's output (the activation's output)
//   h_prev      [rows, ld]  optional out (nullptr to skip): the state each row started from, for grad_w_hh
//   prev_out    [rows, ld]  rows r < carried started from the walk's previous step's output ...
//   hx          [B, H]      ... rows r >= carried from hx[r]
template <typename scalar_t, typename acc_t>
__global__ void backward_step_kernel(
    scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ carry,
    const scalar_t* __restrict__ grad_h_n, const scalar_t* __restrict__ h, scalar_t* __restrict__ h_prev,
    const scalar_t* __restrict__ prev_out, const scalar_t* __restrict__ hx,
    int64_t rows, int64_t H, int64_t ld, int64_t continuing, int64_t carried, bool relu) {
  const int64_t n = rows * H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / H;
    const int64_t j = i - r * H;
    const int64_t k = r * ld + j;
    const acc_t incoming = r < continuing ? carry[i] : static_cast<acc_t>(grad_h_n[i]);
    const acc_t g = static_cast<acc_t>(grad_out[k]) + incoming;
    grad_z[k] = static_cast<scalar_t>(scale_by_activation_grad(g, static_cast<acc_t>(h[k]), relu));
    if (h_prev != nullptr) {
      h_prev[k] = r < carried ? prev_out[k] : hx[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cuBLAS

template <typename scalar_t>
constexpr cudaDataType_t cublas_type() {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return CUDA_R_64F;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return CUDA_R_32F;
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return CUDA_R_16F;
  } else {
    static_assert(std::is_same_v<scalar_t, at::BFloat16>, "rnn_ext: no cuBLAS type for this dtype");
    return CUDA_R_16BF;
  }
}

// C[rows, cols] = A[rows, depth] @ op(W), row-major with leading dimensions lda, ldw, ldc;
// op(W) = W^T for w_transposed (W: [cols, depth]), else W (W: [depth, cols]).
// A and W are scalar_t; C and the accumulation are acc_t (float32 for the 16-bit types).
// cuBLAS is column-major, where a row-major X is X^T: it computes C^T = op(W)^T @ A^T.
template <typename scalar_t>
void gemm_rows(
    cublasHandle_t handle, bool w_transposed, int64_t rows, int64_t cols, int64_t depth,
    const scalar_t* A, int64_t lda, const scalar_t* W, int64_t ldw, at::opmath_type<scalar_t>* C, int64_t ldc) {
  using acc_t = at::opmath_type<scalar_t>;
  if (rows == 0 || cols == 0) {
    return;
  }
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if constexpr (std::is_same_v<scalar_t, double>) {
    compute = CUBLAS_COMPUTE_64F;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (at::globalContext().allowTF32CuBLAS() && !at::NoTF32Guard::should_disable_tf32()) {
      compute = CUBLAS_COMPUTE_32F_FAST_TF32;
    }
  }
  const acc_t alpha = 1;
  const acc_t beta = 0;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, w_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
      static_cast<int>(cols), static_cast<int>(rows), static_cast<int>(depth),
      &alpha, W, cublas_type<scalar_t>(), static_cast<int>(ldw), A, cublas_type<scalar_t>(), static_cast<int>(lda),
      &beta, C, cublas_type<acc_t>(), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------------
// The backend

void check_int_sizes(const LayerSizes& s) {
  // Per-step GEMMs pass these to cuBLAS as int.
  TORCH_CHECK(
      s.B <= INT_MAX && s.D * s.H <= INT_MAX,
      "rnn_ext: batch (", s.B, ") and directions * hidden_size (", s.D * s.H, ") must fit in int32 on CUDA");
}

// The input's device, after the checks that need no device guard.
c10::Device checked_device(const at::Tensor& input, const LayerSizes& s) {
  TORCH_CHECK(input.is_cuda(), "rnn_ext: input must be a CUDA tensor for the CUDA kernels, got ", input.device());
  check_int_sizes(s);
  return input.device();
}

class CudaBackend {
 public:
  // The guard comes first: the handle and the stream are those of the input's device.
  CudaBackend(const at::Tensor& input, const LayerSizes& s)
      : guard_(checked_device(input, s)),
        handle_(at::cuda::getCurrentCUDABlasHandle()),
        stream_(at::cuda::getCurrentCUDAStream()),
        z_(at::empty({s.B, s.H}, input.options().dtype(at::toOpMathType(input.scalar_type())))) {}

  static bool native(at::ScalarType /*dtype*/) { return true; }
  // The cuBLAS step GEMMs need a step's rows in place: the driver sorts a padded batch by length.
  static constexpr bool kRowOrder = false;

  template <typename F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rnn_ext_cuda", [&] { f(DType<scalar_t>{}); });
  }

  // The directions run one after the other on the current stream (they share z_).
  template <typename scalar_t>
  void forward_walks(const StepSchedule& steps, const std::vector<ForwardWalk<scalar_t>>& dirs) {
    for (const auto& dir : dirs) forward_walk(steps, dir);
  }
  template <typename scalar_t>
  void backward_walks(const StepSchedule& steps, const std::vector<BackwardWalk<scalar_t>>& dirs) {
    for (const auto& dir : dirs) backward_walk(steps, dir);
  }

  // One GEMM over all rows, padding rows included: on the GPU one large GEMM costs less than one
  // per step, and the driver zeroes the padding rows afterwards.
  template <typename scalar_t>
  void project(const StepSchedule& /*steps*/, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& bias,
               at::Tensor& output) {
    if (bias.defined()) {
      at::addmm_out(output, bias, x, w_ih.t());
    } else {
      at::mm_out(output, x, w_ih.t());
    }
  }

  template <typename scalar_t>
  void grad_input(const StepSchedule& steps, const at::Tensor& grad_z, const at::Tensor& w_ih, at::Tensor& grad_input) {
    if (steps.padded()) {  // grad_z holds the rows the steps own, gathered
      grad_input.index_copy_(0, row_index(steps.step_rows()).to(grad_input.device()), at::mm(grad_z, w_ih));
    } else {
      at::mm_out(grad_input, grad_z, w_ih);
    }
  }

  void zero_rows(at::Tensor& t, const RowSet& rows) {
    if (rows.count > 0) t.index_fill_(0, row_index(rows).to(t.device()), 0);
  }

  at::Tensor gather_rows(const at::Tensor& t, const StepSchedule& steps) {
    return t.index_select(0, row_index(steps.step_rows()).to(t.device()));
  }

  // cuBLAS through ATen.
  std::vector<at::Tensor> weight_grads(
      const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& hx, const at::Tensor& output,
      const at::Tensor& h_prev, const LayerSizes& s) {
    return rnn_ext::weight_grads(grad_z, x, hx, output, h_prev, s);
  }

  // Per step: z = h_prev @ w_hh^T (h_prev: the walk's previous state, or hx), then the fused
  // kernel output[t] = act(output[t] + z), which also stores h_n for the rows ending here.
  template <typename scalar_t>
  void forward_walk(const StepSchedule& steps, const ForwardWalk<scalar_t>& dir) {
    walk(steps, dir, Pass::kForward, [&](const Step& now, const scalar_t* w_hh, at::opmath_type<scalar_t>* z) {
      const int64_t H = dir.H;
      const int64_t ld = dir.ld;
      if (now.carried > 0) {
        gemm_rows(handle_, true, now.carried, H, H, dir.output + steps.offset(now.previous) * ld, ld, w_hh, H, z, H);
      }
      gemm_rows(handle_, true, now.rows - now.carried, H, H, dir.hx + now.carried * H, H, w_hh, H, z + now.carried * H, H);
      const int64_t n = now.rows * H;
      if (n > 0) {
        forward_step_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(
            dir.output + now.offset * ld, z, dir.h_n, now.rows, H, ld, now.continuing, dir.relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }

  // Per step: z = grad_z[next] @ w_hh for the rows that go on, then the fused kernel forms
  // grad_z[t] and gathers h_prev; rows that started from hx send grad_z[t] @ w_hh to grad_hx.
  template <typename scalar_t>
  void backward_walk(const StepSchedule& steps, const BackwardWalk<scalar_t>& dir) {
    walk(steps, dir, Pass::kBackward, [&](const Step& now, const scalar_t* w_hh, at::opmath_type<scalar_t>* z) {
      const int64_t H = dir.H;
      const int64_t ld = dir.ld;
      const int64_t at_rows = now.offset * ld;                              // grad_output, output
      scalar_t* grad_z = dir.grad_z + steps.gathered_offset(now.t) * ld;  // grad_z, h_prev
      if (now.continuing > 0) {
        gemm_rows(handle_, false, now.continuing, H, H, dir.grad_z + steps.gathered_offset(now.next) * ld, ld, w_hh, H,
                  z, H);
      }
      const scalar_t* prev_out = now.carried > 0 ? dir.output + steps.offset(now.previous) * ld : nullptr;
      const int64_t n = now.rows * H;
      if (n > 0) {
        backward_step_kernel<<<blocks_for(n), kThreads, 0, stream_>>>(
            grad_z, dir.grad_output + at_rows, z, dir.grad_h_n, dir.output + at_rows,
            dir.h_prev != nullptr ? dir.h_prev + steps.gathered_offset(now.t) * ld : nullptr, prev_out, dir.hx, now.rows, H, ld,
            now.continuing, now.carried, dir.relu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // Each row starts from hx once, so its gradient is written, not accumulated.
      if (dir.grad_hx != nullptr) {
        gemm_rows(handle_, false, now.rows - now.carried, H, H, grad_z + now.carried * ld, ld, w_hh, H,
                  dir.grad_hx + now.carried * H, H);
      }
    });
  }

  // The setup both walks share: one direction's W_hh made contiguous (kept alive for the walk) and
  // the step buffer z_, then step(now, w_hh, z) for each step in the pass's order.
  template <typename scalar_t, template <typename> class Walk, typename F>
  void walk(const StepSchedule& steps, const Walk<scalar_t>& dir, Pass pass, F&& step) {
    const at::Tensor w_hh = dir.w_hh.contiguous();
    const scalar_t* w_hh_data = w_hh.data_ptr<scalar_t>();
    at::opmath_type<scalar_t>* z = z_.data_ptr<at::opmath_type<scalar_t>>();
    steps.walk(dir.reverse, pass, [&](const Step& now) { step(now, w_hh_data, z); });
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cublasHandle_t handle_;
  cudaStream_t stream_;
  at::Tensor z_;  // [B, H] in the op-math type: one step's GEMM result
};

// rnn_cell: one step is two cuBLAS GEMMs into one buffer and the activation in place (ATen's
// kernels, on the current stream), under a guard for the input's device.
at::Tensor rnn_cell_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool relu) {
  check_cell_args(input, hx, w_ih, w_hh, b_ih, b_hh);
  const c10::cuda::CUDAGuard guard(input.device());
  return cell_forward_aten(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_cell_backward_cuda(
    const at::Tensor& grad_h, const at::Tensor& input, const at::Tensor& hx, at::TensorList weights, bool relu,
    const at::Tensor& output, std::array<bool, 3> output_mask) {
  check_cell_backward_args(grad_h, input, hx, weights, output);
  const c10::cuda::CUDAGuard guard(input.device());
  return cell_backward(grad_h, input, hx, weights, relu, output, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CUDA, m) {
  m.impl("rnn_layer", &rnn_layer_entry<&layer_forward<CudaBackend>>);
  m.impl("rnn_layer_backward", &layer_backward<CudaBackend>);
  m.impl("rnn_cell", &rnn_cell_cuda);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cuda);
}

}  // namespace rnn_ext::gpu
