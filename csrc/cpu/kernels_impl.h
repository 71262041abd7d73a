// The body of the per-ISA kernels. Included by one small .cpp per instruction set, after a
// `#pragma GCC target(...)`, with these defined:
//   RNN_EXT_VECTOR_BYTES  16, 32 or 64      RNN_EXT_ISA_NAME  avx512_bf16, avx512, avx2 or baseline
//   RNN_EXT_TILE_ROWS     rows of C per tile RNN_EXT_MAX_ACC   vector accumulators a tile may use
//   RNN_EXT_BF16          (avx512_bf16 only, with <immintrin.h> included) also the bfloat16 kernels
// Everything here has internal linkage, so no function compiled for a wider ISA can be picked by
// the linker for another translation unit.
//
// Vectors are GCC vector extensions of RNN_EXT_VECTOR_BYTES: a tile's accumulators are named
// vector values, which the compiler keeps in registers over the whole depth loop.
//
// GEMM dimensions are named rows x depth times depth x cols (not the shape legend's letters).
#include "kernels_isa.h"

#include <vector>

namespace rnn_ext::cpu {
namespace {

template <typename scalar_t>
struct Vector;
template <>
struct Vector<float> {
  typedef float type __attribute__((vector_size(RNN_EXT_VECTOR_BYTES)));
  typedef int32_t bits __attribute__((vector_size(RNN_EXT_VECTOR_BYTES)));
};
template <>
struct Vector<double> {
  typedef double type __attribute__((vector_size(RNN_EXT_VECTOR_BYTES)));
  typedef int64_t bits __attribute__((vector_size(RNN_EXT_VECTOR_BYTES)));
};
template <typename scalar_t>
using vec = typename Vector<scalar_t>::type;
template <typename scalar_t>
constexpr int kLanes = RNN_EXT_VECTOR_BYTES / sizeof(scalar_t);

constexpr int kVectorsPerPanel = 2;
template <typename scalar_t>
constexpr int kPanelWidth = kVectorsPerPanel * kLanes<scalar_t>;
constexpr int kTileRows = RNN_EXT_TILE_ROWS;
constexpr int kMaxAcc = RNN_EXT_MAX_ACC;

#define RNN_EXT_INLINE inline __attribute__((always_inline))
#define RNN_EXT_INLINE_LAMBDA __attribute__((always_inline))

template <typename scalar_t>
RNN_EXT_INLINE vec<scalar_t> load(const scalar_t* p) {
  vec<scalar_t> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
RNN_EXT_INLINE void store(scalar_t* p, vec<scalar_t> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// ---------------------------------------------------------------------------------------------
// Activations and their derivatives, on vectors.

// tanh of a vector of floats, agreeing with std::tanh to about 2 ulp:
//   |x| < 0.55: the odd Taylor series, which needs no subtraction of nearly equal numbers;
//   otherwise 1 - 2 / (e^{2|x|} + 1) with e^{2|x|} = 2^n * 2^f, n integer, |f| <= 1/2.
// tanh(9) rounds to 1 in float, so clamping |x| there keeps 2^n finite and changes nothing.
RNN_EXT_INLINE vec<float> tanh_vec(vec<float> x) {
  using V = vec<float>;
  using Bits = Vector<float>::bits;
  const Bits sign_mask = Bits{} + int32_t(0x80000000u);
  const Bits x_bits = reinterpret_cast<Bits>(x);
  const V a = reinterpret_cast<V>(x_bits & ~sign_mask);

  const V z = x * x;
  V series = V{} + 6404582.0f / 10854718875.0f;
  series = series * z - 929569.0f / 638512875.0f;
  series = series * z + 21844.0f / 6081075.0f;
  series = series * z - 1382.0f / 155925.0f;
  series = series * z + 62.0f / 2835.0f;
  series = series * z - 17.0f / 315.0f;
  series = series * z + 2.0f / 15.0f;
  series = series * z - 1.0f / 3.0f;
  const V small = a + a * z * series;

  const V clamped = a < 9.0f ? a : V{} + 9.0f;  // NaN becomes 9 here, but takes the NaN path below
  const V t = clamped * 2.88539008177792681f;    // 2 / ln 2
  const V round_shift = V{} + 12582912.0f;       // 1.5 * 2^23: adding it rounds t (< 2^22) to an integer
  const V n = (t + round_shift) - round_shift;
  const V f = (t - n) * 0.693147180559945309f;  // ln 2
  V p = V{} + 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const Bits exponent = (__builtin_convertvector(n, Bits) + 127) << 23;
  const V e = p * reinterpret_cast<V>(exponent);
  const V large = 1.0f - 2.0f / (e + 1.0f);

  V r = a < 0.55f ? small : large;
  r = a != a ? x : r;  // NaN in, NaN out
  return reinterpret_cast<V>(reinterpret_cast<Bits>(r) | (x_bits & sign_mask));
}

RNN_EXT_INLINE vec<double> tanh_vec(vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = __builtin_tanh(x[i]);
  return x;
}

// load_y() gives the vector of the step's outputs that the gradient epilogues read.
template <typename scalar_t, typename LoadY>
RNN_EXT_INLINE vec<scalar_t> apply_epilogue(vec<scalar_t> c, Epilogue epilogue, LoadY&& load_y) {
  switch (epilogue) {
    case Epilogue::kTanh:
      return tanh_vec(c);
    case Epilogue::kRelu:
      return c < scalar_t(0) ? vec<scalar_t>{} : c;  // NaN passes through, as in torch.relu
    case Epilogue::kTanhGrad: {
      const vec<scalar_t> y = load_y();
      return c * (scalar_t(1) - y * y);
    }
    case Epilogue::kReluGrad:
      return load_y() > scalar_t(0) ? c : vec<scalar_t>{};
    case Epilogue::kNone:
      break;
  }
  return c;
}

template <typename scalar_t>
RNN_EXT_INLINE vec<scalar_t> apply_epilogue(vec<scalar_t> c, Epilogue epilogue, const scalar_t* h) {
  return apply_epilogue<scalar_t>(c, epilogue, [h] { return load(h); });
}

// ---------------------------------------------------------------------------------------------
// Packing and the register-blocked tile.

template <typename scalar_t>
int64_t panels(int64_t cols) {
  return (cols + kPanelWidth<scalar_t> - 1) / kPanelWidth<scalar_t>;
}

template <typename scalar_t>
int64_t packed_size(int64_t depth, int64_t cols) {
  return panels<scalar_t>(cols) * depth * kPanelWidth<scalar_t>;
}

// Calls copy(depth_index k, column j of the panel, W[k, p * width + j]) for every element of panel
// p, reading W along its contiguous dimension (a row-major W row by row, a transposed one column
// by column); columns past cols are left alone.
template <int width, typename value_t, typename F>
RNN_EXT_INLINE void for_panel_elements(
    int64_t p, int64_t depth, int64_t cols, const value_t* W, int64_t stride_k, int64_t stride_j, F&& copy) {
  const int64_t col0 = p * width;
  const int64_t n = cols - col0 < width ? cols - col0 : width;
  if (stride_j == 1) {
    for (int64_t k = 0; k < depth; ++k)
      for (int64_t j = 0; j < n; ++j) copy(k, j, W[k * stride_k + col0 + j]);
  } else {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < depth; ++k) copy(k, j, W[(col0 + j) * stride_j + k * stride_k]);
  }
}

template <typename scalar_t>
void pack(int64_t depth, int64_t cols, const scalar_t* W, int64_t stride_k, int64_t stride_j, scalar_t* packed) {
  constexpr int width = kPanelWidth<scalar_t>;
  for (int64_t i = 0; i < packed_size<scalar_t>(depth, cols); ++i) packed[i] = scalar_t(0);
  for (int64_t p = 0; p < panels<scalar_t>(cols); ++p) {
    scalar_t* panel = packed + p * depth * width;
    for_panel_elements<width>(p, depth, cols, W, stride_k, stride_j,
                              [&](int64_t k, int64_t j, scalar_t w) { panel[k * width + j] = w; });
  }
}

// Panels per tile: few rows leave registers free for several panels, which gives the FMA units
// enough independent accumulators.
template <typename scalar_t>
int64_t panels_per_tile(int64_t job_rows) {
  const int64_t rows = job_rows < kTileRows ? job_rows : kTileRows;
  const int64_t fit = kMaxAcc / (rows * kVectorsPerPanel);
  return fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
}

// The rows of one row block: a[i], c[i], y[i] and start[i] point at row i of A (nullptr: no
// product), C, y (nullptr: the epilogue reads no y) and the start, at column 0.
template <typename scalar_t, typename c_t = scalar_t>
struct TileRows {
  const scalar_t* a[kTileRows];
  c_t* c[kTileRows];
  const scalar_t* y[kTileRows];
  const c_t* start[kTileRows];
};

// The order of a job's tiles: tiles go down a band of row blocks with one panel group, then the
// band's next group, and so on, then the next band: a band of A (about kBandBytes) stays in L2
// while every panel of W passes by, and a panel stays in cache while it serves the band's row
// blocks. (Tall products, the input projection and grad_input, would otherwise re-read all of A
// from memory for every panel.)
struct TilePosition {
  int64_t row_block, panel;
  int64_t band_start;  // the band's first row block
};
constexpr int64_t kBandBytes = int64_t{256} << 10;

class TileOrder {
 public:
  TileOrder(int64_t rows, int64_t depth, int64_t element_bytes, int64_t groups, int64_t group_panels)
      : row_blocks_((rows + kTileRows - 1) / kTileRows), groups_(groups), group_panels_(group_panels) {
    const int64_t block_bytes = kTileRows * (depth > 0 ? depth : 1) * element_bytes;
    band_ = kBandBytes / block_bytes > 1 ? kBandBytes / block_bytes : 1;  // row blocks per band
  }

  // Where tile `index` lies.
  TilePosition at(int64_t index) const {
    const int64_t start = index / (band_ * groups_) * band_;
    const int64_t within = index - start * groups_;
    const int64_t blocks = band_blocks(start);
    return {start + within % blocks, within / blocks * group_panels_, start};
  }

  // Where the tile after the one at `now` lies: at(index + 1) without its divisions, which cost
  // as much as a few hundred multiply-adds of a small tile.
  RNN_EXT_INLINE TilePosition next(const TilePosition& now) const {
    if (now.row_block + 1 < now.band_start + band_blocks(now.band_start)) {
      return {now.row_block + 1, now.panel, now.band_start};
    }
    if (now.panel + group_panels_ < groups_ * group_panels_) return {now.band_start, now.panel + group_panels_, now.band_start};
    return {now.band_start + band_, 0, now.band_start + band_};
  }

 private:
  int64_t band_blocks(int64_t start) const { return row_blocks_ - start < band_ ? row_blocks_ - start : band_; }
  int64_t row_blocks_, groups_, group_panels_, band_;
};

// The rows of row block `which` of a job, into block; returns how many there are.
template <typename scalar_t, typename c_t>
int64_t row_block(const StepJob<scalar_t, c_t>& job, int64_t which, TileRows<scalar_t, c_t>& block) {
  const int64_t r0 = which * kTileRows;
  const int64_t count = job.rows - r0 < kTileRows ? job.rows - r0 : kTileRows;
  const RowIndex& at = job.index;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = r0 + i;
    block.a[i] = job.A != nullptr ? job.A + (at.a != nullptr ? at.a[r] : r) * job.lda : nullptr;
    block.c[i] = job.C + (at.c != nullptr ? at.c[r] : r) * job.ldc;
    block.y[i] = job.y != nullptr ? job.y + (at.y != nullptr ? at.y[r] : r) * job.ldy : nullptr;
    block.start[i] = job.start != nullptr ? job.start + (at.y != nullptr ? at.y[r] : r) * job.ld_start : block.c[i];
  }
  return count;
}

// Prefetches the start and y (when the job has one) a tile of `cols` columns from col0 on reads
// first, in each of the count rows of block: issued for the next tile while one runs, these rows
// (a step's start, written long before, e.g. the input projection) arrive from memory in the
// meantime instead of stalling the tile's first loads.
template <typename scalar_t, typename c_t>
RNN_EXT_INLINE void prefetch_tile_rows(const TileRows<scalar_t, c_t>& block, int64_t count, int64_t col0, int64_t cols) {
  const auto prefetch = [](const void* p, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(static_cast<const char*>(p) + offset);
  };
  for (int64_t i = 0; i < count; ++i) {
    prefetch(block.start[i] + col0, cols * static_cast<int64_t>(sizeof(c_t)));
    if (block.y[i] != nullptr) prefetch(block.y[i] + col0, cols * static_cast<int64_t>(sizeof(scalar_t)));
  }
}

// ROWS x (G panels) of C = epilogue(start + A @ W) (start: StepJob), the tile's columns from col0
// on; row points at the tile's first column of the start row (nullptr for a zero start).
template <typename scalar_t, int ROWS, int G>
RNN_EXT_INLINE void tile(
    const StepJob<scalar_t>& job, const TileRows<scalar_t>& rows, int64_t col0, const scalar_t* W, const scalar_t* row) {
  constexpr int lanes = kLanes<scalar_t>;
  constexpr int width = kPanelWidth<scalar_t>;
  constexpr int vectors = G * kVectorsPerPanel;
  vec<scalar_t> acc[ROWS][vectors];
  if (job.accumulate) {
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) acc[i][v] = load(rows.start[i] + col0 + v * lanes);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) acc[0][v] = row != nullptr ? load(row + v * lanes) : vec<scalar_t>{};
#pragma GCC unroll 8
    for (int i = 1; i < ROWS; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) acc[i][v] = acc[0][v];
  }
  if (rows.a[0] != nullptr) {
    const int64_t panel_stride = job.depth * width;
    for (int64_t k = 0; k < job.depth; ++k) {
      vec<scalar_t> b[vectors];
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) {
        b[v] = load(W + (v / kVectorsPerPanel) * panel_stride + k * width + (v % kVectorsPerPanel) * lanes);
        asm("" : "+v"(b[v]));  // keep b in a register: reloading it for every row costs load bandwidth
      }
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; ++i) {
        const scalar_t a = rows.a[i][k];  // scalar * vector broadcasts
#pragma GCC unroll 8
        for (int v = 0; v < vectors; ++v) acc[i][v] += a * b[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      const scalar_t* y = rows.y[i] != nullptr ? rows.y[i] + col0 + v * lanes : nullptr;
      store(rows.c[i] + col0 + v * lanes, apply_epilogue(acc[i][v], job.epilogue, y));
    }
}

template <typename scalar_t, int G>
void tile_rows(
    int64_t count, const StepJob<scalar_t>& job, const TileRows<scalar_t>& rows, int64_t col0, const scalar_t* W,
    const scalar_t* row) {
#define RNN_EXT_TILE_CASE(R)                                                      \
  case R:                                                                         \
    if constexpr (R <= kTileRows && R * G * kVectorsPerPanel <= kMaxAcc) {    \
      tile<scalar_t, R, G>(job, rows, col0, W, row);                             \
      return;                                                                     \
    }                                                                             \
    break;
  switch (count) {
    RNN_EXT_TILE_CASE(1)
    RNN_EXT_TILE_CASE(2)
    RNN_EXT_TILE_CASE(3)
    RNN_EXT_TILE_CASE(4)
    RNN_EXT_TILE_CASE(5)
    RNN_EXT_TILE_CASE(6)
    RNN_EXT_TILE_CASE(7)
    RNN_EXT_TILE_CASE(8)
  }
#undef RNN_EXT_TILE_CASE
  __builtin_trap();  // unreachable: rows <= kTileRows <= 8 and G fits by construction
}

// The last panel when cols is not a multiple of the panel width: computed in a padded local copy.
// Same arguments as tile_rows.
template <typename scalar_t>
void partial_panel_tile(
    int64_t count, const StepJob<scalar_t>& job, const TileRows<scalar_t>& rows, int64_t col0, const scalar_t* W,
    const scalar_t* row) {
  constexpr int width = kPanelWidth<scalar_t>;
  const int64_t cols = job.cols % width;
  scalar_t c_local[kTileRows * width] = {};
  scalar_t y_local[kTileRows * width] = {};
  TileRows<scalar_t> local = rows;
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      c_local[i * width + j] = job.accumulate ? rows.start[i][col0 + j] : row != nullptr ? row[j] : scalar_t(0);
      y_local[i * width + j] = rows.y[i] != nullptr ? rows.y[i][col0 + j] : scalar_t(0);
    }
    local.c[i] = c_local + i * width;
    local.start[i] = local.c[i];
    local.y[i] = y_local + i * width;
  }
  StepJob<scalar_t> padded = job;  // the start is in c_local now
  padded.accumulate = true;
  tile_rows<scalar_t, 1>(count, padded, local, 0, W, nullptr);
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t j = 0; j < cols; ++j) rows.c[i][col0 + j] = c_local[i * width + j];
  }
}

