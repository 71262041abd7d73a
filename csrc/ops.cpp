// Op schemas (declared once, here), argument checks and the helpers every backend shares.
// Backends only add implementations: csrc/cpu/rnn_cpu.cpp and csrc/cuda/rnn_cuda.cu.
#include "rnn.h"

#include <torch/library.h>

#include <algorithm>
#include <numeric>

// Importing rnn_ext._C (csrc/python.cpp) runs the static registrations below.

TORCH_LIBRARY(rnn_ext, m) {
  // One layer, all of its directions (shapes in rnn.h). relu selects the activation (else tanh).
  // The reverse direction's weights are given for a bidirectional layer (hx.size(0) == 2), the
  // biases when the layer has them. batch_sizes makes the batch packed, lengths padded (at most
  // one of them). Returns (output [N, D*H], h_n [D, B, H]).
  m.def(
      "rnn_layer(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_ih_reverse, Tensor? w_hh_reverse, Tensor? b_ih_reverse, Tensor? b_hh_reverse, "
      "Tensor? batch_sizes, bool relu, Tensor? lengths=None) -> (Tensor, Tensor)");
  // Gradients of rnn_layer from its saved input, hx, weights (nn.RNN's flat list) and output.
  // output_mask says which of (grad_input, grad_hx, grad_weights) to compute; a skipped one is
  // returned empty (shape [0], or an empty list).
  m.def(
      "rnn_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
      "Tensor[] weights, Tensor? batch_sizes, bool relu, Tensor output, bool[3] output_mask, "
      "Tensor? lengths=None) -> (Tensor, Tensor, Tensor[])");
  // One step on its own, nn.RNNCell's (shapes in rnn.h): act(input @ w_ih^T + b_ih + hx @ w_hh^T + b_hh).
  m.def(
      "rnn_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool relu) "
      "-> Tensor");
  // Gradients of rnn_cell from its input, hx, weights ([w_ih, w_hh(, b_ih, b_hh)]) and output, as
  // rnn_layer_backward's: output_mask picks (grad_input, grad_hx, grad_weights).
  m.def(
      "rnn_cell_backward(Tensor grad_h, Tensor input, Tensor hx, Tensor[] weights, bool relu, Tensor output, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor[])");
  // Facts of the CPU backend, which implements them (csrc/cpu/rnn_cpu.cpp); they take no tensor.
  // The instruction set of the CPU kernels (RNN_EXT_CPU_ISA can lower it), for tests and reports.
  m.def("cpu_isa() -> str");
  // How the CPU walks split over the threads (rnn_ext/threads.py): [row_groups, col_slices] per
  // direction, and a split forced on every walk (0, 0: none), for tests and benchmarks.
  m.def("cpu_walk_split(int rows, int walk_rows, int hidden, ScalarType dtype, int directions, int threads) -> int[]");
  m.def("cpu_force_walk_split(int row_groups, int col_slices) -> ()");
}

namespace rnn_ext {

void check_same_kind(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(
      t.scalar_type() == input.scalar_type(),
      "rnn_ext: ", name, " must have the input's dtype ", input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      "rnn_ext: ", name, " must be on the input's device ", input.device(), ", got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(
      t.sizes() == expected, "rnn_ext: ", name, " must have shape ", expected, ", got ", t.sizes());
}

namespace {

void check_batch_sizes(const at::Tensor& batch_sizes, int64_t N, int64_t B) {
  TORCH_CHECK(
      batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1,
      "rnn_ext: batch_sizes must be a 1-D int64 CPU tensor, got ", batch_sizes.dim(), "-D ",
      batch_sizes.scalar_type(), " on ", batch_sizes.device());
  const auto sizes = batch_sizes.contiguous();
  const int64_t* data = sizes.data_ptr<int64_t>();
  const int64_t T = sizes.numel();
  TORCH_CHECK(T > 0, "rnn_ext: batch_sizes must not be empty");
  TORCH_CHECK(
      data[0] == B, "rnn_ext: batch_sizes[0] must equal the batch size of hx (", B, "), got ", data[0]);
  int64_t total = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(data[t] > 0, "rnn_ext: batch_sizes[", t, "] must be positive, got ", data[t]);
    TORCH_CHECK(
        t == 0 || data[t] <= data[t - 1], "rnn_ext: batch_sizes must be non-increasing, got batch_sizes[",
        t - 1, "] = ", data[t - 1], " < batch_sizes[", t, "] = ", data[t]);
    total += data[t];
  }
  TORCH_CHECK(
      total == N, "rnn_ext: sum(batch_sizes) must equal the number of input rows (", N, "), got ", total);
}

// lengths: see rnn.h. N == T*B, so T = N / B.
void check_lengths(const at::Tensor& lengths, const std::optional<at::Tensor>& batch_sizes, int64_t N, int64_t B) {
  TORCH_CHECK(!batch_sizes.has_value(), "rnn_ext: a batch is either packed (batch_sizes) or padded (lengths), not both");
  TORCH_CHECK(
      lengths.device().is_cpu() && lengths.scalar_type() == at::kLong && lengths.dim() == 1,
      "rnn_ext: lengths must be a 1-D int64 CPU tensor, got ", lengths.dim(), "-D ", lengths.scalar_type(), " on ",
      lengths.device());
  TORCH_CHECK(
      lengths.numel() == B, "rnn_ext: lengths must hold one length per batch row (", B, "), got ", lengths.numel());
  TORCH_CHECK(
      B == 0 ? N == 0 : N % B == 0, "rnn_ext: padded input rows (", N, ") must be a multiple of the batch size of hx (",
      B, ")");
  const int64_t T = B == 0 ? 0 : N / B;
  const auto values = lengths.contiguous();
  const int64_t* data = values.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(
        data[b] >= 0 && data[b] <= T, "rnn_ext: lengths must lie in [0, ", T, "] (the time steps), got lengths[", b,
        "] = ", data[b]);
  }
}

}  // namespace

