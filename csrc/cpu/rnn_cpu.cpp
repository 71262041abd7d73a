// CPU implementation of rnn_layer and rnn_layer_backward (shapes in csrc/rnn.h).
//
// Forward: output = input @ [w_ih of all directions]^T + (b_ih + b_hh) as one GEMM, then per step
// and direction output[t] = act(output[t] + h_{t-1} @ w_hh^T) in place. Only output is kept for
// backward: the activation derivative is written in terms of it.
//
// Backward: per direction a walk against time builds grad_z (gradient of the pre-activation) in
// one [N, D*H] buffer; the weight and input gradients are then a few GEMMs over all rows.
#include "../rnn.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace rnn_ext::cpu {

namespace {

bool is_low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

std::vector<at::Tensor> to_float(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.to(at::kFloat));
  return out;
}

template <typename T>
void copy_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld_dst, src + r * ld_src, H * sizeof(T));
  }
}

template <typename T>
void add_rows(T* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < H; ++j) dst[r * ld_dst + j] += src[r * ld_src + j];
  }
}

Epilogue activation(bool relu) { return relu ? Epilogue::kRelu : Epilogue::kTanh; }
Epilogue activation_grad(bool relu) { return relu ? Epilogue::kReluGrad : Epilogue::kTanhGrad; }

// One direction's recurrence over out, which already holds the input projection plus bias:
// out[t] = act(out[t] + h_{t-1} @ w_hh^T).
//   hx [B, H], w_hh_t = w_hh^T packed, out [N, ld] (this direction's columns), h_n [B, H]
template <typename T>
void forward_direction(
    const StepSchedule& steps, bool reverse, bool relu, int64_t H, const T* hx,
    const PackedWeight<T>& w_hh_t, T* out, int64_t ld, T* h_n, bool single_thread) {
  const Epilogue act = activation(relu);
  const int64_t T_steps = steps.steps();
  if (!reverse) {
    for (int64_t t = 0; t < T_steps; ++t) {
      const int64_t rows = steps.size(t);
      T* h = out + steps.offset(t) * ld;
      if (t == 0) {
        step(rows, hx, H, w_hh_t, h, ld, act, nullptr, 0, single_thread);
      } else {
        step(rows, out + steps.offset(t - 1) * ld, ld, w_hh_t, h, ld, act, nullptr, 0, single_thread);
      }
      // Sequences that end at this step leave their last state in h_n.
      const int64_t ending = steps.size_after(t);
      copy_rows(h_n + ending * H, H, h + ending * ld, ld, rows - ending, H);
    }
    return;
  }
  // Reverse: each sequence starts at its own last step, from hx.
  for (int64_t t = T_steps - 1; t >= 0; --t) {
    const int64_t rows = steps.size(t);
    const int64_t continuing = steps.size_after(t);
    T* h = out + steps.offset(t) * ld;
    if (continuing > 0) {
      step(continuing, out + steps.offset(t + 1) * ld, ld, w_hh_t, h, ld, act, nullptr, 0, single_thread);
    }
    step(rows - continuing, hx + continuing * H, H, w_hh_t, h + continuing * ld, ld, act, nullptr, 0, single_thread);
  }
  if (T_steps > 0) {
    copy_rows(h_n, H, out, ld, steps.size(0), H);
  }
}

// One direction's walk against time. On entry grad_z holds grad_output; on exit, the gradient
// of the pre-activation z_t = x_t w_ih^T + b + h_{t-1} w_hh^T:
// grad_z[t] = (grad_output[t] + grad_z[t+1] @ w_hh, or grad_h_n where a sequence ends) * act'.
//   grad_h_n [B, H], out [N, ld], w_hh packed, grad_z [N, ld], grad_hx [B, H] (zeroed)
template <typename T>
void backward_direction(
    const StepSchedule& steps, bool reverse, bool relu, int64_t H, const T* grad_h_n, const T* out,
    const PackedWeight<T>& w_hh, T* grad_z, int64_t ld, T* grad_hx, bool single_thread) {
  const Epilogue act_grad = activation_grad(relu);
  const int64_t T_steps = steps.steps();
  if (!reverse) {
    for (int64_t t = T_steps - 1; t >= 0; --t) {
      const int64_t rows = steps.size(t);
      const int64_t continuing = steps.size_after(t);
      T* g = grad_z + steps.offset(t) * ld;
      const T* y = out + steps.offset(t) * ld;
      // Rows that ended here received grad_h_n; the others the gradient flowing back from t + 1.
      add_rows(g + continuing * ld, ld, grad_h_n + continuing * H, H, rows - continuing, H);
      if (continuing > 0) {
        step(continuing, grad_z + steps.offset(t + 1) * ld, ld, w_hh, g, ld, act_grad, y, ld, single_thread);
      }
      step<T>(rows - continuing, nullptr, 0, w_hh, g + continuing * ld, ld, act_grad, y + continuing * ld, ld, single_thread);
    }
    if (T_steps > 0) {
      step(steps.size(0), grad_z, ld, w_hh, grad_hx, H, Epilogue::kNone, nullptr, 0, single_thread);
    }
    return;
  }
  for (int64_t t = 0; t < T_steps; ++t) {
    const int64_t rows = steps.size(t);
    const int64_t continuing = steps.size_after(t);
    T* g = grad_z + steps.offset(t) * ld;
    const T* y = out + steps.offset(t) * ld;
    if (t == 0) {
      add_rows(g, ld, grad_h_n, H, rows, H);
      step<T>(rows, nullptr, 0, w_hh, g, ld, act_grad, y, ld, single_thread);
    } else {
      step(rows, grad_z + steps.offset(t - 1) * ld, ld, w_hh, g, ld, act_grad, y, ld, single_thread);
    }
    // Sequences that started (in reverse) at this step started from hx.
    step(rows - continuing, g + continuing * ld, ld, w_hh, grad_hx + continuing * H, H, Epilogue::kNone, nullptr, 0, single_thread);
  }
}