// Tiles of a job of `rows` rows and `panel_count` column panels, g panels per tile.
int64_t tile_count(int64_t rows, int64_t panel_count, int64_t g) {
  if (rows <= 0 || panel_count <= 0) return 0;
  return (rows + kTileRows - 1) / kTileRows * ((panel_count + g - 1) / g);
}

template <typename scalar_t>
int64_t num_tiles(int64_t rows, int64_t cols) {
  return tile_count(rows, panels<scalar_t>(cols), panels_per_tile<scalar_t>(rows));
}

// Calls body(count, block, first panel, end panel) for tiles [begin, end) of a job whose tiles
// hold g panels of `width` columns (TileOrder's order): block holds the tile's count rows.
// Before each tile, the next tile's rows are found, and its start and y rows prefetched.
template <typename scalar_t, typename c_t, typename F>
RNN_EXT_INLINE void for_each_tile(
    const StepJob<scalar_t, c_t>& job, int64_t begin, int64_t end, int64_t width, int64_t g, F&& body) {
  const int64_t panel_count = (job.cols + width - 1) / width;
  const int64_t groups = (panel_count + g - 1) / g;
  const TileOrder order(job.rows, job.depth, sizeof(scalar_t), groups, g);
  TilePosition tile_at = order.at(begin);
  TileRows<scalar_t, c_t> block, next_block;  // a row block's rows, at column 0 (the first count of each)
  int64_t count = row_block(job, tile_at.row_block, block);
  for (int64_t index = begin; index < end; ++index) {
    const int64_t p = tile_at.panel;
    const int64_t p_end = p + g < panel_count ? p + g : panel_count;
    int64_t next_count = 0;
    if (index + 1 < end) {
      tile_at = order.next(tile_at);
      next_count = row_block(job, tile_at.row_block, next_block);
      const int64_t col0 = tile_at.panel * width;
      prefetch_tile_rows(next_block, next_count, col0, job.cols - col0 < g * width ? job.cols - col0 : g * width);
    }
    body(count, block, p, p_end);
    block = next_block;
    count = next_count;
  }
}

