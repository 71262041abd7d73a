// The CPU backend of the layer driver (csrc/layer.h; shapes in csrc/rnn.h).
//
// Forward: output = input @ [w_ih of all directions]^T + (b_ih + b_hh) through the packed step
// kernel, then per step and direction output[t] = act(output[t] + h_{t-1} @ w_hh^T) in place.
// Only output is kept for backward: the activation derivative is written in terms of it.
//
// Backward: per direction a walk against time builds grad_z (gradient of the pre-activation) in
// one [N, D*H] buffer; grad_input is then one product over all rows.
//
// The walks run on all of torch's threads: every direction's at once, each split into row groups
// and column slices as walk_threads.h describes; the products over all rows split their tiles.
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
#include "walk_threads.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>


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
template <typename scalar_t>
MatrixRows<scalar_t> rows_of(const at::Tensor& t, int64_t count, int64_t col0, int64_t cols) {
  MatrixRows<scalar_t> rows{std::vector<const scalar_t*>(count), cols};
  const scalar_t* data = t.data_ptr<scalar_t>() + col0;
  for (int64_t r = 0; r < count; ++r) rows.rows[r] = data + r * t.stride(0);
  return rows;
}

// The state each row of a dense batch's direction d started from (weight_grads' h_prev, read in
// place): the output B rows earlier (later, in reverse), or hx[d] for the walk's first step.
// output [N, D*H] and hx [D, B, H] contiguous.
template <typename scalar_t>
MatrixRows<scalar_t> dense_state_rows(const at::Tensor& output, const at::Tensor& hx, int64_t d, const LayerSizes& s) {
  const bool reverse = d == 1;
  const scalar_t* outputs = output.data_ptr<scalar_t>() + d * s.H;
  const scalar_t* first = hx[d].data_ptr<scalar_t>();
  MatrixRows<scalar_t> rows{std::vector<const scalar_t*>(s.N), s.H};
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

// A product of the weight gradients: out = sum over i of a_i^T b_i, a_i [rows_i, out rows] and b_i
// [rows_i, out cols] (views); the rows of all terms, in order, are the product's depth.
struct TransposedProduct {
  at::Tensor out;
  std::vector<std::pair<at::Tensor, at::Tensor>> terms;

  int64_t depth() const {
    int64_t rows = 0;
    for (const auto& term : terms) rows += term.first.size(0);
    return rows;
  }
};

// The weight gradients' tasks are fixed by the shapes alone, so that every thread count gives the
// same bits (one GEMM on several threads may split the depth by thread):
// - blocks of each result, kBlockRows x kBlockCols: large enough that a GEMM's packing of its
//   operands, once per block, stays a few percent of it;
// - where a layer's results (both of each direction's) give fewer than kWeightTasks blocks
//   (I = H = 256: 4 a direction, H = 128: 2), the depth (every step's row: thousands) too, in equal
//   chunks of at least kMinChunkDepth rows, so that 16 to 32 threads have work. A chunk past the
//   first writes a partial product, added into the result afterwards in chunk order.
// Each task is ATen's GEMM on one thread (inside a parallel region of two or more threads, BLAS runs
// on its calling thread).
constexpr int64_t kBlockRows = 128;
constexpr int64_t kBlockCols = 256;
constexpr int64_t kWeightTasks = 32;
constexpr int64_t kMinChunkDepth = 256;

int64_t block_count(const TransposedProduct& product) {
  return at::divup(product.out.size(0), kBlockRows) * at::divup(product.out.size(1), kBlockCols);
}

// Rows per depth chunk of a product of this depth, when the products have `blocks` blocks in all.
int64_t chunk_depth(int64_t depth, int64_t blocks) {
  const int64_t most_chunks = std::max<int64_t>(1, depth / kMinChunkDepth);
  const int64_t chunks = std::clamp<int64_t>(at::divup(kWeightTasks, std::max<int64_t>(1, blocks)), 1, most_chunks);
  return std::max<int64_t>(1, at::divup(depth, chunks));
}

// dst [rows, cols] = the sum over depth rows [k0, k1) of product's terms, block (r, c) of its result.
void block_product(const TransposedProduct& product, int64_t r, int64_t c, int64_t k0, int64_t k1, at::Tensor dst) {
  bool first = true;
  int64_t term0 = 0;  // the term's first row, in the product's depth
  for (const auto& [a, b] : product.terms) {
    const int64_t begin = std::max(k0, term0), end = std::min(k1, term0 + a.size(0));
    if (begin < end) {
      const auto a_block = a.narrow(0, begin - term0, end - begin).narrow(1, r, dst.size(0)).t();
      const auto b_block = b.narrow(0, begin - term0, end - begin).narrow(1, c, dst.size(1));
      if (first) {
        at::mm_out(dst, a_block, b_block);
      } else {
        dst.addmm_(a_block, b_block);
      }
      first = false;
    }
    term0 += a.size(0);
  }
  if (first) dst.zero_();  // no rows at all
}

// out (contiguous) += partials[0] + partials[1] + ... ([chunks, out's shape], contiguous), each element
// summed in that order, a range of elements at a time: one pass over each.
void add_in_chunk_order(at::Tensor& out, const at::Tensor& partials) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rnn_ext_add_in_chunk_order", [&] {
    scalar_t* sum = out.data_ptr<scalar_t>();
    const scalar_t* partial = partials.data_ptr<scalar_t>();
    const int64_t size = out.numel();
    at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < partials.size(0); ++k) {
        for (int64_t i = begin; i < end; ++i) sum[i] += partial[k * size + i];
      }
    });
  });
}

