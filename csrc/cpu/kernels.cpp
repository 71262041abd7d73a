#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace rnn_ext::cpu {

namespace {

// Steps with at least this many multiply-adds split their tiles over threads; below it the
// cost of waking the threads exceeds the gain.
constexpr int64_t kParallelMinMacs = int64_t{1} << 17;
// Weights of more than this many elements pack their column panels on several threads.
constexpr int64_t kParallelPackElements = int64_t{1} << 18;

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if RNN_EXT_HAS_BF16_KERNELS  // built with the kernels, and a compiler that can ask the CPU
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The best instruction set this CPU has, or the one RNN_EXT_CPU_ISA names (avx512_bf16, avx512,
// avx2, baseline): a lower one runs the code an older CPU would, e.g. to test it.
std::string pick_isa() {
  const bool avx512_bf16 = cpu_has_avx512_bf16();
  const bool avx512 = cpu_has_avx512();
  const bool avx2 = cpu_has_avx2();
  const char* requested = std::getenv("RNN_EXT_CPU_ISA");
  if (requested == nullptr || *requested == '\0') {
    return avx512_bf16 ? "avx512_bf16" : avx512 ? "avx512" : avx2 ? "avx2" : "baseline";
  }
  const std::string isa(requested);
  TORCH_CHECK(
      isa == "avx512_bf16" || isa == "avx512" || isa == "avx2" || isa == "baseline",
      "rnn_ext: RNN_EXT_CPU_ISA must be avx512_bf16, avx512, avx2 or baseline, got '", isa, "'");
  TORCH_CHECK(
      (isa != "avx512_bf16" || avx512_bf16) && (isa != "avx512" || avx512) && (isa != "avx2" || avx2),
      "rnn_ext: RNN_EXT_CPU_ISA=", isa, " but this CPU does not support it");
  return isa;
}

const std::string& active_isa() {
  static const std::string isa = pick_isa();
  return isa;
}

template <typename scalar_t>
IsaKernels<scalar_t> pick(
    IsaKernels<scalar_t> (*avx512_bf16)(), IsaKernels<scalar_t> (*avx512)(), IsaKernels<scalar_t> (*avx2)(),
    IsaKernels<scalar_t> (*baseline)()) {
  const std::string& isa = active_isa();
  if (isa == "avx512_bf16") return avx512_bf16();
  if (isa == "avx512") return avx512();
  if (isa == "avx2") return avx2();
  return baseline();
}

template <typename scalar_t>
const IsaKernels<scalar_t>& kernels();

template <>
const IsaKernels<float>& kernels<float>() {
  static const IsaKernels<float> k =
      pick(&avx512_bf16_kernels_f32, &avx512_kernels_f32, &avx2_kernels_f32, &baseline_kernels_f32);
  return k;
}

template <>
const IsaKernels<double>& kernels<double>() {
  static const IsaKernels<double> k =
      pick(&avx512_bf16_kernels_f64, &avx512_kernels_f64, &avx2_kernels_f64, &baseline_kernels_f64);
  return k;
}

IsaKernels<bf16_t> bf16_kernel_set() {
#if RNN_EXT_HAS_BF16_KERNELS
  return avx512_bf16_kernels_bf16();
#else
  return {};
#endif
}

template <>
const IsaKernels<bf16_t>& kernels<bf16_t>() {
  TORCH_CHECK(has_bf16_kernels(), "rnn_ext: no bfloat16 kernels with the ", active_isa(), " CPU kernels");
  static const IsaKernels<bf16_t> k = bf16_kernel_set();
  return k;
}

// The kernels' element type: c10::BFloat16 as its bits; float and double as they are.
template <typename T>
struct KernelElement {
  using type = T;
};
template <>
struct KernelElement<c10::BFloat16> {
  using type = bf16_t;
};
template <typename T>
using kernel_t = typename KernelElement<T>::type;

template <typename T>
T* bits(T* p) {
  return p;
}
const bf16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const bf16_t*>(p); }
bf16_t* bits(c10::BFloat16* p) { return reinterpret_cast<bf16_t*>(p); }

template <typename scalar_t>
void run_range(const IsaKernels<scalar_t>& k, const StepJob<scalar_t>& job, int64_t begin, int64_t end) {
  k.run_tiles(job, begin, end);
}
void run_range(const IsaKernels<bf16_t>& k, const StepJob<bf16_t, float>& job, int64_t begin, int64_t end) {
  k.run_tiles_float_c(job, begin, end);
}

template <typename scalar_t, typename c_t>
void run(const StepJob<scalar_t, c_t>& job, bool single_thread) {
  if (job.rows <= 0 || job.cols <= 0) return;
  const IsaKernels<scalar_t>& k = kernels<scalar_t>();
  const int64_t tiles = k.num_tiles(job.rows, job.cols);
  if (single_thread || tiles < 2 || job.A == nullptr || job.rows * job.cols * job.depth < kParallelMinMacs) {
    run_range(k, job, 0, tiles);
    return;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) { run_range(k, job, begin, end); });
}

}  // namespace

