// The body of the per-ISA kernels. Included by one small .cpp per instruction set, after a
// `#pragma GCC target(...)`, with these defined:
//   RNN_EXT_VECTOR_BYTES  16, 32 or 64      RNN_EXT_ISA_NAME  avx512, avx2 or baseline
//   RNN_EXT_TILE_ROWS     rows of C per tile RNN_EXT_MAX_ACC   vector accumulators a tile may use
// Everything here has internal linkage, so no function compiled for a wider ISA can be picked by
// the linker for another translation unit.
//
// Vectors are GCC vector extensions of RNN_EXT_VECTOR_BYTES: a tile's accumulators are named
// vector values, which the compiler keeps in registers over the whole K loop.
#include "kernels_isa.h"

namespace rnn_ext::cpu {
namespace {

template <typename T>
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
template <typename T>
using vec = typename Vector<T>::type;
template <typename T>
constexpr int kLanes = RNN_EXT_VECTOR_BYTES / sizeof(T);

constexpr int kVectorsPerPanel = 2;
template <typename T>
constexpr int kPanelWidth = kVectorsPerPanel * kLanes<T>;
constexpr int kTileRows = RNN_EXT_TILE_ROWS;
constexpr int kMaxAcc = RNN_EXT_MAX_ACC;

#define RNN_EXT_INLINE inline __attribute__((always_inline))

template <typename T>
RNN_EXT_INLINE vec<T> load(const T* p) {
  vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
RNN_EXT_INLINE void store(T* p, vec<T> v) {
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

template <typename T>
RNN_EXT_INLINE vec<T> apply_epilogue(vec<T> c, Epilogue epilogue, const T* h) {
  switch (epilogue) {
    case Epilogue::kTanh:
      return tanh_vec(c);
    case Epilogue::kRelu:
      return c < T(0) ? vec<T>{} : c;  // NaN passes through, as in torch.relu
    case Epilogue::kTanhGrad: {
      const vec<T> y = load(h);
      return c * (T(1) - y * y);
    }
    case Epilogue::kReluGrad:
      return load(h) > T(0) ? c : vec<T>{};
    case Epilogue::kNone:
      break;
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Packing and the register-blocked tile.

template <typename T>
int64_t panels(int64_t N) {
  return (N + kPanelWidth<T> - 1) / kPanelWidth<T>;
}

template <typename T>
void pack(int64_t K, int64_t N, const T* W, int64_t ldw, T* packed) {
  constexpr int NR = kPanelWidth<T>;
  for (int64_t p = 0; p < panels<T>(N); ++p) {
    for (int64_t k = 0; k < K; ++k) {
      T* dst = packed + (p * K + k) * NR;
      for (int64_t j = 0; j < NR; ++j) {
        const int64_t n = p * NR + j;
        dst[j] = n < N ? W[k * ldw + n] : T(0);
      }
    }
  }
}

// Panels per tile: few rows leave registers free for several panels, which gives the FMA units
// enough independent accumulators.
template <typename T>
int64_t panels_per_tile(int64_t M) {
  const int64_t rows = M < kTileRows ? M : kTileRows;
  const int64_t fit = kMaxAcc / (rows * kVectorsPerPanel);
  return fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
}

// ROWS x (G panels) of C = epilogue(start + A @ W) (start: StepJob); C, H and row point at the
// tile's first element (row: its first column; nullptr for a zero start).
template <typename T, int ROWS, int G>
RNN_EXT_INLINE void tile(
    const StepJob<T>& job, const T* A, const T* W, T* C, int64_t ldc, const T* H, int64_t ldh, const T* row) {
  constexpr int L = kLanes<T>;
  constexpr int NR = kPanelWidth<T>;
  constexpr int NV = G * kVectorsPerPanel;
  vec<T> acc[ROWS][NV];
  if (job.accumulate) {
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = load(C + i * ldc + v * L);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] = row != nullptr ? load(row + v * L) : vec<T>{};
#pragma GCC unroll 8
    for (int i = 1; i < ROWS; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[0][v];
  }
  if (A != nullptr) {
    const int64_t panel_stride = job.K * NR;
    for (int64_t k = 0; k < job.K; ++k) {
      vec<T> b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        b[v] = load(W + (v / kVectorsPerPanel) * panel_stride + k * NR + (v % kVectorsPerPanel) * L);
        asm("" : "+v"(b[v]));  // keep b in a register: reloading it for every row costs load bandwidth
      }
#pragma GCC unroll 8
      for (int i = 0; i < ROWS; ++i) {
        const T a = A[i * job.lda + k];  // scalar * vector broadcasts
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(C + i * ldc + v * L, apply_epilogue(acc[i][v], job.epilogue, H + i * ldh + v * L));
}

template <typename T, int G>
void tile_rows(
    int64_t rows, const StepJob<T>& job, const T* A, const T* W, T* C, int64_t ldc, const T* H, int64_t ldh,
    const T* row) {
#define RNN_EXT_TILE_CASE(R)                                                      \
  case R:                                                                         \
    if constexpr (R <= kTileRows && R * G * kVectorsPerPanel <= kMaxAcc) {    \
      tile<T, R, G>(job, A, W, C, ldc, H, ldh, row);                              \
      return;                                                                     \
    }                                                                             \
    break;
  switch (rows) {
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

// The last panel when N is not a multiple of the panel width: computed in a padded local copy.
// Same arguments as tile_rows.
template <typename T>
void partial_panel_tile(
    int64_t rows, const StepJob<T>& job, const T* A, const T* W, T* C, int64_t ldc, const T* H, int64_t ldh,
    const T* row) {
  constexpr int NR = kPanelWidth<T>;
  const int64_t cols = job.N % NR;
  T c_local[kTileRows * NR] = {};
  T h_local[kTileRows * NR] = {};
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      c_local[i * NR + j] = job.accumulate ? C[i * ldc + j] : row != nullptr ? row[j] : T(0);
      h_local[i * NR + j] = H != nullptr ? H[i * ldh + j] : T(0);
    }
  }
  StepJob<T> padded = job;  // the start is in c_local now
  padded.accumulate = true;
  tile_rows<T, 1>(rows, padded, A, W, c_local, NR, h_local, NR, nullptr);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) C[i * ldc + j] = c_local[i * NR + j];
  }
}

template <typename T>
int64_t num_tiles(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  const int64_t row_blocks = (M + kTileRows - 1) / kTileRows;
  const int64_t g = panels_per_tile<T>(M);
  return row_blocks * ((panels<T>(N) + g - 1) / g);
}

template <typename T>
void run_tiles(const StepJob<T>& job, int64_t begin, int64_t end) {
  constexpr int NR = kPanelWidth<T>;
  const int64_t P = panels<T>(job.N);
  const int64_t g = panels_per_tile<T>(job.M);
  const int64_t row_blocks = (job.M + kTileRows - 1) / kTileRows;
  // Consecutive tiles share a panel group (and walk down the rows), so a panel is read from
  // memory once and then served from cache to every row block.
  for (int64_t index = begin; index < end; ++index) {
    const int64_t r0 = (index % row_blocks) * kTileRows;
    const int64_t rows = job.M - r0 < kTileRows ? job.M - r0 : kTileRows;
    const T* A = job.A != nullptr ? job.A + r0 * job.lda : nullptr;
    int64_t p = (index / row_blocks) * g;
    const int64_t p_end = p + g < P ? p + g : P;
    // The tile of panel `panel` (and the next G - 1) on this row block, by tile_rows<T, G>.
    const auto at = [&](int64_t panel, auto tile_fn) {
      const int64_t n0 = panel * NR;
      const T* H = job.H != nullptr ? job.H + r0 * job.ldh + n0 : nullptr;
      const T* row = job.row != nullptr ? job.row + n0 : nullptr;
      tile_fn(rows, job, A, job.W + panel * job.K * NR, job.C + r0 * job.ldc + n0, job.ldc, H, job.ldh, row);
    };
    // Whole panels, 4, 2 or 1 at a time; the ragged last panel on its own.
    const int64_t whole_end = job.N % NR == 0 ? p_end : (p_end == P ? P - 1 : p_end);
    for (; p + 4 <= whole_end && g >= 4; p += 4) at(p, tile_rows<T, 4>);
    for (; p + 2 <= whole_end && g >= 2; p += 2) at(p, tile_rows<T, 2>);
    for (; p < whole_end; ++p) at(p, tile_rows<T, 1>);
    if (p < p_end) at(p, partial_panel_tile<T>);
  }
}

template <typename T>
IsaKernels<T> kernels() {
  return {kPanelWidth<T>, &pack<T>, &num_tiles<T>, &run_tiles<T>};
}

}  // namespace

#define RNN_EXT_CONCAT_(a, b) a##b
#define RNN_EXT_CONCAT(a, b) RNN_EXT_CONCAT_(a, b)
IsaKernels<float> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_f32)() { return kernels<float>(); }
IsaKernels<double> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_f64)() { return kernels<double>(); }

}  // namespace rnn_ext::cpu