void blocked_products(std::vector<TransposedProduct>& products) {
  int64_t blocks = 0;
  for (const auto& product : products) blocks += block_count(product);
  struct Task {
    int64_t product, row, col, chunk;
    int64_t first_row, end_row;  // the chunk's rows of the product's depth
  };
  std::vector<Task> tasks;
  std::vector<at::Tensor> partials;  // per product: [chunks - 1, out rows, out cols], or undefined
  for (int64_t p = 0; p < static_cast<int64_t>(products.size()); ++p) {
    const auto& out = products[p].out;
    const int64_t depth = products[p].depth();
    const int64_t rows_per_chunk = chunk_depth(depth, blocks);
    const int64_t chunks = std::max<int64_t>(1, at::divup(depth, rows_per_chunk));
    partials.push_back(chunks > 1 ? at::empty({chunks - 1, out.size(0), out.size(1)}, out.options()) : at::Tensor());
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t first_row = k * rows_per_chunk, end_row = std::min(first_row + rows_per_chunk, depth);
      for (int64_t r = 0; r < out.size(0); r += kBlockRows) {
        for (int64_t c = 0; c < out.size(1); c += kBlockCols) tasks.push_back({p, r, c, k, first_row, end_row});
      }
    }
  }
  // Tasks differ in size (W_ih's blocks against W_hh's), so the threads claim them one at a time.
  const int64_t task_count = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(task_count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // on each thread: the operands may require grad
    for (int64_t i = next_task++; i < task_count; i = next_task++) {
      const Task& task = tasks[i];
      const TransposedProduct& product = products[task.product];
      const at::Tensor& whole = task.chunk == 0 ? product.out : partials[task.product][task.chunk - 1];
      const auto dst = whole.narrow(0, task.row, std::min(kBlockRows, whole.size(0) - task.row))
                           .narrow(1, task.col, std::min(kBlockCols, whole.size(1) - task.col));
      block_product(product, task.row, task.col, task.first_row, task.end_row, dst);
    }
  });
  for (size_t p = 0; p < products.size(); ++p) {
    if (partials[p].defined()) add_in_chunk_order(products[p].out, partials[p]);
  }
}

