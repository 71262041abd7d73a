// The layer driver: rnn_layer and rnn_layer_backward of every backend (shapes in rnn.h), in one
// shape: checks -> shared setup (sizes, schedule, the no-step case) -> one dtype dispatch around
// the backend's products and per-direction walks -> shared finish (weight gradients).
//
// A backend (cpu/rnn_cpu.cpp, cuda/rnn_cuda.cu) supplies only what is device-specific, as a class
// with these members, and registers layer_forward<Backend> and layer_backward<Backend>:
//
//   Backend(const at::Tensor& input, const LayerSizes&)
//       device checks; holds what one call needs (device guard, handles, scratch)
//   static bool native(at::ScalarType)
//       whether its kernels run this dtype; if not, the driver computes in float32 and rounds
//   template <typename F> static void dispatch(at::ScalarType, F&& f)
//       calls f(DType<scalar_t>{}) for the input's (native) dtype
//   template <typename F> void for_each_direction(const LayerSizes&, F&& body)
//       calls body(d, single_thread) for every direction d, in any order or concurrently;
//       single_thread asks the direction's walk not to split its steps over threads
//   template <typename scalar_t> void project(x [N, I], w_ih [D*H, I], bias [D*H]?, output [N, D*H])
//       output = x w_ih^T + bias (the input projection of every step at once)
//   template <typename scalar_t> void forward_walk(const StepSchedule&, const ForwardWalk<scalar_t>&, bool single_thread)
//   template <typename scalar_t> void backward_walk(const StepSchedule&, const BackwardWalk<scalar_t>&, bool single_thread)
//       one direction's recurrence, and its gradient; each visits the steps through
//       StepSchedule::walk, which holds the rules of a variable-length batch
//   template <typename scalar_t> void grad_input(grad_z [N, D*H], w_ih [D*H, I], grad_input [N, I])
//       grad_input = grad_z w_ih
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

// One direction's backward pass (pointers as in ForwardWalk).
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
  scalar_t* grad_z;             // [N, ld] out: the gradient of each row's pre-activation
  scalar_t* h_prev;             // [N, ld] out: the state each row's step started from; nullptr: not wanted
  at::opmath_type<scalar_t>* grad_hx;  // [B, H] out, zeroed on entry; nullptr: not wanted
};

inline std::vector<at::Tensor> to_float(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.to(at::kFloat));
  return out;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes);
  const auto dtype = input.scalar_type();
  if (!Backend::native(dtype)) {
    auto [output, h_n] = layer_forward<Backend>(input.to(at::kFloat), hx.to(at::kFloat), to_float(weights), batch_sizes, relu);
    return {output.to(dtype), h_n.to(dtype)};
  }
  Backend backend(input, s);
  if (runs_no_step(s)) {
    return no_step_forward(input, hx, s);
  }
  const StepSchedule steps(batch_sizes, s.N, s.B);
  const int64_t ld = s.D * s.H;
  auto output = at::empty({s.N, ld}, input.options());      // [N, D*H]
  auto h_n = at::empty({s.D, s.B, s.H}, input.options());  // [D, B, H]
  const auto x = input.contiguous();                       // [N, I]
  const auto h0 = hx.contiguous();                         // [D, B, H]
  const auto w_ih = stacked_w_ih(weights, s);              // [D*H, I]
  const auto bias = stacked_bias(weights, s);              // [D*H] or undefined

  Backend::dispatch(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    backend.template project<scalar_t>(x, w_ih, bias, output);
    backend.for_each_direction(s, [&](int64_t d, bool single_thread) {
      const ForwardWalk<scalar_t> walk{
          d == 1, relu, s.H, ld, h0[d].data_ptr<scalar_t>(), direction_weights(weights, d, s.has_bias).w_hh,
          output.data_ptr<scalar_t>() + d * s.H, h_n[d].data_ptr<scalar_t>()};
      backend.template forward_walk<scalar_t>(steps, walk, single_thread);
    });
  });
  return {output, h_n};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
    bool relu, const at::Tensor& output, std::array<bool, 3> output_mask) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes);
  check_backward_args(s, input, grad_output, grad_h_n, output);
  const auto dtype = input.scalar_type();
  if (!Backend::native(dtype)) {
    auto [grad_input, grad_hx, grad_weights] = layer_backward<Backend>(
        grad_output.to(at::kFloat), grad_h_n.to(at::kFloat), input.to(at::kFloat), hx.to(at::kFloat),
        to_float(weights), batch_sizes, relu, output.to(at::kFloat), output_mask);
    for (auto& g : grad_weights) g = g.to(dtype);
    return {grad_input.to(dtype), grad_hx.to(dtype), grad_weights};
  }
  Backend backend(input, s);
  if (runs_no_step(s)) {
    return no_step_backward(input, grad_h_n, weights, output_mask);
  }
  const StepSchedule steps(batch_sizes, s.N, s.B);
  const int64_t ld = s.D * s.H;
  const auto options = input.options();
  const auto out = output.contiguous();            // [N, D*H]
  const auto grad_out = grad_output.contiguous();  // [N, D*H]
  const auto grad_last = grad_h_n.contiguous();    // [D, B, H]
  const auto h0 = hx.contiguous();                 // [D, B, H]
  auto grad_z = at::empty({s.N, ld}, options);     // [N, D*H], every row written by the walks
  // [D, B, H], accumulated in the op-math type (float32 for float16/bfloat16).
  auto grad_hx = output_mask[1] ? at::zeros({s.D, s.B, s.H}, options.dtype(at::toOpMathType(dtype))) : at::Tensor();
  // [N, D*H]: only packed batches need the states gathered; dense ones are read in place.
  auto h_prev = output_mask[2] && batch_sizes.has_value() ? at::empty({s.N, ld}, options) : at::Tensor();
  auto grad_input = output_mask[0] ? at::empty({s.N, s.I}, options) : at::empty({0}, options);  // [N, I]

  Backend::dispatch(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::type;
    using acc_t = at::opmath_type<scalar_t>;
    backend.for_each_direction(s, [&](int64_t d, bool single_thread) {
      const BackwardWalk<scalar_t> walk{
          d == 1, relu, s.H, ld, grad_out.data_ptr<scalar_t>() + d * s.H, grad_last[d].data_ptr<scalar_t>(),
          h0[d].data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + d * s.H,
          direction_weights(weights, d, s.has_bias).w_hh, grad_z.data_ptr<scalar_t>() + d * s.H,
          h_prev.defined() ? h_prev.data_ptr<scalar_t>() + d * s.H : nullptr,
          grad_hx.defined() ? grad_hx[d].data_ptr<acc_t>() : nullptr};
      backend.template backward_walk<scalar_t>(steps, walk, single_thread);
    });
    if (output_mask[0]) {
      backend.template grad_input<scalar_t>(grad_z, stacked_w_ih(weights, s), grad_input);
    }
  });

  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    grad_weights = weight_grads(grad_z, input, h0, out, h_prev, s);
  }
  return {grad_input, output_mask[1] ? grad_hx.to(dtype) : at::empty({0}, options), grad_weights};
}

}  // namespace rnn_ext
