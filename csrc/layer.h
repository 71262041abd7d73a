// The layer driver: rnn_layer and rnn_layer_backward of every backend (shapes in rnn.h), in one
// shape: checks -> shared setup (sizes, schedule, the no-step case) -> one dtype dispatch around
// the backend's products and per-direction walks -> shared finish (weight gradients).
//
// A backend (cpu/rnn_cpu.cpp, cuda/rnn_cuda.cu) supplies only what is device-specific, as a class
// with these members, and registers layer_forward<Backend> and layer_backward<Backend>:
//
//   Backend(const at::Tensor& input, const LayerSizes&)
//       device checks; holds what one call needs (device guard, handles, scratch)
//   static constexpr bool kRowOrder
//       whether its walks take a padded batch's rows in StepSchedule::order(); if not, the driver
//       sorts the batch by length for it (copies of the batch rows, in and out)
//   static bool native(at::ScalarType)
//       whether its kernels run this dtype; if not, the driver computes in float32 and rounds
//   template <typename F> static void dispatch(at::ScalarType, F&& f)
//       calls f(DType<scalar_t>{}) for the input's (native) dtype
//   template <typename scalar_t> void project(const StepSchedule&, x [N, I], w_ih [D*H, I], bias [D*H]?, output [N, D*H])
//       output = x w_ih^T + bias (the input projection of every step at once), on at least the
//       rows the steps own (StepSchedule::step_rows); other rows may be left as anything
//   template <typename scalar_t> void forward_walks(const StepSchedule&, const std::vector<ForwardWalk<scalar_t>>&)
//   template <typename scalar_t> void backward_walks(const StepSchedule&, const std::vector<BackwardWalk<scalar_t>>&)
//       every direction's recurrence (one or two), and its gradient, in any order or concurrently;
//       each visits the steps through StepSchedule (walk, walk_step), which holds the rules of a
//       variable-length batch
//   template <typename scalar_t> void grad_input(const StepSchedule&, grad_z [gathered rows, D*H], w_ih [D*H, I], grad_input [N, I])
//       grad_input = grad_z w_ih, from grad_z in the gathered layout (StepSchedule::step_rows) into
//       at least the rows the steps own (as project)
//   void zero_rows(at::Tensor& t [N, C] contiguous, const RowSet&)
//       zeroes those rows of t (the padding rows of a padded batch)
//   at::Tensor gather_rows(const at::Tensor& t [N, C] contiguous, const StepSchedule&)
//       the rows the steps own, in step order (StepSchedule::step_rows): [gathered rows, C]
//   std::vector<at::Tensor> weight_grads(grad_z, x, hx, output, h_prev, const LayerSizes&)
//       rnn_ext::weight_grads (rnn.h), its arguments and result, by whichever products are fastest
#pragma once

#include <ATen/OpMathType.h>

#include "rnn.h"

namespace rnn_ext {

template <typename T>
struct DType {
  using type = T;
};

// One direction's forward pass. Pointers are to this direction's columns of [N, D*H] tensors
// (rows ld = D*H apart) and its slice of [D, B, H] ones.
template <typename scalar_t>
struct ForwardWalk {
  bool reverse;
  bool relu;
  int64_t H, ld;
  const scalar_t* hx;  // [B, H]
  at::Tensor w_hh;     // [H, H]
  scalar_t* output;    // [N, ld]: on entry the input projection plus bias; on exit each step's state
  scalar_t* h_n;       // [B, H] out
};

// One direction's backward pass (pointers as in ForwardWalk). grad_z and h_prev are in the gathered
// layout: only the rows the steps own, step t's from StepSchedule::gathered_offset(t), in walk order
// (the layout itself for dense and packed batches).
template <typename scalar_t>
struct BackwardWalk {
  bool reverse;
  bool relu;
  int64_t H, ld;
  const scalar_t* grad_output;  // [N, ld]
  const scalar_t* grad_h_n;     // [B, H]
  const scalar_t* hx;           // [B, H]
  const scalar_t* output;       // [N, ld]
  at::Tensor w_hh;              // [H, H]
  scalar_t* grad_z;             // [gathered rows, ld] out: the gradient of each row's pre-activation
  scalar_t* h_prev;             // [gathered rows, ld] out: the state each row's step started from; nullptr: not wanted
  at::opmath_type<scalar_t>* grad_hx;  // [B, H] out, zeroed on entry; nullptr: not wanted
};

inline std::vector<at::Tensor> to_float(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.to(at::kFloat));
  return out;
}