// Direction d's weight-gradient products, grad_w_ih and grad_w_hh, from its grad_z_d [rows, H]:
// grad_z_d^T x and grad_z_d^T h_prev, h_prev gathered (packed and padded batches) or, for a dense
// batch, read in place: the output B rows earlier (later, in reverse), and hx[d] for the walk's
// first step.
std::array<TransposedProduct, 2> weight_products(
    const at::Tensor& grad_z_d, const at::Tensor& x, const at::Tensor& h_prev, const at::Tensor& output,
    const at::Tensor& hx, int64_t d, const LayerSizes& s) {
  const auto options = grad_z_d.options();
  std::array<TransposedProduct, 2> products{TransposedProduct{at::empty({s.H, s.I}, options), {{grad_z_d, x}}},
                                            TransposedProduct{at::empty({s.H, s.H}, options), {}}};
  if (h_prev.defined()) {
    products[1].terms.push_back({grad_z_d, h_prev.narrow(1, d * s.H, s.H)});
  } else {
    const bool reverse = d == 1;
    const int64_t later = s.N - s.B;  // rows whose step started from the output of another
    const auto output_d = output.narrow(1, d * s.H, s.H);
    products[1].terms.push_back({grad_z_d.narrow(0, reverse ? 0 : s.B, later), output_d.narrow(0, reverse ? s.B : 0, later)});
    products[1].terms.push_back({grad_z_d.narrow(0, reverse ? later : 0, s.B), hx[d]});
  }
  return products;
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

  // The same bits at every thread count: bfloat16 on the bf16 kernels, whose sums run over the rows
  // in order; float and double in tasks fixed by the shapes, every direction's at once
  // (blocked_products); the bias gradients by column_sums.
  std::vector<at::Tensor> weight_grads(
      const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& hx, const at::Tensor& output,
      const at::Tensor& h_prev, const LayerSizes& s) {
    const auto grad_b = s.has_bias ? column_sums(grad_z) : at::Tensor();
    if (grad_z.scalar_type() != at::kBFloat16) {
      const auto x_ = x.contiguous();
      std::vector<TransposedProduct> products;  // per direction: grad_w_ih, grad_w_hh
      for (int64_t d = 0; d < s.D; ++d) {
        for (auto& product : weight_products(grad_z.narrow(1, d * s.H, s.H), x_, h_prev, output, hx, d, s)) {
          products.push_back(std::move(product));
        }
      }
      blocked_products(products);
      return weight_grads_from(grad_z, s, [&](int64_t d) {
        return std::pair{products[2 * d].out, products[2 * d + 1].out};
      }, grad_b);
    }
    const auto x_ = x.contiguous();
    const auto input_rows = rows_of<c10::BFloat16>(x_, x_.size(0), 0, s.I);
    return weight_grads_from(grad_z, s, [&](int64_t d) -> std::pair<at::Tensor, at::Tensor> {
      const auto states = h_prev.defined() ? rows_of<c10::BFloat16>(h_prev, h_prev.size(0), d * s.H, s.H)
                                           : dense_state_rows<c10::BFloat16>(output, hx, d, s);
      auto products = bf16_transposed_products(rows_of<c10::BFloat16>(grad_z, grad_z.size(0), d * s.H, s.H),
                                               {input_rows, states});
      return {std::move(products[0]), std::move(products[1])};
    }, grad_b);
  }

  // Every direction's walk at once, on all threads: output[t] = act(output[t] + h_prev @ w_hh^T),
  // h_prev the walk's previous state or hx.
  template <typename scalar_t>
  void forward_walks(const StepSchedule& steps, const std::vector<ForwardWalk<scalar_t>>& dirs) {
    std::vector<PackedWeight<scalar_t>> w_hh_t;  // [H, H] packed: w_hh^T of each direction
    for (const auto& dir : dirs) w_hh_t.emplace_back(dir.w_hh.t());
    walk_plan<scalar_t>(steps, dirs).run(0, [&](const GroupWalk& group, int64_t i, Columns cols) {
      forward_step(*group.steps, dirs[group.direction], w_hh_t[group.direction], i, cols);
    });
  }

  // Every direction's gradient walk at once, on all threads: grad_z[t] = (grad_output[t] +
  // grad_z[next] @ w_hh, or + grad_h_n where a sequence ends) * act'; then grad_hx in a last phase.
  template <typename scalar_t>
  void backward_walks(const StepSchedule& steps, const std::vector<BackwardWalk<scalar_t>>& dirs) {
    std::vector<PackedWeight<scalar_t>> w_hh;  // [H, H] packed, of each direction
    for (const auto& dir : dirs) w_hh.emplace_back(dir.w_hh);
    walk_plan<scalar_t>(steps, dirs).run(1, [&](const GroupWalk& group, int64_t i, Columns cols) {
      const StepSchedule& rows = *group.steps;
      if (i < rows.steps()) {
        backward_step(rows, dirs[group.direction], w_hh[group.direction], i, cols);
      } else {
        grad_hx_columns(rows, dirs[group.direction], w_hh[group.direction], cols);
      }
    });
  }

 private:
  template <typename scalar_t, typename Walk>
  static WalkPlan walk_plan(const StepSchedule& steps, const std::vector<Walk>& dirs) {
    const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
    return WalkPlan(steps, static_cast<int64_t>(dirs.size()), dirs.front().H, sizeof(scalar_t), packed_panel_width(dtype));
  }

  // Walk step i of one direction, on its columns cols (w_hh_t packed: the state's columns).
  template <typename scalar_t>
  static void forward_step(const StepSchedule& steps, const ForwardWalk<scalar_t>& dir,
                           const PackedWeight<scalar_t>& w_hh_t, int64_t i, Columns cols) {
    const Step now = steps.walk_step(i, dir.reverse, Pass::kForward);
    const auto w = w_hh_t.columns(cols.begin, cols.end);
    const Epilogue act = activation(dir.relu);
    const int64_t H = dir.H;
    const int64_t ld = dir.ld;
    const StepRows order{steps.order()};
    scalar_t* h = dir.output + now.offset * ld + cols.begin;
    const int64_t carried = now.carried;
    if (carried > 0) {  // A: the whole previous state, every column
      step(carried, dir.output + steps.offset(now.previous) * ld, ld, w, h, ld, act, nullptr, 0,
           {order.index, order.index, nullptr});
    }
    if (carried < now.rows) {
      const int64_t* index = order.index_from(carried);
      step(now.rows - carried, order.from(dir.hx, H, carried), H, w, order.from(h, ld, carried), ld, act, nullptr, 0,
           {index, index, nullptr});
    }
    const int64_t ending = now.continuing;  // the first row ending here
    copy_rows(order.from(dir.h_n + cols.begin, H, ending), H, order.from(h, ld, ending), ld, now.rows - ending,
              cols.count(), order.index_from(ending));
  }

  // Walk step i of one direction's gradient, on its columns cols.
  template <typename scalar_t>
  static void backward_step(const StepSchedule& steps, const BackwardWalk<scalar_t>& dir,
                            const PackedWeight<scalar_t>& w_hh, int64_t i, Columns cols) {
    const Step now = steps.walk_step(i, dir.reverse, Pass::kBackward);
    const auto w = w_hh.columns(cols.begin, cols.end);
    const Epilogue act_grad = activation_grad(dir.relu);
    const int64_t H = dir.H;
    const int64_t ld = dir.ld;
    const int64_t c0 = cols.begin;
    const StepRows order{steps.order()};
    const int64_t ldg = ld * steps.gathered_stride();  // rows apart in the gathered layout: grad_z, h_prev
    const int64_t at_rows = now.offset * ld + c0;     // padded layout: grad_output, output
    scalar_t* g = dir.grad_z + steps.gathered_offset(now.t) * ld + c0;  // gathered layout
    const scalar_t* y = dir.output + at_rows;
    const scalar_t* grad_out = dir.grad_output + at_rows;
    const int64_t going_on = now.continuing;  // rows [0, going_on) continue; the rest end here
    const int64_t ending = now.rows - going_on;
    gather_sum_rows(g + going_on * ldg, ldg, order.from(grad_out, ld, going_on), ld,
                    order.from(dir.grad_h_n + c0, H, going_on), H, ending, cols.count(), order.index_from(going_on));
    if (going_on > 0) {  // A: the next step's whole grad_z; starting from grad_output's rows, read where they are
      step(going_on, dir.grad_z + steps.gathered_offset(now.next) * ld, ldg, w, g, ldg, act_grad, y, ld,
           {nullptr, nullptr, order.index}, grad_out, ld);
    }
    if (ending > 0) {  // no gradient flows back into these rows: the epilogue only
      step<scalar_t>(ending, nullptr, 0, w, g + going_on * ldg, ldg, act_grad, order.from(y, ld, going_on), ld,
                     {nullptr, nullptr, order.index_from(going_on)});
    }
    if (dir.h_prev != nullptr) {  // gathered layout, as grad_z
      scalar_t* dst = dir.h_prev + steps.gathered_offset(now.t) * ld + c0;
      const int64_t carried = now.carried;
      if (carried > 0) {
        gather_rows_into(dst, ldg, dir.output + steps.offset(now.previous) * ld + c0, ld, carried, cols.count(),
                         order.index);
      }
      gather_rows_into(dst + carried * ldg, ldg, order.from(dir.hx + c0, H, carried), H, now.rows - carried,
                       cols.count(), order.index_from(carried));
    }
  }

  // The gradient walk's last phase: rows that started from hx send their gradient there, grad_z of
  // their first step @ w_hh, which needs every column of that grad_z (so not before the walk is done).
  template <typename scalar_t>
  static void grad_hx_columns(const StepSchedule& steps, const BackwardWalk<scalar_t>& dir,
                              const PackedWeight<scalar_t>& w_hh, Columns cols) {
    if (dir.grad_hx == nullptr) return;
    const auto w = w_hh.columns(cols.begin, cols.end);
    const StepRows order{steps.order()};
    const int64_t ldg = dir.ld * steps.gathered_stride();
    steps.walk(dir.reverse, Pass::kBackward, [&](const Step& now) {
      const int64_t carried = now.carried;
      if (carried < now.rows) {
        const scalar_t* g = dir.grad_z + steps.gathered_offset(now.t) * dir.ld;
        step(now.rows - carried, g + carried * ldg, ldg, w, order.from(dir.grad_hx + cols.begin, dir.H, carried), dir.H,
             Epilogue::kNone, nullptr, 0, {nullptr, order.index_from(carried), nullptr});
      }
    });
  }
};

