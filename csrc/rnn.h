// Shared declarations of the rnn_ext ops: shapes, argument checks, time-step schedule.
//
// Shapes, used throughout csrc/:
//   T  time steps         B  batch rows (of hx)        N  total rows: T*B dense or padded, sum(batch_sizes) packed
//   I  input features     H  hidden features           D  directions (1, or 2 when bidirectional)
//
//   input        [N, I]     time-major rows: step t owns rows [offset(t), offset(t) + size(t))
//   hx           [D, B, H]
//   weights      per direction d, in nn.RNN's order: w_ih [H, I], w_hh [H, H], then b_ih [H], b_hh [H] if biased
//   batch_sizes  [T] int64 on the CPU, non-increasing, batch_sizes[0] == B: a packed batch
//   lengths      [B] int64 on the CPU, each in [0, T], in any order: a padded batch; row b is
//                real at steps t < lengths[b], padding after
//                (neither given: dense, every step has B rows)
//   output       [N, D*H]   direction d in columns [d*H, (d+1)*H); zero on padding rows
//   h_n          [D, B, H]  each row's state after its last step; hx where a row has no step
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

// A set of rows of an [N, ...] layout: rows 0, 1, ..., count - 1, or index[0], ..., index[count - 1].
struct RowSet {
  int64_t count;
  const int64_t* index;  // nullptr: the first count rows
  int64_t at(int64_t r) const { return index != nullptr ? index[r] : r; }
};

// The rows the steps own, once each, as pairs: layout row layout[r] is gathered row gathered[r]
// (either nullptr: r). Listed in the layout's order, so that reading them streams memory front to back.
struct RowPairs {
  int64_t count;
  const int64_t* layout;
  const int64_t* gathered;
};

// The rows of a RowSet as an int64 CPU tensor [count].
at::Tensor row_index(const RowSet& rows);

// One time step of one direction's walk, and how its rows connect to the walk's neighbouring
// steps. Rows are this step's rows of the time-major layout, [offset, offset + rows); because
// batch sizes never grow with t, the rows that link to a neighbour are always a prefix.
struct Step {
  int64_t t;       // time step
  int64_t offset;  // first row of step t in the [N, ...] layout
  int64_t rows;    // rows of step t
  // Rows [0, carried) start from the state of the walk's previous step (time `previous`);
  // rows [carried, rows) start their sequence here, from hx rows [carried, rows).
  int64_t previous, carried;
  // Rows [0, continuing) go on to the walk's next step (time `next`); rows [continuing, rows)
  // end their sequence here: their state is h_n rows [continuing, rows).
  int64_t next, continuing;
};

// Which order a walk visits the steps in: the order the recurrence runs (forward pass), or
// the order its gradient flows (backward pass: the recurrence's order reversed).
enum class Pass { kForward, kBackward };

// The time steps of a layer: which rows each step owns in the time-major [N, ...] layout, and
// the rules of a variable-length batch, for both directions and both passes. Every backend and
// the composite (double-backward) path walk time through this class only.
//   forward direction: step t continues from t - 1; rows [size(t+1), size(t)) end at t.
//   reverse direction: step t continues from t + 1, whose size(t+1) rows carry on, and
//                      rows [size(t+1), size(t)) start at t from hx; every row ends at t = 0.
// Dense and packed batches have no gaps: step t's rows follow step t - 1's. A padded batch
// (lengths) keeps all B rows of every step in the layout, offset(t) = t*B, and is walked with its
// rows taken longest first: row r of a step (Step's row numbers, h_n's and hx's too) is batch row
// order()[r] (row r when order() is nullptr, i.e. the rows are already sorted). Step t owns rows
// r < size(t); the rest are padding, which no step reads or writes. steps() is the longest length,
// and rows r >= started() have no step at all.
class StepSchedule {
 public:
  StepSchedule(
      const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& lengths, int64_t N, int64_t B);
  int64_t steps() const { return static_cast<int64_t>(sizes_.size()); }
  int64_t size(int64_t t) const { return sizes_[t]; }
  int64_t offset(int64_t t) const { return offsets_[t]; }
  // Where step t's rows start, and how many rows there are, when only the rows the steps own are
  // kept, in step order (gather_rows, step_rows); the layout itself unless padded.
  int64_t gathered_offset(int64_t t) const { return gathered_offsets_[t]; }
  int64_t gathered_rows() const { return gathered_rows_; }
  // Rows between consecutive rows of a step in the gathered layout: 1, or the number of parts in a part().
  int64_t gathered_stride() const { return gathered_stride_; }
  bool padded() const { return padded_; }
  const int64_t* order() const { return order_.empty() ? nullptr : order_.data(); }
  // Rows that run at least one step (the others keep hx as their state).
  int64_t started() const { return sizes_.empty() ? 0 : sizes_[0]; }

