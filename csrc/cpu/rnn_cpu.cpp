// The CPU backend of the layer driver (csrc/layer.h; shapes in csrc/rnn.h).
//
// Forward: output = input @ [w_ih of all directions]^T + (b_ih + b_hh) through the packed step
// kernel, then per step and direction output[t] = act(output[t] + h_{t-1} @ w_hh^T) in place.
// Only output is kept for backward: the activation derivative is written in terms of it.
//
// Backward: per direction a walk against time builds grad_z (gradient of the pre-activation) in
// one [N, D*H] buffer; grad_input is then one product over all rows.
//
// float16 and bfloat16 are not native here: the driver computes them in float32 and rounds the
// results, as nn.RNN's CPU path does.
#include "../layer.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace rnn_ext::cpu {

namespace {

template <typename scalar_t>
void copy_rows(scalar_t* dst, int64_t ld_dst, const scalar_t* src, int64_t ld_src, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * ld_dst, src + r * ld_src, cols * sizeof(scalar_t));
  }
}

// dst = a + b, row by row.
template <typename scalar_t>
void sum_rows(
    scalar_t* dst, int64_t ld_dst, const scalar_t* a, int64_t ld_a, const scalar_t* b, int64_t ld_b, int64_t rows,
    int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) dst[r * ld_dst + j] = a[r * ld_a + j] + b[r * ld_b + j];
  }
}

Epilogue activation(bool relu) { return relu ? Epilogue::kRelu : Epilogue::kTanh; }
Epilogue activation_grad(bool relu) { return relu ? Epilogue::kReluGrad : Epilogue::kTanhGrad; }

// c [rows, cols] = row + a [rows, depth] @ w [depth, cols] (row [cols] or undefined) with the
// step kernel. For the all-rows products (input projection, grad_input) it beats at::mm at these
// tall-skinny shapes.
template <typename scalar_t>
void product_into(const at::Tensor& a, const at::Tensor& w, const at::Tensor& row, at::Tensor& c) {
  const auto a_ = a.contiguous();
  const auto w_ = w.contiguous();
  const auto row_ = row.defined() ? row.contiguous() : row;
  const PackedWeight<scalar_t> packed(w_.data_ptr<scalar_t>(), w_.size(1), w_.size(0), w_.size(1));
  product<scalar_t>(a_.size(0), a_.data_ptr<scalar_t>(), a_.size(1), packed, c.data_ptr<scalar_t>(), c.size(1),
                    row_.defined() ? row_.data_ptr<scalar_t>() : nullptr);
}

class CpuBackend {
 public:
  CpuBackend(const at::Tensor& /*input*/, const LayerSizes& /*sizes*/) {}

  static bool native(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble; }

  template <typename F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_ext_cpu", [&] { f(DType<scalar_t>{}); });
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

  template <typename scalar_t>
  void project(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& bias, at::Tensor& output) {
    product_into<scalar_t>(x, w_ih.t(), bias, output);
  }

  template <typename scalar_t>
  void grad_input(const at::Tensor& grad_z, const at::Tensor& w_ih, at::Tensor& grad_input) {
    product_into<scalar_t>(grad_z, w_ih, at::Tensor(), grad_input);
  }

  // output[t] = act(output[t] + h_prev @ w_hh^T), h_prev the walk's previous state or hx.
  template <typename scalar_t>
  void forward_walk(const StepSchedule& steps, const ForwardWalk<scalar_t>& dir, bool single_thread) {
    const Epilogue act = activation(dir.relu);
    const int64_t H = dir.H;
    const int64_t ld = dir.ld;
    const at::Tensor w_hh_t = dir.w_hh.t().contiguous();
    const PackedWeight<scalar_t> packed(w_hh_t.data_ptr<scalar_t>(), H, H, H);
    steps.walk(dir.reverse, Pass::kForward, [&](const Step& now) {
      scalar_t* h = dir.output + now.offset * ld;
      if (now.carried > 0) {
        step(now.carried, dir.output + steps.offset(now.previous) * ld, ld, packed, h, ld, act, nullptr, 0, single_thread);
      }
      if (now.carried < now.rows) {
        step(now.rows - now.carried, dir.hx + now.carried * H, H, packed, h + now.carried * ld, ld, act, nullptr, 0,
             single_thread);
      }
      copy_rows(dir.h_n + now.continuing * H, H, h + now.continuing * ld, ld, now.rows - now.continuing, H);
    });
  }

  // grad_z[t] = (grad_output[t] + grad_z[next] @ w_hh, or + grad_h_n where a sequence ends) * act'.
  template <typename scalar_t>
  void backward_walk(const StepSchedule& steps, const BackwardWalk<scalar_t>& dir, bool single_thread) {
    const Epilogue act_grad = activation_grad(dir.relu);
    const int64_t H = dir.H;
    const int64_t ld = dir.ld;
    const at::Tensor w_hh = dir.w_hh.contiguous();
    const PackedWeight<scalar_t> packed(w_hh.data_ptr<scalar_t>(), H, H, H);
    steps.walk(dir.reverse, Pass::kBackward, [&](const Step& now) {
      const int64_t at_rows = now.offset * ld;
      scalar_t* g = dir.grad_z + at_rows;
      const scalar_t* y = dir.output + at_rows;
      const int64_t ending = now.rows - now.continuing;
      copy_rows(g, ld, dir.grad_output + at_rows, ld, now.continuing, H);
      sum_rows(g + now.continuing * ld, ld, dir.grad_output + at_rows + now.continuing * ld, ld,
               dir.grad_h_n + now.continuing * H, H, ending, H);
      if (now.continuing > 0) {
        step(now.continuing, dir.grad_z + steps.offset(now.next) * ld, ld, packed, g, ld, act_grad, y, ld, single_thread);
      }
      if (ending > 0) {  // no gradient flows back into these rows: the epilogue only
        step<scalar_t>(ending, nullptr, 0, packed, g + now.continuing * ld, ld, act_grad, y + now.continuing * ld, ld,
                       single_thread);
      }
      // Rows that started from hx send their gradient there.
      if (dir.grad_hx != nullptr && now.carried < now.rows) {
        step(now.rows - now.carried, g + now.carried * ld, ld, packed, dir.grad_hx + now.carried * H, H,
             Epilogue::kNone, nullptr, 0, single_thread);
      }
      if (dir.h_prev != nullptr) {
        scalar_t* dst = dir.h_prev + at_rows;
        if (now.carried > 0) {
          copy_rows(dst, ld, dir.output + steps.offset(now.previous) * ld, ld, now.carried, H);
        }
        copy_rows(dst + now.carried * ld, ld, dir.hx + now.carried * H, H, now.rows - now.carried, H);
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("rnn_layer", &rnn_layer_entry<&layer_forward<CpuBackend>>);
  m.impl("rnn_layer_backward", &layer_backward<CpuBackend>);
}

}  // namespace rnn_ext::cpu
