// The parts of the rnn_cell op every backend shares (shapes in rnn.h): argument checks, the step
// from ATen GEMMs, and the backward, which is a handful of GEMMs on any device.
#include "rnn.h"

namespace rnn_ext {

CellSizes check_cell_args(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(input.dim() == 2, "rnn_ext: input must be 2-D [batch, input_size], got ", input.dim(), "-D");
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      "rnn_ext: input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(hx.dim() == 2, "rnn_ext: hx must be 2-D [batch, hidden_size], got ", hx.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, "rnn_ext: w_ih and w_hh must be 2-D");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "rnn_ext: b_ih and b_hh must be given together");
  check_same_kind(hx, "hx", input);
  check_same_kind(w_ih, "w_ih", input);
  check_same_kind(w_hh, "w_hh", input);
  CellSizes s{input.size(0), w_ih.size(1), w_hh.size(0), b_ih.has_value()};
  check_shape(w_ih, "w_ih", {s.H, s.I});
  check_shape(w_hh, "w_hh", {s.H, s.H});
  if (s.has_bias) {
    check_same_kind(*b_ih, "b_ih", input);
    check_same_kind(*b_hh, "b_hh", input);
    check_shape(*b_ih, "b_ih", {s.H});
    check_shape(*b_hh, "b_hh", {s.H});
  }
  TORCH_CHECK(
      input.size(1) == s.I, "rnn_ext: input has inconsistent input_size: got ", input.size(1), " expected ", s.I);
  TORCH_CHECK(
      hx.size(1) == s.H, "rnn_ext: hx has inconsistent hidden_size: got ", hx.size(1), ", expected ", s.H);
  TORCH_CHECK(
      hx.size(0) == s.B, "rnn_ext: input batch size ", s.B, " doesn't match hx batch size ", hx.size(0));
  return s;
}

at::Tensor cell_forward_aten(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool relu) {
  at::Tensor h = b_ih.has_value() ? at::addmm(*b_ih + *b_hh, input, w_ih.t()) : at::mm(input, w_ih.t());
  h.addmm_(hx, w_hh.t());
  return relu ? h.relu_() : h.tanh_();
}

CellSizes check_cell_backward_args(
    const at::Tensor& grad_h, const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const at::Tensor& output) {
  TORCH_CHECK(
      weights.size() == 2 || weights.size() == 4, "rnn_ext: weights must hold 2 (no bias) or 4 tensors, got ",
      weights.size());
  const CellSizes s = weights.size() == 4 ? check_cell_args(input, hx, weights[0], weights[1], weights[2], weights[3])
                                          : check_cell_args(input, hx, weights[0], weights[1], {}, {});
  check_same_kind(grad_h, "grad_h", input);
  check_same_kind(output, "output", input);
  check_shape(grad_h, "grad_h", {s.B, s.H});
  check_shape(output, "output", {s.B, s.H});
  return s;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cell_backward(
    const at::Tensor& grad_h, const at::Tensor& input, const at::Tensor& hx, at::TensorList weights, bool relu,
    const at::Tensor& output, std::array<bool, 3> output_mask, std::array<at::Tensor, 2> grad_w_out) {
  // relu' from relu's output: output > 0 exactly where the pre-activation was.
  const auto grad_z = relu ? at::threshold_backward(grad_h, output, 0) : at::tanh_backward(grad_h, output);
  const auto skipped = [&] { return at::empty({0}, input.options()); };  // one each: outputs must not alias
  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    const auto into = [](const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
      return out.defined() ? at::mm_out(const_cast<at::Tensor&>(out), a, b) : at::mm(a, b);
    };
    grad_weights = {into(grad_w_out[0], grad_z.t(), input), into(grad_w_out[1], grad_z.t(), hx)};
    if (weights.size() == 4) {
      const auto grad_b = grad_z.sum(0);
      grad_weights.push_back(grad_b);
      grad_weights.push_back(grad_b.clone());  // op outputs must not alias
    }
  }
  return {output_mask[0] ? at::mm(grad_z, weights[0]) : skipped(),
          output_mask[1] ? at::mm(grad_z, weights[1]) : skipped(), grad_weights};
}

}  // namespace rnn_ext