template <typename scalar_t>
void run_tiles(const StepJob<scalar_t>& job, int64_t begin, int64_t end) {
  constexpr int width = kPanelWidth<scalar_t>;
  const int64_t panel_count = panels<scalar_t>(job.cols);
  const int64_t g = panels_per_tile<scalar_t>(job.rows);
  for_each_tile(job, begin, end, width, g, [&](int64_t count, const TileRows<scalar_t>& block, int64_t p, int64_t p_end) {
    // The tile of panel `panel` (and the next G - 1) on this row block, by tile_rows<scalar_t, G>.
    const auto run_tile = [&](int64_t panel, auto tile_fn) {
      const int64_t col0 = panel * width;
      const scalar_t* row = job.row != nullptr ? job.row + col0 : nullptr;
      tile_fn(count, job, block, col0, job.W + panel * job.depth * width, row);
    };
    // Whole panels, 4, 2 or 1 at a time; the ragged last panel on its own.
    const int64_t whole_end = job.cols % width == 0 ? p_end : (p_end == panel_count ? panel_count - 1 : p_end);
    for (; p + 4 <= whole_end && g >= 4; p += 4) run_tile(p, tile_rows<scalar_t, 4>);
    for (; p + 2 <= whole_end && g >= 2; p += 2) run_tile(p, tile_rows<scalar_t, 2>);
    for (; p < whole_end; ++p) run_tile(p, tile_rows<scalar_t, 1>);
    if (p < p_end) run_tile(p, partial_panel_tile<scalar_t>);
  });
}