std::string cpu_isa() {
  return active_isa();
}

bool has_bf16_kernels() {
  static const bool has = active_isa() == "avx512_bf16";  // picked only where built (cpu_has_avx512_bf16)
  return has;
}

template <typename scalar_t>
PackedWeight<scalar_t>::PackedWeight(const at::Tensor& W) : depth_(W.size(0)), cols_(W.size(1)) {
  const auto w = W.stride(0) == 1 || W.stride(1) == 1 ? W : W.contiguous();
  const auto& k = kernels<kernel_t<scalar_t>>();
  buffer_ = at::empty({k.packed_size(depth_, cols_)}, w.options());
  // Panels are independent: a range of them packs as the columns they hold would on their own.
  const int64_t width = k.panel_width;
  const int64_t panel_count = (cols_ + width - 1) / width;
  const int64_t grain = std::max<int64_t>(1, kParallelPackElements / (std::max<int64_t>(depth_, 1) * width));
  at::parallel_for(0, panel_count, grain, [&](int64_t begin, int64_t end) {
    const int64_t col0 = begin * width;
    k.pack(depth_, std::min(end * width, cols_) - col0, bits(w.data_ptr<scalar_t>()) + col0 * w.stride(1),
           w.stride(0), w.stride(1), bits(buffer_.data_ptr<scalar_t>()) + k.packed_size(depth_, col0));
  });
}

template <typename scalar_t>
PackedColumns<scalar_t> PackedWeight<scalar_t>::columns(int64_t col0, int64_t col_end) const {
  const auto& k = kernels<kernel_t<scalar_t>>();
  TORCH_INTERNAL_ASSERT(col0 % k.panel_width == 0 && col0 <= col_end && col_end <= cols_);
  return {data() + k.packed_size(depth_, col0), depth_, col_end - col0};
}

int64_t packed_panel_width(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return kernels<double>().panel_width;
    case at::kBFloat16: return has_bf16_kernels() ? kernels<bf16_t>().panel_width : kernels<float>().panel_width;
    default: return kernels<float>().panel_width;  // float, and what runs as float (float16)
  }
}

template <typename scalar_t, typename c_t>
void step(
    int64_t rows, const std::type_identity_t<scalar_t>* A, int64_t lda, const PackedColumns<scalar_t>& W, c_t* C,
    int64_t ldc, Epilogue epilogue, const std::type_identity_t<scalar_t>* y, int64_t ldy, RowIndex index,
    const std::type_identity_t<c_t>* start, int64_t ld_start) {
  run(StepJob<kernel_t<scalar_t>, kernel_t<c_t>>{rows, W.cols, W.depth, bits(A), lda, bits(W.data), bits(C), ldc,
                                                  epilogue, bits(y), ldy, /*accumulate=*/true, nullptr, index,
                                                  /*a_pair_stride=*/2, bits(start), ld_start},
      /*single_thread=*/true);
}