  // The rows the steps own, in step order (step t's at gathered_offset(t)), and the padding rows.
  RowSet step_rows() const { return {gathered_rows_, padded_ ? step_index_.data() : nullptr}; }
  RowSet padding_rows() const { return {static_cast<int64_t>(padding_index_.size()), padding_index_.data()}; }
  RowPairs step_rows_in_layout_order() const {
    if (order() == nullptr) return {gathered_rows_, padded_ ? step_index_.data() : nullptr, nullptr};
    return {gathered_rows_, layout_order_.data(), gathered_order_.data()};
  }
  // The batch rows that run no step (a padded batch's rows of length 0): [B - started()] int64 on the CPU.
  at::Tensor idle_rows() const;

  // Part `which` of `parts` of the rows: those at positions which, which + parts, ... of the walk's
  // row order, as a schedule of their own (a padded one's order, or the batch's). Sequences are
  // independent, so the parts can be walked at the same time, with no synchronisation per step;
  // each keeps its rows where the whole schedule has them, in the layout and in the gathered layout
  // (every parts-th row: gathered_stride() grows by that factor). Only the walk's members (steps,
  // size, offset, gathered_offset, gathered_stride, order, started) are set. Needs which < started().
  StepSchedule part(int64_t which, int64_t parts) const;

  // Step t of the forward (reverse == false) or reverse direction.
  Step step(int64_t t, bool reverse) const {
    const int64_t rows = sizes_[t];
    const int64_t later = t + 1 < steps() ? sizes_[t + 1] : 0;  // rows that step t + 1 has
    const int64_t earlier = t > 0 ? rows : 0;                     // rows of step t that step t - 1 has
    if (!reverse) {
      return {t, offsets_[t], rows, t - 1, earlier, t + 1, later};
    }
    return {t, offsets_[t], rows, t + 1, later, t - 1, earlier};
  }

  // Step i (0, 1, ..., steps() - 1) of a direction's walk, in the order of the pass.
  Step walk_step(int64_t i, bool reverse, Pass pass) const {
    const bool increasing_t = reverse == (pass == Pass::kBackward);
    return step(increasing_t ? i : steps() - 1 - i, reverse);
  }

  // Calls body(const Step&) for every step of a direction, in the order of the pass.
  template <typename F>
  void walk(bool reverse, Pass pass, F&& body) const {
    for (int64_t i = 0; i < steps(); ++i) body(walk_step(i, reverse, pass));
  }

 private:
  std::vector<int64_t> sizes_;
  std::vector<int64_t> offsets_;
  std::vector<int64_t> gathered_offsets_;
  int64_t gathered_rows_ = 0;
  int64_t gathered_stride_ = 1;
  std::vector<int64_t> order_;  // [B] of a padded batch not already sorted by length; else empty
  std::vector<int64_t> step_index_, padding_index_;  // of a padded batch: step_rows(), padding_rows()
  std::vector<int64_t> layout_order_, gathered_order_;  // step_rows_in_layout_order(), when order() is given
  int64_t rows_;  // N
  int64_t batch_;  // B
  bool padded_;

  StepSchedule() = default;
};

// That t (called name in the message) has the input's dtype and device.
void check_same_kind(const at::Tensor& t, const char* name, const at::Tensor& input);
// That t (called name in the message) has the expected shape.
void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected);

// Checks dtypes, devices and shapes of a layer's arguments; returns its sizes.
LayerSizes check_layer_args(
    const at::Tensor& input,
    const at::Tensor& hx,
    at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& lengths);

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
//   input  [N, I],
// and the state each row's step started from, h_prev [N, D*H]: for a packed or padded batch, as
// gathered by the backend's walk; for a dense one (h_prev undefined) read in place: the output
// B rows earlier (later, in the reverse direction), or hx [D, B, H] for the walk's first step.
// grad_w_ih = grad_z^T input, grad_w_hh = grad_z^T h_prev per direction, grad_b = sum of grad_z rows.
// (For a padded batch, the driver passes only the rows the steps own, gathered.)
std::vector<at::Tensor> weight_grads(
    const at::Tensor& grad_z, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& output,
    const at::Tensor& h_prev, const LayerSizes& sizes);