// ---------------------------------------------------------------------------------------------
// The unpacked step (DotJob): dot products along the weights' rows.

template <typename scalar_t>
RNN_EXT_INLINE scalar_t sum_lanes(vec<scalar_t> v) {
  scalar_t s[kLanes<scalar_t>];
  __builtin_memcpy(s, &v, sizeof(v));
#pragma GCC unroll 8
  for (int width = kLanes<scalar_t> / 2; width > 0; width /= 2)
#pragma GCC unroll 8
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}

// sums[i][c] += (row i of a) . (row c of w), both of length depth, for ROWS x COLS pairs at once:
// each vector of a serves COLS products and each vector of w serves ROWS.
template <typename scalar_t, int ROWS, int COLS>
RNN_EXT_INLINE void add_dots(
    const scalar_t* a, int64_t lda, const scalar_t* w, int64_t depth, scalar_t (&sums)[ROWS][COLS]) {
  constexpr int lanes = kLanes<scalar_t>;
  vec<scalar_t> acc[ROWS][COLS];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < COLS; ++c) acc[i][c] = vec<scalar_t>{};
  int64_t k = 0;
  for (; k + lanes <= depth; k += lanes) {
    vec<scalar_t> x[ROWS];
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) x[i] = load(a + i * lda + k);
#pragma GCC unroll 8
    for (int c = 0; c < COLS; ++c) {
      const vec<scalar_t> wv = load(w + c * depth + k);
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; ++i) acc[i][c] += x[i] * wv;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
    for (int c = 0; c < COLS; ++c) {
      scalar_t s = sum_lanes<scalar_t>(acc[i][c]);
      for (int64_t tail = k; tail < depth; ++tail) s += a[i * lda + tail] * w[c * depth + tail];
      sums[i][c] += s;
    }
}

// Rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of a DotJob, before the epilogue.
template <typename scalar_t, int ROWS, int COLS>
void dot_block(const DotJob<scalar_t>& job, int64_t r0, int64_t c0) {
  scalar_t sums[ROWS][COLS];
  for (int c = 0; c < COLS; ++c) {
    const scalar_t bias = (job.bias1 != nullptr ? job.bias1[c0 + c] : scalar_t(0)) +
        (job.bias2 != nullptr ? job.bias2[c0 + c] : scalar_t(0));
    for (int i = 0; i < ROWS; ++i) sums[i][c] = bias;
  }
  add_dots<scalar_t, ROWS, COLS>(job.a1 + r0 * job.lda1, job.lda1, job.w1 + c0 * job.depth1, job.depth1, sums);
  add_dots<scalar_t, ROWS, COLS>(job.a2 + r0 * job.lda2, job.lda2, job.w2 + c0 * job.depth2, job.depth2, sums);
  for (int i = 0; i < ROWS; ++i)
    for (int c = 0; c < COLS; ++c) job.C[(r0 + i) * job.ldc + c0 + c] = sums[i][c];
}

// c[0, cols) = epilogue(c[0, cols)), for the epilogues that read no y.
template <typename scalar_t>
void activate(scalar_t* c, int64_t cols, Epilogue epilogue) {
  constexpr int lanes = kLanes<scalar_t>;
  if (epilogue == Epilogue::kNone) return;
  int64_t j = 0;
  for (; j + lanes <= cols; j += lanes) store(c + j, apply_epilogue(load(c + j), epilogue, static_cast<const scalar_t*>(nullptr)));
  if (j < cols) {  // the ragged end, through a padded copy
    scalar_t local[lanes] = {};
    for (int64_t i = j; i < cols; ++i) local[i - j] = c[i];
    store(local, apply_epilogue(load(local), epilogue, static_cast<const scalar_t*>(nullptr)));
    for (int64_t i = j; i < cols; ++i) c[i] = local[i - j];
  }
}

template <typename scalar_t>
void dot_columns(const DotJob<scalar_t>& job, int64_t begin, int64_t end) {
  // Blocks of 8 columns: their 8 rows of w stay in L1 while every row of a passes by.
  int64_t c0 = begin;
  for (; c0 + 8 <= end; c0 += 8) {
    int64_t r = 0;
    for (; r + 2 <= job.rows; r += 2) {
      dot_block<scalar_t, 2, 4>(job, r, c0);
      dot_block<scalar_t, 2, 4>(job, r, c0 + 4);
    }
    if (r < job.rows) dot_block<scalar_t, 1, 8>(job, r, c0);
  }
  for (; c0 < end; ++c0)
    for (int64_t r = 0; r < job.rows; ++r) dot_block<scalar_t, 1, 1>(job, r, c0);
  for (int64_t r = 0; r < job.rows; ++r) activate(job.C + r * job.ldc + begin, end - begin, job.epilogue);
}

// y[0, n) = (add ? y : 0) + a * x[0, n)
template <typename scalar_t>
RNN_EXT_INLINE void scaled_row(scalar_t* y, scalar_t a, const scalar_t* x, int64_t n, bool add) {
  constexpr int lanes = kLanes<scalar_t>;
  const vec<scalar_t> scale = vec<scalar_t>{} + a;
  int64_t k = 0;
  if (add) {
    for (; k + lanes <= n; k += lanes) store(y + k, load(y + k) + scale * load(x + k));
    for (; k < n; ++k) y[k] += a * x[k];
  } else {
    for (; k + lanes <= n; k += lanes) store(y + k, scale * load(x + k));
    for (; k < n; ++k) y[k] = a * x[k];
  }
}

// out[k0, k0 + V * lanes) = sum over j < cols of g[j] * w row j's same columns (w rows depth
// apart): V column vectors of grad_a = g @ w, accumulated in registers over w's rows.
template <typename scalar_t, int V>
RNN_EXT_INLINE void row_combination_block(
    const scalar_t* g, int64_t cols, const scalar_t* w, int64_t depth, int64_t k0, scalar_t* out) {
  constexpr int lanes = kLanes<scalar_t>;
  vec<scalar_t> acc[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) acc[v] = vec<scalar_t>{};
  for (int64_t j = 0; j < cols; ++j) {
    const vec<scalar_t> scale = vec<scalar_t>{} + g[j];
    const scalar_t* row = w + j * depth + k0;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[v] += scale * load(row + v * lanes);
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) store(out + k0 + v * lanes, acc[v]);
}