template <typename scalar_t>
void product(
    int64_t rows, const std::type_identity_t<scalar_t>* A, int64_t lda, const PackedWeight<scalar_t>& W, scalar_t* C,
    int64_t ldc, const std::type_identity_t<scalar_t>* row, RowIndex index) {
  run(StepJob<kernel_t<scalar_t>>{rows, W.cols(), W.depth(), bits(A), lda, bits(W.data()), bits(C), ldc, Epilogue::kNone,
                                  nullptr, 0, /*accumulate=*/false, bits(row), index},
      /*single_thread=*/false);
}

namespace {

// IsaKernels<bf16_t>::pack_pairs of every pair of the rows, threaded.
void pack_pairs(int64_t rows, int64_t cols, const bf16_t* const* row, bf16_t* dst, int64_t pair_stride,
                int64_t group_stride) {
  const IsaKernels<bf16_t>& k = kernels<bf16_t>();
  at::parallel_for(0, (rows + 1) / 2, 64, [&](int64_t begin, int64_t end) {
    k.pack_pairs(rows, cols, row, dst, pair_stride, group_stride, begin, end);
  });
}

const bf16_t* const* row_bits(const MatrixRows<c10::BFloat16>& m, int64_t r0) {
  return reinterpret_cast<const bf16_t* const*>(m.rows.data() + r0);
}

}  // namespace

std::vector<at::Tensor> bf16_transposed_products(
    const MatrixRows<c10::BFloat16>& g, const std::vector<MatrixRows<c10::BFloat16>>& ms) {
  const int64_t rows = static_cast<int64_t>(g.rows.size());
  constexpr int64_t chunk_pairs = kTransposedChunkRows / 2;
  const auto groups = [](int64_t cols) { return (cols + 31) / 32; };
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  // A chunk of g, as the transpose's rows: A row r (g's column r) at 2 * a_rows[r] elements on.
  auto packed_g = at::empty({chunk_pairs * 64 * groups(g.cols)}, bf16);
  std::vector<int64_t> a_rows(g.cols);
  for (int64_t r = 0; r < g.cols; ++r) a_rows[r] = r / 32 * chunk_pairs * 32 + r % 32;
  int64_t widest = 0;
  std::vector<at::Tensor> sums;
  for (const auto& m : ms) {
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(m.rows.size()) == rows);
    widest = std::max(widest, m.cols);
    sums.push_back(at::empty({g.cols, m.cols}, at::TensorOptions().dtype(at::kFloat)));
  }
  auto packed_m = at::empty({chunk_pairs * 64 * groups(widest)}, bf16);  // a chunk of one m, as W
  const auto a = bits(packed_g.data_ptr<c10::BFloat16>());
  const auto w = bits(packed_m.data_ptr<c10::BFloat16>());
  for (int64_t r0 = 0; r0 < rows; r0 += kTransposedChunkRows) {
    const int64_t depth = std::min(kTransposedChunkRows, rows - r0);
    pack_pairs(depth, g.cols, row_bits(g, r0), a, /*pair_stride=*/64, /*group_stride=*/chunk_pairs * 64);
    for (size_t i = 0; i < ms.size(); ++i) {
      pack_pairs(depth, ms[i].cols, row_bits(ms[i], r0), w, /*pair_stride=*/64, /*group_stride=*/(depth + 1) / 2 * 64);
      const StepJob<bf16_t, float> job{g.cols, ms[i].cols, depth, a, /*lda=*/2, w, sums[i].data_ptr<float>(),
                                       ms[i].cols, Epilogue::kNone, nullptr, 0, /*accumulate=*/r0 > 0, nullptr,
                                       RowIndex{a_rows.data(), nullptr, nullptr}, /*a_pair_stride=*/64};
      run(job, /*single_thread=*/false);
    }
  }
  for (auto& sum : sums) sum = sum.to(at::kBFloat16);
  return sums;
}

