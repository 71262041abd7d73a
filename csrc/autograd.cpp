// Autograd of rnn_layer and rnn_cell. Each saves its output and, of its arguments, only those whose values the
// gradients asked for read (as nn.RNN saves no more: a weight changed in place after the forward does not stop
// a backward that does not read it); the backward calls the rnn_layer_backward op (its own registered op, with
// a fake kernel, so compiled graphs hold it).
// When the gradients must themselves be differentiable (create_graph=True: double backward,
// gradient penalties, torch.func), the backward instead differentiates the layer rebuilt from
// differentiable ATen ops, step by step: slower, but exact to any order, on every device.
//
// This lives in C++ rather than in torch.library.register_autograd: at small shapes the Python
// autograd wrapper (argument re-binding, redispatch, Python forward/backward frames) cost more
// than the whole recurrence, e.g. 2/3 of forward+backward at B=1, L=100, H=32.
//
// A C++ autograd Function supports neither forward-mode AD nor functorch's differentiating
// transforms (torch.func.grad, vjp, jvp, jacrev, jacfwd, hessian). Calls under those run the op
// as differentiable ATen ops instead (composite_layer, composite_cell), which every transform and
// forward-mode AD know, to any order. vmap needs no such path: functorch reaches this kernel only
// after its batching rule (rnn_ext/batching.py) has removed the vmap level, so the Function
// records plain tensors, as autograd records ATen ops there.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "rnn.h"

namespace rnn_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// rnn_layer's arguments, by index: input, hx, the kWeightSlots weight slots (rnn.h), batch_sizes,
// relu, lengths.
constexpr int kInputArg = 0;
constexpr int kHxArg = 1;
constexpr int kFirstWeightArg = 2;
constexpr int kArgs = kFirstWeightArg + kWeightSlots + 3;
constexpr int kSlotsPerDirection = kWeightSlots / 2;  // w_ih, w_hh, b_ih, b_hh

// What forward saves, by index: input, hx, output, batch_sizes and lengths (undefined when not
// given), then the weight slots (undefined where absent); input and weights only where backward
// reads their values (RnnLayerFunction::forward).
constexpr size_t kSavedInput = 0;
constexpr size_t kSavedHx = 1;
constexpr size_t kSavedOutput = 2;
constexpr size_t kSavedBatchSizes = 3;
constexpr size_t kSavedLengths = 4;
constexpr size_t kSavedFirstWeight = 5;

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>&
layer_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_layer", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
    const std::optional<at::Tensor>&, bool, const at::Tensor&, std::array<bool, 3>, const std::optional<at::Tensor>&)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnn_ext::rnn_layer_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 at::TensorList, const std::optional<at::Tensor>&, bool, const at::Tensor&,
                                 std::array<bool, 3>, const std::optional<at::Tensor>&)>();
  return op;
}

std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

using OptionalTensor = std::optional<at::Tensor>;