// out[0, depth) = g[0, cols) @ w [cols, depth].
template <typename scalar_t>
void row_combination(const scalar_t* g, int64_t cols, const scalar_t* w, int64_t depth, scalar_t* out) {
  constexpr int lanes = kLanes<scalar_t>;
  int64_t k = 0;
  for (; k + 8 * lanes <= depth; k += 8 * lanes) row_combination_block<scalar_t, 8>(g, cols, w, depth, k, out);
  for (; k + lanes <= depth; k += lanes) row_combination_block<scalar_t, 1>(g, cols, w, depth, k, out);
  for (; k < depth; ++k) {
    scalar_t sum = 0;
    for (int64_t j = 0; j < cols; ++j) sum += g[j] * w[j * depth + k];
    out[k] = sum;
  }
}

// One operand pair (a, W) of a DotGradJob: grad_a = grad_z @ W, row by row, then grad_w row j =
// sum over b of grad_z[b, j] * a row b, written once.
template <typename scalar_t>
void dot_grad_operand(
    int64_t rows, int64_t cols, const scalar_t* grad_z, const scalar_t* a, int64_t depth, const scalar_t* w,
    scalar_t* grad_a, scalar_t* grad_w) {
  if (grad_a != nullptr) {
    for (int64_t b = 0; b < rows; ++b) row_combination(grad_z + b * cols, cols, w, depth, grad_a + b * depth);
  }
  if (grad_w != nullptr) {
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t b = 0; b < rows; ++b) scaled_row(grad_w + j * depth, grad_z[b * cols + j], a + b * depth, depth, b > 0);
  }
}

template <typename scalar_t>
void dot_grad_pair(const DotGradJob<scalar_t>& job, int64_t operand) {
  if (operand == 0) {
    dot_grad_operand(job.rows, job.cols, job.grad_z, job.a1, job.depth1, job.w1, job.grad_a1, job.grad_w1);
  } else {
    dot_grad_operand(job.rows, job.cols, job.grad_z, job.a2, job.depth2, job.w2, job.grad_a2, job.grad_w2);
  }
}

#ifdef RNN_EXT_BF16
// ---------------------------------------------------------------------------------------------
// bfloat16 (AVX512_BF16): the float tile with depth taken in pairs. vdpbf16ps adds
// a[2j] * b[2j] + a[2j + 1] * b[2j + 1] into float lane j; with a the broadcast pair (A[r, 2q],
// A[r, 2q + 1]) and b 16 columns of W's packed pair q (IsaKernels<bf16_t>), lane j gains column
// j's two products. Sums stay in float over the whole depth; bfloat16 C and y are widened on load
// and C rounded to nearest even on store (vcvtneps2bf16). Both instructions treat float denormals
// (below 1.2e-38) as zero.
// Columns past cols are masked, so a ragged last panel needs no local copy.

constexpr int kBf16Lanes = 16;
constexpr int kBf16PanelWidth = kVectorsPerPanel * kBf16Lanes;
static_assert(kBf16PanelWidth == kPanelWidth<float>, "bf16 and float tiles share their column panels");

int64_t bf16_pairs(int64_t depth) { return (depth + 1) / 2; }

int64_t bf16_packed_size(int64_t depth, int64_t cols) {
  return panels<float>(cols) * bf16_pairs(depth) * 2 * kBf16PanelWidth;
}

// tanh for results rounded to bfloat16 (the bf16 kernels' epilogue): x P(x^2) / Q(x^2), a rational
// minimax fit on |x| <= 7.9 (past it tanh is 1 to within 3e-7), and x itself below 4e-4; within
// 5e-7 of tanh relatively, a ten-thousandth of bfloat16's rounding, at half tanh_vec's
// instructions and with no division.
RNN_EXT_INLINE vec<float> tanh_for_bf16(vec<float> x) {
  using V = vec<float>;
  constexpr float limit = 7.90531110763549805f;
  V c = x > limit ? V{} + limit : x;  // NaN compares false: it passes through
  c = c < -limit ? V{} - limit : c;
  const V z = c * c;
  V p = V{} - 2.76076847742355e-16f;
  p = p * z + 2.00018790482477e-13f;
  p = p * z - 8.60467152213735e-11f;
  p = p * z + 5.12229709037114e-08f;
  p = p * z + 1.48572235717979e-05f;
  p = p * z + 6.37261928875436e-04f;
  p = p * z + 4.89352455891786e-03f;
  V q = V{} + 1.19825839466702e-06f;
  q = q * z + 1.18534705686654e-04f;
  q = q * z + 2.26843463243900e-03f;
  q = q * z + 4.89352518554385e-03f;
  V inverse = _mm512_rcp14_ps(q);  // 1/q within 2^-14; one Newton step: to float's precision
  inverse = inverse * (2.0f - q * inverse);
  const V r = c * p * inverse;
  const V a = x < 0.0f ? -x : x;
  return a < 0.0004f ? x : r;
}