StepSchedule::StepSchedule(
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& lengths, int64_t N, int64_t B)
    : rows_(N), batch_(B), padded_(lengths.has_value()) {
  if (batch_sizes.has_value()) {
    const auto sizes = batch_sizes->contiguous();
    const int64_t* data = sizes.data_ptr<int64_t>();
    sizes_.assign(data, data + sizes.numel());
  } else if (padded_) {
    const auto values = lengths->contiguous();
    const int64_t* length = values.data_ptr<int64_t>();
    // Longest first (ties in batch order), so that the rows real at step t are the first size(t).
    order_.resize(B);
    std::iota(order_.begin(), order_.end(), int64_t{0});
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return length[a] > length[b]; });
    const int64_t longest = B > 0 ? length[order_[0]] : 0;
    sizes_.resize(longest);
    int64_t rows = B;
    for (int64_t t = 0; t < longest; ++t) {
      while (length[order_[rows - 1]] <= t) --rows;
      sizes_[t] = rows;
    }
    if (std::is_sorted(order_.begin(), order_.end())) order_.clear();
  } else if (B > 0) {
    sizes_.assign(N / B, B);
  }
  offsets_.resize(sizes_.size());
  gathered_offsets_.resize(sizes_.size());
  for (size_t t = 0; t < sizes_.size(); ++t) {
    gathered_offsets_[t] = gathered_rows_;
    offsets_[t] = padded_ ? static_cast<int64_t>(t) * B : gathered_rows_;
    gathered_rows_ += sizes_[t];
  }
  if (padded_) {
    // rank[b]: batch row b's position in the walk's row order; step t owns the rows of rank < size(t).
    std::vector<int64_t> rank(B);
    for (int64_t r = 0; r < B; ++r) rank[order() != nullptr ? order_[r] : r] = r;
    step_index_.resize(gathered_rows_);
    padding_index_.resize(N - gathered_rows_);
    if (order() != nullptr) {
      layout_order_.resize(gathered_rows_);
      gathered_order_.resize(gathered_rows_);
    }
    int64_t* owned_rows = step_index_.data();
    int64_t* padding_rows = padding_index_.data();
    int64_t owned_in_layout = 0;
    for (int64_t t = 0; t * B < N; ++t) {
      const int64_t owned = t < steps() ? sizes_[t] : 0;
      const int64_t first = t * B;
      for (int64_t r = 0; r < owned; ++r) *owned_rows++ = first + (order() != nullptr ? order_[r] : r);
      for (int64_t b = 0; b < B; ++b) {  // in the layout's order
        if (rank[b] >= owned) {
          *padding_rows++ = first + b;
        } else if (order() != nullptr) {
          layout_order_[owned_in_layout] = first + b;
          gathered_order_[owned_in_layout++] = gathered_offsets_[t] + rank[b];
        }
      }
    }
  }
}

at::Tensor row_index(const RowSet& rows) {
  if (rows.index == nullptr) {
    return at::arange(rows.count, at::TensorOptions().dtype(at::kLong));
  }
  return at::tensor(at::IntArrayRef(rows.index, rows.count), at::TensorOptions().dtype(at::kLong));
}