// The state each row's step started from, for grad_w_hh: [N, D*H], direction d in its columns.
template <typename T>
void gather_previous_states(
    const StepSchedule& steps, bool reverse, int64_t H, const T* hx, const T* out, int64_t ld, T* h_prev) {
  const int64_t T_steps = steps.steps();
  for (int64_t t = 0; t < T_steps; ++t) {
    const int64_t rows = steps.size(t);
    T* dst = h_prev + steps.offset(t) * ld;
    if (!reverse) {
      if (t == 0) {
        copy_rows(dst, ld, hx, H, rows, H);
      } else {
        copy_rows(dst, ld, out + steps.offset(t - 1) * ld, ld, rows, H);
      }
    } else {
      const int64_t continuing = steps.size_after(t);
      if (continuing > 0) {
        copy_rows(dst, ld, out + steps.offset(t + 1) * ld, ld, continuing, H);
      }
      copy_rows(dst + continuing * ld, ld, hx + continuing * H, H, rows - continuing, H);
    }
  }
}

// weight_grads (rnn.h) for dense batches, without gathering h_prev: the state a row's step
// started from is the output B rows earlier (later in the reverse direction), or hx for the
// first step's rows.
//   grad_z, out [N, D*H], hx [D, B, H], input [N, I]
std::vector<at::Tensor> dense_weight_grads(
    const at::Tensor& grad_z, const at::Tensor& out, const at::Tensor& hx, const at::Tensor& input,
    const LayerSizes& s) {
  const int64_t later = s.N - s.B;  // rows whose step started from an output
  return weight_grads(grad_z, input, s, [&](int64_t d, const at::Tensor& grad_z_d) {
    const bool reverse = d == 1;
    const auto out_d = out.narrow(1, d * s.H, s.H);
    auto grad_w_hh = at::mm(grad_z_d.narrow(0, reverse ? 0 : s.B, later).t(), out_d.narrow(0, reverse ? s.B : 0, later));
    return grad_w_hh.addmm_(grad_z_d.narrow(0, reverse ? later : 0, s.B).t(), hx[d]);
  });
}

// c[M, N] = row + a[M, K] @ w[K, N] (row [N] or undefined) with the step kernel. For the
// all-rows products (input projection, grad_input) it beats at::mm at these tall-skinny shapes.
template <typename T>
void product_into(const at::Tensor& a, const at::Tensor& w, const at::Tensor& row, at::Tensor& c) {
  const auto a_ = a.contiguous();
  const auto w_ = w.contiguous();
  const auto row_ = row.defined() ? row.contiguous() : row;
  const PackedWeight<T> packed(w_.data_ptr<T>(), w_.size(1), w_.size(0), w_.size(1));
  product<T>(a_.size(0), a_.data_ptr<T>(), a_.size(1), packed, c.data_ptr<T>(), c.size(1),
             row_.defined() ? row_.data_ptr<T>() : nullptr);
}

// Both directions run side by side on two threads, each single-threaded (no per-step
// synchronisation); one direction splits each step's tiles over the threads instead.
template <typename F>
void for_each_direction(const LayerSizes& s, F&& body) {
  if (s.D > 1 && at::get_num_threads() > 1) {
    at::parallel_for(0, s.D, 1, [&](int64_t begin, int64_t end) {
      for (int64_t d = begin; d < end; ++d) body(d, /*single_thread=*/true);
    });
  } else {
    for (int64_t d = 0; d < s.D; ++d) body(d, /*single_thread=*/false);
  }
}