// weight_grads' list, with direction d's (grad_w_ih, grad_w_hh) from products(d): for a backend
// with products of its own. The biases' gradients are grad_z's column sums, grad_b [D*H] where
// the backend sums them itself, else grad_z.sum(0).
using WeightProducts = std::function<std::pair<at::Tensor, at::Tensor>(int64_t d)>;
std::vector<at::Tensor> weight_grads_from(
    const at::Tensor& grad_z, const LayerSizes& sizes, const WeightProducts& products, const at::Tensor& grad_b = {});

// Whether a layer runs no time step (no input rows, or every length 0): then h_n is hx. The one test for it.
inline bool runs_no_step(const StepSchedule& steps) {
  return steps.steps() == 0;
}

// rnn_layer's result when the layer runs no step: a zero output [N, D*H] and h_n = hx (contiguous).
std::tuple<at::Tensor, at::Tensor> no_step_forward(const at::Tensor& input, const at::Tensor& hx, const LayerSizes& sizes);

// rnn_layer_backward's result when the layer ran no step: h_n was hx, so grad_hx is grad_h_n and
// every other gradient is zero.
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> no_step_backward(
    const at::Tensor& input, const at::Tensor& grad_h_n, at::TensorList weights, std::array<bool, 3> output_mask);

// rnn_layer takes its weights in kWeightSlots separate arguments, in this order, each optional but
// the first two: w_ih, w_hh, b_ih, b_hh, then the same four of the reverse direction. Its C++
// autograd Function (autograd.cpp) then gives each present weight an autograd edge of its own.
constexpr int kWeightSlots = 8;

// The weight slots as nn.RNN's flat list (per direction: w_ih, w_hh[, b_ih, b_hh]).
std::vector<at::Tensor> flat_weights(
    const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse);

using LayerImpl = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes, bool relu, const std::optional<at::Tensor>& lengths);

// Adapts a list-based forward to rnn_layer's schema: m.impl("rnn_layer", &rnn_layer_entry<&impl>).
template <LayerImpl impl>
std::tuple<at::Tensor, at::Tensor> rnn_layer_entry(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse,
    const std::optional<at::Tensor>& batch_sizes, bool relu, const std::optional<at::Tensor>& lengths) {
  const auto weights =
      flat_weights(w_ih, w_hh, b_ih, b_hh, w_ih_reverse, w_hh_reverse, b_ih_reverse, b_hh_reverse);
  return impl(input, hx, weights, batch_sizes, relu, lengths);
}

}  // namespace rnn_ext

// ---------------------------------------------------------------------------------------------
// One step of the recurrence on its own: the rnn_cell op, nn.RNNCell's step.
//   input  [B, I]    hx [B, H]    w_ih [H, I]    w_hh [H, H]    b_ih [H]?    b_hh [H]? (both or neither)
//   -> h   [B, H]    h = act(input @ w_ih^T + b_ih + hx @ w_hh^T + b_hh)

namespace rnn_ext {

struct CellSizes {
  int64_t B, I, H;
  bool has_bias;
};

// Checks dtypes, devices and shapes of a cell's arguments (nn.RNNCell's messages); returns its sizes.
CellSizes check_cell_args(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);

// rnn_cell from ATen ops (two GEMMs into one buffer, the activation in place), on any device.
// The caller has checked the arguments (check_cell_args), as for cell_backward (check_cell_backward_args).
at::Tensor cell_forward_aten(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool relu);

// Checks rnn_cell_backward's arguments (below): the cell's, and grad_h and output [B, H].
CellSizes check_cell_backward_args(
    const at::Tensor& grad_h, const at::Tensor& input, const at::Tensor& hx, at::TensorList weights,
    const at::Tensor& output);

// rnn_cell_backward (shapes above; weights [w_ih, w_hh(, b_ih, b_hh)]; output the cell's h): from
// grad_z = grad_h * act'(output), grad_input = grad_z @ w_ih, grad_hx = grad_z @ w_hh,
// grad_w_ih = grad_z^T input, grad_w_hh = grad_z^T hx, grad_b_ih = grad_b_hh = sum of grad_z rows.
// ATen ops on any device, differentiable: with grad mode on it records the graph of the gradients.
// grad_w_out: buffers for grad_w_ih and grad_w_hh to write into (undefined: allocated).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> cell_backward(
    const at::Tensor& grad_h, const at::Tensor& input, const at::Tensor& hx, at::TensorList weights, bool relu,
    const at::Tensor& output, std::array<bool, 3> output_mask, std::array<at::Tensor, 2> grad_w_out = {});

}  // namespace rnn_ext
