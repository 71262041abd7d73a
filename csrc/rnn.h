// Shared declarations of the rnn_ext ops: shapes, argument checks, time-step schedule.
//
// Shapes, used throughout csrc/:
//   T  time steps         B  batch rows at step 0      N  total rows = sum(batch_sizes) (T*B when dense)
//   I  input features     H  hidden features           D  directions (1, or 2 when bidirectional)
//
//   input        [N, I]     time-major rows: step t owns rows [offset(t), offset(t) + size(t))
//   hx           [D, B, H]
//   weights      per direction d, in nn.RNN's order: w_ih [H, I], w_hh [H, H], then b_ih [H], b_hh [H] if biased
//   batch_sizes  [T] int64 on the CPU, non-increasing, batch_sizes[0] == B (absent: dense, every step has B rows)
//   output       [N, D*H]   direction d in columns [d*H, (d+1)*H)
//   h_n          [D, B, H]
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

namespace rnn_ext {

struct LayerSizes {
  int64_t N, B, I, H, D;
  bool has_bias;
};

// The weights of one direction; biases are undefined tensors when the layer has none.
struct DirectionWeights {
  at::Tensor w_ih, w_hh, b_ih, b_hh;
};

// Which rows each time step owns in the time-major [N, ...] layout.
class StepSchedule {
 public:
  StepSchedule(const std::optional<at::Tensor>& batch_sizes, int64_t N, int64_t B);
  int64_t steps() const { return static_cast<int64_t>(sizes_.size()); }
  int64_t size(int64_t t) const { return sizes_[t]; }
  int64_t offset(int64_t t) const { return offsets_[t]; }
  // Rows at step t+1 (0 past the last step): rows [size_after(t), size(t)) end at step t.
  int64_t size_after(int64_t t) const { return t + 1 < steps() ? sizes_[t + 1] : 0; }

 private:
  std::vector<int64_t> sizes_;
  std::vector<int64_t> offsets_;
};

// Checks dtypes, devices and shapes of a layer's arguments; returns its sizes.
LayerSizes check_layer_args(
    const at::Tensor& input,
    const at::Tensor& hx,
    at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes);

// Checks grad_output [N, D*H], grad_h_n [D, B, H] and output [N, D*H] against the layer's sizes.
void check_backward_args(
    const LayerSizes& sizes,
    const at::Tensor& input,
    const at::Tensor& grad_output,
    const at::Tensor& grad_h_n,
    const at::Tensor& output);

DirectionWeights direction_weights(at::TensorList weights, int64_t d, bool has_bias);

// Input-projection weights of all directions stacked: [D*H, I].
at::Tensor stacked_w_ih(at::TensorList weights, const LayerSizes& sizes);
// b_ih + b_hh of all directions stacked: [D*H]; undefined when the layer has no bias.
at::Tensor stacked_bias(at::TensorList weights, const LayerSizes& sizes);

// The weight gradients of a layer, as nn.RNN's flat list (each in memory of its own), from
//   grad_z [N, D*H]  gradient of each row's pre-activation,
//   h_prev [N, D*H]  the state each row's step started from,
//   input  [N, I].
// grad_w_ih = grad_z^T input, grad_w_hh = grad_z^T h_prev per direction, grad_b = sum of grad_z rows.
std::vector<at::Tensor> weight_grads(
    const at::Tensor& grad_z, const at::Tensor& h_prev, const at::Tensor& input, const LayerSizes& sizes);

// The same, with grad_w_hh of direction d given by grad_w_hh(d, grad_z_d), grad_z_d [N, H],
// for backends that get it without materialising h_prev.
std::vector<at::Tensor> weight_grads(
    const at::Tensor& grad_z, const at::Tensor& input, const LayerSizes& sizes,
    const std::function<at::Tensor(int64_t, const at::Tensor&)>& grad_w_hh);

// rnn_layer_backward's result when the layer ran no step (N == 0): h_n was hx, so grad_hx is
// grad_h_n and every other gradient is zero. Each backend returns it before its time walk.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> no_step_backward(
    const at::Tensor& input, const at::Tensor& grad_h_n, at::TensorList weights, std::array<bool, 3> output_mask);

// rnn_layer takes its weights as separate arguments (w_ih, w_hh, b_ih?, b_hh?, then the same four
// of the reverse direction, all optional), so that its Python autograd layer handles no lists.
// Returns them as nn.RNN's flat list (per direction: w_ih, w_hh[, b_ih, b_hh]).
std::vector<at::Tensor> flat_weights(
    const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse);

using LayerImpl = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu);

// Adapts a backend's list-based forward to rnn_layer's schema: m.impl("rnn_layer", &rnn_layer_entry<&impl>).
template <LayerImpl impl>
std::tuple<at::Tensor, at::Tensor> rnn_layer_entry(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& batch_sizes, bool relu) {
  const auto weights =
      flat_weights(w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse);
  return impl(input, hx, weights, batch_sizes, relu);
}

}  // namespace rnn_ext