std::tuple<at::Tensor, at::Tensor> rnn_layer_cpu(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes);
  if (is_low_precision(input)) {
    // Like nn.RNN's CPU path for half/bfloat16, compute in float and round the results.
    auto [output, h_n] = rnn_layer_cpu(input.to(at::kFloat), hx.to(at::kFloat), to_float(weights), batch_sizes, relu);
    return {output.to(input.scalar_type()), h_n.to(input.scalar_type())};
  }

  auto output = at::empty({s.N, s.D * s.H}, input.options());
  auto h_n = at::empty({s.D, s.B, s.H}, input.options());
  if (s.N == 0) {  // no time steps: h_n is hx
    h_n.copy_(hx);
    return {output, h_n};
  }
  const auto x = input.contiguous();
  const auto w_ih = stacked_w_ih(weights, s);
  const auto bias = stacked_bias(weights, s);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_cpu_projection", [&] {
    product_into<scalar_t>(x, w_ih.t(), bias, output);
  });

  const StepSchedule steps(batch_sizes, s.N, s.B);
  const auto h0 = hx.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_cpu", [&] {
    for_each_direction(s, [&](int64_t d, bool single_thread) {
      const auto w_hh_t = direction_weights(weights, d, s.has_bias).w_hh.t().contiguous();
      const PackedWeight<scalar_t> packed(w_hh_t.data_ptr<scalar_t>(), s.H, s.H, s.H);
      forward_direction<scalar_t>(
          steps, d == 1, relu, s.H, h0[d].data_ptr<scalar_t>(), packed, output.data_ptr<scalar_t>() + d * s.H,
          s.D * s.H, h_n[d].data_ptr<scalar_t>(), single_thread);
    });
  });
  return {output, h_n};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, at::TensorList weights, const std::optional<at::Tensor>& batch_sizes,
    bool relu, const at::Tensor& output, std::array<bool, 3> output_mask) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes);
  check_backward_args(s, input, grad_output, grad_h_n, output);
  if (is_low_precision(input)) {
    auto [grad_input, grad_hx, grad_weights] = rnn_layer_backward_cpu(
        grad_output.to(at::kFloat), grad_h_n.to(at::kFloat), input.to(at::kFloat), hx.to(at::kFloat),
        to_float(weights), batch_sizes, relu, output.to(at::kFloat), output_mask);
    const auto dtype = input.scalar_type();
    for (auto& g : grad_weights) g = g.to(dtype);
    return {grad_input.to(dtype), grad_hx.to(dtype), grad_weights};
  }

  if (s.N == 0) {
    return no_step_backward(input, grad_h_n, weights, output_mask);
  }
  const int64_t ld = s.D * s.H;
  const StepSchedule steps(batch_sizes, s.N, s.B);
  const auto out = output.contiguous();
  const auto grad_last = grad_h_n.contiguous();
  const auto h0 = hx.contiguous();
  auto grad_z = at::empty({s.N, ld}, input.options());
  grad_z.copy_(grad_output);
  auto grad_hx = at::zeros({s.D, s.B, s.H}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_backward_cpu", [&] {
    for_each_direction(s, [&](int64_t d, bool single_thread) {
      const auto w_hh = direction_weights(weights, d, s.has_bias).w_hh.contiguous();
      const PackedWeight<scalar_t> packed(w_hh.data_ptr<scalar_t>(), s.H, s.H, s.H);
      backward_direction<scalar_t>(
          steps, d == 1, relu, s.H, grad_last[d].data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + d * s.H,
          packed, grad_z.data_ptr<scalar_t>() + d * s.H, ld, grad_hx[d].data_ptr<scalar_t>(), single_thread);
    });
  });

  at::Tensor grad_input = at::empty({0}, input.options());
  if (output_mask[0]) {
    grad_input = at::empty({s.N, s.I}, input.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_backward_cpu_input", [&] {
      product_into<scalar_t>(grad_z, stacked_w_ih(weights, s), at::Tensor(), grad_input);
    });
  }
  if (!output_mask[1]) {
    grad_hx = at::empty({0}, input.options());
  }
  std::vector<at::Tensor> grad_weights;
  if (output_mask[2] && !batch_sizes.has_value()) {
    grad_weights = dense_weight_grads(grad_z, out, h0, input, s);
  } else if (output_mask[2]) {
    auto h_prev = at::empty({s.N, ld}, input.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_layer_backward_cpu_states", [&] {
      for (int64_t d = 0; d < s.D; ++d) {
        gather_previous_states<scalar_t>(
            steps, d == 1, s.H, h0[d].data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + d * s.H, ld,
            h_prev.data_ptr<scalar_t>() + d * s.H);
      }
    });
    grad_weights = weight_grads(grad_z, h_prev, input, s);
  }
  return {grad_input, grad_hx, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("rnn_layer", &rnn_layer_entry<&rnn_layer_cpu>);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cpu);
}

}  // namespace rnn_ext::cpu