RNN_EXT_INLINE __m512 load_float(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
RNN_EXT_INLINE __m512 load_float(const bf16_t* p, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
RNN_EXT_INLINE void store_float(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
RNN_EXT_INLINE void store_float(bf16_t* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// A's pair (p[0], p[1]) in every lane; p[1] is not read when only one is left (single).
RNN_EXT_INLINE __m512bh broadcast_pair(const bf16_t* p, bool single) {
  uint32_t pair = p[0];
  if (!single) __builtin_memcpy(&pair, p, sizeof(pair));
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(pair)));
}

// ROWS x (G panels) of C = epilogue(start + A @ W) (start: StepJob), the tile's columns from col0
// on, of which the first `valid` are C's (the rest masked).
template <typename c_t, int ROWS, int G>
RNN_EXT_INLINE void bf16_tile(
    const StepJob<bf16_t, c_t>& job, const TileRows<bf16_t, c_t>& rows, int64_t col0, const bf16_t* W,
    int64_t valid) {
  constexpr int lanes = kBf16Lanes;
  constexpr int width = kBf16PanelWidth;
  constexpr int vectors = G * kVectorsPerPanel;
  __mmask16 mask[vectors];
#pragma GCC unroll 8
  for (int v = 0; v < vectors; ++v) {
    const int64_t left = valid - v * lanes;
    mask[v] = left >= lanes ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
  __m512 acc[ROWS][vectors];
  if (job.accumulate) {
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) acc[i][v] = load_float(rows.start[i] + col0 + v * lanes, mask[v]);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      acc[0][v] = job.row != nullptr ? load_float(job.row + col0 + v * lanes, mask[v]) : _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (int i = 1; i < ROWS; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) acc[i][v] = acc[0][v];
  }
  if (rows.a[0] != nullptr) {
    const int64_t panel_stride = bf16_pairs(job.depth) * 2 * width;
    // Adds pair q's products; single: only A's first value is left (an odd depth's last pair).
    const auto add_pair = [&](int64_t q, bool single) RNN_EXT_INLINE_LAMBDA {
      __m512bh b[vectors];
#pragma GCC unroll 8
      for (int v = 0; v < vectors; ++v) {
        b[v] = reinterpret_cast<__m512bh>(
            _mm512_loadu_si512(W + (v / kVectorsPerPanel) * panel_stride + q * 2 * width + (v % kVectorsPerPanel) * 2 * lanes));
        asm("" : "+v"(b[v]));  // keep b in a register, as in the float tile
      }
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; ++i) {
        const __m512bh a = broadcast_pair(rows.a[i] + q * job.a_pair_stride, single);
#pragma GCC unroll 8
        for (int v = 0; v < vectors; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
      }
    };
    const int64_t whole = job.depth / 2;
#pragma GCC unroll 2
    for (int64_t q = 0; q < whole; ++q) add_pair(q, false);
    if (job.depth % 2 != 0) add_pair(whole, true);
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < vectors; ++v) {
      const auto load_y = [&] { return load_float(rows.y[i] + col0 + v * lanes, mask[v]); };
      const __m512 c = job.epilogue == Epilogue::kTanh ? tanh_for_bf16(acc[i][v])
                                                        : apply_epilogue<float>(acc[i][v], job.epilogue, load_y);
      store_float(rows.c[i] + col0 + v * lanes, mask[v], c);
    }
}

template <typename c_t, int G>
void bf16_tile_rows(
    int64_t count, const StepJob<bf16_t, c_t>& job, const TileRows<bf16_t, c_t>& rows, int64_t col0, const bf16_t* W,
    int64_t valid) {
#define RNN_EXT_BF16_TILE_CASE(R)                                              \
  case R:                                                                      \
    if constexpr (R <= kTileRows && R * G * kVectorsPerPanel <= kMaxAcc &&     \
                  (R + 1) * G * kVectorsPerPanel + 1 <= 32) {                  \
      bf16_tile<c_t, R, G>(job, rows, col0, W, valid);                         \
      return;                                                                  \
    }                                                                          \
    break;
  switch (count) {
    RNN_EXT_BF16_TILE_CASE(1)
    RNN_EXT_BF16_TILE_CASE(2)
    RNN_EXT_BF16_TILE_CASE(3)
    RNN_EXT_BF16_TILE_CASE(4)
    RNN_EXT_BF16_TILE_CASE(5)
    RNN_EXT_BF16_TILE_CASE(6)
    RNN_EXT_BF16_TILE_CASE(7)
    RNN_EXT_BF16_TILE_CASE(8)
  }
#undef RNN_EXT_BF16_TILE_CASE
  __builtin_trap();  // unreachable, as in tile_rows
}

// Panels per tile, as panels_per_tile, but with a register for the broadcast pair of A as well as
// the tile's accumulators and W vectors (3 rows of 4 panels would spill).
int64_t bf16_panels_per_tile(int64_t job_rows) {
  const int64_t rows = job_rows < kTileRows ? job_rows : kTileRows;
  const auto fits = [&](int64_t g) { return (rows + 1) * g * kVectorsPerPanel + 1 <= 32 && rows * g * kVectorsPerPanel <= kMaxAcc; };
  return fits(4) ? 4 : fits(2) ? 2 : 1;
}

int64_t bf16_num_tiles(int64_t rows, int64_t cols) {
  return tile_count(rows, panels<float>(cols), bf16_panels_per_tile(rows));
}

// Tiles as bf16_num_tiles numbers them, in run_tiles' order.
template <typename c_t>
void bf16_run_tiles(const StepJob<bf16_t, c_t>& job, int64_t begin, int64_t end) {
  constexpr int width = kBf16PanelWidth;
  const int64_t g = bf16_panels_per_tile(job.rows);
  const int64_t panel_stride = bf16_pairs(job.depth) * 2 * width;
  for_each_tile(job, begin, end, width, g, [&](int64_t count, const TileRows<bf16_t, c_t>& block, int64_t p, int64_t p_end) {
    const auto run_tile = [&](int64_t panel, auto tile_fn) {
      tile_fn(count, job, block, panel * width, job.W + panel * panel_stride, job.cols - panel * width);
    };
    for (; p + 4 <= p_end && g >= 4; p += 4) run_tile(p, bf16_tile_rows<c_t, 4>);
    for (; p + 2 <= p_end && g >= 2; p += 2) run_tile(p, bf16_tile_rows<c_t, 2>);
    for (; p < p_end; ++p) run_tile(p, bf16_tile_rows<c_t, 1>);
  });
}

// IsaKernels<bf16_t>::pack_pairs: each 32-column group of a row pair interleaved by two permutes.
void pack_pairs_bf16(int64_t rows, int64_t cols, const bf16_t* const* row, bf16_t* dst, int64_t pair_stride,
                     int64_t group_stride, int64_t begin, int64_t end) {
  constexpr int group = 2 * kBf16Lanes;  // columns per group: 32 bfloat16, one 512-bit load per row
  alignas(64) int16_t low[group], high[group];  // lane 2c + h takes column c (c + 16) of row h
  for (int i = 0; i < group; ++i) {
    low[i] = static_cast<int16_t>(i / 2 + (i % 2) * group);
    high[i] = static_cast<int16_t>(low[i] + kBf16Lanes);
  }
  const __m512i low_index = _mm512_load_si512(low), high_index = _mm512_load_si512(high);
  for (int64_t q = begin; q < end; ++q) {
    const bf16_t* first = row[2 * q];
    const bf16_t* second = 2 * q + 1 < rows ? row[2 * q + 1] : nullptr;
    for (int64_t c0 = 0, p = 0; c0 < cols; c0 += group, ++p) {
      const int64_t left = cols - c0;
      const __mmask32 mask = left >= group ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      const __m512i a = _mm512_maskz_loadu_epi16(mask, first + c0);
      const __m512i b = second != nullptr ? _mm512_maskz_loadu_epi16(mask, second + c0) : _mm512_setzero_si512();
      bf16_t* out = dst + q * pair_stride + p * group_stride;
      _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, low_index, b));
      _mm512_storeu_si512(out + group, _mm512_permutex2var_epi16(a, high_index, b));
    }
  }
}

