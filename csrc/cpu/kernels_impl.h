// The body of the per-ISA kernels. Included by one small .cpp per instruction set, after a
// `#pragma GCC target(...)` and with RNN_EXT_VECTOR_BYTES (16, 32 or 64) and RNN_EXT_ISA_NAME
// defined. Everything here has internal linkage, so no function compiled for a wider ISA can be
// picked by the linker for another translation unit.
//
// Vectors are GCC vector extensions of RNN_EXT_VECTOR_BYTES: the accumulators of a GEMM tile are
// named vector values, which the compiler keeps in registers across the K loop.
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

template <typename T>
RNN_EXT_INLINE vec<T> splat(T x) {
  return vec<T>{} + x;
}

// ---------------------------------------------------------------------------------------------
// C += A @ B, register-blocked: an MR x (NV vectors) tile of C stays in registers over all of K.

template <typename T, int MR, int NV>
RNN_EXT_INLINE void gemm_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int L = kLanes<T>;
  vec<T> acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[i][j] = load(C + i * ldc + j * L);
  for (int64_t k = 0; k < K; ++k) {
    vec<T> b[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) b[j] = load(B + k * ldb + j * L);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * lda + k];  // scalar * vector broadcasts without an extra add
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) store(C + i * ldc + j * L, acc[i][j]);
}

// All M rows of one panel of NV vectors of columns.
template <typename T, int NV>
RNN_EXT_INLINE void gemm_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int MR = 4;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) gemm_tile<T, MR, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
  for (; m < M; ++m) gemm_tile<T, 1, NV>(K, A + m * lda, lda, B, ldb, C + m * ldc, ldc);
}

template <typename T>
void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int L = kLanes<T>;
  int64_t n = 0;
  if (M < 4) {
    // Few rows: a wide panel gives eight independent accumulators to hide the FMA latency.
    for (; n + 8 * L <= N; n += 8 * L) gemm_panel<T, 8>(M, K, A, lda, B + n, ldb, C + n, ldc);
  }
  for (; n + 2 * L <= N; n += 2 * L) gemm_panel<T, 2>(M, K, A, lda, B + n, ldb, C + n, ldc);
  for (; n + L <= N; n += L) gemm_panel<T, 1>(M, K, A, lda, B + n, ldb, C + n, ldc);
  for (; n < N; ++n) {  // the last N % L columns
    for (int64_t m = 0; m < M; ++m) {
      T sum = C[m * ldc + n];
      for (int64_t k = 0; k < K; ++k) sum += A[m * lda + k] * B[k * ldb + n];
      C[m * ldc + n] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Activations.

template <typename T>
RNN_EXT_INLINE vec<T> relu(vec<T> x) {
  return x < T(0) ? vec<T>{} : x;  // NaN passes through, as in torch.relu
}

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
  V series = splat(6404582.0f / 10854718875.0f);
  series = series * z - 929569.0f / 638512875.0f;
  series = series * z + 21844.0f / 6081075.0f;
  series = series * z - 1382.0f / 155925.0f;
  series = series * z + 62.0f / 2835.0f;
  series = series * z - 17.0f / 315.0f;
  series = series * z + 2.0f / 15.0f;
  series = series * z - 1.0f / 3.0f;
  const V small = a + a * z * series;

  const V clamped = a < 9.0f ? a : splat(9.0f);  // NaN becomes 9 here, but takes the NaN path below
  const V t = clamped * 2.88539008177792681f;  // 2 / ln 2
  const V round_shift = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds t (< 2^22) to an integer
  const V n = (t + round_shift) - round_shift;
  const V f = (t - n) * 0.693147180559945309f;  // ln 2
  V p = splat(1.0f / 5040.0f);
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

template <typename T>
RNN_EXT_INLINE T tanh_scalar(T x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    vec<float> v = splat(x);
    return tanh_vec(v)[0];
  } else {
    return __builtin_tanh(x);
  }
}

template <typename T>
void activate_rows(T* h, int64_t rows, int64_t H, int64_t ld, bool use_relu) {
  constexpr int L = kLanes<T>;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = h + r * ld;
    int64_t j = 0;
    if (use_relu) {
      for (; j + L <= H; j += L) store(row + j, relu<T>(load(row + j)));
      for (; j < H; ++j) row[j] = row[j] < T(0) ? T(0) : row[j];
    } else if constexpr (sizeof(T) == sizeof(float)) {
      for (; j + L <= H; j += L) store(row + j, tanh_vec(load(row + j)));
      for (; j < H; ++j) row[j] = tanh_scalar(row[j]);
    } else {
      for (; j < H; ++j) row[j] = __builtin_tanh(row[j]);
    }
  }
}

template <typename T>
void scale_by_activation_grad(T* grad, const T* h, int64_t rows, int64_t H, int64_t ld, bool use_relu) {
  constexpr int L = kLanes<T>;
  for (int64_t r = 0; r < rows; ++r) {
    T* g = grad + r * ld;
    const T* y = h + r * ld;
    int64_t j = 0;
    if (use_relu) {
      for (; j + L <= H; j += L) {
        const vec<T> yv = load(y + j);
        store(g + j, yv > T(0) ? load(g + j) : vec<T>{});
      }
      for (; j < H; ++j) g[j] = y[j] > T(0) ? g[j] : T(0);
    } else {
      for (; j + L <= H; j += L) {
        const vec<T> yv = load(y + j);
        store(g + j, load(g + j) * (T(1) - yv * yv));
      }
      for (; j < H; ++j) g[j] *= T(1) - y[j] * y[j];
    }
  }
}

template <typename T>
IsaKernels<T> kernels() {
  return {&gemm_acc<T>, &activate_rows<T>, &scale_by_activation_grad<T>};
}

}  // namespace

#define RNN_EXT_CONCAT_(a, b) a##b
#define RNN_EXT_CONCAT(a, b) RNN_EXT_CONCAT_(a, b)
IsaKernels<float> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_f32)() { return kernels<float>(); }
IsaKernels<double> RNN_EXT_CONCAT(RNN_EXT_ISA_NAME, _kernels_f64)() { return kernels<double>(); }

}  // namespace rnn_ext::cpu