StepSchedule StepSchedule::part(int64_t which, int64_t parts) const {
  TORCH_INTERNAL_ASSERT(which >= 0 && which < parts && which < started());
  StepSchedule part;
  part.padded_ = padded_;
  part.rows_ = rows_;
  part.batch_ = batch_;
  part.gathered_stride_ = parts * gathered_stride_;
  for (int64_t r = which; r < started(); r += parts) part.order_.push_back(order() != nullptr ? order_[r] : r);
  for (int64_t t = 0; t < steps() && sizes_[t] > which; ++t) {
    part.sizes_.push_back((sizes_[t] - which + parts - 1) / parts);  // positions which, which + parts, ... below size(t)
    part.offsets_.push_back(offsets_[t]);
    part.gathered_offsets_.push_back(gathered_offsets_[t] + which * gathered_stride_);
  }
  return part;
}

at::Tensor StepSchedule::idle_rows() const {
  std::vector<int64_t> rows;
  for (int64_t r = started(); r < batch_; ++r) rows.push_back(order() != nullptr ? order_[r] : r);
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong));
}

LayerSizes check_layer_args(
    const at::Tensor& input,
    const at::Tensor& hx,
    at::TensorList weights,
    const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(input.dim() == 2, "rnn_ext: input must be 2-D [rows, input_size], got ", input.dim(), "-D");
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      "rnn_ext: input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(hx.dim() == 3, "rnn_ext: hx must be 3-D [directions, batch, hidden_size], got ", hx.dim(), "-D");
  check_same_kind(hx, "hx", input);

  LayerSizes s;
  s.N = input.size(0);
  s.I = input.size(1);
  s.D = hx.size(0);
  s.B = hx.size(1);
  s.H = hx.size(2);
  TORCH_CHECK(s.D == 1 || s.D == 2, "rnn_ext: hx.size(0) (directions) must be 1 or 2, got ", s.D);
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(
      n == 2 * s.D || n == 4 * s.D, "rnn_ext: weights must hold 2 (no bias) or 4 tensors per direction, got ",
      n, " for ", s.D, " direction(s)");
  s.has_bias = n == 4 * s.D;

  const int64_t per_direction = s.has_bias ? 4 : 2;
  for (int64_t d = 0; d < s.D; ++d) {
    for (int64_t k = 0; k < per_direction; ++k) {
      check_same_kind(weights[d * per_direction + k], "each weight", input);
    }
    const auto w = direction_weights(weights, d, s.has_bias);
    check_shape(w.w_ih, "w_ih", {s.H, s.I});
    check_shape(w.w_hh, "w_hh", {s.H, s.H});
    if (s.has_bias) {
      check_shape(w.b_ih, "b_ih", {s.H});
      check_shape(w.b_hh, "b_hh", {s.H});
    }
  }

  if (lengths.has_value()) {
    check_lengths(*lengths, batch_sizes, s.N, s.B);
  } else if (batch_sizes.has_value()) {
    check_batch_sizes(*batch_sizes, s.N, s.B);
  } else {
    TORCH_CHECK(
        s.B == 0 ? s.N == 0 : s.N % s.B == 0, "rnn_ext: dense input rows (", s.N,
        ") must be a multiple of the batch size of hx (", s.B, ")");
  }
  return s;
}

void check_backward_args(
    const LayerSizes& sizes,
    const at::Tensor& input,
    const at::Tensor& grad_output,
    const at::Tensor& grad_h_n,
    const at::Tensor& output) {
  check_same_kind(grad_output, "grad_output", input);
  check_same_kind(grad_h_n, "grad_h_n", input);
  check_same_kind(output, "output", input);
  check_shape(grad_output, "grad_output", {sizes.N, sizes.D * sizes.H});
  check_shape(output, "output", {sizes.N, sizes.D * sizes.H});
  check_shape(grad_h_n, "grad_h_n", {sizes.D, sizes.B, sizes.H});
}

std::vector<at::Tensor> flat_weights(
    const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_ih_reverse, const std::optional<at::Tensor>& w_hh_reverse,
    const std::optional<at::Tensor>& b_ih_reverse, const std::optional<at::Tensor>& b_hh_reverse) {
  const bool has_bias = b_ih.has_value();
  const bool bidirectional = w_ih_reverse.has_value();
  TORCH_CHECK(b_hh.has_value() == has_bias, "rnn_ext: b_ih and b_hh must be given together");
  TORCH_CHECK(
      w_hh_reverse.has_value() == bidirectional, "rnn_ext: w_ih_reverse and w_hh_reverse must be given together");
  TORCH_CHECK(
      b_ih_reverse.has_value() == (bidirectional && has_bias) && b_hh_reverse.has_value() == b_ih_reverse.has_value(),
      "rnn_ext: the reverse direction's biases must be given exactly when it exists and the forward one has biases");
  std::vector<at::Tensor> weights{w_ih, w_hh};
  if (has_bias) weights.insert(weights.end(), {*b_ih, *b_hh});
  if (bidirectional) {
    weights.insert(weights.end(), {*w_ih_reverse, *w_hh_reverse});
    if (has_bias) weights.insert(weights.end(), {*b_ih_reverse, *b_hh_reverse});
  }
  return weights;
}