// Whether an argument is wrapped by a functorch transform that differentiates (grad, vjp, jvp,
// ...) or carries a forward-mode tangent: then the op must run as differentiable ATen ops (see the
// top of this file).
bool needs_composite(std::initializer_list<const at::Tensor*> args) {
  for (const at::Tensor* t : args) {
    if (t == nullptr || !t->defined()) continue;
    if (t->key_set().has(c10::DispatchKey::FuncTorchGradWrapper) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// A CPU tensor of host values (at::tensor, row_index) made while functorch transforms run. It is
// made outside them: they would wrap the new tensor before its values are written, and a wrapper
// has no storage to write to.
at::Tensor host_tensor(const RowSet& rows) {
  c10::impl::ExcludeDispatchKeyGuard outside_functorch(c10::DispatchKeySet{
      c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode});
  return row_index(rows);
}

// batch_sizes or lengths as a plain CPU tensor. functorch's transforms wrap every tensor argument
// of an op, these integer ones too, and a wrapper has no storage to read: item() reaches the
// wrapped values through the dispatcher. Anything but a 1-D int64 CPU tensor is left for
// check_layer_args to refuse.
OptionalTensor plain_integers(const OptionalTensor& t) {
  if (!t.has_value() || t->has_storage() || t->scalar_type() != at::kLong || t->dim() != 1 || !t->is_cpu()) {
    return t;
  }
  std::vector<int64_t> values(t->numel());
  for (int64_t i = 0; i < t->numel(); ++i) values[i] = (*t)[i].item().toLong();
  return host_tensor({t->numel(), values.data()});
}

const at::Tensor* present(const OptionalTensor& t) {
  return t.has_value() ? &*t : nullptr;
}

// The arguments a backward reads only the shapes of, for the gradients asked for: kept by reference
// beside the saved tensors, out of autograd's version check, which would refuse an in-place change that
// cannot alter those gradients. The layer's create_graph=True path reads them all (it differentiates
// the layer again from its arguments), so there it checks the versions they had in the forward itself,
// as autograd does (with_versions).
void keep_by_reference(AutogradContext* ctx, std::vector<at::Tensor> kept, bool with_versions) {
  if (with_versions) {
    std::vector<int64_t> versions;
    versions.reserve(kept.size());
    for (const auto& t : kept) versions.push_back(t.defined() ? t._version() : 0);
    ctx->saved_data["kept_versions"] = std::move(versions);
  }
  ctx->saved_data["kept"] = std::move(kept);
}

std::vector<at::Tensor> kept_by_reference(AutogradContext* ctx) {
  return ctx->saved_data["kept"].toTensorVector();
}

// Refuses, as autograd refuses a modified saved tensor, when a kept argument changed in place since the forward.
void check_kept_unchanged(AutogradContext* ctx, const std::vector<at::Tensor>& kept, const char* op) {
  const auto versions = ctx->saved_data["kept_versions"].toIntVector();
  for (size_t k = 0; k < kept.size(); ++k) {
    TORCH_CHECK(
        !kept[k].defined() || kept[k]._version() == versions[k],
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        "argument ", k, " of ", op, " is at version ", kept[k]._version(), "; expected version ", versions[k],
        " instead. Its first gradients do not read it, but create_graph=True differentiates the op again "
        "from all of its arguments.");
  }
}

// A saved tensor, or where it was not saved (its value is not read), the argument kept by reference.
const at::Tensor& saved_or_kept(const at::Tensor& saved, const at::Tensor& kept) {
  return saved.defined() ? saved : kept;
}

bool any_requires_grad(std::initializer_list<const at::Tensor*> args) {
  for (const at::Tensor* t : args) {
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  }
  return false;
}

// rnn_layer written with differentiable ATen ops, one step at a time (shapes in rnn.h), walking
// time through the same StepSchedule as the kernels. A padded batch runs on its real rows only,
// gathered in step order, and its output is scattered back into the padded layout; its states
// (hx, h_n) are taken in the schedule's row order and put back.
std::tuple<at::Tensor, at::Tensor> composite_layer(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, const std::optional<at::Tensor>& lengths) {
  const LayerSizes s = check_layer_args(input, hx, weights, batch_sizes, lengths);
  const StepSchedule steps(batch_sizes, lengths, s.N, s.B);
  if (runs_no_step(steps)) {
    return no_step_forward(input, hx, s);
  }
  const auto owned = steps.padded() ? host_tensor(steps.step_rows()).to(input.device()) : at::Tensor();
  const auto x = steps.padded() ? input.index_select(0, owned) : input;  // [rows the steps own, I]
  const auto act = [relu](const at::Tensor& z) { return relu ? at::relu(z) : at::tanh(z); };
  at::Tensor order;  // [B]: the batch row at each of the schedule's row positions; undefined: in place
  if (steps.order() != nullptr) {
    order = host_tensor({s.B, steps.order()}).to(input.device());
  }
  const auto hx_in_order = order.defined() ? hx.index_select(1, order) : hx;
  std::vector<at::Tensor> outputs, h_n;
  for (int64_t d = 0; d < s.D; ++d) {
    const auto w = direction_weights(weights, d, s.has_bias);
    auto projection = at::matmul(x, w.w_ih.t());
    if (s.has_bias) projection = projection + w.b_ih + w.b_hh;
    const auto h0 = hx_in_order.select(0, d);
    std::vector<at::Tensor> states(steps.steps());     // [size(t), H] per step
    std::vector<int64_t> first_row(steps.steps() + 1, 0);  // of step t in x: the rows of steps before it
    for (int64_t t = 0; t < steps.steps(); ++t) first_row[t + 1] = first_row[t] + steps.size(t);
    std::vector<std::pair<int64_t, at::Tensor>> last;  // (first row, the states of rows ending at a step)
    steps.walk(d == 1, Pass::kForward, [&](const Step& now) {
      std::vector<at::Tensor> start;  // the state each row of this step starts from
      if (now.carried > 0) start.push_back(states[now.previous].narrow(0, 0, now.carried));
      if (now.carried < now.rows) start.push_back(h0.narrow(0, now.carried, now.rows - now.carried));
      const auto h_prev = start.size() == 1 ? start[0] : at::cat(start, 0);
      const auto h = act(projection.narrow(0, first_row[now.t], now.rows) + at::matmul(h_prev, w.w_hh.t()));
      states[now.t] = h;
      if (now.continuing < now.rows) last.emplace_back(now.continuing, h.narrow(0, now.continuing, now.rows - now.continuing));
    });
    if (steps.started() < s.B) last.emplace_back(steps.started(), h0.narrow(0, steps.started(), s.B - steps.started()));
    std::sort(last.begin(), last.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<at::Tensor> last_states;
    for (const auto& [row, state] : last) last_states.push_back(state);
    outputs.push_back(at::cat(states, 0));
    h_n.push_back(last_states.size() == 1 ? last_states[0] : at::cat(last_states, 0));
  }
  auto output = at::cat(outputs, 1);  // [rows the steps own, D*H]
  if (steps.padded()) {
    output = at::zeros({s.N, s.D * s.H}, output.options()).index_put({owned}, output);
  }
  auto last_states = at::stack(h_n, 0);  // [D, B, H] in the schedule's row order
  if (order.defined()) last_states = last_states.index_select(1, at::argsort(order));
  return {output, last_states};
}

class RnnLayerFunction : public torch::autograd::Function<RnnLayerFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
      const at::Tensor& w_hh, const OptionalTensor& b_ih, const OptionalTensor& b_hh,
      const OptionalTensor& w_ih_reverse, const OptionalTensor& w_hh_reverse, const OptionalTensor& b_ih_reverse,
      const OptionalTensor& b_hh_reverse, const OptionalTensor& batch_sizes, bool relu, const OptionalTensor& lengths) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n] = layer_op().call(
        input, hx, w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse, batch_sizes, relu,
        lengths);
    // Saved: what the backward reads the values of. The walk of grad_h reads the output and w_hh; the
    // input's gradient w_ih; the weights' gradients the input and hx (hx also starts the walk). The
    // biases' gradients are sums of grad_z. Everything else is kept by reference, for its shape.
    const bool input_grad = input.requires_grad();
    const bool weight_grad = any_requires_grad({&w_ih, &w_hh, present(b_ih), present(b_hh), present(w_ih_reverse),
                                                present(w_hh_reverse), present(b_ih_reverse), present(b_hh_reverse)});
    const OptionalTensor slots[kWeightSlots] = {w_ih,         w_hh,         b_ih,         b_hh,
                                                w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse};
    std::vector<at::Tensor> saved{weight_grad ? input : at::Tensor(), hx, output, batch_sizes.value_or(at::Tensor()),
                                  lengths.value_or(at::Tensor())};
    std::vector<at::Tensor> kept(kArgs - 3);  // input, hx, the weight slots
    if (!weight_grad) kept[kInputArg] = input;
    for (int slot = 0; slot < kWeightSlots; ++slot) {
      const int kind = slot % kSlotsPerDirection;  // w_ih, w_hh, b_ih, b_hh
      const bool read = kind == 1 || (kind == 0 && input_grad);
      const at::Tensor weight = slots[slot].value_or(at::Tensor());
      saved.push_back(read ? weight : at::Tensor());
      if (!read) kept[kFirstWeightArg + slot] = weight;
    }
    ctx->save_for_backward(saved);
    keep_by_reference(ctx, std::move(kept), /*with_versions=*/true);
    ctx->saved_data["relu"] = relu;
    return {output, h_n};
  }

  // grads: (grad_output, grad_h_n). Returns one gradient per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto kept = kept_by_reference(ctx);
    const at::Tensor& input = saved_or_kept(saved[kSavedInput], kept[kInputArg]);
    const at::Tensor& hx = saved[kSavedHx];
    const at::Tensor& output = saved[kSavedOutput];
    const at::Tensor& batch_sizes = saved[kSavedBatchSizes];
    const at::Tensor& lengths = saved[kSavedLengths];
    // needs_input_grad counts autograd edges, which only present tensors have: input, hx, then
    // the present weights in argument order.
    std::vector<at::Tensor> weights;
    std::vector<int> weight_arg;  // forward argument index of each present weight
    std::vector<bool> weight_needed;
    int64_t edge = kFirstWeightArg;
    for (int slot = 0; slot < kWeightSlots; ++slot) {
      const at::Tensor& weight = saved_or_kept(saved[kSavedFirstWeight + slot], kept[kFirstWeightArg + slot]);
      if (weight.defined()) {
        weights.push_back(weight);
        weight_arg.push_back(kFirstWeightArg + slot);
        weight_needed.push_back(ctx->needs_input_grad(edge++));
      }
    }
    const bool need_weights = std::find(weight_needed.begin(), weight_needed.end(), true) != weight_needed.end();
    const std::array<bool, 3> mask{ctx->needs_input_grad(kInputArg), ctx->needs_input_grad(kHxArg), need_weights};
    const bool relu = ctx->saved_data["relu"].toBool();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      check_kept_unchanged(ctx, kept, "rnn_ext::rnn_layer");
      return differentiable_backward(
          grads, input, hx, weights, weight_arg, weight_needed, batch_sizes, lengths, relu, mask);
    }
    auto [grad_input, grad_hx, grad_weights] = backward_op().call(
        grads[0], grads[1], input, hx, weights, as_optional(batch_sizes), relu, output, mask, as_optional(lengths));

    variable_list result(kArgs);  // batch_sizes, relu and lengths get none
    if (mask[0]) result[kInputArg] = grad_input;
    if (mask[1]) result[kHxArg] = grad_hx;
    for (size_t k = 0; need_weights && k < weights.size(); ++k) {
      if (weight_needed[k]) result[weight_arg[k]] = grad_weights[k];
    }
    return result;
  }

 private:
  // The gradients as a graph of their own: autograd through composite_layer.
  static variable_list differentiable_backward(
      const variable_list& grads, const at::Tensor& input, const at::Tensor& hx, const std::vector<at::Tensor>& weights,
      const std::vector<int>& weight_arg, const std::vector<bool>& weight_needed, const at::Tensor& batch_sizes,
      const at::Tensor& lengths, bool relu, const std::array<bool, 3>& mask) {
    std::vector<at::Tensor> wrt;
    std::vector<int> wrt_arg;  // forward argument index of each tensor in wrt
    if (mask[0]) wrt.push_back(input), wrt_arg.push_back(kInputArg);
    if (mask[1]) wrt.push_back(hx), wrt_arg.push_back(kHxArg);
    for (size_t k = 0; k < weights.size(); ++k) {
      if (weight_needed[k]) wrt.push_back(weights[k]), wrt_arg.push_back(weight_arg[k]);
    }
    variable_list result(kArgs);
    if (wrt.empty()) return result;
    auto [output, h_n] = composite_layer(input, hx, weights, as_optional(batch_sizes), relu, as_optional(lengths));
    const auto grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    const auto grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(h_n);
    const auto wrt_grads = torch::autograd::grad(
        {output, h_n}, wrt, {grad_output, grad_h_n}, /*retain_graph=*/true, /*create_graph=*/true,
        /*allow_unused=*/true);
    for (size_t k = 0; k < wrt.size(); ++k) result[wrt_arg[k]] = wrt_grads[k];
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> rnn_layer_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptionalTensor& b_ih, const OptionalTensor& b_hh, const OptionalTensor& w_ih_reverse,
    const OptionalTensor& w_hh_reverse, const OptionalTensor& b_ih_reverse, const OptionalTensor& b_hh_reverse,
    const OptionalTensor& batch_sizes, bool relu, const OptionalTensor& lengths) {
  if (needs_composite({&input, &hx, &w_ih, &w_hh, present(b_ih), present(b_hh), present(w_ih_reverse),
                       present(w_hh_reverse), present(b_ih_reverse), present(b_hh_reverse)})) {
    const auto weights =
        flat_weights(w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse);
    return composite_layer(input, hx, weights, plain_integers(batch_sizes), relu, plain_integers(lengths));
  }
  const auto result = RnnLayerFunction::apply(
      input, hx, w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse, batch_sizes, relu,
      lengths);
  return {result[0], result[1]};
}