at::Tensor column_sums(const at::Tensor& t) {
  const auto input = t.contiguous();
  const int64_t rows = input.size(0);
  const int64_t cols = input.size(1);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "rnn_ext_column_sums", [&] {
    // float and double sum in double (a float sum of thousands of rows in order would drift from
    // ATen's cascaded one), bfloat16 in float.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, float, double>;
    constexpr int64_t kCols = 64;  // a thread's columns at a time, summed side by side
    sums = at::empty({cols}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* data = input.data_ptr<scalar_t>();
    acc_t* out = sums.data_ptr<acc_t>();
    at::parallel_for(0, (cols + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j0 = begin * kCols; j0 < std::min(end * kCols, cols); j0 += kCols) {
        const int64_t n = std::min(kCols, cols - j0);
        acc_t total[kCols] = {};
        // Chunks of rows summed on their own, then added up in order: an error that grows with
        // the chunk and the number of chunks, not with every row.
        for (int64_t r0 = 0; r0 < rows; r0 += kTransposedChunkRows) {
          acc_t chunk[kCols] = {};
          for (int64_t r = r0; r < std::min(r0 + kTransposedChunkRows, rows); ++r) {
            for (int64_t j = 0; j < n; ++j) chunk[j] += static_cast<acc_t>(data[r * cols + j0 + j]);
          }
          for (int64_t j = 0; j < n; ++j) total[j] += chunk[j];
        }
        for (int64_t j = 0; j < n; ++j) out[j0 + j] = total[j];
      }
    });
  });
  return sums.to(input.scalar_type());
}

template <typename scalar_t>
void dot_step(const DotJob<scalar_t>& job) {
  const IsaKernels<scalar_t>& k = kernels<scalar_t>();
  const int64_t blocks = (job.cols + 7) / 8;  // dot_columns splits at multiples of 8 columns
  if (blocks < 2 || job.rows * job.cols * (job.depth1 + job.depth2) < kParallelMinMacs) {
    k.dot_columns(job, 0, job.cols);
    return;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    k.dot_columns(job, begin * 8, std::min(end * 8, job.cols));
  });
}

template <typename scalar_t>
void dot_grad(const DotGradJob<scalar_t>& job) {
  const IsaKernels<scalar_t>& k = kernels<scalar_t>();
  if (job.rows * job.cols * (job.depth1 + job.depth2) < kParallelMinMacs) {
    k.dot_grad_pair(job, 0);
    k.dot_grad_pair(job, 1);
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t operand = begin; operand < end; ++operand) k.dot_grad_pair(job, operand);
  });
}

using c10::BFloat16;
template class PackedWeight<float>;
template class PackedWeight<double>;
template class PackedWeight<BFloat16>;
template void step<float, float>(int64_t, const float*, int64_t, const PackedColumns<float>&, float*, int64_t, Epilogue, const float*, int64_t, RowIndex, const float*, int64_t);
template void step<double, double>(int64_t, const double*, int64_t, const PackedColumns<double>&, double*, int64_t, Epilogue, const double*, int64_t, RowIndex, const double*, int64_t);
template void step<BFloat16, BFloat16>(int64_t, const BFloat16*, int64_t, const PackedColumns<BFloat16>&, BFloat16*, int64_t, Epilogue, const BFloat16*, int64_t, RowIndex, const BFloat16*, int64_t);
template void step<BFloat16, float>(int64_t, const BFloat16*, int64_t, const PackedColumns<BFloat16>&, float*, int64_t, Epilogue, const BFloat16*, int64_t, RowIndex, const float*, int64_t);
template void product<float>(int64_t, const float*, int64_t, const PackedWeight<float>&, float*, int64_t, const float*, RowIndex);
template void product<BFloat16>(int64_t, const BFloat16*, int64_t, const PackedWeight<BFloat16>&, BFloat16*, int64_t, const BFloat16*, RowIndex);
template void dot_step<float>(const DotJob<float>&);
template void dot_step<double>(const DotJob<double>&);
template void dot_grad<float>(const DotGradJob<float>&);
template void dot_grad<double>(const DotGradJob<double>&);
template void product<double>(int64_t, const double*, int64_t, const PackedWeight<double>&, double*, int64_t, const double*, RowIndex);

}  // namespace rnn_ext::cpu
