// The CPU backend of the layer driver (csrc/layer.h; shapes in csrc/rnn.h).
//
// Forward: output = input @ [w_ih of all directions]^T + (b_ih + b_hh) through the packed step
// kernel, then per step and direction output[t] = act(output[t] + h_{t-1} @ w_hh^T) in place.
// Only output is kept for backward: the activation derivative is written in terms of it.
//
// Backward: per direction a walk against time builds grad_z (gradient of the pre-activation) in
// one [N, D*H] buffer; grad_input is then one product over all rows.
//
// bfloat16 is native where the CPU has AVX512_BF16 (the avx512_bf16 kernels): every product runs
// on bf16 operands with float sums, and each step's state is rounded to bfloat16 as it is stored
// in output, the operand the next step's product needs (nn.RNN rounds it too, and more often:
// after each GEMM, the sum and the activation). The input projection is rounded once, into output,
// before the steps add their products to it; grad_z likewise per step, and grad_hx sums in float.
// Other CPUs, and float16 everywhere, are not native: the driver computes them in float32 and
// rounds the results.
#include "../layer.h"
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


namespace rnn_ext::cpu {

namespace {

// Where row r of a step is in a buffer of the padded layout: at row r, or at row index[r] when the
// walk takes a padded batch's rows longest first (StepSchedule::order). With an index, pointers
// stay at the step's row 0; without, they move to the first row used. (Buffers in the gathered
// layout, grad_z and h_prev, hold a step's rows in walk order, StepSchedule::gathered_stride()
// rows apart.)
struct StepRows {
  const int64_t* index;
  // The pointer and index that address rows r, r + 1, ... of the buffer p (rows ld apart).
  template <typename T>
  T* from(T* p, int64_t ld, int64_t r) const { return index != nullptr ? p : p + r * ld; }
  const int64_t* index_from(int64_t r) const { return index != nullptr ? index + r : nullptr; }
};

int64_t row_at(const int64_t* index, int64_t r) { return index != nullptr ? index[r] : r; }

// Rows [0, count) of t (rows t.stride(0) apart), columns [col0, col0 + cols).
Bf16Rows rows_of(const at::Tensor& t, int64_t count, int64_t col0, int64_t cols) {
  Bf16Rows rows{std::vector<const c10::BFloat16*>(count), cols};
  const c10::BFloat16* data = t.data_ptr<c10::BFloat16>() + col0;
  for (int64_t r = 0; r < count; ++r) rows.rows[r] = data + r * t.stride(0);
  return rows;
}

// The state each row of a dense batch's direction d started from (weight_grads' h_prev, read in
// place): the output B rows earlier (later, in reverse), or hx[d] for the walk's first step.
// output [N, D*H] and hx [D, B, H] contiguous.
Bf16Rows dense_state_rows(const at::Tensor& output, const at::Tensor& hx, int64_t d, const LayerSizes& s) {
  const bool reverse = d == 1;
  const c10::BFloat16* outputs = output.data_ptr<c10::BFloat16>() + d * s.H;
  const c10::BFloat16* first = hx[d].data_ptr<c10::BFloat16>();
  Bf16Rows rows{std::vector<const c10::BFloat16*>(s.N), s.H};
  for (int64_t r = 0; r < s.N; ++r) {
    const int64_t from = reverse ? r + s.B : r - s.B;  // the output row the step started from
    rows.rows[r] = from >= 0 && from < s.N ? outputs + from * output.stride(0) : first + (reverse ? r - (s.N - s.B) : r) * s.H;
  }
  return rows;
}

// A loop the compiler vectorizes in place: rows here are short, and a memcpy call per row costs
// as much as the copy.
template <typename scalar_t>
void copy_row(scalar_t* dst, const scalar_t* src, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) dst[j] = src[j];
}

// dst row r = src row index[r] (src row r without an index).
template <typename scalar_t>
void gather_rows_into(
    scalar_t* dst, int64_t ld_dst, const scalar_t* src, int64_t ld_src, int64_t rows, int64_t cols,
    const int64_t* index) {
  for (int64_t r = 0; r < rows; ++r) {
    copy_row(dst + r * ld_dst, src + row_at(index, r) * ld_src, cols);
  }
}

// dst row index[r] = src row index[r].
template <typename scalar_t>
void copy_rows(
    scalar_t* dst, int64_t ld_dst, const scalar_t* src, int64_t ld_src, int64_t rows, int64_t cols,
    const int64_t* index) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = row_at(index, r);
    copy_row(dst + at * ld_dst, src + at * ld_src, cols);
  }
}

