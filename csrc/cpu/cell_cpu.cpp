// The CPU rnn_cell (shapes in csrc/rnn.h). A cell step is small and called once per Python loop
// iteration, so what it costs is mostly fixed overhead: a few rows run as one call of the
// unpacked dot-product kernel (both products, the biases and the activation, no temporaries);
// many rows, where the GEMMs dominate, and float16/bfloat16 run as ATen GEMMs.
#include "../rnn.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace rnn_ext::cpu {

namespace {

// Up to this many rows the dot-product kernel beats two ATen GEMMs and an activation (each of
// those reads its operands once per call; the dot products re-read x's rows from L1 per block of
// 8 columns).
constexpr int64_t kDotMaxRows = 8;

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

at::Tensor rnn_cell_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool relu) {
  const CellSizes s = check_cell_args(input, hx, w_ih, w_hh, b_ih, b_hh);
  const auto dtype = input.scalar_type();
  if (s.B > kDotMaxRows || (dtype != at::kFloat && dtype != at::kDouble)) {
    return cell_forward_aten(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
  }
  const auto x = input.contiguous();
  const auto h_prev = hx.contiguous();
  const auto w1 = w_ih.contiguous();
  const auto w2 = w_hh.contiguous();
  const auto bias1 = s.has_bias ? std::optional<at::Tensor>(b_ih->contiguous()) : std::nullopt;
  const auto bias2 = s.has_bias ? std::optional<at::Tensor>(b_hh->contiguous()) : std::nullopt;
  auto h = at::empty({s.B, s.H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_ext_cell_cpu", [&] {
    dot_step<scalar_t>(DotJob<scalar_t>{
        s.B, s.H, x.data_ptr<scalar_t>(), s.I, s.I, w1.data_ptr<scalar_t>(), h_prev.data_ptr<scalar_t>(), s.H, s.H,
        w2.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias1), data_or_null<scalar_t>(bias2),
        h.data_ptr<scalar_t>(), s.H, relu ? Epilogue::kRelu : Epilogue::kTanh});
  });
  return h;
}

// Weight-gradient buffers, kept per thread and handed out again once nothing else holds them. In
// a BPTT loop each step's weight gradients are added into the accumulated ones and dropped at
// once; fresh buffers of a megabyte and more would make malloc grow and trim the heap at every
// step, and fault the pages in again (measured: 350 page faults a step, 3x slower, at B=1, H=512).
// The cache keeps a few buffers (two per cell of a stack of two) of bounded size: smaller ones come
// and go in malloc's bins, larger ones are rare and not worth holding on to.
class GradBufferCache {
 public:
  at::Tensor get(at::IntArrayRef sizes, const at::TensorOptions& options) {
    for (const auto& cached : buffers_) {
      const bool free_to_reuse = cached.use_count() == 1 && cached.storage().use_count() == 1;
      if (free_to_reuse && cached.sizes() == sizes && cached.dtype() == options.dtype()) return cached;
    }
    auto buffer = at::empty(sizes, options);
    if (buffer.nbytes() >= kMinBytes && buffer.nbytes() <= kMaxBytes) {
      if (buffers_.size() == kBuffers) buffers_.erase(buffers_.begin());  // the oldest goes
      buffers_.push_back(buffer);
    }
    return buffer;
  }

 private:
  static constexpr size_t kBuffers = 4;
  static constexpr size_t kMinBytes = size_t{1} << 17;
  static constexpr size_t kMaxBytes = size_t{1} << 24;
  std::vector<at::Tensor> buffers_;
};

// grad_z [B, H] = grad_h * act'(output), and grad_b [H] (its column sums) when wanted.
template <typename scalar_t>
void grad_pre_activation(
    const scalar_t* grad_h, const scalar_t* y, int64_t rows, int64_t cols, bool relu, scalar_t* grad_z,
    scalar_t* grad_b) {
  for (int64_t i = 0; i < rows * cols; ++i) {
    // relu: as threshold_backward (the ATen path's), which passes the gradient where y is NaN.
    grad_z[i] = relu ? (y[i] <= scalar_t(0) ? scalar_t(0) : grad_h[i]) : grad_h[i] * (scalar_t(1) - y[i] * y[i]);
  }
  if (grad_b == nullptr) return;
  for (int64_t j = 0; j < cols; ++j) grad_b[j] = scalar_t(0);
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t j = 0; j < cols; ++j) grad_b[j] += grad_z[b * cols + j];
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_cell_backward_cpu(
    const at::Tensor& grad_h, const at::Tensor& input, const at::Tensor& hx, at::TensorList weights, bool relu,
    const at::Tensor& output, std::array<bool, 3> output_mask) {
  const CellSizes s = check_cell_backward_args(grad_h, input, hx, weights, output);
  const auto dtype = input.scalar_type();
  const auto options = input.options();
  thread_local GradBufferCache cache;
  const auto weight_grad_buffers = [&]() -> std::array<at::Tensor, 2> {
    if (!output_mask[2]) return {};
    return {cache.get({s.H, s.I}, options), cache.get({s.H, s.H}, options)};
  };
  // (An empty batch too: its weight gradients are zeros, which the ATen GEMMs write.)
  if (s.B == 0 || s.B > kDotMaxRows || (dtype != at::kFloat && dtype != at::kDouble)) {
    return cell_backward(grad_h, input, hx, weights, relu, output, output_mask, weight_grad_buffers());
  }
  const auto x = input.contiguous();
  const auto h_prev = hx.contiguous();
  const auto w_ih = weights[0].contiguous();
  const auto w_hh = weights[1].contiguous();
  const auto g = grad_h.contiguous();
  const auto y = output.contiguous();
  // A skipped gradient is empty, one tensor each: outputs must not alias.
  const auto grad_input = output_mask[0] ? at::empty({s.B, s.I}, options) : at::empty({0}, options);
  const auto grad_hx = output_mask[1] ? at::empty({s.B, s.H}, options) : at::empty({0}, options);
  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    const auto buffers = weight_grad_buffers();
    grad_weights = {buffers[0], buffers[1]};
    if (s.has_bias) grad_weights.insert(grad_weights.end(), {at::empty({s.H}, options), at::empty({s.H}, options)});
  }
  auto grad_z = at::empty({s.B, s.H}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_ext_cell_backward_cpu", [&] {
    const auto ptr = [](const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr<scalar_t>() : nullptr; };
    scalar_t* grad_b = s.has_bias && output_mask[2] ? grad_weights[2].data_ptr<scalar_t>() : nullptr;
    grad_pre_activation(g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s.B, s.H, relu, grad_z.data_ptr<scalar_t>(),
                        grad_b);
    if (grad_b != nullptr) grad_weights[3].copy_(grad_weights[2]);
    const bool weights_wanted = output_mask[2];
    dot_grad<scalar_t>(DotGradJob<scalar_t>{
        s.B, s.H, grad_z.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(), s.I, w_ih.data_ptr<scalar_t>(), output_mask[0] ? ptr(grad_input) : nullptr,
        weights_wanted ? ptr(grad_weights[0]) : nullptr,
        h_prev.data_ptr<scalar_t>(), s.H, w_hh.data_ptr<scalar_t>(), output_mask[1] ? ptr(grad_hx) : nullptr,
        weights_wanted ? ptr(grad_weights[1]) : nullptr});
  });
  return {grad_input, grad_hx, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("rnn_cell", &rnn_cell_cpu);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cpu);
}

}  // namespace rnn_ext::cpu