// A padded batch's rows sorted by length, for a backend without kRowOrder: its tensors with the
// batch rows in StepSchedule::order(), and back.
class LengthOrder {
 public:
  LengthOrder(const StepSchedule& steps, const at::Tensor& lengths, int64_t B, const at::Device& device)
      : B_(B) {
    const auto order = row_index({B, steps.order()});
    lengths_ = lengths.index_select(0, order);
    order_ = order.to(device);
    restore_ = at::argsort(order).to(device);
  }
  const at::Tensor& lengths() const { return lengths_; }
  at::Tensor sorted_rows(const at::Tensor& t) const { return permute_rows(t, order_); }     // [N, C]
  at::Tensor sorted_batch(const at::Tensor& t) const { return t.index_select(1, order_); }  // [D, B, H]
  at::Tensor restored_rows(const at::Tensor& t) const { return permute_rows(t, restore_); }
  at::Tensor restored_batch(const at::Tensor& t) const { return t.index_select(1, restore_); }

 private:
  // The rows of every step of t [T*B, C], reordered by index [B].
  at::Tensor permute_rows(const at::Tensor& t, const at::Tensor& index) const {
    return t.reshape({-1, B_, t.size(1)}).index_select(1, index).reshape({-1, t.size(1)});
  }
  int64_t B_;
  at::Tensor lengths_, order_, restore_;
};

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, const std::optional<at::Tensor>& lengths) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes, lengths);
  const auto dtype = input.scalar_type();
  if (!Backend::native(dtype)) {
    auto [output, h_n] =
        layer_forward<Backend>(input.to(at::kFloat), hx.to(at::kFloat), to_float(weights), batch_sizes, relu, lengths);
    return {output.to(dtype), h_n.to(dtype)};
  }
  const StepSchedule steps(batch_sizes, lengths, s.N, s.B);
  if (!Backend::kRowOrder && steps.order() != nullptr) {
    const LengthOrder sorted(steps, *lengths, s.B, input.device());
    auto [output, h_n] = layer_forward<Backend>(
        sorted.sorted_rows(input), sorted.sorted_batch(hx), weights, batch_sizes, relu, sorted.lengths());
    return {sorted.restored_rows(output), sorted.restored_batch(h_n)};
  }
  Backend backend(input, s);
  if (runs_no_step(steps)) {
    return no_step_forward(input, hx, s);
  }
  const int64_t ld = s.D * s.H;
  auto output = at::empty({s.N, ld}, input.options());      // [N, D*H]
  auto h_n = at::empty({s.D, s.B, s.H}, input.options());  // [D, B, H]
  const auto x = input.contiguous();                       // [N, I]
  const auto h0 = hx.contiguous();                         // [D, B, H]
  const auto w_ih = stacked_w_ih(weights, s);              // [D*H, I]
  const auto bias = stacked_bias(weights, s);              // [D*H] or undefined

  Backend::dispatch(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    backend.template project<scalar_t>(steps, x, w_ih, bias, output);
    std::vector<ForwardWalk<scalar_t>> walks;
    for (int64_t d = 0; d < s.D; ++d) {
      walks.push_back({d == 1, relu, s.H, ld, h0[d].data_ptr<scalar_t>(), direction_weights(weights, d, s.has_bias).w_hh,
                       output.data_ptr<scalar_t>() + d * s.H, h_n[d].data_ptr<scalar_t>()});
    }
    backend.template forward_walks<scalar_t>(steps, walks);
  });
  if (steps.padded()) {
    backend.zero_rows(output, steps.padding_rows());
    if (steps.started() < s.B) {  // rows without a step keep hx
      const auto idle = steps.idle_rows().to(input.device());
      h_n.index_copy_(1, idle, h0.index_select(1, idle));
    }
  }
  return {output, h_n};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
    bool relu, const at::Tensor& output, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& lengths) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes, lengths);
  check_backward_args(s, input, grad_output, grad_h_n, output);
  const auto dtype = input.scalar_type();
  if (!Backend::native(dtype)) {
    auto [grad_input, grad_hx, grad_weights] = layer_backward<Backend>(
        grad_output.to(at::kFloat), grad_h_n.to(at::kFloat), input.to(at::kFloat), hx.to(at::kFloat),
        to_float(weights), batch_sizes, relu, output.to(at::kFloat), output_mask, lengths);
    for (auto& g : grad_weights) g = g.to(dtype);
    return {grad_input.to(dtype), grad_hx.to(dtype), grad_weights};
  }
  const StepSchedule steps(batch_sizes, lengths, s.N, s.B);
  if (!Backend::kRowOrder && steps.order() != nullptr) {
    const LengthOrder sorted(steps, *lengths, s.B, input.device());
    auto [grad_input, grad_hx, grad_weights] = layer_backward<Backend>(
        sorted.sorted_rows(grad_output), sorted.sorted_batch(grad_h_n), sorted.sorted_rows(input),
        sorted.sorted_batch(hx), weights, batch_sizes, relu, sorted.sorted_rows(output), output_mask, sorted.lengths());
    return {output_mask[0] ? sorted.restored_rows(grad_input) : grad_input,
            output_mask[1] ? sorted.restored_batch(grad_hx) : grad_hx, grad_weights};
  }
  Backend backend(input, s);
  if (runs_no_step(steps)) {
    return no_step_backward(input, grad_h_n, weights, output_mask);
  }
  const int64_t ld = s.D * s.H;
  const auto options = input.options();
  const auto out = output.contiguous();            // [N, D*H]
  const auto grad_out = grad_output.contiguous();  // [N, D*H]
  const auto grad_last = grad_h_n.contiguous();    // [D, B, H]
  const auto h0 = hx.contiguous();                 // [D, B, H]
  auto grad_z = at::empty({steps.gathered_rows(), ld}, options);  // every row written by the walks
  // [D, B, H], accumulated in the op-math type (float32 for float16/bfloat16).
  auto grad_hx = output_mask[1] ? at::zeros({s.D, s.B, s.H}, options.dtype(at::toOpMathType(dtype))) : at::Tensor();
  // Only packed and padded batches need the states gathered; dense ones are read in place.
  const bool dense = !batch_sizes.has_value() && !lengths.has_value();
  auto h_prev = output_mask[2] && !dense ? at::empty({steps.gathered_rows(), ld}, options) : at::Tensor();
  auto grad_input = output_mask[0] ? at::empty({s.N, s.I}, options) : at::empty({0}, options);  // [N, I]

  Backend::dispatch(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<BackwardWalk<scalar_t>> walks;
    for (int64_t d = 0; d < s.D; ++d) {
      walks.push_back({d == 1, relu, s.H, ld, grad_out.data_ptr<scalar_t>() + d * s.H, grad_last[d].data_ptr<scalar_t>(),
                       h0[d].data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + d * s.H,
                       direction_weights(weights, d, s.has_bias).w_hh, grad_z.data_ptr<scalar_t>() + d * s.H,
                       h_prev.defined() ? h_prev.data_ptr<scalar_t>() + d * s.H : nullptr,
                       grad_hx.defined() ? grad_hx[d].data_ptr<acc_t>() : nullptr});
    }
    backend.template backward_walks<scalar_t>(steps, walks);
    if (output_mask[0]) {
      backend.template grad_input<scalar_t>(steps, grad_z, stacked_w_ih(weights, s), grad_input);
    }
  });
  if (steps.padded()) {
    if (output_mask[0]) backend.zero_rows(grad_input, steps.padding_rows());
    if (output_mask[1] && steps.started() < s.B) {  // rows without a step passed hx on to h_n
      const auto idle = steps.idle_rows().to(input.device());
      grad_hx.index_add_(1, idle, grad_last.index_select(1, idle).to(grad_hx.scalar_type()));
    }
  }

  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    // A padded batch's input gathered as grad_z is: the products follow the real rows, and padding
    // (which may hold anything, even NaN) never meets them.
    const auto x = steps.padded() ? backend.gather_rows(input.contiguous(), steps) : input;
    grad_weights = backend.weight_grads(grad_z, x, h0, out, h_prev, s);
  }
  return {grad_input, output_mask[1] ? grad_hx.to(dtype) : at::empty({0}, options), grad_weights};
}

}  // namespace rnn_ext