// dst row r = a row index[r] + b row index[r].
template <typename scalar_t>
void gather_sum_rows(
    scalar_t* dst, int64_t ld_dst, const scalar_t* a, int64_t ld_a, const scalar_t* b, int64_t ld_b, int64_t rows,
    int64_t cols, const int64_t* index) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = row_at(index, r);
    for (int64_t j = 0; j < cols; ++j) dst[r * ld_dst + j] = a[at * ld_a + j] + b[at * ld_b + j];
  }
}

Epilogue activation(bool relu) { return relu ? Epilogue::kRelu : Epilogue::kTanh; }
Epilogue activation_grad(bool relu) { return relu ? Epilogue::kReluGrad : Epilogue::kTanhGrad; }

// c = row + a @ w (w [depth, cols], row [cols] or undefined) with the step kernel, on `rows` rows
// numbered through index. For the all-rows products (input projection, grad_input) it beats
// at::mm at these tall-skinny shapes.
template <typename scalar_t>
void product_into(
    int64_t rows, const at::Tensor& a, const at::Tensor& w, const at::Tensor& row, at::Tensor& c, RowIndex index) {
  const auto a_ = a.contiguous();
  const auto row_ = row.defined() ? row.contiguous() : row;
  const PackedWeight<scalar_t> packed(w);
  product<scalar_t>(rows, a_.data_ptr<scalar_t>(), a_.size(1), packed, c.data_ptr<scalar_t>(), c.size(1),
                    row_.defined() ? row_.data_ptr<scalar_t>() : nullptr, index);
}

class CpuBackend {
 public:
  CpuBackend(const at::Tensor& /*input*/, const LayerSizes& /*sizes*/) {}

  static bool native(at::ScalarType dtype) {
    return dtype == at::kFloat || dtype == at::kDouble || (dtype == at::kBFloat16 && has_bf16_kernels());
  }
  static constexpr bool kRowOrder = true;