// cpu_walk_split: the split of each direction's walk (walk_threads.h), flattened as [row_groups,
// col_slices] per direction, for a walk of `rows` rows in its first step and walk_rows in all, of
// this dtype (as it runs: float16, and bfloat16 without the bf16 kernels, run as float).
std::vector<int64_t> walk_split(
    int64_t rows, int64_t walk_rows, int64_t hidden, at::ScalarType dtype, int64_t directions, int64_t threads) {
  TORCH_CHECK(rows >= 0 && walk_rows >= rows && hidden > 0 && (directions == 1 || directions == 2) && threads > 0,
              "rnn_ext: cpu_walk_split needs 0 <= rows <= walk_rows, hidden > 0, 1 or 2 directions and threads > 0");
  const at::ScalarType runs_as = CpuBackend::native(dtype) ? dtype : at::kFloat;
  const WalkShape shape{rows, walk_rows, hidden, static_cast<int64_t>(c10::elementSize(runs_as)),
                        packed_panel_width(runs_as)};
  std::vector<int64_t> flat;
  for (const WalkSplit& split : choose_walk_splits(shape, directions, threads)) {
    flat.push_back(split.row_groups);
    flat.push_back(split.col_slices);
  }
  return flat;
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_ext, CPU, m) {
  m.impl("rnn_layer", &rnn_layer_entry<&layer_forward<CpuBackend>>);
  m.impl("rnn_layer_backward", &layer_backward<CpuBackend>);
}

// The CPU backend's facts (schemas in csrc/ops.cpp). They take no tensor to dispatch on, so they
// are registered for every dispatch key.
TORCH_LIBRARY_IMPL(rnn_ext, CompositeImplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa);
  m.impl("cpu_walk_split", &walk_split);
  m.impl("cpu_force_walk_split", &set_walk_split_override);
}

}  // namespace rnn_ext::cpu