// pack for bfloat16. A row-major W (stride_j 1) goes a depth pair at a time through
// pack_pairs_bf16. In the transpose of one (stride_k 1), a column's pair is one 32-bit word of its
// row, copied whole.
void pack_bf16(int64_t depth, int64_t cols, const bf16_t* W, int64_t stride_k, int64_t stride_j, bf16_t* packed) {
  constexpr int width = kBf16PanelWidth;
  const int64_t pairs = bf16_pairs(depth);
  const int64_t panel_size = pairs * 2 * width;
  if (stride_j == 1) {
    std::vector<const bf16_t*> row(depth);
    for (int64_t k = 0; k < depth; ++k) row[k] = W + k * stride_k;
    pack_pairs_bf16(depth, cols, row.data(), packed, /*pair_stride=*/2 * width, /*group_stride=*/panel_size, 0, pairs);
    return;
  }
  const int64_t whole = depth / 2;
  for (int64_t p = 0; p < panels<float>(cols); ++p) {
    uint32_t* panel = reinterpret_cast<uint32_t*>(packed + p * panel_size);  // [pairs, width] lanes
    for (int64_t j = 0; j < width; ++j) {
      const int64_t col = p * width + j;
      if (col >= cols) {
        for (int64_t q = 0; q < pairs; ++q) panel[q * width + j] = 0;
        continue;
      }
      const bf16_t* column = W + col * stride_j;
      const auto lane = [](bf16_t low, bf16_t high) { return uint32_t{low} | uint32_t{high} << 16; };
      if (stride_k == 1) {
        for (int64_t q = 0; q < whole; ++q) __builtin_memcpy(panel + q * width + j, column + 2 * q, sizeof(uint32_t));
      } else {
        for (int64_t q = 0; q < whole; ++q) panel[q * width + j] = lane(column[2 * q * stride_k], column[(2 * q + 1) * stride_k]);
      }
      if (whole < pairs) panel[whole * width + j] = lane(column[2 * whole * stride_k], bf16_t(0));
    }
  }
}

IsaKernels<bf16_t> bf16_kernels() {
  return {kBf16PanelWidth, &bf16_packed_size, &pack_bf16, &bf16_num_tiles, &bf16_run_tiles<bf16_t>,
          &bf16_run_tiles<float>, &pack_pairs_bf16};
}
#endif  // RNN_EXT_BF16

template <typename scalar_t>
IsaKernels<scalar_t> kernels() {
  return {kPanelWidth<scalar_t>, &packed_size<scalar_t>, &pack<scalar_t>, &num_tiles<scalar_t>, &run_tiles<scalar_t>, &dot_columns<scalar_t>,
          &dot_grad_pair<scalar_t>};
}

}  // namespace

#define RNN_EXT_CONCAT_(a, b) a##b
#define RNN_EXT_CONCAT(a, b) RNN_EXT_CONCAT_(a, b)
IsaKernels<float> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_f32)() { return kernels<float>(); }
IsaKernels<double> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_f64)() { return kernels<double>(); }
#ifdef RNN_EXT_BF16
IsaKernels<bf16_t> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_bf16)() { return bf16_kernels(); }
#endif

}  // namespace rnn_ext::cpu