// Autograd of rnn_cell: one node per step, where nn.RNNCell's step records several. The backward
// calls the rnn_cell_backward op; with create_graph=True it runs the same formulas (cell_backward)
// as differentiable ATen ops instead, whose graph reaches the inputs through the saved output.
class RnnCellFunction : public torch::autograd::Function<RnnCellFunction> {
 public:
  // Forward arguments by index (b_ih = 4, b_hh = 5 follow w_hh, then relu). Only present tensors
  // take an autograd edge, but the biases come last and are given together or not at all, so a
  // present tensor's edge index equals its argument index.
  static constexpr int kInput = 0, kHx = 1, kWIh = 2, kArgs = 7;

  static const c10::TypedOperatorHandle<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
      const OptionalTensor&, bool)>&
  cell_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("rnn_ext::rnn_cell", "")
                               .typed<at::Tensor(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const OptionalTensor&, const OptionalTensor&, bool)>();
    return op;
  }

  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
      const at::Tensor& w_hh, const OptionalTensor& b_ih, const OptionalTensor& b_hh, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto h = cell_op().call(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
    // Saved: what the backward reads the values of (cell_backward): the output always, w_ih for the
    // input's gradient, w_hh for hx's, the input and hx for the weights'. The rest is kept by reference.
    const bool weight_grad = any_requires_grad({&w_ih, &w_hh, present(b_ih), present(b_hh)});
    const bool input_grad = input.requires_grad(), hx_grad = hx.requires_grad();
    const auto when = [](bool read, const at::Tensor& t) { return read ? t : at::Tensor(); };
    ctx->save_for_backward(
        {when(weight_grad, input), when(weight_grad, hx), h, when(input_grad, w_ih), when(hx_grad, w_hh)});
    keep_by_reference(ctx, {when(!weight_grad, input), when(!weight_grad, hx), when(!input_grad, w_ih),
                            when(!hx_grad, w_hh), b_ih.value_or(at::Tensor()), b_hh.value_or(at::Tensor())},
                      /*with_versions=*/false);
    ctx->saved_data["relu"] = relu;
    return {h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // input, hx, h, w_ih, w_hh (RnnCellFunction::forward)
    const auto kept = kept_by_reference(ctx);           // input, hx, w_ih, w_hh, b_ih, b_hh
    const at::Tensor& input = saved_or_kept(saved[0], kept[0]);
    const at::Tensor& hx = saved_or_kept(saved[1], kept[1]);
    const bool has_bias = kept[4].defined();
    std::vector<at::Tensor> weights{saved_or_kept(saved[3], kept[2]), saved_or_kept(saved[4], kept[3])};
    if (has_bias) weights.insert(weights.end(), {kept[4], kept[5]});
    std::array<bool, 4> weight_needed{};
    bool need_weights = false;
    for (size_t k = 0; k < weights.size(); ++k) {
      weight_needed[k] = ctx->needs_input_grad(kWIh + k);
      need_weights = need_weights || weight_needed[k];
    }
    const std::array<bool, 3> mask{ctx->needs_input_grad(kInput), ctx->needs_input_grad(kHx), need_weights};
    const bool relu = ctx->saved_data["relu"].toBool();
    std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> result;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      // Reads only what forward saved for these gradients: nothing kept by reference.
      result = cell_backward(grads[0], input, hx, weights, relu, saved[2], mask);
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("rnn_ext::rnn_cell_backward", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, bool,
                                     const at::Tensor&, std::array<bool, 3>)>();
      result = op.call(grads[0], input, hx, weights, relu, saved[2], mask);
    }
    auto& [grad_input, grad_hx, grad_weights] = result;
    variable_list grad_args(kArgs);  // relu gets none
    if (mask[0]) grad_args[kInput] = grad_input;
    if (mask[1]) grad_args[kHx] = grad_hx;
    for (size_t k = 0; need_weights && k < weights.size(); ++k) {
      if (weight_needed[k]) grad_args[kWIh + k] = grad_weights[k];
    }
    return grad_args;
  }
};

