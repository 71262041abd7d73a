// Autograd of rnn_layer: saves input, hx, the weights and the output; the backward calls the
// rnn_layer_backward op (its own registered op, with a fake kernel, so compiled graphs hold it).
//
// This lives in C++ rather than in torch.library.register_autograd: at small shapes the Python
// autograd wrapper (argument re-binding, redispatch, Python forward/backward frames) cost more
// than the whole recurrence, e.g. 2/3 of forward+backward at B=1, L=100, H=32.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "rnn.h"

namespace rnn_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kWeightArgs = 8;  // w_ih, w_hh, b_ih, b_hh, then the same four of the reverse direction

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool)>&
layer_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_layer", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, bool)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
    const std::optional<at::Tensor>&, bool, const at::Tensor&, std::array<bool, 3>)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_layer_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 at::TensorList, const std::optional<at::Tensor>&, bool, const at::Tensor&,
                                 std::array<bool, 3>)>();
  return op;
}

std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

using OptionalTensor = std::optional<at::Tensor>;

class RnnLayerFunction : public torch::autograd::Function<RnnLayerFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
      const at::Tensor& w_hh, const OptionalTensor& b_ih, const OptionalTensor& b_hh,
      const OptionalTensor& w_ih_reverse, const OptionalTensor& w_hh_reverse, const OptionalTensor& b_ih_reverse,
      const OptionalTensor& b_hh_reverse, const OptionalTensor& batch_sizes, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n] = layer_op().call(
        input, hx, w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse, batch_sizes, relu);
    const auto or_undefined = [](const OptionalTensor& t) { return t.value_or(at::Tensor()); };
    // Absent optional weights are saved as undefined tensors, and take no autograd edge.
    ctx->save_for_backward(
        {input, hx, output, or_undefined(batch_sizes), w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh),
         or_undefined(w_ih_reverse), or_undefined(w_hh_reverse), or_undefined(b_ih_reverse),
         or_undefined(b_hh_reverse)});
    ctx->saved_data["relu"] = relu;
    return {output, h_n};
  }

  // grads: (grad_output, grad_h_n). Returns one gradient per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& hx = saved[1];
    const at::Tensor& output = saved[2];
    // needs_input_grad counts autograd edges, which only present tensors have: input, hx, then
    // the present weights in argument order.
    std::vector<at::Tensor> weights;
    std::vector<int> weight_arg;  // forward argument index of each present weight
    std::vector<bool> weight_needed;
    int64_t edge = 2;
    for (int i = 0; i < kWeightArgs; ++i) {
      if (saved[4 + i].defined()) {
        weights.push_back(saved[4 + i]);
        weight_arg.push_back(2 + i);
        weight_needed.push_back(ctx->needs_input_grad(edge++));
      }
    }
    const bool need_weights = std::find(weight_needed.begin(), weight_needed.end(), true) != weight_needed.end();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), need_weights};
    auto [grad_input, grad_hx, grad_weights] = backward_op().call(
        grads[0], grads[1], input, hx, weights, as_optional(saved[3]), ctx->saved_data["relu"].toBool(), output,
        mask);

    variable_list result(2 + kWeightArgs + 2);  // + batch_sizes and relu, which get none
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_hx;
    for (size_t k = 0; need_weights && k < weights.size(); ++k) {
      if (weight_needed[k]) result[weight_arg[k]] = grad_weights[k];
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> rnn_layer_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptionalTensor& b_ih, const OptionalTensor& b_hh, const OptionalTensor& w_ih_reverse,
    const OptionalTensor& w_hh_reverse, const OptionalTensor& b_ih_reverse, const OptionalTensor& b_hh_reverse,
    const OptionalTensor& batch_sizes, bool relu) {
  const auto result = RnnLayerFunction::apply(
      input, hx, w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse, batch_sizes, relu);
  return {result[0], result[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, Autograd, m) {
  m.impl("rnn_layer", &rnn_layer_autograd);
}

}  // namespace rnn_ext