DirectionWeights direction_weights(at::TensorList weights, int64_t d, bool has_bias) {
  const int64_t base = d * (has_bias ? 4 : 2);
  DirectionWeights w;
  w.w_ih = weights[base];
  w.w_hh = weights[base + 1];
  if (has_bias) {
    w.b_ih = weights[base + 2];
    w.b_hh = weights[base + 3];
  }
  return w;
}

at::Tensor stacked_w_ih(at::TensorList weights, const LayerSizes& sizes) {
  if (sizes.D == 1) {
    return weights[0];
  }
  return at::cat({weights[0], direction_weights(weights, 1, sizes.has_bias).w_ih}, 0);
}

at::Tensor stacked_bias(at::TensorList weights, const LayerSizes& sizes) {
  if (!sizes.has_bias) {
    return at::Tensor();
  }
  std::vector<at::Tensor> biases;
  for (int64_t d = 0; d < sizes.D; ++d) {
    const auto w = direction_weights(weights, d, true);
    biases.push_back(w.b_ih + w.b_hh);
  }
  return sizes.D == 1 ? biases[0] : at::cat(biases, 0);
}

std::tuple<at::Tensor, at::Tensor> no_step_forward(const at::Tensor& input, const at::Tensor& hx, const LayerSizes& sizes) {
  return {at::zeros({sizes.N, sizes.D * sizes.H}, input.options()), hx.clone(at::MemoryFormat::Contiguous)};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> no_step_backward(
    const at::Tensor& input, const at::Tensor& grad_h_n, at::TensorList weights, std::array<bool, 3> output_mask) {
  const auto skipped = at::empty({0}, input.options());
  std::vector<at::Tensor> grad_weights;
  if (output_mask[2]) {
    for (const auto& w : weights) grad_weights.push_back(at::zeros_like(w, at::MemoryFormat::Contiguous));
  }
  return {output_mask[0] ? at::zeros_like(input) : skipped, output_mask[1] ? grad_h_n.clone() : skipped,
          grad_weights};
}

namespace {

// grad_w_hh of direction d of a dense batch, without h_prev: the walk's first step (t = 0, or
// t = T - 1 in reverse) started from hx; every other step from the output B rows before it
// (after it, in reverse). grad_z_d, output_d [N, H]; hx_d [B, H].
at::Tensor dense_grad_w_hh(
    const at::Tensor& grad_z_d, const at::Tensor& output_d, const at::Tensor& hx_d, bool reverse,
    const LayerSizes& s) {
  const int64_t later = s.N - s.B;  // rows whose step started from an output
  auto grad_w_hh = at::mm(
      grad_z_d.narrow(0, reverse ? 0 : s.B, later).t(), output_d.narrow(0, reverse ? s.B : 0, later));
  return grad_w_hh.addmm_(grad_z_d.narrow(0, reverse ? later : 0, s.B).t(), hx_d);
}

}  // namespace

std::vector<at::Tensor> weight_grads_from(
    const at::Tensor& grad_z, const LayerSizes& sizes, const WeightProducts& products, const at::Tensor& column_sums) {
  const int64_t H = sizes.H;
  const auto grad_b = !sizes.has_bias ? at::Tensor() : column_sums.defined() ? column_sums : grad_z.sum(0);
  std::vector<at::Tensor> grads;
  for (int64_t d = 0; d < sizes.D; ++d) {
    auto [grad_w_ih, grad_w_hh] = products(d);
    grads.push_back(std::move(grad_w_ih));
    grads.push_back(std::move(grad_w_hh));
    if (sizes.has_bias) {
      // b_ih and b_hh get equal, but separate, gradients: op outputs must not alias.
      grads.push_back(grad_b.narrow(0, d * H, H).clone());
      grads.push_back(grad_b.narrow(0, d * H, H).clone());
    }
  }
  return grads;
}

std::vector<at::Tensor> weight_grads(
    const at::Tensor& grad_z, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& output,
    const at::Tensor& h_prev, const LayerSizes& sizes) {
  const int64_t H = sizes.H;
  const auto x = input.contiguous();
  return weight_grads_from(grad_z, sizes, [&](int64_t d) -> std::pair<at::Tensor, at::Tensor> {
    const auto grad_z_d = grad_z.narrow(1, d * H, H);
    return {at::mm(grad_z_d.t(), x),
            h_prev.defined() ? at::mm(grad_z_d.t(), h_prev.narrow(1, d * H, H))
                             : dense_grad_w_hh(grad_z_d, output.narrow(1, d * H, H), hx[d], d == 1, sizes)};
  });
}

}  // namespace rnn_ext