// rnn_cell written with differentiable ATen ops, as nn.RNNCell computes it.
at::Tensor composite_cell(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptionalTensor& b_ih, const OptionalTensor& b_hh, bool relu) {
  check_cell_args(input, hx, w_ih, w_hh, b_ih, b_hh);
  const auto z = at::linear(input, w_ih, b_ih) + at::linear(hx, w_hh, b_hh);
  return relu ? at::relu(z) : at::tanh(z);
}

at::Tensor rnn_cell_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptionalTensor& b_ih, const OptionalTensor& b_hh, bool relu) {
  if (needs_composite({&input, &hx, &w_ih, &w_hh, present(b_ih), present(b_hh)})) {
    return composite_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
  }
  bool tracked = false;  // whether an argument needs a gradient while grad mode records
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&input, &hx, &w_ih, &w_hh, present(b_ih), present(b_hh)}) {
      tracked = tracked || (t != nullptr && t->requires_grad());
    }
  }
  if (!tracked) {
    // Nothing to record (e.g. a no_grad sampling loop): skip building an autograd node, a cost as
    // large as a small step's arithmetic.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return RnnCellFunction::cell_op().call(input, hx, w_ih, w_hh, b_ih, b_hh, relu);
  }
  return RnnCellFunction::apply(input, hx, w_ih, w_hh, b_ih, b_hh, relu)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, Autograd, m) {
  m.impl("rnn_layer", &rnn_layer_autograd);
  m.impl("rnn_cell", &rnn_cell_autograd);
}

}  // namespace rnn_ext