  template <typename F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rnn_ext_cpu", [&] { f(DType<scalar_t>{}); });
  }

  // Both directions run side by side on two threads, each single-threaded (no per-step
  // synchronisation); one direction splits its rows in two halves (walk_in_halves), or else each
  // step's tiles over the threads.
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

  // On the rows the steps own, x's and output's in the layout, in the layout's order: x's rows,
  // re-read for each column panel, then stream from memory front to back.
  template <typename scalar_t>
  void project(const StepSchedule& steps, const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& bias,
               at::Tensor& output) {
    const RowPairs rows = steps.step_rows_in_layout_order();
    product_into<scalar_t>(rows.count, x, w_ih.t(), bias, output, {rows.layout, rows.layout, nullptr});
  }

  // grad_z's gathered rows into the layout's rows of grad_input.
  template <typename scalar_t>
  void grad_input(const StepSchedule& steps, const at::Tensor& grad_z, const at::Tensor& w_ih, at::Tensor& grad_input) {
    const RowSet rows = steps.step_rows();
    product_into<scalar_t>(rows.count, grad_z, w_ih, at::Tensor(), grad_input, {nullptr, rows.index, nullptr});
  }

  void zero_rows(at::Tensor& t, const RowSet& rows) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "rnn_ext_zero_rows", [&] {
      const int64_t cols = t.size(1);
      scalar_t* data = t.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows.count; ++r) {
        scalar_t* row = data + rows.at(r) * cols;
        for (int64_t j = 0; j < cols; ++j) row[j] = scalar_t(0);
      }
    });
  }

  // Copies the rows in the layout's order, so that t is read front to back.
  at::Tensor gather_rows(const at::Tensor& t, const StepSchedule& steps) {
    const RowPairs rows = steps.step_rows_in_layout_order();
    auto gathered = at::empty({rows.count, t.size(1)}, t.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "rnn_ext_gather_rows", [&] {
      const int64_t cols = t.size(1);
      scalar_t* dst = gathered.data_ptr<scalar_t>();
      const scalar_t* src = t.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows.count; ++r) {
        copy_row(dst + row_at(rows.gathered, r) * cols, src + row_at(rows.layout, r) * cols, cols);
      }
    });
    return gathered;
  }

  // bfloat16 on the bf16 kernels: each product's depth is every step's row, which they sum in
  // float; other dtypes through ATen.
  std::vector<at::Tensor> weight_grads(
      const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& hx, const at::Tensor& output,
      const at::Tensor& h_prev, const LayerSizes& s) {
    if (grad_z.scalar_type() != at::kBFloat16) return rnn_ext::weight_grads(grad_z, x, hx, output, h_prev, s);
    const auto x_ = x.contiguous();
    const Bf16Rows input_rows = rows_of(x_, x_.size(0), 0, s.I);
    return weight_grads_from(grad_z, s, [&](int64_t d) -> std::pair<at::Tensor, at::Tensor> {
      const Bf16Rows states = h_prev.defined() ? rows_of(h_prev, h_prev.size(0), d * s.H, s.H) : dense_state_rows(output, hx, d, s);
      auto grads = bf16_transposed_products(rows_of(grad_z, grad_z.size(0), d * s.H, s.H), {input_rows, states});
      return {std::move(grads[0]), std::move(grads[1])};
    });
  }

  // output[t] = act(output[t] + h_prev @ w_hh^T), h_prev the walk's previous state or hx.
  template <typename scalar_t>
  void forward_walk(const StepSchedule& steps, const ForwardWalk<scalar_t>& dir, bool single_thread) {
    if (walk_in_halves(steps, dir.H, single_thread)) {
      in_halves(steps, [&](const StepSchedule& half) { forward_walk(half, dir, /*single_thread=*/true); });
      return;
    }
    const Epilogue act = activation(dir.relu);
    const int64_t H = dir.H;
    const int64_t ld = dir.ld;
    const PackedWeight<scalar_t> packed(dir.w_hh.t());
    const StepRows order{steps.order()};
    steps.walk(dir.reverse, Pass::kForward, [&](const Step& now) {
      scalar_t* h = dir.output + now.offset * ld;
      const int64_t carried = now.carried;
      if (carried > 0) {
        step(carried, dir.output + steps.offset(now.previous) * ld, ld, packed, h, ld, act, nullptr, 0, single_thread,
             {order.index, order.index, nullptr});
      }
      if (carried < now.rows) {
        const int64_t* index = order.index_from(carried);
        step(now.rows - carried, order.from(dir.hx, H, carried), H, packed, order.from(h, ld, carried), ld, act, nullptr,
             0, single_thread, {index, index, nullptr});
      }
      const int64_t ending = now.continuing;  // the first row ending here
      copy_rows(order.from(dir.h_n, H, ending), H, order.from(h, ld, ending), ld, now.rows - ending, H,
                order.index_from(ending));
    });
  }

  // grad_z[t] = (grad_output[t] + grad_z[next] @ w_hh, or + grad_h_n where a sequence ends) * act'.
  template <typename scalar_t>
  void backward_walk(const StepSchedule& steps, const BackwardWalk<scalar_t>& dir, bool single_thread) {
    if (walk_in_halves(steps, dir.H, single_thread)) {
      in_halves(steps, [&](const StepSchedule& half) { backward_walk(half, dir, /*single_thread=*/true); });
      return;
    }
    const Epilogue act_grad = activation_grad(dir.relu);
    const int64_t H = dir.H;
    const int64_t ld = dir.ld;
    const PackedWeight<scalar_t> packed(dir.w_hh);
    const StepRows order{steps.order()};
    const int64_t ldg = ld * steps.gathered_stride();  // rows apart in the gathered layout: grad_z, h_prev
    steps.walk(dir.reverse, Pass::kBackward, [&](const Step& now) {
      const int64_t at_rows = now.offset * ld;  // padded layout: grad_output, output
      scalar_t* g = dir.grad_z + steps.gathered_offset(now.t) * ld;  // gathered layout
      const scalar_t* y = dir.output + at_rows;
      const scalar_t* grad_out = dir.grad_output + at_rows;
      const int64_t going_on = now.continuing;  // rows [0, going_on) continue; the rest end here
      const int64_t ending = now.rows - going_on;
      gather_sum_rows(g + going_on * ldg, ldg, order.from(grad_out, ld, going_on), ld,
                      order.from(dir.grad_h_n, H, going_on), H, ending, H, order.index_from(going_on));
      if (going_on > 0) {  // starting from grad_output's rows, read where they are
        step(going_on, dir.grad_z + steps.gathered_offset(now.next) * ld, ldg, packed, g, ldg, act_grad, y, ld,
             single_thread, {nullptr, nullptr, order.index}, grad_out, ld);
      }
      if (ending > 0) {  // no gradient flows back into these rows: the epilogue only
        step<scalar_t>(ending, nullptr, 0, packed, g + going_on * ldg, ldg, act_grad, order.from(y, ld, going_on), ld,
                       single_thread, {nullptr, nullptr, order.index_from(going_on)});
      }
      // Rows that started from hx send their gradient there.
      const int64_t carried = now.carried;
      if (dir.grad_hx != nullptr && carried < now.rows) {
        step(now.rows - carried, g + carried * ldg, ldg, packed, order.from(dir.grad_hx, H, carried), H,
             Epilogue::kNone, nullptr, 0, single_thread, {nullptr, order.index_from(carried), nullptr});
      }
      if (dir.h_prev != nullptr) {  // gathered layout, as grad_z
        scalar_t* dst = dir.h_prev + steps.gathered_offset(now.t) * ld;
        if (carried > 0) {
          gather_rows_into(dst, ldg, dir.output + steps.offset(now.previous) * ld, ld, carried, H, order.index);
        }
        gather_rows_into(dst + carried * ldg, ldg, order.from(dir.hx, H, carried), H, now.rows - carried, H,
                         order.index_from(carried));
      }
    });
  }

 private:
  // A direction walked by one thread splits its rows in two halves, walked side by side
  // (sequences are independent): no synchronisation per step, where splitting each step's tiles
  // pays for one at every step, and cannot split small steps at all. It takes halves of
  // kMinHalfRows rows or more, and a walk whose products (rows x H x H multiply-adds over all
  // steps) pay for waking the second thread; smaller walks are faster on one thread.
  static constexpr int64_t kMinHalfRows = 4;
  static constexpr int64_t kMinHalvesMacs = int64_t{1} << 19;
  static bool walk_in_halves(const StepSchedule& steps, int64_t H, bool single_thread) {
    return !single_thread && at::get_num_threads() > 1 && steps.started() >= 2 * kMinHalfRows &&
        steps.gathered_rows() * H * H >= kMinHalvesMacs;
  }

  template <typename F>
  static void in_halves(const StepSchedule& steps, F&& walk) {
    const StepSchedule halves[2] = {steps.half(0), steps.half(1)};
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t which = begin; which < end; ++which) walk(halves[which]);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("rnn_layer", &rnn_layer_entry<&layer_forward<CpuBackend>>);
  m.impl("rnn_layer_backward", &layer_backward<CpuBackend>);
}

}  // namespace rnn_ext::cpu
